"""The ``deepatlas-fast`` command (console script ``deepatlas_fast.cli:main``; also
``python -m deepatlas_fast.cli``, the entry torchrun uses for multi-GPU training).

Each subcommand lives in its own module of :mod:`deepatlas_fast.commands`; this module only assembles
the parser and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ._version import __version__
from .commands import atlas, bench, demo, evaluate, finetune, info, locate, register, segment, tour, train

# In the order of the ``--help`` listing (locate adds ``crop`` and ``locate``).
COMMANDS = (demo, bench, tour, info, train, evaluate, segment, finetune, register, atlas, locate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepatlas-fast",
        description="DeepATLAS dense anatomical coordinates on fused kernels.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
