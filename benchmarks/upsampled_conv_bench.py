"""Time and memory of a CoordNet decoder's upsampled convolution: resize + conv3d (stock) against
``upsampled_conv3d`` (slabs of planes), forward + backward, on any device.

    python benchmarks/upsampled_conv_bench.py                          # GPU: 256^3, a pair, 32 -> 16 channels
    python benchmarks/upsampled_conv_bench.py --device cpu --side 64

Rows: median ms of forward + backward (gradients to the coarse input and the weight) and, on CUDA, the peak
memory allocated beyond the inputs; "slabs N" forces N slabs (``rows = ceil(side / N)``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepatlas_fast.upsampled_conv import slab_rows, upsampled_conv3d  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=256, help="fine cube side (default 256)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cin", type=int, default=32, help="coarse channels (default 32: base 16, level 1)")
    p.add_argument("--cout", type=int, default=16)
    p.add_argument("--slabs", type=int, nargs="*", default=[2], help="extra rows with this many slabs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def stock(h, weight, size, rows=None):
    return F.conv3d(F.interpolate(h, size=size, mode="trilinear", align_corners=True), weight, padding=1)


def measure(fn, h, weight, size, rows, dtype, reps, device):
    """(median ms, peak extra MiB or None) of fn's forward + backward under autocast ``dtype`` (None: off)."""
    def once():
        h.grad = weight.grad = None
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            y = fn(h, weight, size, rows=rows)
        y.backward(torch.ones_like(y))

    once()  # warm-up (cuDNN's choice of algorithms)
    times, peak = [], None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        start = time.perf_counter()
        once()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    coarse = -(-args.side // 2)
    size = (args.side,) * 3
    h = torch.randn(args.batch, args.cin, coarse, coarse, coarse, device=device, requires_grad=True)
    weight = torch.randn(args.cout, args.cin, 3, 3, 3, device=device, requires_grad=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"upsampled convolution on {name}: {args.batch} x {args.cin} channels {coarse}^3 -> {args.side}^3, "
          f"{args.cout} out, forward + backward, median of {args.reps}; torch {torch.__version__}\n")
    print("| precision | method | ms | peak extra MiB |")
    print("|---|---|---:|---:|")
    variants = [("resize + conv3d", stock, None), (f"slabs (default, {slab_rows(args.side)} planes)", upsampled_conv3d, None)]
    variants += [(f"slabs {n}", upsampled_conv3d, -(-args.side // n)) for n in args.slabs]
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        for method, fn, rows in variants:
            ms, peak = measure(fn, h, weight, size, rows, dtype, args.reps, device)
            print(f"| {label} | {method} | {ms:.1f} | {'n/a' if peak is None else f'{peak:.0f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
