"""``deepatlas-fast demo``: generate phantoms, train, propagate labels, compare with registration."""

from __future__ import annotations

from ._common import _add_device_argument, _device, _fail, _positive_float, _positive_int


def run(args) -> int:
    from ..demo import run_demo

    try:
        run_demo(args.out, args.minutes, _device(args), targets=args.targets, subjects=args.subjects,
                 seed=args.seed, quiet=args.quiet)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        return _fail("demo", f"--{message}" if message.startswith(("out:", "minutes", "targets", "subjects")) else exc)
    return 0


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole job on generated phantoms: train, propagate labels, compare with registration",
        description="With no data and no network: writes held-out phantoms (NIfTI), trains DeepATLAS on other "
        "phantoms for the time budget, propagates phantom 0's labels to the others through the coordinates, runs "
        "affine and deformable registration on the same pairs, and prints a Dice table with the time per target. "
        "Writes OUT/data, OUT/run/model.pt, OUT/segmentations, OUT/pictures (PNG overlays) and OUT/results.json.",
    )
    demo.add_argument("--out", default="deepatlas-demo", metavar="DIR",
                      help="a new (or empty) folder for everything written (default deepatlas-demo)")
    demo.add_argument("--minutes", type=_positive_float, default=5.0, metavar="M",
                      help="time budget in minutes, almost all of it training (default 5)")
    demo.add_argument("--targets", type=_positive_int, default=5, metavar="N", help="held-out phantoms (default 5)")
    demo.add_argument("--subjects", type=_positive_int, default=32, metavar="N",
                      help="phantoms to train on (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the training and the held-out cohort (default 0)")
    _add_device_argument(demo)
    demo.add_argument("--quiet", action="store_true", help="no progress bars (the table is still printed)")
    demo.set_defaults(run=run)
