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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "size", 8) < 8:
        print("deepatlas-fast: --size must be at least 8", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
