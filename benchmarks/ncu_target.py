"""The program Nsight Compute profiles in `gpu_check.sh`'s "ncu" step: one forward+backward of every op on
the chosen backend at 256³ (the report's inputs), after a warm-up, between cudaProfilerStart/Stop so that
`ncu --profile-from-start off` sees only those kernels.

    ncu --profile-from-start off --csv --metrics ... python benchmarks/ncu_target.py --backend cuda
    ... python benchmarks/ncu_target.py --backend "cuda (tiled),cuda (tiled splat)" --ops lncc,sample  # variants
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepatlas_fast import bench, finite_checks  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda",
                        help="comma list of backends or report implementation names (default cuda)")
    parser.add_argument("--ops", default=None, help="comma list of ops (default: all)")
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--skip", default="", help="comma list: leave out implementations whose name or variant "
                                                  "setting contains one")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    names = args.backend.split(",")
    cases = [c for c in bench.build_cases(device, [(args.side, 1)], sorted({bench.backend_of(n) for n in names}))
             if args.ops is None or c.op in args.ops.split(",")]
    skip = args.skip.split(",")
    runs = [(case, case.impls[name], *case.inputs()) for name in names for case in cases
            if name in case.impls and not bench.skipped(name, case.impls[name], skip)]
    def setting(fn):  # a variant's environment, set around each of its calls only (variants may share variables)
        return getattr(fn, "context", contextlib.nullcontext)()

    with finite_checks(False):
        for _, fn, leaves, constants in runs:  # warm-up: compile, allocator
            with setting(fn):
                bench.forward_backward(fn, leaves, constants)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for case, fn, leaves, constants in runs:
            torch.cuda.nvtx.range_push(f"{case.op} {case.label}")
            with setting(fn):
                bench.forward_backward(fn, leaves, constants)
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled:", ", ".join(f"{case.op} {case.label}" for case, *_ in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
