"""Kernel benchmark (DESIGN §8): every op, per size, per implementation, in one run on one device.

Used by ``deepatlas-fast bench`` (any machine) and ``benchmarks/gpu_report.py`` (the GPU report).

For each case: median ms (CUDA events on a GPU, wall clock on the CPU) of forward, backward and
forward+backward; peak MiB allocated beyond the inputs during forward+backward (GPU only); % of the
memory roofline (minimum DRAM bytes per voxel, ../shared/PEERS.md, over the copy bandwidth measured in
the same run; GPU only); time ratio against stock PyTorch eager. Implementations: our backends, stock
PyTorch eager (and under ``torch.compile`` on a GPU), and the peers that import (MONAI's LNCC, PyPI
``fused-lncc``). Timings are measured here, never asserted anywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import stock
from .coords import identity_coords

__all__ = ["OPS", "Case", "build_cases", "measure", "run", "markdown", "write", "plot_png"]

OPS = ("sample", "lncc", "jacobian_var", "invert_displacement")


@dataclass
class Case:
    op: str
    label: str
    shape: tuple  # (N, C, D, H, W) of the volume the op works on
    bytes_per_voxel: float  # forward+backward minimum DRAM traffic per voxel (all channels)
    make: Callable[[], tuple]  # -> (leaves needing grad, constants)
    impls: dict = field(default_factory=dict)  # name -> fn(*leaves, *constants) -> tensor
    reps: int = 20
    side: int = 0  # the cube side (the plot's x axis)

    def inputs(self) -> tuple[list, tuple]:
        """Fresh inputs: the leaves (requiring gradients) and the constants."""
        leaves, constants = self.make()
        return [t.detach().requires_grad_() for t in leaves], constants


def forward_backward(fn, leaves, constants):
    """One forward of ``fn`` and the backward of its sum to ``leaves``."""
    return torch.autograd.grad(fn(*leaves, *constants).sum(), list(leaves), allow_unused=True)


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
    """Bytes read + written per second by a large device-to-device copy (GPU only)."""
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


def _with_backend(name, op_fn):
    import deepatlas_fast as da

    def run(*args):
        with da.use_backend(name):
            return op_fn(*args)

    return run


def _triton_lncc_variant(inplane: str, available):
    """The triton lncc with its in-plane passes set to ``inplane`` (kernels/similarity.py INPLANE) for a
    whole measurement (the backward runs outside the forward's call): {name: fn}, empty without triton."""
    import deepatlas_fast as da

    if "lncc" not in available.get("triton", []):
        return {}
    from .kernels import similarity

    fn = _with_backend("triton", lambda a, b: da.lncc(a, b, 9))
    fn.context = lambda: similarity.inplane_mode(inplane)
    fn.setting = f"deepatlas_fast.kernels.similarity.INPLANE = {inplane!r}"
    return {f"triton ({inplane} in-plane)": fn}


def _cuda_variant(op: str, op_fn, variable: str, value: str, label: str, available, **more: str):
    """The cuda backend's ``op`` with the environment variable ``variable`` (ops/_cpp.py) set to ``value``
    (and the variables ``more``, name=value) for a whole measurement: {"cuda (label)": fn}, empty without the
    cuda backend."""
    if op not in available.get("cuda", []):
        return {}
    fn = _with_backend("cuda", op_fn)
    settings = {variable: value, **more}
    fn.context = lambda: _environment(settings)
    fn.setting = " ".join(f"{name}={value}" for name, value in settings.items())
    return {f"cuda ({label})": fn}


def _cuda_lncc_variant(implementation: str, available, z_planes: str = ""):
    """The cuda lncc with DEEPATLAS_FAST_CUDA_LNCC=``implementation`` (and, if given, the tiled kernels'
    DEEPATLAS_FAST_LNCC_Z_PLANES=``z_planes``): {name: fn}."""
    import deepatlas_fast as da

    from .ops import _cpp

    more = {"DEEPATLAS_FAST_LNCC_Z_PLANES": z_planes} if z_planes else {}
    label = f"{implementation}, {z_planes} z-plane" if z_planes else implementation
    return _cuda_variant("lncc", lambda a, b: da.lncc(a, b, 9), _cpp.LNCC_CUDA_VARIABLE, implementation,
                         label, available, **more)


def _cuda_splat_variant(implementation: str, available):
    """The cuda sample with DEEPATLAS_FAST_CUDA_SPLAT=``implementation`` (its volume gradient): {name: fn}."""
    import deepatlas_fast as da

    from .ops import _cpp

    return _cuda_variant("sample", da.sample, _cpp.SPLAT_CUDA_VARIABLE, implementation, f"{implementation} splat",
                         available)


def _cuda_jacobian_variant(implementation: str, available):
    """The cuda jacobian_var with DEEPATLAS_FAST_CUDA_JACOBIAN=``implementation`` (its backward): {name: fn}."""
    import deepatlas_fast as da

    from .ops import _cpp

    return _cuda_variant("jacobian_var", lambda f: da.jacobian_var(f), _cpp.JACOBIAN_CUDA_VARIABLE, implementation,
                         implementation, available)


def _cuda_invert_splat_variant(implementation: str, available):
    """The cuda invert_displacement with DEEPATLAS_FAST_CUDA_INVERT_SPLAT=``implementation`` (its backward's
    splat): {name: fn}."""
    import deepatlas_fast as da

    from .ops import _cpp

    return _cuda_variant("invert_displacement", lambda d: da.invert_displacement(d)[0],
                         _cpp.INVERT_SPLAT_CUDA_VARIABLE, implementation, f"{implementation} splat", available)


def skipped(name: str, fn, skip: Sequence[str]) -> bool:
    """Whether an implementation is left out: one of ``skip`` is part of its name or of the setting that
    selects it (a variant's environment variable: gpu_check.sh leaves out the variants whose tests failed)."""
    setting = getattr(fn, "setting", "") or ""
    return any(s and (s in name or s in setting) for s in skip)


def backend_of(name: str) -> str:
    """The backend behind a report implementation name: "cuda (tiled)" -> "cuda", "triton" -> "triton"."""
    return name.split(" ")[0]


@contextlib.contextmanager
def _environment(settings: dict):
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def stock_lncc(a, b, kernel_size=9):
    """MONAI 1.6's LocalNormalizedCrossCorrelationLoss when installed (what users run), else the package's
    own separable-convolution stock LNCC (the same numbers)."""
    try:
        from monai.losses import LocalNormalizedCrossCorrelationLoss
    except ImportError:
        return stock.lncc(a, b, kernel_size)
    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)(a, b)


def stock_invert_displacement(disp, iters=8):
    """Fixed-point iterations v <- -disp(x + v) with grid_sample, differentiated by autograd."""
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    v = -disp
    for _ in range(iters):
        v = -stock.sample(disp, identity + v)
    return v


def lncc_peers() -> dict:
    """Peer LNCC implementations that import here (gradient to the first input only)."""
    peers = {}
    try:
        from fused_lncc import fused_lncc_loss

        peers["fused-lncc (a-grad only)"] = lambda a, b: fused_lncc_loss(a, b.detach(), 9)
    except Exception as error:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        print(f"fused-lncc not available: {type(error).__name__}: {error}", file=sys.stderr)
    return peers


def _monai_available() -> bool:
    try:
        import monai.losses  # noqa: F401
    except ImportError:
        return False
    return True


def build_cases(
    device,
    points: Sequence[tuple],
    backends: Sequence[str],
    *,
    with_compile: bool = False,
    ops: Sequence[str] = OPS,
    multichannel: bool = False,
) -> list:
    """The benchmark cases.

    Args:
        points: ``(cube side, batch)`` pairs; every op runs at each. The reference backend joins the first
            single-batch point (it is slow), and so do the ``torch.compile`` baselines (``with_compile``).
        backends: our backends to time (those not implementing an op on ``device`` are left out).
        multichannel: also sample with 16 channels and LNCC over 2 x 16 channels (at the first point's side,
            LNCC at 128 when the first side is 160: the GPU report's cases).
    """
    import deepatlas_fast as da

    gen = torch.Generator().manual_seed(0)
    available = da.available_backends(device)
    first_single = next(((s, n) for s, n in points if n == 1), None)
    cases = []

    def ours(op, op_fn, point=None):
        names = [name for name in backends if op in available.get(name, [])]
        if point == first_single and "reference" not in names:
            names.append("reference")
        return {name: _with_backend(name, op_fn) for name in names}

    def compiled(point, name, fn):
        return {f"{name}+compile": torch.compile(fn, dynamic=False)} if with_compile and point == first_single else {}

    def smooth_disp(n, shape, amplitude):
        """``amplitude`` x N(0, 1) on a grid of side / 8, upsampled trilinearly (normalised units)."""
        disp = amplitude * torch.randn(n, 3, *[max(2, s // 8) for s in shape], generator=gen)
        return torch.nn.functional.interpolate(disp, size=shape, mode="trilinear", align_corners=True)

    def vol_coords(n, c, shape):
        vol = torch.randn(n, c, *shape, generator=gen).to(device)
        return vol, (identity_coords(shape, batch=n) + smooth_disp(n, shape, 0.05)).to(device)

    lncc_name = "monai" if _monai_available() else "stock"
    peers = lncc_peers() if "lncc" in ops else {}
    for side, n in points:
        shape, point = (side,) * 3, (side, n)
        if "sample" in ops:
            def make(n=n, shape=shape):
                return vol_coords(n, 1, shape), ()

            impls = {**ours("sample", da.sample, point), **_cuda_splat_variant("tiled", available),
                     **_cuda_splat_variant("merged", available), "stock": stock.sample,
                     **compiled(point, "stock", stock.sample)}
            cases.append(Case("sample", f"C=1 both grads {n}x{side}³", (n, 1, *shape), 56, make, impls, side=side))

            def make_coords(n=n, shape=shape):
                vol, coords = vol_coords(n, 1, shape)
                return (coords,), (vol,)

            coords_only = {name: (lambda c, v, f=f: f(v, c)) for name, f in impls.items()
                           if "splat" not in name}  # a volume-gradient variant: the same as its backend here
            cases.append(Case("sample", f"C=1 coords grad {n}x{side}³", (n, 1, *shape), 52, make_coords, coords_only,
                              side=side))
        if "lncc" in ops:
            def make_lncc(n=n, shape=shape, c=1):
                a = torch.randn(n, c, *shape, generator=gen).to(device)
                return (a, (a + 0.5 * torch.randn(n, c, *shape, generator=gen).to(device)).contiguous()), ()

            impls = {**ours("lncc", lambda a, b: da.lncc(a, b, 9), point), **_triton_lncc_variant("dot", available),
                     **_cuda_lncc_variant("tiled", available), **_cuda_lncc_variant("tiled", available, "1"),
                     lncc_name: stock_lncc,
                     **compiled(point, lncc_name, stock_lncc), **peers}
            cases.append(Case("lncc", f"k=9 box {n}x1x{side}³", (n, 1, *shape), 24, make_lncc, impls,
                              reps=5 if side >= 256 else 20, side=side))
        if "jacobian_var" in ops:
            def make_field(n=n, shape=shape):
                return (vol_coords(n, 1, shape)[1],), ()

            impls = {**ours("jacobian_var", lambda f: da.jacobian_var(f), point),
                     **_cuda_jacobian_variant("tiled", available), "stock": stock.jacobian_var,
                     **compiled(point, "stock", stock.jacobian_var)}
            cases.append(Case("jacobian_var", f"{n}x{side}³", (n, 1, *shape), 36, make_field, impls, side=side))
        if "invert_displacement" in ops:
            def make_disp(n=n, shape=shape):
                # 1 voxel (std) over 8-voxel cells: det J in [0.16, 2.4], no folding at 160^3 or 256^3. (The
                # sampling cases' 0.05 normalised, 6 voxels at 256^3, folds a quarter of the voxels there:
                # no inverse to converge to.)
                return (smooth_disp(n, shape, 2.0 / (shape[0] - 1)).to(device),), ()

            impls = {**ours("invert_displacement", lambda d: da.invert_displacement(d)[0], point),
                     **_cuda_invert_splat_variant("tiled", available),
                     **_cuda_invert_splat_variant("merged", available),
                     "stock 8-step": stock_invert_displacement,
                     **compiled(point, "stock 8-step", stock_invert_displacement)}
            cases.append(Case("invert_displacement", f"{n}x{side}³", (n, 1, *shape), 84, make_disp, impls, side=side))
    if multichannel and points:
        side = points[0][0]
        shape = (side,) * 3
        if "sample" in ops:
            def make16(shape=shape):
                return vol_coords(1, 16, shape), ()

            cases.append(Case("sample", f"C=16 both grads 1x{side}³", (1, 16, *shape), 36 + 20 * 16, make16,
                              {**ours("sample", da.sample), **_cuda_splat_variant("tiled", available),
                               **_cuda_splat_variant("merged", available), "stock": stock.sample}, side=side))
        if "lncc" in ops:
            lside = 128 if side == 160 else side
            lshape = (lside,) * 3

            def make_lncc16(shape=lshape):
                a = torch.randn(2, 16, *shape, generator=gen).to(device)
                return (a, (a + 0.5 * torch.randn(2, 16, *shape, generator=gen).to(device)).contiguous()), ()

            impls = {**ours("lncc", lambda a, b: da.lncc(a, b, 9)), **_triton_lncc_variant("dot", available),
                     **_cuda_lncc_variant("tiled", available),
                     lncc_name: stock_lncc, **peers}
            cases.append(Case("lncc", f"k=9 box 2x16x{lside}³", (2, 16, *lshape), 24 * 16, make_lncc16, impls,
                              reps=5, side=lside))
    return cases


def measure(case: Case, name: str, fn, device, bandwidth) -> dict:
    """One implementation of one case: fwd, bwd and fwd+bwd medians, peak extra MiB, % roofline."""
    leaves, constants = case.inputs()
    row = {"op": case.op, "case": case.label, "impl": name, "side": case.side, "batch": case.shape[0],
           "channels": case.shape[1]}
    if getattr(fn, "setting", None):  # a variant: what selects it (benchmarks/pick_defaults.py reads it)
        row["setting"] = fn.setting
    try:
        def forward():
            with torch.no_grad():
                return fn(*leaves, *constants)

        row["fwd_ms"] = time_ms(forward, device, case.reps)
        out = fn(*leaves, *constants).sum()
        row["bwd_ms"] = time_ms(lambda: torch.autograd.grad(out, leaves, retain_graph=True, allow_unused=True),
                                device, case.reps)
        del out
        row["fwd_bwd_ms"] = time_ms(lambda: forward_backward(fn, leaves, constants), device, case.reps)
        row["peak_extra_mib"] = peak_extra_mib(lambda: forward_backward(fn, leaves, constants), device)
        if bandwidth:
            voxels = case.shape[0] * math.prod(case.shape[2:])
            roofline_ms = case.bytes_per_voxel * voxels / bandwidth * 1e3
            row["roofline_pct"] = 100 * roofline_ms / row["fwd_bwd_ms"]
    except Exception as error:  # noqa: BLE001 - one failing implementation must not sink the report
        row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


STOCK_IMPLS = ("stock", "monai", "stock 8-step")


def add_ratios(rows):
    base = {(r["op"], r["case"]): r["fwd_bwd_ms"] for r in rows if r["impl"] in STOCK_IMPLS and "fwd_bwd_ms" in r}
    for row in rows:
        stock_ms = base.get((row["op"], row["case"]))
        if stock_ms and "fwd_bwd_ms" in row:
            row["speedup_vs_stock"] = stock_ms / row["fwd_bwd_ms"]


def environment(device, bandwidth) -> dict:
    import deepatlas_fast as da

    info = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "deepatlas_fast": getattr(da, "__version__", "?"),
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


def write(out, info, rows) -> str:
    """``out/report.json`` and ``out/report.md`` (ratios added); returns the markdown table."""
    add_ratios(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"environment": info, "rows": rows}, f, indent=1)
    table = markdown(info, rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(table)
    return table


def run(
    device,
    cases: Sequence[Case],
    out: Optional[str] = None,
    *,
    only: Optional[Sequence[str]] = None,
    skip: Sequence[str] = (),
    echo: Callable[[str], None] = lambda line: None,
) -> tuple:
    """Measure every (case, implementation) whose name contains one of ``only`` (all by default) and that
    :func:`skipped` does not leave out; the report files are rewritten after every row (a run cut short still
    leaves its table). Returns ``(environment, rows)``."""
    from .ops import finite_checks

    device = torch.device(device)
    with finite_checks(False):  # time the kernels, not the validation's host syncs
        bandwidth = copy_bandwidth(device)
        info = environment(device, bandwidth)
        rows = []
        for case in cases:
            for name, fn in case.impls.items():
                if (only and not any(s in name for s in only)) or skipped(name, fn, skip):
                    continue
                with getattr(fn, "context", contextlib.nullcontext)():  # a variant's setting, for fwd and bwd
                    rows.append(measure(case, name, fn, device, bandwidth))
                echo(json.dumps(rows[-1]))
                if out is not None:
                    write(out, info, rows)
    add_ratios(rows)
    return info, rows


# ------------------------------------------------------------------------------------------------- plot
_FONT = {  # 3x5 pixel glyphs, rows top to bottom
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "F": ("111", "100", "110", "100", "100"),
    "G": ("011", "100", "101", "101", "011"), "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"), "J": ("001", "001", "001", "101", "010"),
    "K": ("101", "101", "110", "101", "101"), "L": ("100", "100", "100", "100", "111"),
    "M": ("101", "111", "111", "101", "101"), "N": ("110", "101", "101", "101", "101"),
    "O": ("010", "101", "101", "101", "010"), "P": ("110", "101", "110", "100", "100"),
    "Q": ("010", "101", "101", "110", "011"), "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"), "T": ("111", "010", "010", "010", "010"),
    "U": ("101", "101", "101", "101", "111"), "V": ("101", "101", "101", "101", "010"),
    "W": ("101", "101", "111", "111", "101"), "X": ("101", "101", "010", "101", "101"),
    "Y": ("101", "101", "010", "010", "010"), "Z": ("111", "001", "010", "100", "111"),
    ".": ("000", "000", "000", "000", "010"), "+": ("000", "010", "111", "010", "000"),
    "-": ("000", "000", "111", "000", "000"), "_": ("000", "000", "000", "000", "111"),
    ":": ("000", "010", "000", "010", "000"), "(": ("010", "100", "100", "100", "010"),
    ")": ("010", "001", "001", "001", "010"), "/": ("001", "001", "010", "100", "100"),
    " ": ("000",) * 5,
}
_LINE_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
                 (240, 50, 230), (128, 128, 0), (0, 0, 128), (128, 0, 0))


def _text(img, x: int, y: int, text: str, colour=(0, 0, 0), scale: int = 2) -> None:
    for ch in text.upper():
        glyph = _FONT.get(ch, _FONT[" "])
        for r, row in enumerate(glyph):
            for c, bit in enumerate(row):
                if bit == "1":
                    img[y + r * scale: y + (r + 1) * scale, x + c * scale: x + (c + 1) * scale] = torch.tensor(colour)
        x += 4 * scale


def _line(img, x0, y0, x1, y1, colour, width=2) -> None:
    steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
    for t in range(steps + 1):
        x = round(x0 + (x1 - x0) * t / steps)
        y = round(y0 + (y1 - y0) * t / steps)
        img[max(0, y - width // 2): y + width - width // 2, max(0, x - width // 2): x + width - width // 2] = \
            torch.tensor(colour)


def plot_png(rows: Sequence[dict], path: str, *, key: str = "fwd_bwd_ms") -> Optional[str]:
    """Time (``key``, log scale) against the cube side, one panel per op, one line per implementation
    (single-batch, single-channel cases with two or more sizes), with ``+MiB`` panels below when the rows
    carry GPU memory. A dependency-free PNG (:func:`~deepatlas_fast.pictures.write_png`); None when no
    implementation has two sizes."""
    from .pictures import write_png

    def series(metric):
        found = {}
        for r in rows:
            if r.get(metric) is None or r.get("batch") != 1 or r.get("channels") != 1 or "coords grad" in r["case"]:
                continue
            found.setdefault(r["op"], {}).setdefault(r["impl"], []).append((r["side"], r[metric]))
        return {op: {i: sorted(p) for i, p in impls.items() if len(p) >= 2} for op, impls in found.items()}

    panels = [("MS", series(key))]
    if any(r.get("peak_extra_mib") is not None for r in rows):
        panels.append(("MIB", series("peak_extra_mib")))
    ops = [op for op in OPS if any(panels[0][1].get(op, {}).values())]
    if not ops:
        return None
    width, height, margin = 360, 260, 50
    img = torch.full((height * len(panels), width * len(ops), 3), 255, dtype=torch.uint8)
    impl_names = sorted({i for _, s in panels for impls in s.values() for i in impls})
    colour = {name: _LINE_COLOURS[k % len(_LINE_COLOURS)] for k, name in enumerate(impl_names)}
    for row_index, (unit, data) in enumerate(panels):
        for col, op in enumerate(ops):
            x0, y0 = col * width, row_index * height
            impls = data.get(op, {})
            points = [p for pts in impls.values() for p in pts if p[1] > 0]
            _text(img, x0 + margin, y0 + 6, f"{op} {unit}")
            if not points:
                continue
            sides = sorted({p[0] for p in points})
            lo, hi = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
            hi = hi if hi > lo else lo + 1
            left, right, top, bottom = x0 + margin, x0 + width - 10, y0 + 30, y0 + height - 80
            _line(img, left, top, left, bottom, (0, 0, 0), 1)
            _line(img, left, bottom, right, bottom, (0, 0, 0), 1)

            def xy(side, value):
                fx = (math.log(side) - math.log(sides[0])) / max(1e-9, math.log(sides[-1]) - math.log(sides[0]))
                fy = (math.log10(value) - lo) / (hi - lo)
                return left + fx * (right - left), bottom - fy * (bottom - top)

            for side in sides:
                _text(img, int(xy(side, 10**lo)[0]) - 8, bottom + 4, str(side), scale=1)
            _text(img, x0 + 2, top, f"{10**hi:.3g}", scale=1)
            _text(img, x0 + 2, bottom - 6, f"{10**lo:.3g}", scale=1)
            for k, (name, pts) in enumerate(sorted(impls.items())):
                pts = [p for p in pts if p[1] > 0]
                for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
                    _line(img, *xy(s0, v0), *xy(s1, v1), colour[name])
                legend_y = bottom + 16 + 10 * k
                if legend_y < y0 + height - 8:
                    img[legend_y: legend_y + 6, left: left + 10] = torch.tensor(colour[name])
                    _text(img, left + 14, legend_y, name[:40], scale=1)
    return write_png(path, img)
