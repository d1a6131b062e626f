"""``deepatlas-fast ops-tour``: run every op on a generated volume and report what it did."""

from __future__ import annotations

import sys


def run(args) -> int:
    if args.size < 8:
        print("deepatlas-fast: --size must be at least 8", file=sys.stderr)
        return 2
    from ..tour import run_tour

    run_tour(size=args.size, seed=args.seed, device=args.device)
    return 0


def add_parser(sub) -> None:
    tour = sub.add_parser("ops-tour", help="run every op on a generated volume and report what it did")
    tour.add_argument("--size", type=int, default=40, help="cube side of the generated volume (default 40)")
    tour.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    tour.add_argument("--device", default="cpu", help="torch device (default cpu)")
    tour.set_defaults(run=run)
