"""Bad inputs to the raw C++ ops (``torch.ops.deepatlas_fast_C``), each call in its own process: does the op
raise its error, as it should, or take the process down?

    python benchmarks/raw_op_errors.py --device cuda            # one line per case
    python benchmarks/raw_op_errors.py --device cuda --gdb      # + a native backtrace of the first crash (cuda-gdb)

On an H200 (2026-11-27) the first bad input of tests/test_kernels_invert.py::test_raw_ops_reject_bad_inputs
(2-channel coords to ``invert``) killed its pytest worker with a segmentation fault; the CPU kernels raise.
Exit status: 0 when every case raised, 1 when any crashed or passed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

PRELUDE = """
import torch
from deepatlas_fast._extension import load_extension
module, reason = load_extension()
assert module is not None, reason
ops = torch.ops.deepatlas_fast_C
dev = {device!r}
f = lambda *shape: torch.rand(*shape, device=dev) * 1.8 - 0.9
"""

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


def run_case(python, device, call, expected):
    code = PRELUDE.format(device=device) + f"""
try:
    {call}
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0][:160])
    raise SystemExit(0 if {expected!r} in str(error) else 3)
raise SystemExit(4)
"""
    proc = subprocess.run([python, "-X", "faulthandler", "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode < 0:
        return f"CRASHED (signal {-proc.returncode})", code, proc.stderr[-1500:]
    verdict = {0: "raised", 3: "raised another message", 4: "DID NOT RAISE"}.get(proc.returncode, f"exit {proc.returncode}")
    return verdict, code, (proc.stdout + proc.stderr)[-600:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gdb", action="store_true", help="native backtrace of the first crash (cuda-gdb or gdb)")
    args = parser.parse_args(argv)
    failed = []
    for name, (call, expected) in CASES.items():
        verdict, code, output = run_case(sys.executable, args.device, call, expected)
        print(f"{args.device} | {name} | {verdict}", flush=True)
        if verdict != "raised":
            print(output, flush=True)
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
