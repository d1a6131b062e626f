"""The identity of a built ``deepatlas_fast._C``: the C++/CUDA sources and build script it came from, and the
Python and torch it was built for. ``benchmarks/prebuild_extension.sh`` writes it beside a library built on a
machine without a GPU; ``gpu_check.sh`` uses that library only when its stamp still matches, and builds
otherwise.

    python benchmarks/extension_stamp.py                    # print this tree's stamp for this Python / torch
    python benchmarks/extension_stamp.py --check FILE       # exit 0 if FILE holds exactly that stamp
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh", ".hpp")
"""What the build compiles from csrc/ (its README and other notes do not change the library)."""


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the paths and contents of csrc/'s sources and setup.py, in sorted order."""
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
    files.append(root / "setup.py")
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stamp(root: Path = ROOT) -> str:
    import torch

    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"python={python} torch={torch.__version__} cuda={torch.version.cuda} sources={source_digest(root)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="compare with the stamp in FILE (exit 1 if it differs)")
    args = parser.parse_args(argv)
    current = stamp()
    if args.check is None:
        print(current)
        return 0
    recorded = Path(args.check).read_text().strip() if Path(args.check).is_file() else "(none)"
    if recorded != current:
        print(f"stamp differs:\n  recorded {recorded}\n  here     {current}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
