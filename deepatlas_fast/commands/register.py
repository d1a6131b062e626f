"""``deepatlas-fast register``: classic iterative registration (affine, then deformable) of two images."""

from __future__ import annotations

from ._common import _fail, _nifti_path, _option, _positive_float, _write_file, _write_json


def _labels_path_next_to(out: str) -> str:
    """The default moved-labels file next to the moved image: OUT.nii.gz -> OUT_labels.nii.gz."""
    stem, ext = (out[: -len(".nii.gz")], ".nii.gz") if out.endswith(".nii.gz") else (out[: -len(".nii")], ".nii")
    return f"{stem}_labels{ext}"


def run(args) -> int:
    import time

    from ..data.io import foreground_mask, load_labels, load_volume, save_like
    from ..pictures import overlay_png
    from ..register import affine_register, deformable_register, warp_image, warp_labels

    try:
        out = _nifti_path("-o/--out", args.out)
        if args.out_labels is not None and args.moving_labels is None:
            raise ValueError("--out-labels: only used with --moving-labels")
        out_labels = None
        if args.moving_labels is not None:
            out_labels = _nifti_path("--out-labels", args.out_labels or _labels_path_next_to(out))
        fixed = _option("--fixed", load_volume, args.fixed)
        moving = _option("--moving", load_volume, args.moving)
        moving_labels = None
        if args.moving_labels is not None:
            moving_labels = _option("--moving-labels", load_labels, args.moving_labels, moving)
        start = time.perf_counter()
        result = affine_register(fixed, moving, spacing=args.spacing, quiet=args.quiet)
        affine_lncc = result.lncc
        if not args.affine_only:
            result = deformable_register(fixed, moving, result, spacing=args.spacing, quiet=args.quiet)
        seconds = time.perf_counter() - start
        moved = warp_image(result, moving)
        written = [("moved image", _write_file("-o/--out", out, save_like, moved, fixed, out))]
        moved_labels = None
        if moving_labels is not None:
            moved_labels = warp_labels(result, moving_labels)
            written.append(("moved labels",
                            _write_file("--out-labels", out_labels, save_like, moved_labels, fixed, out_labels)))
        if args.save_affine:
            written.append(("affine", _write_json(
                "--save-affine", args.save_affine,
                {"matrix": result.matrix.tolist(),
                 "convention": "moving world point (mm, RAS+) = matrix @ fixed world point (mm, RAS+)",
                 "fixed": args.fixed, "moving": args.moving})))
        if args.png:
            if moved_labels is not None:  # the moved labels over the fixed image
                image, labels, contour = fixed.data, moved_labels, None
            else:  # the moved image under the fixed image's body outline
                image, labels, contour = moved, None, foreground_mask(fixed.data).long()
            written.append(("picture", _write_file("--png", args.png, overlay_png, image, labels, args.png,
                                                   contour=contour, spacing=fixed.spacing)))
    except (ValueError, TypeError) as exc:
        return _fail("register", exc)
    stage = result if args.affine_only else result.affine
    summary = (f"registered in {seconds:.1f} s at {stage.spacing:.2f} mm: mean LNCC {stage.lncc_initial:.3f} before, "
               f"{affine_lncc:.3f} after affine")
    if not args.affine_only:
        summary += f", {result.lncc:.3f} after deformable; folding fraction {result.folding:.4f}"
    print(summary)
    for what, path in written:
        print(f"{what}: {path}")
    return 0


def add_parser(sub) -> None:
    register = sub.add_parser(
        "register",
        help="register a moving image to a fixed image (affine, then deformable) and carry its labels over",
        description="Classic iterative registration on this package's ops, in world coordinates (the images "
        "may have different grids, orientations and spacings): an affine stage (Adam on local NCC over a "
        "3-level pyramid, started from the foreground centres of mass aligned), then a multi-scale "
        "deformable stage (Adam on local NCC plus a Jacobian-variance penalty, the field Gaussian-smoothed "
        "after every step). Writes the moved image, and the moved labels (uint8/uint16), exactly on the "
        "fixed image's grid and affine. See deepatlas_fast.register for the defaults.",
    )
    register.add_argument("--fixed", required=True, metavar="F.nii.gz", help="fixed (target) image")
    register.add_argument("--moving", required=True, metavar="M.nii.gz", help="moving (source) image")
    register.add_argument("--moving-labels", metavar="ML.nii.gz",
                          help="label map on the moving image's grid, carried onto the fixed grid")
    register.add_argument("-o", "--out", required=True, metavar="OUT.nii.gz", help="the moved image")
    register.add_argument("--out-labels", metavar="OL.nii.gz",
                          help="the moved labels (default: OUT_labels.nii.gz next to --out)")
    register.add_argument("--affine-only", action="store_true", help="stop after the affine stage")
    register.add_argument("--spacing", type=_positive_float, metavar="MM",
                          help="working voxel size in mm (default: the finest input spacing, coarsened to at "
                          "most 96 voxels per side)")
    register.add_argument("--save-affine", metavar="FILE.json",
                          help="write the affine as JSON: 4x4 world matrix, fixed -> moving, mm")
    register.add_argument("--png", metavar="FILE.png",
                          help="three-plane picture: the moved labels over the fixed image (without labels: "
                          "the moved image under the fixed body outline)")
    register.add_argument("--quiet", action="store_true", help="no progress bars")
    register.set_defaults(run=run)
