"""Compile every Triton kernel of the ``triton`` backend for sm_90 (H100) on a machine without a GPU,
and print each kernel's resource use (registers, spills, shared memory).

    python benchmarks/triton_sm90.py [--out FILE.md]

How: with the interpreter off, each backend function is called on small CPU tensors while
``JITFunction.run`` is replaced by a recorder that keeps the launch's arguments instead of running it
(outputs stay unwritten, which no host code may depend on: the ops never synchronise). Each distinct
(kernel, argument types, constexprs, num_warps) is then compiled ahead of time with
``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and the cubin's resource usage read with
Triton's bundled ``cuobjdump`` (shared memory from the compile's metadata: it includes the dynamic part,
software-pipelining buffers and layout conversions). This catches what the interpreter cannot: code that
does not compile for a real GPU, register spills (stack frame > 0), shared memory beyond what a block may
use (such a kernel fails to launch). It does not check results.
Exit status 1 when a kernel fails to compile or needs too much shared memory.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_sm90.py needs the interpreter off: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB); more fails to launch


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


class Recorder:
    """Collects distinct launches: key -> (kernel, signature, constexprs, options)."""

    def __init__(self):
        self.launches: dict = {}

    def run(self, kernel: JITFunction, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
        names = [p.name for p in kernel.params]
        bound = dict(zip(names, args))
        bound.update(kwargs)
        for param in kernel.params:
            if param.name not in bound and param.has_default:
                bound[param.name] = param.default
        signature, constexprs = {}, {}
        for param in kernel.params:
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            else:
                signature[param.name] = arg_type(value)
        key = (kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()),
               tuple(sorted((k, str(v)) for k, v in constexprs.items())), tuple(sorted(options.items())))
        self.launches.setdefault(key, (kernel, signature, constexprs, options))


def _inputs(dtype, channels, seed=0):
    from deepatlas_fast.coords import identity_coords

    gen = torch.Generator().manual_seed(seed)
    shape = (9, 10, 11)
    coords = (identity_coords(shape, batch=2, dtype=dtype) * 1.1).contiguous()
    disp = 0.05 * torch.randn(2, 3, *shape, generator=gen, dtype=dtype)
    vol = torch.randn(2, channels, *shape, generator=gen, dtype=dtype)
    other = torch.randn(2, channels, *shape, generator=gen, dtype=dtype)
    return coords, disp, vol, other


def exercise_sample(bt, dtype):
    for channels in (1, 16):
        coords, disp, vol, out = _inputs(dtype, channels)
        for padding in ("border", "zeros"):
            bt.sample(vol, coords, padding)
            bt.sample_backward(out, vol, coords, padding, True, True)
            bt.sample_backward(out, vol, coords, padding, False, True)
            bt.warp(vol, disp, padding)
            bt.warp_backward(out, vol, disp, padding, True, True)
        torch.use_deterministic_algorithms(True)
        try:
            bt.sample_backward(out, vol, coords, "zeros", True, False)
        finally:
            torch.use_deterministic_algorithms(False)
    if dtype == torch.float32:
        for half in (torch.float16, torch.bfloat16):
            bt.sample(vol.to(half), coords, "border")


def exercise_lncc(bt, dtype):
    for channels in (1, 16):
        _, _, a, b = _inputs(dtype, channels)
        for kernel, k in (("box", 9), ("gaussian", 21)):
            bt.lncc(a, b, k, kernel, 1e-5, "mean")
            bt.lncc(a, b, k, kernel, 1e-5, "none")
            bt.lncc_backward(torch.tensor(1.0, dtype=dtype), a, b, k, kernel, 1e-5, "mean", True, True)
            bt.lncc_backward(b, a, b, k, kernel, 1e-5, "none", True, False)
    if dtype == torch.float32:
        for half in (torch.float16, torch.bfloat16):
            bt.lncc(a.to(half), b.to(half), 9, "box", 1e-5, "mean")
    from deepatlas_fast.kernels import similarity

    with similarity.inplane_mode("auto"):  # the in-plane passes as matrix products (k <= 11)
        bt.lncc(a, b, 9, "box", 1e-5, "mean")
        bt.lncc_backward(torch.tensor(1.0, dtype=dtype), a, b, 9, "box", 1e-5, "mean", True, True)
        bt.lncc_backward(b, a, b, 9, "box", 1e-5, "none", True, False)


def exercise_jacobian(bt, dtype):
    coords, *_ = _inputs(dtype, 1)
    grad = torch.randn(2, 1, *coords.shape[2:], dtype=dtype)
    bt.jacobian_det(coords, None)
    bt.jacobian_det_backward(grad, coords, [1.0, 2.0, 3.0])
    stats = bt.jacobian_var(coords, None, True)[2]
    bt.jacobian_var_backward(torch.tensor(1.0, dtype=dtype), coords, stats, None, False)
    bt.jacobian_var_backward(torch.tensor(1.0, dtype=dtype), coords, stats, None, True)


def exercise_invert(bt, dtype):
    coords, disp, *_ = _inputs(dtype, 1)
    inverse, valid = bt.invert(coords, [8, 9, 7], 8, 0.05)
    bt.invert_backward(torch.randn(inverse.shape, dtype=dtype), coords, inverse, valid)
    inverse_disp, valid = bt.invert_displacement(disp, 8, 0.05)
    bt.invert_displacement_backward(torch.randn(disp.shape, dtype=dtype), disp, inverse_disp, valid)


EXERCISES = {"sample": exercise_sample, "lncc": exercise_lncc, "jacobian": exercise_jacobian, "invert": exercise_invert}


def exercise_backend(ops) -> list[str]:
    """Call every backend function on small inputs covering the kernel variants the ops launch;
    returns one line per op whose host code failed."""
    from deepatlas_fast.ops import backend_triton as bt

    errors = []
    for op in ops:
        for dtype in (torch.float32, torch.float64):
            try:
                EXERCISES[op](bt, dtype)
            except Exception as error:  # noqa: BLE001 - report, then fail
                errors.append(f"{op} ({dtype}): host code failed: {type(error).__name__}: {error}")
    return errors


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in found.items()}


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (" / ".join(lines[:1] + lines[-1:]) if lines else "")[:240].replace("|", "/")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here too")
    parser.add_argument("--ops", default=",".join(EXERCISES), help=f"comma list of {list(EXERCISES)}")
    args = parser.parse_args(argv)

    recorder = Recorder()
    original = JITFunction.run
    JITFunction.run = lambda self, *a, grid, warmup, **kw: recorder.run(self, *a, grid=grid, warmup=warmup, **kw)
    try:
        errors = exercise_backend(args.ops.split(","))
    finally:
        JITFunction.run = original

    rows, failures = [], len(errors)
    for (module, name, _, const_key, opt_key), (kernel, signature, constexprs, options) in sorted(
        recorder.launches.items(), key=lambda item: item[0][:2]
    ):
        dtypes = sorted({t for t in signature.values() if t.startswith("*")})
        label = f"{module.rsplit('.', 1)[-1]}.{name}"
        consts = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options)
            use = resources(compiled.asm["cubin"])
            shared = compiled.metadata.shared  # static + dynamic (pipelining buffers, layout conversions)
            over = shared > SHARED_LIMIT
            failures += over
            rows.append(f"| {label} | {' '.join(dtypes)} | {consts} | {options.get('num_warps', 4)} "
                        f"| {options.get('num_stages', 3)} | {use.get('REG')} | {use.get('LOCAL')} | {use.get('STACK')} "
                        f"| {shared}{' OVER THE LIMIT: fails to launch' if over else ''} |")
        except Exception as error:  # noqa: BLE001 - report every failing kernel, then fail
            failures += 1
            rows.append(f"| {label} | {' '.join(dtypes)} | {consts} | - | - | COMPILE FAILED: "
                        f"{type(error).__name__}: {_last_line(error)} ||||")
    table = "\n".join([
        f"Triton {triton.__version__} ahead-of-time compile for sm_90, {len(rows)} kernel variants, {failures} failed.",
        "",
        f"A kernel fails when it does not compile or needs more than {SHARED_LIMIT} bytes of shared memory.",
        "",
        "| kernel | pointer dtypes | constexprs | warps | stages | registers | local bytes | stack frame bytes (spills) "
        "| shared bytes |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        *("", *errors),
    ]) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
