"""The ``deepatlas-fast`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence


def _ops_tour(args) -> int:
    from .tour import run_tour

    run_tour(size=args.size, seed=args.seed, device=args.device)
    return 0


def _info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def _train(args) -> int:
    from .train import ConfigError, TrainConfig, train

    try:
        config = TrainConfig.from_yaml(args.config) if args.config else None
        if args.spacing is not None:
            if config is None and not args.resume:
                config = TrainConfig()
            if config is None:  # --resume --spacing without --config: override the run's own
                from .checkpoint import load_checkpoint

                saved = load_checkpoint(f"{args.out}/checkpoint.pt")["config"]
                config = TrainConfig.from_dict(saved)
            config = TrainConfig.from_dict({**config.to_dict(), "spacing": args.spacing}, source="--spacing")
        result = train(
            config,
            images=args.images,
            phantoms=args.phantoms,
            out_dir=args.out,
            device=args.device,
            ops=args.ops,
            resume=args.resume,
            max_steps=args.max_steps,
            max_minutes=args.max_minutes,
            quiet=args.quiet,
        )
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"deepatlas-fast train: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet and result.model_path is not None:
        print(f"{result.status}: step {result.step}/{result.total_steps}; model {result.model_path}; "
              f"metrics {result.out_dir / 'metrics.csv'}")
    return 0 if result.status != "interrupted" else 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_train(sub) -> None:
    train = sub.add_parser(
        "train",
        help="train DeepATLAS on unlabelled NIfTI exams (or the embedded phantom cohort)",
        description="Train DeepATLAS without labels. Writes RUN_DIR/model.pt (network, atlas, preprocessing), "
        "RUN_DIR/config.yaml, RUN_DIR/metrics.csv and RUN_DIR/checkpoint.pt (for --resume). SIGINT/SIGTERM "
        "save a checkpoint and stop (exit status 130; continue with --resume). Multi-GPU: "
        "torchrun --nproc_per_node=K -m deepatlas_fast.cli train ...",
    )
    data = train.add_mutually_exclusive_group()
    data.add_argument("--images", nargs="+", metavar="PATH",
                      help="NIfTI files, folders (every *.nii/*.nii.gz inside) or glob patterns")
    data.add_argument("--phantoms", type=_positive_int, metavar="N",
                      help="train on N exams of the embedded procedural phantom cohort")
    train.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created)")
    train.add_argument("--config", metavar="FILE", help="YAML training configuration (see config.yaml of any run)")
    train.add_argument("--spacing", type=_positive_float, metavar="MM", help="data voxel size in mm (config.spacing)")
    train.add_argument("--max-minutes", type=_positive_float, metavar="M", help="stop after M minutes (checkpointed)")
    train.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop once N steps are done in total")
    train.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    train.add_argument("--ops", default="fused", choices=["fused", "stock"],
                       help="this package's fused ops or stock PyTorch ops (default fused)")
    train.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR exactly")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)


def _option(option: str, load, *args):
    """``load(*args)`` with its ValueError prefixed by the command-line option it came from."""
    try:
        return load(*args)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


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


def _evaluate(args) -> int:
    from .data.io import load_labels, load_volume, read_label_table, same_grid
    from .evaluate import evaluate_labels, resample_to_grid
    from .pictures import overlay_png

    try:
        if args.image is not None and args.png is None:
            raise ValueError("--image: only used for the --png picture; add --png FILE")
        pred = _option("--pred", load_labels, args.pred)
        truth = _option("--truth", load_labels, args.truth)
        names = read_label_table(args.labels, "--labels") if args.labels else None
        image = _option("--image", load_volume, args.image) if args.image else None
        metrics = evaluate_labels(pred, truth, names=names)
        if args.out:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(metrics, f, indent=2)
            except OSError as exc:
                raise ValueError(f"--out: cannot write {args.out!r} ({exc})") from None
        if args.png:
            background = None
            if image is not None:  # drawn on the truth's grid, like the labels
                same = same_grid(image.affine, image.shape, truth.affine, truth.shape)
                background = image.data if same else resample_to_grid(image, truth, fill=float(image.data.min()))
            filled = resample_to_grid(pred, truth) if metrics["resampled"] else pred.data
            try:
                overlay_png(background, filled, args.png, contour=truth.data, spacing=truth.spacing)
            except OSError as exc:
                raise ValueError(f"--png: cannot write {args.png!r} ({exc})") from None
    except (ValueError, TypeError) as exc:
        print(f"deepatlas-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(_format_table(metrics))
    for what, path in (("metrics", args.out), ("picture", args.png)):
        if path:
            print(f"{what}: {path}")
    return 0


def _add_evaluate(sub) -> None:
    from .evaluate import EMPTY_LABEL_RULE

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
    evaluate.set_defaults(run=_evaluate)


_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nifti_stem(path: str) -> Optional[str]:
    """The file name without its .nii/.nii.gz suffix; None when it has neither."""
    name = os.path.basename(path)
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _segment_pairs(inputs: Sequence[str], outputs: Sequence[str]) -> list:
    """(input, output) file pairs from repeated -i/-o, or from -i FOLDER -o FOLDER."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        folder = inputs[0]
        if len(outputs) != 1 or os.path.isfile(outputs[0]):
            raise ValueError(f"-o: an input folder ({folder!r}) needs one output folder, got {list(outputs)}")
        names = sorted(n for n in os.listdir(folder)
                       if _nifti_stem(n) and os.path.isfile(os.path.join(folder, n)))
        if not names:
            raise ValueError(f"-i: no .nii or .nii.gz files in the folder {folder!r}")
        pairs = [(os.path.join(folder, n), os.path.join(outputs[0], n)) for n in names]
    else:
        if len(outputs) != len(inputs):
            raise ValueError(f"-o: got {len(outputs)} output(s) for {len(inputs)} input(s); "
                             "give one -o per -i, in the same order (or -i FOLDER -o FOLDER)")
        for path in inputs:
            if os.path.isdir(path):
                raise ValueError(f"-i: {path!r} is a folder; a folder is segmented alone: -i FOLDER -o FOLDER")
            if not os.path.isfile(path):
                raise ValueError(f"-i: path {path!r}: no such file")
        for path in outputs:
            if _nifti_stem(path) is None:
                raise ValueError(f"-o: {path!r} must end in .nii or .nii.gz")
        pairs = list(zip(inputs, outputs))
    written = [os.path.abspath(out) for _, out in pairs]
    if len(set(written)) != len(written):
        raise ValueError("-o: the same output file is given twice")
    if set(written) & {os.path.abspath(inp) for inp, _ in pairs}:
        raise ValueError("-o: an output would overwrite an input exam")
    return pairs


def _side_file(option: str, value: Optional[str], output: str, name: str, several: bool) -> Optional[str]:
    """Where an extra file of one target goes: ``value`` itself for a single target, else ``value/name``."""
    if value is None:
        return None
    if several or os.path.isdir(value):
        if os.path.isfile(value):
            raise ValueError(f"{option}: {value!r} is a file; with several targets give a folder")
        return os.path.join(value, name)
    return value


def _segment_summary(output: str, labels, names: Optional[dict], seconds: float) -> str:
    """``OUT: N label(s) (names or ids) in S s`` for one target."""
    import torch

    present = [i for i in torch.unique(labels.data).tolist() if i != 0]
    described = ", ".join(names.get(i, str(i)) if names else str(i) for i in present)
    return f"{output}: {len(present)} label(s){f' ({described})' if present else ''} in {seconds:.2f} s"


def _segment_jobs(args) -> list:
    """``(input, output, probabilities file or None, png file or None)`` per target, checked up front."""
    pairs = _segment_pairs(args.input, args.output)
    several = len(pairs) > 1
    outputs = {os.path.abspath(out) for _, out in pairs}
    jobs = []
    for inp, out in pairs:
        probability = _side_file("--probabilities", args.probabilities, out, os.path.basename(out), several)
        if probability is not None and _nifti_stem(probability) is None:
            raise ValueError(f"--probabilities: {probability!r} must end in .nii or .nii.gz")
        if probability is not None and os.path.abspath(probability) in outputs:
            raise ValueError(f"--probabilities: {probability!r} would overwrite a label output")
        png = _side_file("--png", args.png, out, f"{_nifti_stem(out)}.png", several)
        jobs.append((inp, out, probability, png))
    return jobs


def _segment_atlas(args, model):
    """The references loaded on the model's grid (errors naming their option) and splatted once."""
    from . import segment as seg
    from .data.io import load_labels

    if len(args.reference_labels) != len(args.reference):
        raise ValueError(f"--reference-labels: got {len(args.reference_labels)} label map(s) for "
                         f"{len(args.reference)} --reference image(s); give one per reference, in the same order")
    references = []
    for image_path, labels_path in zip(args.reference, args.reference_labels):
        image = _option("--reference", seg.load_exam, model, image_path)
        references.append((image, _option("--reference-labels", load_labels, labels_path, image)))
    template = None if args.template_shape is None else args.template_shape * (3 // len(args.template_shape))
    return seg.build_reference(model, references, template_shape=template)


def _segment(args) -> int:
    import time

    import torch
    from tqdm.auto import tqdm

    from . import segment as seg
    from .checkpoint import load_model
    from .data.io import load_volume, read_label_table, save_like, write_label_table
    from .pictures import overlay_png

    try:
        if args.template_shape is not None and (len(args.template_shape) not in (1, 3) or min(args.template_shape) < 2):
            raise ValueError(f"--template-shape: give 1 or 3 sizes >= 2, got {args.template_shape}")
        if not args.min_weight >= 0:
            raise ValueError(f"--min-weight: must be >= 0, got {args.min_weight}")
        jobs = _segment_jobs(args)
        names = read_label_table(args.labels, "--labels") if args.labels else None
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = _option("--model", load_model, args.model, device)
        _option("--model", seg.model_spacing, model)
        atlas = _segment_atlas(args, model)
        if not args.quiet:
            print(f"reference: {len(args.reference)} exam(s), {len(atlas.classes) - 1} label(s), "
                  f"template grid {'x'.join(map(str, atlas.template_shape))}")
        with tqdm(jobs, disable=args.quiet, unit="exam", file=sys.stderr, dynamic_ncols=True) as bar:
            for inp, out, probability, png in bar:
                start = time.perf_counter()
                result = seg.segment(model, atlas, _option("-i", seg.load_exam, model, inp), min_weight=args.min_weight)
                try:
                    save_like(result.labels.data, result.labels, out, dtype=atlas.dtype)
                    if names is not None:
                        write_label_table(os.path.join(os.path.dirname(out), f"{_nifti_stem(out)}.json"), names)
                    if probability is not None:
                        save_like(result.probability.data, result.probability, probability)
                    if png is not None:  # over the target as stored (the labels' grid), not the network grid
                        image = _option("-i", load_volume, inp)
                        overlay_png(image.data, result.labels.data, png, spacing=result.labels.spacing)
                except OSError as exc:
                    raise ValueError(f"cannot write the results of {inp!r} ({exc})") from None
                if not args.quiet:
                    bar.write(_segment_summary(out, result.labels, names, time.perf_counter() - start), file=sys.stdout)
    except (ValueError, TypeError) as exc:
        print(f"deepatlas-fast segment: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_segment(sub) -> None:
    from .segment import MAX_TEMPLATE_SIDE, MIN_WEIGHT

    segment = sub.add_parser(
        "segment",
        help="one-shot / few-shot segmentation: propagate labelled reference exams to new exams",
        description="Propagate the labels of one or more labelled reference exams to target exams by matching "
        "template coordinates: the references' labels are splatted into a template grid once (few-shot: votes "
        "pooled), then read at each target's coordinates. Outputs are on exactly each target's grid and affine "
        "(uint8 labels, uint16 when an id exceeds 255); background where a target lies outside the references' "
        "coverage.",
    )
    segment.add_argument("--model", required=True, metavar="RUN_DIR/model.pt", help="a trained model")
    segment.add_argument("--reference", required=True, action="append", metavar="R.nii.gz",
                         help="a labelled reference exam (repeat for few-shot)")
    segment.add_argument("--reference-labels", required=True, action="append", metavar="RL.nii.gz",
                         help="the label map of the reference of the same rank, on its image's grid")
    segment.add_argument("-i", "--input", required=True, action="append", metavar="T.nii.gz",
                         help="a target exam (repeat with -o), or one folder (every *.nii / *.nii.gz inside)")
    segment.add_argument("-o", "--output", required=True, action="append", metavar="OUT.nii.gz",
                         help="the label map written for the -i of the same rank, or the output folder "
                         "(file names = input names)")
    segment.add_argument("--labels", metavar="NAMES.json",
                         help='label names {"id": "name", ...}: written beside each output as OUT.json, '
                         "and used in the summary")
    segment.add_argument("--probabilities", metavar="P.nii.gz",
                         help="write the probability of the written label (3-D float32, target grid; 1 for "
                         "background outside the coverage); a folder with several targets")
    segment.add_argument("--png", metavar="FILE.png",
                         help="write axial, coronal and sagittal slices of the labels over the target; "
                         "a folder with several targets (OUT.png)")
    segment.add_argument("--template-shape", type=_positive_int, nargs="+", metavar="N",
                         help="splat grid, 1 or 3 sizes (default: the references' largest grid at the model's "
                         f"spacing, at most {MAX_TEMPLATE_SIDE} per axis)")
    segment.add_argument("--min-weight", type=float, default=MIN_WEIGHT, metavar="F",
                         help="coverage threshold, a fraction of the mean splatted weight (default "
                         f"{MIN_WEIGHT}); below it a target voxel is background")
    segment.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    segment.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    segment.set_defaults(run=_segment)
def _nifti_path(option: str, path: str) -> str:
    """``path`` when it names a NIfTI file (.nii / .nii.gz), else a ValueError naming ``option``."""
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{option}: {path!r} must end in .nii or .nii.gz")
    return path


def _labels_path_next_to(out: str) -> str:
    """The default moved-labels file next to the moved image: OUT.nii.gz -> OUT_labels.nii.gz."""
    stem, ext = (out[: -len(".nii.gz")], ".nii.gz") if out.endswith(".nii.gz") else (out[: -len(".nii")], ".nii")
    return f"{stem}_labels{ext}"


def _write_file(option: str, path: str, write, *args, **kwargs) -> str:
    """``write(*args, **kwargs)``, an OSError turned into a ValueError naming ``option``; returns ``path``."""
    try:
        write(*args, **kwargs)
    except OSError as exc:
        raise ValueError(f"{option}: cannot write {path!r} ({exc})") from None
    return path


def _save_affine(path: str, result, fixed_path: str, moving_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"matrix": result.matrix.tolist(),
                   "convention": "moving world point (mm, RAS+) = matrix @ fixed world point (mm, RAS+)",
                   "fixed": fixed_path, "moving": moving_path}, f, indent=2)


def _register(args) -> int:
    import time

    from .data.io import foreground_mask, load_labels, load_volume, save_like
    from .pictures import overlay_png
    from .register import affine_register, deformable_register, warp_image, warp_labels

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
            written.append(("affine", _write_file("--save-affine", args.save_affine, _save_affine, args.save_affine,
                                                  result, args.fixed, args.moving)))
        if args.png:
            if moved_labels is not None:  # the moved labels over the fixed image
                image, labels, contour = fixed.data, moved_labels, None
            else:  # the moved image under the fixed image's body outline
                image, labels, contour = moved, None, foreground_mask(fixed.data).long()
            written.append(("picture", _write_file("--png", args.png, overlay_png, image, labels, args.png,
                                                   contour=contour, spacing=fixed.spacing)))
    except (ValueError, TypeError) as exc:
        print(f"deepatlas-fast register: error: {exc}", file=sys.stderr)
        return 2
    stage = result if args.affine_only else result.affine
    summary = (f"registered in {seconds:.1f} s at {stage.spacing:.2f} mm: mean LNCC {stage.lncc_initial:.3f} before, "
               f"{affine_lncc:.3f} after affine")
    if not args.affine_only:
        summary += f", {result.lncc:.3f} after deformable; folding fraction {result.folding:.4f}"
    print(summary)
    for what, path in written:
        print(f"{what}: {path}")
    return 0


def _add_register(sub) -> None:
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
    register.set_defaults(run=_register)


def _template_shape(sizes: Optional[Sequence[int]]) -> Optional[tuple]:
    """``--template-shape`` as 3 sizes (one size: a cube); None when not given."""
    if sizes is None:
        return None
    if len(sizes) not in (1, 3) or min(sizes) < 2:
        raise ValueError(f"--template-shape: give 1 or 3 sizes >= 2, got {sizes}")
    return tuple(sizes) * (3 // len(sizes))


def _nifti_output(option: str, path: Optional[str], *inputs: str) -> None:
    """A ValueError naming ``option`` unless ``path`` (when given) is a .nii/.nii.gz file name that is
    not one of the ``inputs``."""
    if path is None:
        return
    if _nifti_stem(path) is None:
        raise ValueError(f"{option}: {path!r} must end in .nii or .nii.gz")
    if os.path.abspath(path) in {os.path.abspath(p) for p in inputs}:
        raise ValueError(f"{option}: {path!r} would overwrite an input")


def _write_json(option: str, path: str, obj: dict) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    except OSError as exc:
        raise ValueError(f"{option}: cannot write {path!r} ({exc})") from None


def _load_model_option(args):
    """The ``--model`` (on ``--device``, default cuda when available), checked to carry its spacing."""
    import torch

    from .checkpoint import load_model
    from .segment import model_spacing

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = _option("--model", load_model, args.model, device)
    _option("--model", model_spacing, model)
    return model


def _atlas(args) -> int:
    from tqdm.auto import tqdm

    from .atlas import reconstruct_atlas
    from .segment import load_exam
    from .train import resolve_images

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
        print(f"deepatlas-fast atlas: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        empty = int((atlas.weight.data == 0).sum())
        print(f"{args.out}: template {'x'.join(map(str, atlas.intensity.shape))} from {len(paths)} exam(s), "
              f"voxel {' x '.join(f'{s:.3g}' for s in atlas.intensity.spacing)} mm; "
              f"{empty} cell(s) ({100 * empty / atlas.weight.data.numel():.1f}%) with no exam voxel")
        for what, path in (("weights", args.weights), ("picture", args.png)):
            if path:
                print(f"{what}: {path}")
    return 0


def _add_atlas(sub) -> None:
    from .atlas import FILL_CELLS
    from .segment import MIN_WEIGHT

    atlas = sub.add_parser(
        "atlas",
        help="reconstruct the template image by splatting exams into the template grid",
        description="Reconstruct the template image: every exam's normalised intensities (its grid at the model's "
        "spacing) are splatted into the template grid at their template coordinates and averaged over the exams. "
        f"Cells with less than {MIN_WEIGHT} of the mean weight are holes, filled from covered cells up to "
        f"{FILL_CELLS} cell(s) away, else 0. Written as float32 NIfTI on an axis-aligned RAS grid whose cube spans "
        "the exams' mean physical extent (per template axis), centred on their mean position.",
    )
    atlas.add_argument("--model", required=True, metavar="RUN_DIR/model.pt", help="a trained model")
    atlas.add_argument("--images", required=True, nargs="+", metavar="PATH",
                       help="NIfTI files, folders (every *.nii/*.nii.gz inside) or glob patterns")
    atlas.add_argument("-o", "--out", required=True, metavar="ATLAS.nii.gz", help="the template image written")
    atlas.add_argument("--template-shape", type=_positive_int, nargs="+", metavar="N",
                       help="template grid, 1 or 3 sizes (default: the model's template grid)")
    atlas.add_argument("--weights", metavar="W.nii.gz", help="also write the weight map (exam voxels per cell)")
    atlas.add_argument("--png", metavar="FILE.png", help="write axial, coronal and sagittal slices of the template")
    atlas.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    atlas.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    atlas.set_defaults(run=_atlas)


def _percentile_option(args) -> None:
    if not 0 <= args.percentile < 50:
        raise ValueError(f"--percentile: must be in [0, 50), got {args.percentile}")


def _crop(args) -> int:
    import functools

    from . import segment as seg
    from .data.io import load_labels, read_label_table
    from .locate import crop, label_id, locate, template_box

    try:
        _percentile_option(args)
        if not args.margin >= 0:
            raise ValueError(f"--margin: must be >= 0 mm, got {args.margin}")
        _nifti_output("-o", args.output, args.input, args.reference, args.reference_labels)
        names = read_label_table(args.labels, "--labels") if args.labels else None
        label = _option("--label", label_id, args.label, names)
        model = _load_model_option(args)
        reference = _option("--reference", seg.load_exam, model, args.reference)
        labels = _option("--reference-labels", load_labels, args.reference_labels, reference)
        measure = functools.partial(template_box, percentile=args.percentile)
        box = _option("--label", measure, model, reference, labels, label, names)
        region = _option("-i", locate, model, _option("-i", seg.load_exam, model, args.input), box, args.margin)
        try:
            crop(args.input, region, args.output)
        except OSError as exc:
            raise ValueError(f"-o: cannot write {args.output!r} ({exc})") from None
        if args.json:
            _write_json("--json", args.json, {"output": args.output, **region.to_dict()})
    except (ValueError, TypeError) as exc:
        print(f"deepatlas-fast crop: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        low, high = region.world_bounds()
        voxels = ", ".join(f"{a}:{b}" for a, b in zip(region.start, region.stop))
        print(f"{args.output}: label {box.label}{f' ({box.name})' if box.name else ''}: voxels [{voxels}] of "
              f"{args.input} (crop {'x'.join(map(str, region.shape))}), world mm "
              f"({', '.join(f'{v:.1f}' for v in low)}) to ({', '.join(f'{v:.1f}' for v in high)})")
        if args.json:
            print(f"box: {args.json}")
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
    crop.add_argument("--model", required=True, metavar="RUN_DIR/model.pt", help="a trained model")
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
    crop.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    crop.add_argument("--quiet", action="store_true", help="no summary")
    crop.set_defaults(run=_crop)


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


def _locate(args) -> int:
    from . import segment as seg
    from .data.io import load_labels, read_label_table
    from .locate import coverage, template_boxes

    try:
        _percentile_option(args)
        if (args.reference is None) != (args.reference_labels is None):
            missing = "--reference-labels" if args.reference_labels is None else "--reference"
            raise ValueError(f"{missing}: --reference and --reference-labels go together")
        if args.labels and args.reference is None:
            raise ValueError("--labels: only used with --reference and --reference-labels")
        names = read_label_table(args.labels, "--labels") if args.labels else None
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
        print(f"deepatlas-fast locate: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(_format_coverage(args.input, region))
        if args.out:
            print(f"region: {args.out}")
    return 0


def _add_locate(sub) -> None:
    locate = sub.add_parser(
        "locate",
        help="the template extent an exam covers, and which labelled structures lie in it (body-region JSON)",
        description="Measure the template extent an exam's body covers (per template axis, R, A, S at identity: "
        "the range of the template coordinates of its body voxels, and the fraction of the cube) and, with a "
        "labelled reference, which structures lie inside, partly inside or outside that extent.",
    )
    locate.add_argument("--model", required=True, metavar="RUN_DIR/model.pt", help="a trained model")
    locate.add_argument("-i", "--input", required=True, metavar="T.nii.gz", help="the exam")
    locate.add_argument("--reference", metavar="R.nii.gz", help="a labelled reference exam")
    locate.add_argument("--reference-labels", metavar="RL.nii.gz", help="the reference's label map, on its grid")
    locate.add_argument("--labels", metavar="NAMES.json", help='label names, a JSON object {"id": "name", ...}')
    locate.add_argument("-o", "--out", metavar="REGION.json", help="write the body-region metadata as JSON")
    locate.add_argument("--percentile", type=float, default=0.0, metavar="P",
                        help="leave P%% of the voxels out at each end per template axis (default 0: full extent)")
    locate.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    locate.add_argument("--quiet", action="store_true", help="print nothing")
    locate.set_defaults(run=_locate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepatlas-fast",
        description="DeepATLAS dense anatomical coordinates on fused kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tour = sub.add_parser("ops-tour", help="run every op on a generated volume and report what it did")
    tour.add_argument("--size", type=int, default=40, help="cube side of the generated volume (default 40)")
    tour.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tour.add_argument("--device", default="cpu", help="torch device (default cpu)")
    tour.set_defaults(run=_ops_tour)
    info = sub.add_parser("info", help="print versions, the compiled extension and the backend of each op")
    info.set_defaults(run=_info)
    _add_train(sub)
    _add_evaluate(sub)
    _add_segment(sub)
    _add_register(sub)
    _add_atlas(sub)
    _add_crop(sub)
    _add_locate(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", 8) < 8:
        print("deepatlas-fast: --size must be at least 8", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
