"""Where each op's time goes: torch.profiler's per-kernel table for one forward+backward of every op.

    python benchmarks/kernel_profile.py                                  # 256³ on cuda, backends cuda and triton
    python benchmarks/kernel_profile.py --side 24 --device cpu --backends cpu   # smoke run (any machine)

The same inputs as the kernel report (``deepatlas_fast.bench.build_cases``, batch 1, fp32). For each op and
backend: the kernels (or CPU ops) sorted by their total time over ``--iters`` forward+backward passes,
after one warm-up pass. Complements the report's fwd/bwd timings where no hardware profiler runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepatlas_fast import bench  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256, help="cube side (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="cuda,triton", help="comma list of our backends (default cuda,triton)")
    parser.add_argument("--iters", type=int, default=3, help="profiled forward+backward passes (default 3)")
    parser.add_argument("--rows", type=int, default=8, help="kernels listed per op and backend (default 8)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends.split(",")
    cases = bench.build_cases(device, [(args.side, 1)], backends)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for case in cases:
        for name in backends:
            fn = case.impls.get(name)
            if fn is None:
                continue
            tensors, frozen = case.make()
            leaves = [t.detach().requires_grad_() for t in tensors]

            def once():
                out = fn(*leaves, *frozen)
                torch.autograd.grad(out.sum(), leaves, allow_unused=True)

            once()
            bench.sync(device)
            with profile(activities=activities) as prof:
                for _ in range(args.iters):
                    once()
                bench.sync(device)
            print(f"\n## {case.op} {case.label} [{name}], {args.iters} fwd+bwd passes", flush=True)
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
