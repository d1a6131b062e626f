"""``deepatlas-fast evaluate``: Dice and HD95 (mm) per label of a predicted label map against the truth."""

from __future__ import annotations

from ._common import _fail, _label_names, _option, _write_file, _write_json


def _format_table(metrics: dict) -> str:
    """The per-label metrics and the means as a plain-text table."""
    def number(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    rows = [("label", "name", "Dice", "HD95 mm", "pred vox", "truth vox", "")]
    for label, m in metrics["labels"].items():
        note = f"empty in {m['empty']}" if m["empty"] else ""
        rows.append((label, m["name"] or "-", number(m["dice"], 3), number(m["hd95_mm"], 2),
                     str(m["pred_voxels"]), str(m["truth_voxels"]), note))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines = ["  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]),
                        *(cell.rjust(w) for cell, w in zip(row[2:6], widths[2:])), row[6]]).rstrip()
             for row in rows]
    n_dice = len(metrics["labels"])
    n_hd = sum(m["hd95_mm"] is not None for m in metrics["labels"].values())
    lines.append(f"mean Dice {number(metrics['mean_dice'], 3)} over {n_dice} label(s); "
                 f"mean HD95 {number(metrics['mean_hd95_mm'], 2)} mm over {n_hd} label(s)")
    if metrics["resampled"]:
        lines.append("the prediction was resampled onto the truth's grid (nearest neighbour, world coordinates)")
    return "\n".join(lines)


def run(args) -> int:
    from ..data.io import load_labels, load_volume, same_grid
    from ..evaluate import evaluate_labels, resample_to_grid
    from ..pictures import overlay_png

    try:
        if args.image is not None and args.png is None:
            raise ValueError("--image: only used for the --png picture; add --png FILE")
        pred = _option("--pred", load_labels, args.pred)
        truth = _option("--truth", load_labels, args.truth)
        names = _label_names(args.labels)
        image = _option("--image", load_volume, args.image) if args.image else None
        metrics = evaluate_labels(pred, truth, names=names)
        if args.out:
            _write_json("--out", args.out, metrics)
        if args.png:
            background = None
            if image is not None:  # drawn on the truth's grid, like the labels
                same = same_grid(image.affine, image.shape, truth.affine, truth.shape)
                background = image.data if same else resample_to_grid(image, truth, fill=float(image.data.min()))
            filled = resample_to_grid(pred, truth) if metrics["resampled"] else pred.data
            _write_file("--png", args.png, overlay_png, background, filled, args.png,
                        contour=truth.data, spacing=truth.spacing)
    except (ValueError, TypeError) as exc:
        return _fail("evaluate", exc)
    print(_format_table(metrics))
    for what, path in (("metrics", args.out), ("picture", args.png)):
        if path:
            print(f"{what}: {path}")
    return 0


def add_parser(sub) -> None:
    from ..evaluate import EMPTY_LABEL_RULE

    evaluate = sub.add_parser(
        "evaluate",
        help="Dice and HD95 (mm) per label of a predicted label map against the truth",
        description="Score a predicted label map against the truth: Dice, HD95 in mm (MONAI's convention: "
        "the larger directed 95th percentile of boundary-to-boundary distances in world mm) and volumes "
        "per label, and their means. When the two grids differ, the prediction is resampled onto the "
        "truth's grid by nearest neighbour in world coordinates (outside its field of view: background). "
        + EMPTY_LABEL_RULE,
    )
    evaluate.add_argument("--pred", required=True, metavar="P.nii.gz", help="predicted label map (integer ids)")
    evaluate.add_argument("--truth", required=True, metavar="T.nii.gz", help="reference label map (integer ids)")
    evaluate.add_argument("--labels", metavar="NAMES.json",
                          help='label names, a JSON object {"id": "name", ...} (every label present is scored)')
    evaluate.add_argument("-o", "--out", metavar="METRICS.json", help="write the metrics as JSON")
    evaluate.add_argument("--png", metavar="FILE.png",
                          help="write axial, coronal and sagittal slices: prediction filled, truth as contours")
    evaluate.add_argument("--image", metavar="IMG.nii.gz", help="background image of the --png picture")
    evaluate.set_defaults(run=run)
