"""The ``deepatlas-fast`` command."""

from __future__ import annotations

import argparse
import json
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", 8) < 8:
        print("deepatlas-fast: --size must be at least 8", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
