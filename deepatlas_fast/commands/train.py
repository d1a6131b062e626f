"""``deepatlas-fast train``: train DeepATLAS without labels (also the torchrun entry for multi-GPU)."""

from __future__ import annotations

from ._common import _add_device_argument, _fail, _positive_float, _positive_int


def _config(args):
    """The training configuration: ``--config`` (or the defaults), with ``--spacing`` applied; None
    leaves the choice to :func:`~deepatlas_fast.train.train` (the defaults, or the run's own on
    ``--resume``)."""
    from ..train import TrainConfig

    config = TrainConfig.from_yaml(args.config) if args.config else None
    if args.spacing is not None:
        if config is None and not args.resume:
            config = TrainConfig()
        if config is None:  # --resume --spacing without --config: override the run's own
            from ..checkpoint import load_checkpoint

            saved = load_checkpoint(f"{args.out}/checkpoint.pt")["config"]
            config = TrainConfig.from_dict(saved)
        config = TrainConfig.from_dict({**config.to_dict(), "spacing": args.spacing}, source="--spacing")
    return config


def run(args) -> int:
    from ..train import ConfigError, train

    try:
        result = train(
            _config(args),
            images=args.images,
            phantoms=args.phantoms,
            out_dir=args.out,
            device=args.device,
            ops=args.ops,
            resume=args.resume,
            max_steps=args.max_steps,
            max_minutes=args.max_minutes,
            quiet=args.quiet,
            extend_steps=args.extend_steps,
            whole_steps=args.whole_steps,
        )
    except (ConfigError, ValueError, TypeError) as exc:
        return _fail("train", exc)
    if not args.quiet and result.model_path is not None:
        print(f"{result.status}: step {result.step}/{result.total_steps}; model {result.model_path}; "
              f"metrics {result.out_dir / 'metrics.csv'}")
    return 0 if result.status != "interrupted" else 130


def add_parser(sub) -> None:
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
    _add_device_argument(train)
    train.add_argument("--ops", default="fused", choices=["fused", "stock"],
                       help="this package's fused ops or stock PyTorch ops (default fused)")
    train.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR exactly")
    train.add_argument("--extend-steps", type=_positive_int, metavar="N",
                       help="with --resume: lengthen the run's last stage by N steps (also after it completed)")
    train.add_argument("--whole-steps", type=_positive_int, metavar="N",
                       help="with --resume: append a stage of N steps that takes every exam whole each step, "
                            "without augmentation (a full-batch fit; config stage 'whole: true')")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=run)
