"""Kernel report (DESIGN §8): every op, per size, per implementation, in one run on one device.

    python benchmarks/gpu_report.py --out DIR            # the issue-3 table on a GPU
    python benchmarks/gpu_report.py --quick --device cpu # tiny smoke run (any machine)

For each case: median ms (CUDA events on a GPU, wall clock on the CPU) of forward, backward and
forward+backward; peak MiB allocated beyond the inputs during forward+backward (GPU only); % of the
memory roofline (minimum DRAM bytes per voxel from shared/PEERS.md over the copy bandwidth measured in
the same run); time ratio against stock PyTorch eager. Implementations: our backends (``triton``,
``cuda`` when built, ``reference``), stock PyTorch eager and under ``torch.compile``, and the peers
that import (MONAI's LNCC, PyPI ``fused-lncc``). Writes ``report.json`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import deepatlas_fast as da

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402


@dataclass
class Case:
    op: str
    label: str
    shape: tuple  # (N, C, D, H, W) of the volume the op works on
    bytes_per_voxel: float  # forward+backward minimum DRAM traffic per voxel (all channels)
    make: Callable[[], tuple]  # -> (leaves needing grad, constants)
    impls: dict = field(default_factory=dict)  # name -> fn(*leaves, *constants) -> tensor
    reps: int = 20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device) -> Optional[float]:
    """Bytes read + written per second by a large device-to-device copy."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=20)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def peak_extra_mib(fn, device) -> Optional[float]:
    if device.type != "cuda":
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _backend(name):
    def wrap(fn):
        def run(*args):
            with da.use_backend(name):
                return fn(*args)

        return run

    return wrap


def _ours(name, op_fn):
    return _backend(name)(op_fn)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def build_cases(device, quick: bool, backends: list[str], with_compile: bool):
    """The cases of issue 3's report; ``quick`` shrinks every size (smoke test)."""
    gen = torch.Generator().manual_seed(0)
    cube = (lambda s: (s // 10,) * 3) if quick else (lambda s: (s, s, s))
    cases = []

    available = da.available_backends(device)

    def ours(op, op_fn, side=None, n=None):
        """Our backends that implement ``op`` here (a backend that would fall back to another is left out);
        the reference joins them at the smallest single-batch size (it is slow)."""
        names = [name for name in backends if op in available.get(name, [])]
        if side == 160 and n == 1 and "reference" not in names:
            names.append("reference")
        return {name: _ours(name, op_fn) for name in names}

    def vol_coords(n, c, shape, smooth=True):
        vol = torch.randn(n, c, *shape, generator=gen).to(device)
        disp = 0.05 * torch.randn(n, 3, *[max(2, s // 8) for s in shape], generator=gen)
        disp = torch.nn.functional.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
        coords = (da.identity_coords(shape, batch=n) + disp).to(device)
        return vol, coords

    for side, n in [(160, 1), (256, 1), (160, 2), (256, 2)]:
        shape = cube(side)
        stock = {"stock": baselines.sample}
        if with_compile and side == 160 and n == 1:
            stock["stock+compile"] = _compiled(baselines.sample)

        def make(n=n, shape=shape):
            vol, coords = vol_coords(n, 1, shape)
            return (vol, coords), ()

        cases.append(Case("sample", f"C=1 both grads {n}x{shape[0]}³", (n, 1, *shape), 56, make,
                          {**ours("sample", da.sample, side, n), **stock}))

        def make_coords(n=n, shape=shape):
            vol, coords = vol_coords(n, 1, shape)
            return (coords,), (vol,)

        coords_only = {name: (lambda c, v, f=f: f(v, c)) for name, f in {**ours("sample", da.sample, side, n), **stock}.items()}
        cases.append(Case("sample", f"C=1 coords grad {n}x{shape[0]}³", (n, 1, *shape), 52, make_coords, coords_only))

    shape = cube(160)

    def make16():
        vol, coords = vol_coords(1, 16, shape)
        return (vol, coords), ()

    cases.append(Case("sample", f"C=16 both grads 1x{shape[0]}³", (1, 16, *shape), 36 + 20 * 16, make16,
                      {**ours("sample", da.sample), "stock": baselines.sample}))

    peers = lncc_peers()
    for side, n, c in [(160, 1, 1), (256, 1, 1), (160, 2, 1), (256, 2, 1), (128, 2, 16)]:
        shape = cube(side)
        impls = ours("lncc", lambda a, b: da.lncc(a, b, 9), side, n if c == 1 else None)
        impls["monai"] = lambda a, b: baselines.lncc(a, b, 9)
        if with_compile and side == 160 and n == 1:
            impls["monai+compile"] = _compiled(lambda a, b: baselines.lncc(a, b, 9))
        impls.update(peers)

        def make_lncc(n=n, c=c, shape=shape):
            a = torch.randn(n, c, *shape, generator=gen).to(device)
            b = (a + 0.5 * torch.randn(n, c, *shape, generator=gen).to(device)).contiguous()
            return (a, b), ()

        cases.append(Case("lncc", f"k=9 box {n}x{c}x{shape[0]}³", (n, c, *shape), 24 * c, make_lncc, impls,
                          reps=5 if side == 256 or c > 1 else 20))

    for side, n in [(160, 1), (256, 1), (160, 2), (256, 2)]:
        shape = cube(side)
        stock = {"stock": baselines.jacobian_var}
        if with_compile and side == 160 and n == 1:
            stock["stock+compile"] = _compiled(baselines.jacobian_var)

        def make_field(n=n, shape=shape):
            _, coords = vol_coords(n, 1, shape)
            return (coords,), ()

        cases.append(Case("jacobian_var", f"{n}x{shape[0]}³", (n, 1, *shape), 36, make_field,
                          {**ours("jacobian_var", lambda f: da.jacobian_var(f), side, n), **stock}))

        stock_inv = {"stock 8-step": baselines.invert_displacement}
        if with_compile and side == 160 and n == 1:
            stock_inv["stock 8-step+compile"] = _compiled(baselines.invert_displacement)

        def make_disp(n=n, shape=shape):
            _, coords = vol_coords(n, 1, shape)
            return (coords - da.identity_coords(shape, batch=n, device=device),), ()

        cases.append(Case("invert_displacement", f"{n}x{shape[0]}³", (n, 1, *shape), 84, make_disp,
                          {**ours("invert_displacement", lambda d: da.invert_displacement(d)[0], side, n), **stock_inv}))
    if quick:
        for case in cases:
            case.reps = 3
    return cases


def lncc_peers() -> dict:
    """Peer LNCC implementations that import here (gradient to the first input only)."""
    peers = {}
    try:
        from fused_lncc import fused_lncc_loss

        peers["fused-lncc (a-grad only)"] = lambda a, b: fused_lncc_loss(a, b.detach(), 9)
    except Exception as error:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        print(f"fused-lncc not available: {type(error).__name__}: {error}", file=sys.stderr)
    return peers


def measure(case: Case, name: str, fn, device, bandwidth) -> dict:
    leaves, constants = case.make()
    leaves = [t.detach().requires_grad_() for t in leaves]
    row = {"op": case.op, "case": case.label, "impl": name}
    try:
        def forward():
            with torch.no_grad():
                return fn(*leaves, *constants)

        def forward_backward():
            out = fn(*leaves, *constants)
            grads = torch.autograd.grad(out.sum(), [t for t in leaves], allow_unused=True)
            return grads

        row["fwd_ms"] = time_ms(forward, device, case.reps)
        out = fn(*leaves, *constants).sum()
        row["bwd_ms"] = time_ms(lambda: torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True),
                                device, case.reps)
        del out
        row["fwd_bwd_ms"] = time_ms(forward_backward, device, case.reps)
        row["peak_extra_mib"] = peak_extra_mib(forward_backward, device)
        if bandwidth:
            voxels = case.shape[0] * math.prod(case.shape[2:])
            roofline_ms = case.bytes_per_voxel * voxels / bandwidth * 1e3
            row["roofline_pct"] = 100 * roofline_ms / row["fwd_bwd_ms"]
    except Exception as error:  # noqa: BLE001 - one failing implementation must not sink the report
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_ratios(rows):
    stock = {}
    for row in rows:
        if row["impl"] in ("stock", "monai", "stock 8-step") and "fwd_bwd_ms" in row:
            stock[(row["op"], row["case"])] = row["fwd_bwd_ms"]
    for row in rows:
        base = stock.get((row["op"], row["case"]))
        if base and "fwd_bwd_ms" in row:
            row["speedup_vs_stock"] = base / row["fwd_bwd_ms"]


def environment(device, bandwidth) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "deepatlas_fast": da.__version__ if hasattr(da, "__version__") else "?",
        "copy_bandwidth_tb_s": bandwidth / 1e12 if bandwidth else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def markdown(info, rows) -> str:
    head = ", ".join(f"{k}: {v}" for k, v in info.items())
    lines = [f"Environment: {head}", "",
             "| op | case | impl | fwd ms | bwd ms | fwd+bwd ms | +MiB | % roofline | × vs stock |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['impl']} | error: {r['error']} ||||||")
            continue
        lines.append(
            f"| {r['op']} | {r['case']} | {r['impl']} | {fmt(r.get('fwd_ms'), '.3f')} | {fmt(r.get('bwd_ms'), '.3f')} "
            f"| {fmt(r.get('fwd_bwd_ms'), '.3f')} | {fmt(r.get('peak_extra_mib'), '.0f')} "
            f"| {fmt(r.get('roofline_pct'), '.0f')} | {fmt(r.get('speedup_vs_stock'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for report.json/.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="sizes / 10, 3 repetitions (smoke test)")
    parser.add_argument("--backends", default=None, help="comma list of our backends (default: those available)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--ops", default=None, help="comma list of ops to run (default: all)")
    parser.add_argument("--impls", default=None,
                        help="comma list of substrings: run only implementations whose name contains one")
    parser.add_argument("--skip-impls", default=None,
                        help="comma list of substrings: skip implementations whose name contains one")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20; 5 for the largest)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="REPORT_JSON",
                        help="only merge earlier report.json files (same device) into one report.md")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    device = torch.device(args.device)
    da.set_check_finite(False)  # time the kernels, not the validation's host syncs
    available = da.available_backends(device)
    backends = args.backends.split(",") if args.backends else [b for b in ("cuda", "triton", "cpu") if available[b]]
    if not backends:
        backends = ["reference"]
    bandwidth = copy_bandwidth(device)
    info = environment(device, bandwidth)
    print(json.dumps(info), flush=True)
    cases = build_cases(device, args.quick, backends, with_compile=not args.no_compile and device.type == "cuda")
    if args.reps:
        for case in cases:
            case.reps = min(case.reps, args.reps)
    if args.ops:
        wanted = set(args.ops.split(","))
        cases = [c for c in cases if c.op in wanted]
    only = args.impls.split(",") if args.impls else None
    skip = args.skip_impls.split(",") if args.skip_impls else []
    rows = []
    for case in cases:
        for name, fn in case.impls.items():
            if (only and not any(s in name for s in only)) or any(s in name for s in skip):
                continue
            row = measure(case, name, fn, device, bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.out, info, rows)  # after every row: a run cut short still leaves its table
    print(write(args.out, info, rows))


def write(out, info, rows) -> str:
    add_ratios(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"environment": info, "rows": rows}, f, indent=1)
    table = markdown(info, rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table)
    return table


def merge(paths, out):
    """Rows of several runs, in case order of the first run, later runs' implementations after."""
    reports = [json.load(open(p)) for p in paths]
    devices = {r["environment"]["device"] for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"--merge: reports come from different devices {sorted(devices)}; not comparable")
    rows = []
    for report in reports:
        for row in report["rows"]:
            row.pop("speedup_vs_stock", None)
            rows.append(row)
    order = {}
    for row in rows:
        order.setdefault((row["op"], row["case"]), len(order))
    rows.sort(key=lambda r: order[(r["op"], r["case"])])  # stable: implementations keep their run order
    print(write(out, reports[0]["environment"], rows))


if __name__ == "__main__":
    main()
