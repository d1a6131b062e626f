"""``deepatlas-fast crop`` and ``deepatlas-fast locate``: find labelled structures of a reference in a new
exam through template coordinates (crop one out; or report the covered template extent)."""

from __future__ import annotations

from ._common import (
    _add_device_argument,
    _add_model_argument,
    _fail,
    _label_names,
    _load_model_option,
    _nifti_output,
    _option,
    _write_file,
    _write_json,
)


def _percentile_option(args) -> None:
    if not 0 <= args.percentile < 50:
        raise ValueError(f"--percentile: must be in [0, 50), got {args.percentile}")


def _format_coverage(exam: str, region: dict) -> str:
    """The covered template extent and the structures found, as lines of text."""
    axes = ", ".join(f"{a} [{lo:+.2f}, {hi:+.2f}]" for a, lo, hi in zip("RAS", region["low"], region["high"]))
    lines = [f"{exam}: body covers the template {axes}; {100 * region['cube_fraction']:.1f}% of the cube"]
    for status in ("inside", "partial", "outside"):
        found = [f"{s['name'] or s['label']}" + (f" ({s['overlap']:.2f})" if status == "partial" else "")
                 for s in region.get("structures", []) if s["status"] == status]
        if found:
            lines.append(f"{status}: {', '.join(found)}")
    return "\n".join(lines)


def run_crop(args) -> int:
    import functools

    from .. import segment as seg
    from ..data.io import load_labels
    from ..locate import crop, label_id, locate, template_box

    try:
        _percentile_option(args)
        if not args.margin >= 0:
            raise ValueError(f"--margin: must be >= 0 mm, got {args.margin}")
        _nifti_output("-o", args.output, args.input, args.reference, args.reference_labels)
        names = _label_names(args.labels)
        label = _option("--label", label_id, args.label, names)
        model = _load_model_option(args)
        reference = _option("--reference", seg.load_exam, model, args.reference)
        labels = _option("--reference-labels", load_labels, args.reference_labels, reference)
        measure = functools.partial(template_box, percentile=args.percentile)
        box = _option("--label", measure, model, reference, labels, label, names)
        region = _option("-i", locate, model, _option("-i", seg.load_exam, model, args.input), box, args.margin)
        _write_file("-o", args.output, crop, args.input, region, args.output)
        if args.json:
            _write_json("--json", args.json, {"output": args.output, **region.to_dict()})
    except (ValueError, TypeError) as exc:
        return _fail("crop", exc)
    if not args.quiet:
        low, high = region.world_bounds()
        voxels = ", ".join(f"{a}:{b}" for a, b in zip(region.start, region.stop))
        print(f"{args.output}: label {box.label}{f' ({box.name})' if box.name else ''}: voxels [{voxels}] of "
              f"{args.input} (crop {'x'.join(map(str, region.shape))}), world mm "
              f"({', '.join(f'{v:.1f}' for v in low)}) to ({', '.join(f'{v:.1f}' for v in high)})")
        if args.json:
            print(f"box: {args.json}")
    return 0


def run_locate(args) -> int:
    from .. import segment as seg
    from ..data.io import load_labels
    from ..locate import coverage, template_boxes

    try:
        _percentile_option(args)
        if (args.reference is None) != (args.reference_labels is None):
            missing = "--reference-labels" if args.reference_labels is None else "--reference"
            raise ValueError(f"{missing}: --reference and --reference-labels go together")
        if args.labels and args.reference is None:
            raise ValueError("--labels: only used with --reference and --reference-labels")
        names = _label_names(args.labels)
        model = _load_model_option(args)
        boxes = None
        if args.reference is not None:
            reference = _option("--reference", seg.load_exam, model, args.reference)
            labels = _option("--reference-labels", load_labels, args.reference_labels, reference)
            boxes = list(template_boxes(model, reference, labels, names, percentile=args.percentile).values())
            if not boxes:
                raise ValueError("--reference-labels: no labelled voxel on the reference at the model's spacing")
        target = _option("-i", seg.load_exam, model, args.input)
        region = coverage(model, target, boxes, percentile=args.percentile)
        if args.out:
            _write_json("-o", args.out, {"model": args.model, "reference": args.reference,
                                         "reference_labels": args.reference_labels, **region})
    except (ValueError, TypeError) as exc:
        return _fail("locate", exc)
    if not args.quiet:
        print(_format_coverage(args.input, region))
        if args.out:
            print(f"region: {args.out}")
    return 0


def _add_crop(sub) -> None:
    crop = sub.add_parser(
        "crop",
        help="crop a new exam to a structure labelled on a reference, found through template coordinates",
        description="Find a structure labelled on a reference exam in a new exam: the template box of the "
        "reference's voxels with that label selects the target voxels whose coordinates fall inside; their "
        "bounding box (plus --margin mm) is cut from the target file as stored (no resampling, same voxel "
        "type and scaling) and written with the affine that keeps every voxel's world position.",
    )
    _add_model_argument(crop)
    crop.add_argument("--reference", required=True, metavar="R.nii.gz", help="a labelled reference exam")
    crop.add_argument("--reference-labels", required=True, metavar="RL.nii.gz",
                      help="the reference's label map, on its image's grid")
    crop.add_argument("--label", required=True, metavar="ID_OR_NAME",
                      help="the structure: a label id, or a name of --labels")
    crop.add_argument("--labels", metavar="NAMES.json", help='label names, a JSON object {"id": "name", ...}')
    crop.add_argument("-i", "--input", required=True, metavar="T.nii.gz", help="the exam to crop")
    crop.add_argument("-o", "--output", required=True, metavar="CROP.nii.gz", help="the crop written")
    crop.add_argument("--margin", type=float, default=0.0, metavar="MM", help="added on every side (default 0)")
    crop.add_argument("--percentile", type=float, default=0.0, metavar="P",
                      help="leave P%% of the structure's reference voxels out at each end per template axis "
                      "(default 0: the full extent)")
    crop.add_argument("--json", metavar="BOX.json", help="write the box (file voxels, world mm, affine) as JSON")
    _add_device_argument(crop)
    crop.add_argument("--quiet", action="store_true", help="no summary")
    crop.set_defaults(run=run_crop)


def _add_locate(sub) -> None:
    locate = sub.add_parser(
        "locate",
        help="the template extent an exam covers, and which labelled structures lie in it (body-region JSON)",
        description="Measure the template extent an exam's body covers (per template axis, R, A, S at identity: "
        "the range of the template coordinates of its body voxels, and the fraction of the cube) and, with a "
        "labelled reference, which structures lie inside, partly inside or outside that extent.",
    )
    _add_model_argument(locate)
    locate.add_argument("-i", "--input", required=True, metavar="T.nii.gz", help="the exam")
    locate.add_argument("--reference", metavar="R.nii.gz", help="a labelled reference exam")
    locate.add_argument("--reference-labels", metavar="RL.nii.gz", help="the reference's label map, on its grid")
    locate.add_argument("--labels", metavar="NAMES.json", help='label names, a JSON object {"id": "name", ...}')
    locate.add_argument("-o", "--out", metavar="REGION.json", help="write the body-region metadata as JSON")
    locate.add_argument("--percentile", type=float, default=0.0, metavar="P",
                        help="leave P%% of the voxels out at each end per template axis (default 0: full extent)")
    _add_device_argument(locate)
    locate.add_argument("--quiet", action="store_true", help="print nothing")
    locate.set_defaults(run=run_locate)


def add_parser(sub) -> None:
    """``crop``, then ``locate``."""
    _add_crop(sub)
    _add_locate(sub)
