"""``deepatlas-fast finetune``: semi-supervised fine-tuning of a model on a few labelled exams."""

from __future__ import annotations

import os

from ._common import (_add_device_argument, _add_model_argument, _fail, _nifti_path, _option, _positive_int,
                      _reference_pairs)


def _labelled(args, model) -> list:
    """The labelled exams: at least 2 ``--reference`` / ``--reference-labels`` pairs."""
    if len(args.reference_labels) == len(args.reference) < 2:
        raise ValueError(f"--reference: fine-tuning needs at least 2 labelled exams (labels are propagated from "
                         f"one to another), got {len(args.reference)}")
    return _reference_pairs(args, model)


def run(args) -> int:
    from .. import segment as seg
    from ..checkpoint import read_model
    from ..finetune import finetune, save_finetuned
    from ._common import _load_model_option

    try:
        if not args.output.endswith(".pt"):
            raise ValueError(f"-o: {args.output!r} must end in .pt (a model file)")
        if os.path.abspath(args.output) == os.path.abspath(args.model):
            raise ValueError("-o: would overwrite --model; write the fine-tuned model to a new file")
        if not args.lr > 0:
            raise ValueError(f"--lr: must be > 0, got {args.lr}")
        model = _load_model_option(args)
        metadata = _option("--model", read_model, args.model).get("metadata") or {}
        labelled = _labelled(args, model)
        unlabelled = [_option("--images", seg.load_exam, model, path) for path in (args.images or [])]
        model = finetune(model, labelled, unlabelled, steps=args.steps, lr=args.lr, seed=args.seed,
                         progress=not args.quiet)
        model.finetune_info["unlabelled"] = list(args.images or [])
        model.finetune_info["model"] = args.model
        try:
            save_finetuned(args.output, model, metadata)
        except OSError as exc:
            raise ValueError(f"-o: cannot write {args.output!r} ({exc})") from None
        if not args.quiet:
            losses = model.finetune_info["losses"]
            print(f"{args.output}: fine-tuned {args.steps} step(s) on {len(labelled)} labelled and "
                  f"{len(unlabelled)} unlabelled exam(s); propagation loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    except (ValueError, TypeError) as exc:
        return _fail("finetune", exc)
    return 0


def add_parser(sub) -> None:
    from ..finetune import DEFAULT_LR, DEFAULT_STEPS

    parser = sub.add_parser(
        "finetune",
        help="semi-supervised fine-tuning on a few labelled exams (better label propagation)",
        description="Fine-tune a model's CoordNet so that labels propagated between the labelled exams (as "
        "'segment' does) match their label maps (soft Dice), with the Jacobian regulariser and a small "
        "self-supervised DeepATLAS term (also on the --images exams). Writes a new model file.",
    )
    _add_model_argument(parser)
    parser.add_argument("--reference", required=True, action="append", metavar="R.nii.gz",
                        help="a labelled exam (repeat; at least 2)")
    parser.add_argument("--reference-labels", required=True, action="append", metavar="RL.nii.gz",
                        help="the label map of the --reference of the same rank, on its image's grid")
    parser.add_argument("--images", nargs="+", metavar="X.nii.gz", help="unlabelled exams (self-supervised term)")
    parser.add_argument("-o", "--output", required=True, metavar="NEW_MODEL.pt", help="the fine-tuned model file")
    parser.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS, help=f"default {DEFAULT_STEPS}")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate (default {DEFAULT_LR})")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pair draws (default 0)")
    _add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.set_defaults(run=run)
