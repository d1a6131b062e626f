"""``deepatlas-fast atlas``: reconstruct the template image by splatting exams into the template grid."""

from __future__ import annotations

import sys

from ._common import (
    _add_device_argument,
    _add_model_argument,
    _fail,
    _load_model_option,
    _nifti_output,
    _option,
    _positive_int,
    _template_shape,
)


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..atlas import reconstruct_atlas
    from ..segment import load_exam
    from ..train import resolve_images

    try:
        template = _template_shape(args.template_shape)
        try:
            paths = [str(p) for p in resolve_images(args.images)]
        except ValueError as exc:
            raise ValueError(f"--images: {str(exc).removeprefix('images: ')}") from None
        _nifti_output("-o", args.out, *paths)
        _nifti_output("--weights", args.weights, args.out, *paths)
        model = _load_model_option(args)
        with tqdm(paths, disable=args.quiet, unit="exam", file=sys.stderr, dynamic_ncols=True) as bar:
            atlas = reconstruct_atlas(model, (_option("--images", load_exam, model, p) for p in bar), template)
        try:
            atlas.save(args.out, weights=args.weights, png=args.png)
        except OSError as exc:
            raise ValueError(f"cannot write the atlas ({exc})") from None
    except (ValueError, TypeError) as exc:
        return _fail("atlas", exc)
    if not args.quiet:
        empty = int((atlas.weight.data == 0).sum())
        print(f"{args.out}: template {'x'.join(map(str, atlas.intensity.shape))} from {len(paths)} exam(s), "
              f"voxel {' x '.join(f'{s:.3g}' for s in atlas.intensity.spacing)} mm; "
              f"{empty} cell(s) ({100 * empty / atlas.weight.data.numel():.1f}%) with no exam voxel")
        for what, path in (("weights", args.weights), ("picture", args.png)):
            if path:
                print(f"{what}: {path}")
    return 0


def add_parser(sub) -> None:
    from ..atlas import FILL_CELLS
    from ..segment import MIN_WEIGHT

    atlas = sub.add_parser(
        "atlas",
        help="reconstruct the template image by splatting exams into the template grid",
        description="Reconstruct the template image: every exam's normalised intensities (its grid at the model's "
        "spacing) are splatted into the template grid at their template coordinates and averaged over the exams. "
        f"Cells with less than {MIN_WEIGHT} of the mean weight are holes, filled from covered cells up to "
        f"{FILL_CELLS} cell(s) away, else 0. Written as float32 NIfTI on an axis-aligned RAS grid whose cube spans "
        "the exams' mean physical extent (per template axis), centred on their mean position.",
    )
    _add_model_argument(atlas)
    atlas.add_argument("--images", required=True, nargs="+", metavar="PATH",
                       help="NIfTI files, folders (every *.nii/*.nii.gz inside) or glob patterns")
    atlas.add_argument("-o", "--out", required=True, metavar="ATLAS.nii.gz", help="the template image written")
    atlas.add_argument("--template-shape", type=_positive_int, nargs="+", metavar="N",
                       help="template grid, 1 or 3 sizes (default: the model's template grid)")
    atlas.add_argument("--weights", metavar="W.nii.gz", help="also write the weight map (exam voxels per cell)")
    atlas.add_argument("--png", metavar="FILE.png", help="write axial, coronal and sagittal slices of the template")
    _add_device_argument(atlas)
    atlas.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    atlas.set_defaults(run=run)
