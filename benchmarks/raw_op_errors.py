"""Bad inputs to the raw C++ ops (``torch.ops.deepatlas_fast_C``), each call in its own process: does the op
raise its error, as it should, or take the process down?

    python benchmarks/raw_op_errors.py --device cuda            # one line per case
    python benchmarks/raw_op_errors.py --device cuda --gdb      # + a native backtrace of the first crash (cuda-gdb)

On an H200 (2026-11-27) every case crashed the process (segmentation fault) with CUDA tensors; the CPU
kernels raise. On a machine without a GPU, a CUDA build (torch 2.11.0+cu130, nvcc 13.0) raises from the very
same CUDA-side checks when they are reached with CPU tensors (``--device cuda-kernels-on-cpu``): the throw
through nvcc-compiled frames is fine there, so the GPU machine's crash needs CUDA initialised. The control
cases (torch's own C++ errors before / after CUDA initialisation, ours on the CPU after it) tell whether any
C++ exception crashes such a process, and ``--locate`` names the library and function of the faulting
instruction (benchmarks/segv_locator.c, built with ``cc``, preloaded).
Exit status: 0 when every case raised, 1 when any crashed or passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

PRELUDE = """
import torch
from deepatlas_fast._extension import load_extension
module, reason = load_extension()
assert module is not None, reason
ops = torch.ops.deepatlas_fast_C
dev = {device!r}
if dev == "cuda-kernels-on-cpu":  # the CUDA kernels' checks reached with CPU tensors: no GPU needed
    dev = "cpu"
    class CudaKernels:
        def __getattr__(self, name):
            op = getattr(torch.ops.deepatlas_fast_C, name).default
            return lambda *args: op._op_dk(torch._C.DispatchKey.CUDA, *args)
    ops = CudaKernels()
f = lambda *shape: torch.rand(*shape, device=dev) * 1.8 - 0.9
"""

# Does any C++ exception crash the process on this machine (torch's own, ours on the CPU), and since when?
CONTROLS = {
    "torch: C++ error on the CPU, CUDA not initialised": ("torch.zeros(2).view(3)", "invalid for input of size"),
    "torch: C++ error on the CPU, CUDA initialised": ("torch.cuda.init(); torch.zeros(2).view(3)",
                                                      "invalid for input of size"),
    "torch: C++ error on a CUDA tensor": ("torch.zeros(2, device='cuda').view(3)", "invalid for input of size"),
    "ours: raw CPU op, CUDA initialised": ("torch.cuda.init(); ops.jacobian_det(torch.rand(1, 2, 4, 4, 4), None)",
                                           "field"),
}

CASES = {  # name -> (call that must raise, part of the expected message)
    "invert: 2-channel coords": ("ops.invert(f(1, 2, 4, 4, 4), [4, 4, 4], 2, 0.25)", "coords must have 3 channels"),
    "invert: bad out_shape": ("ops.invert(f(1, 3, 4, 4, 4), [4, 4], 2, 0.25)", "out_shape must be 3 sizes"),
    "invert_displacement: tol nan": ("ops.invert_displacement(f(1, 3, 4, 4, 4), 2, float('nan'))", "tol must be positive"),
    "sample: 2-channel coords": ("ops.sample(f(1, 1, 4, 4, 4), f(1, 2, 3, 3, 3), 'zeros')", "coords"),
    "lncc: shapes differ": ("ops.lncc(f(1, 1, 4, 4, 4), f(1, 1, 4, 4, 5), 3, 'box', 1e-5, 'mean')", "b must have"),
    "jacobian_det: 2 channels": ("ops.jacobian_det(f(1, 2, 4, 4, 4), None)", "field"),
    "lncc_tiled: 33 taps": ("ops.lncc_tiled(f(1, 1, 4, 4, 4), f(1, 1, 4, 4, 4), 33, 'box', 1e-5, 'mean')",
                            "kernel_size"),
    "sample_splat_tiled: 2-channel coords": ("ops.sample_splat_tiled(f(1, 1, 3, 3, 3), f(1, 2, 3, 3, 3), [4, 4, 4], "
                                             "'zeros', False)", "coords"),
    "invert_splat_tiled: bad level_shape": ("ops.invert_splat_tiled(f(1, 3, 4, 4, 4), [4, 1, 4])", "level_shape"),
    "invert_backward_tiled: valid not bool": ("ops.invert_backward_tiled(f(1, 3, 4, 4, 4), f(1, 3, 4, 4, 4), "
                                              "f(1, 3, 4, 4, 4), f(1, 1, 4, 4, 4))", "valid must be bool"),
    "jacobian_det_backward_tiled: grad shape": ("ops.jacobian_det_backward_tiled(f(1, 1, 4, 4, 3), f(1, 3, 4, 4, 4), "
                                                "None)", "grad must have shape"),
}


def build_locator(folder):
    """benchmarks/segv_locator.c as a preloadable library in folder, or None (no C compiler, build failed)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = os.path.join(folder, "segv_locator.so")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "segv_locator.c")
    proc = subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", library, source, "-ldl"], capture_output=True,
                          text=True)
    return library if proc.returncode == 0 else None


def run_case(python, device, call, expected, preload=None):
    code = PRELUDE.format(device=device) + f"""
try:
    {call}
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0][:160])
    raise SystemExit(0 if {expected!r} in str(error) or ({device!r} == "cuda-kernels-on-cpu"
                          and "must be a CUDA tensor" in str(error)) else 3)
raise SystemExit(4)
"""
    env = dict(os.environ, LD_PRELOAD=preload) if preload else None
    proc = subprocess.run([python, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120,
                          env=env)
    if proc.returncode < 0:
        return f"CRASHED (signal {-proc.returncode})", code, (proc.stdout + proc.stderr)[-3000:]
    verdict = {0: "raised", 3: "raised another message", 4: "DID NOT RAISE"}.get(proc.returncode, f"exit {proc.returncode}")
    return verdict, code, (proc.stdout + proc.stderr)[-600:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, or cuda-kernels-on-cpu (the CUDA kernels' checks with CPU tensors)")
    parser.add_argument("--controls", action="store_true",
                        help="first, torch's own C++ errors and ours on the CPU, before / after CUDA initialisation")
    parser.add_argument("--locate", action="store_true",
                        help="name the library and function of a crash's faulting instruction (needs cc)")
    parser.add_argument("--gdb", action="store_true", help="native backtrace of the first crash (cuda-gdb or gdb)")
    args = parser.parse_args(argv)
    failed = []
    with tempfile.TemporaryDirectory() as folder:
        preload = build_locator(folder) if args.locate else None
        if args.locate and preload is None:
            print("--locate: no C compiler or the locator did not build: crashes are not located")
        cases = [("control", name, case) for name, case in CONTROLS.items()] if args.controls else []
        cases += [(args.device, name, case) for name, case in CASES.items()]
        for device, name, (call, expected) in cases:
            verdict, code, output = run_case(sys.executable, "cuda" if device == "control" else device, call,
                                             expected, preload)
            print(f"{device} | {name} | {verdict}", flush=True)
            if verdict != "raised":
                print(output, flush=True)
                if device != "control":
                    failed.append(code)
    if failed and args.gdb:
        debugger = shutil.which("cuda-gdb") or shutil.which("gdb")
        if debugger is None:
            print("no cuda-gdb or gdb here: no backtrace")
        else:
            proc = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c",
                                   failed[0]], capture_output=True, text=True, timeout=300)
            print(proc.stdout[-8000:], proc.stderr[-2000:], sep="\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
