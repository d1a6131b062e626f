"""Where each op's time goes: torch.profiler's per-kernel table for one forward+backward of every op.

    python benchmarks/kernel_profile.py                                  # 256³ on cuda: cuda, its tiled variants, triton
    python benchmarks/kernel_profile.py --side 24 --device cpu --backends cpu   # smoke run (any machine)

The same inputs as the kernel report (``deepatlas_fast.bench.build_cases``, batch 1, fp32). For each op and
backend: the GPU kernels (on a CPU: the ops) sorted by their own time over ``--iters`` forward+backward
passes, after one warm-up pass, with the finiteness checks off as in the report. Complements the report's
fwd/bwd timings where no hardware profiler runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepatlas_fast import bench, finite_checks  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256, help="cube side (default 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", default="cuda,cuda (tiled),cuda (tiled splat),cuda (merged splat),triton",
                        help="comma list of the report's implementation names (default: cuda, its tiled variants, "
                             "triton)")
    parser.add_argument("--skip", default="", help="comma list: leave out implementations whose name or variant "
                                                  "setting contains one (gpu_check: the variants whose tests failed)")
    parser.add_argument("--iters", type=int, default=3, help="profiled forward+backward passes (default 3)")
    parser.add_argument("--rows", type=int, default=8, help="kernels listed per op and backend (default 8)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backends = args.backends.split(",")
    cases = bench.build_cases(device, [(args.side, 1)], sorted({bench.backend_of(name) for name in backends}))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for case in cases:
        for name in backends:
            fn = case.impls.get(name)
            if fn is None or bench.skipped(name, fn, args.skip.split(",")):
                continue
            leaves, constants = case.inputs()
            with finite_checks(False), getattr(fn, "context", contextlib.nullcontext)():  # a variant's setting
                bench.forward_backward(fn, leaves, constants)  # warm-up
                bench.sync(device)
                with profile(activities=activities) as prof:
                    for _ in range(args.iters):
                        bench.forward_backward(fn, leaves, constants)
                    bench.sync(device)
            print(f"\n## {case.op} {case.label} [{name}], {args.iters} fwd+bwd passes", flush=True)
            print(kernel_table(prof, device, args.rows), flush=True)
    return 0


def kernel_table(prof, device, rows: int) -> str:
    """Markdown rows: name, calls, own time in total and per call (GPU kernels only on a GPU)."""
    on_gpu = device.type == "cuda"

    def own_us(event):
        return event.self_device_time_total if on_gpu else event.self_cpu_time_total

    def counted(event):  # on a GPU the kernels alone (the ops that launch them report the same time)
        return own_us(event) > 0 and (not on_gpu or str(getattr(event, "device_type", "")).endswith("CUDA"))

    events = [e for e in prof.key_averages() if counted(e)]
    events.sort(key=own_us, reverse=True)
    total = sum(own_us(e) for e in events) or 1.0
    lines = ["| kernel | calls | own ms | ms per call | share |", "|---|---:|---:|---:|---:|"]
    for e in events[:rows]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        lines.append(f"| `{name}` | {e.count} | {own_us(e) / 1e3:.3f} | {own_us(e) / 1e3 / e.count:.3f} | "
                     f"{100 * own_us(e) / total:.0f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
