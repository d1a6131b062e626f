"""``deepatlas-fast segment``: one-shot / few-shot segmentation by propagating labelled reference exams."""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ._common import (
    _add_device_argument,
    _add_model_argument,
    _fail,
    _label_names,
    _load_model_option,
    _nifti_path,
    _nifti_stem,
    _option,
    _positive_float,
    _positive_int,
    _reference_pairs,
    _template_shape,
)


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
            _nifti_path("-o", path)
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


def _segment_summary(output: str, labels, names: Optional[dict], seconds: float, crops=None) -> str:
    """``OUT: N label(s) (names or ids) in S s`` for one target (plus the cascade's fine passes)."""
    import torch

    present = [i for i in torch.unique(labels.data).tolist() if i != 0]
    described = ", ".join(names.get(i, str(i)) if names else str(i) for i in present)
    line = f"{output}: {len(present)} label(s){f' ({described})' if present else ''} in {seconds:.2f} s"
    if crops is not None:
        boxes = "; ".join(
            f"{'all' if c.label is None else (names or {}).get(c.label, str(c.label))} "
            f"{'x'.join(map(str, c.shape))} at {tuple(c.file_start)}" for c in crops
        )
        line += f", {len(crops)} fine pass(es){f' ({boxes})' if crops else ''}"
    return line


def _check_cascade_options(args, model, atlas, names) -> None:
    """--structures, --coarse-spacing and --margin checked once, before any target (errors name the option)."""
    from ..cascade import check_cascade_options

    try:
        check_cascade_options(model, atlas, args.structures, names, args.coarse_spacing, args.margin)
    except ValueError as exc:
        message = str(exc)
        for name, option in (("structures", "--structures"), ("coarse_spacing", "--coarse-spacing"),
                             ("margin_mm", "--margin")):
            if message.startswith(name):
                message = option + message[len(name):]
        raise ValueError(message) from None


def _segment_one(args, model, atlas, names, inp):
    """Labels of one target: the plain pass, or ``--cascade``'s coarse pass and crops."""
    from .. import segment as seg
    from ..cascade import cascade_segment

    exam = _option("-i", seg.load_exam, model, inp)
    if not args.cascade:
        return seg.segment(model, atlas, exam, min_weight=args.min_weight), None
    result = cascade_segment(model, atlas, exam, args.structures, names=names, coarse_spacing=args.coarse_spacing,
                             margin_mm=args.margin, min_weight=args.min_weight)
    return result, result.crops


def _segment_jobs(args) -> list:
    """``(input, output, probabilities file or None, png file or None)`` per target, checked up front."""
    pairs = _segment_pairs(args.input, args.output)
    several = len(pairs) > 1
    outputs = {os.path.abspath(out) for _, out in pairs}
    jobs = []
    for inp, out in pairs:
        probability = _side_file("--probabilities", args.probabilities, out, os.path.basename(out), several)
        if probability is not None:
            _nifti_path("--probabilities", probability)
            if os.path.abspath(probability) in outputs:
                raise ValueError(f"--probabilities: {probability!r} would overwrite a label output")
        png = _side_file("--png", args.png, out, f"{_nifti_stem(out)}.png", several)
        jobs.append((inp, out, probability, png))
    return jobs


def _segment_atlas(args, model, template: Optional[tuple]):
    """The references loaded on the model's grid (errors naming their option) and splatted once."""
    from .. import segment as seg

    references = _reference_pairs(args, model)
    return seg.build_reference(model, references, template_shape=template)


def run(args) -> int:
    import time

    from tqdm.auto import tqdm

    from .. import segment as seg
    from ..data.io import load_volume, save_like, write_label_table
    from ..pictures import overlay_png

    try:
        template = _template_shape(args.template_shape)
        if not args.min_weight >= 0:
            raise ValueError(f"--min-weight: must be >= 0, got {args.min_weight}")
        if not args.cascade:
            for option, value in (("--structures", args.structures), ("--coarse-spacing", args.coarse_spacing),
                                  ("--margin", args.margin)):
                if value is not None:
                    raise ValueError(f"{option}: only used with --cascade")
        jobs = _segment_jobs(args)
        names = _label_names(args.labels)
        model = _load_model_option(args)
        atlas = _segment_atlas(args, model, template)
        if args.cascade:
            _check_cascade_options(args, model, atlas, names)
        if not args.quiet:
            print(f"reference: {len(args.reference)} exam(s), {len(atlas.classes) - 1} label(s), "
                  f"template grid {'x'.join(map(str, atlas.template_shape))}")
        with tqdm(jobs, disable=args.quiet, unit="exam", file=sys.stderr, dynamic_ncols=True) as bar:
            for inp, out, probability, png in bar:
                start = time.perf_counter()
                result, crops = _segment_one(args, model, atlas, names, inp)
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
                    summary = _segment_summary(out, result.labels, names, time.perf_counter() - start, crops)
                    bar.write(summary, file=sys.stdout)
    except (ValueError, TypeError) as exc:
        return _fail("segment", exc)
    return 0


def add_parser(sub) -> None:
    from ..segment import MAX_TEMPLATE_SIDE, MIN_WEIGHT

    segment = sub.add_parser(
        "segment",
        help="one-shot / few-shot segmentation: propagate labelled reference exams to new exams",
        description="Propagate the labels of one or more labelled reference exams to target exams by matching "
        "template coordinates: the references' labels are splatted into a template grid once (few-shot: votes "
        "pooled), then read at each target's coordinates. Outputs are on exactly each target's grid and affine "
        "(uint8 labels, uint16 when an id exceeds 255); background where a target lies outside the references' "
        "coverage.",
    )
    _add_model_argument(segment)
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
    cascade = segment.add_argument_group(
        "cascade", "coarse pass on the whole exam, then fine passes at the model's spacing on crops around the "
        "structures the coarse pass finds (the network never runs on the whole exam at full resolution)")
    cascade.add_argument("--cascade", action="store_true", help="segment with the cascade")
    cascade.add_argument("--structures", nargs="+", metavar="S",
                         help="ids or names (--labels) of the structures to crop, one fine pass each "
                         "(default: one crop around every structure found)")
    cascade.add_argument("--coarse-spacing", type=_positive_float, metavar="MM",
                         help="voxel size of the coarse pass (default: twice the model's spacing)")
    cascade.add_argument("--margin", type=float, metavar="MM",
                         help="added around each structure's coarse box (default: two coarse voxels)")
    _add_device_argument(segment)
    segment.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    segment.set_defaults(run=run)
