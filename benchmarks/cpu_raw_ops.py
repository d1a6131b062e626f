"""Time the C++ ``cpu`` kernels one call at a time (forward and backward apart, raw ``torch.ops.deepatlas_fast_C``
calls for sample / warp, the public functions under the ``cpu`` backend for the rest), best of ``--repeats``
calls: the numbers to compare two builds of the extension on a noisy machine (run each build's tree in turn,
several times, and keep each row's best).

    .venv/bin/python benchmarks/cpu_raw_ops.py --side 64 --threads 1 [--json out.json]

Compare two builds:  PYTHONPATH=/path/to/other/tree .venv/bin/python benchmarks/cpu_raw_ops.py ...
(the tree whose ``deepatlas_fast`` is imported is printed).
"""

import argparse
import json
import os
import sys
import time

import torch


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def cases(side: int):
    import deepatlas_fast as da
    import deepatlas_fast._C  # noqa: F401  (registers torch.ops.deepatlas_fast_C)
    from deepatlas_fast.tour import blob_volume, smooth_map

    op = torch.ops.deepatlas_fast_C
    shape = (side,) * 3
    g = torch.Generator().manual_seed(0)
    vol = blob_volume(shape, g)
    coords = smooth_map(shape, g)
    vol9 = torch.cat([blob_volume(shape, g) for _ in range(9)], 1)  # the training's feature channels (8 + 1)
    disp = 0.3 * (coords - da.identity_coords(shape))
    up1 = torch.randn_like(vol)
    up9 = torch.randn_like(vol9)
    moved = op.sample(vol, coords, "border")

    def public(fn):
        def run():
            with da.use_backend("cpu"):
                fn()
        return run

    def lncc_fwd_bwd():
        a, b = vol.clone().requires_grad_(), moved.clone().requires_grad_()
        da.lncc(a, b, 9).backward()

    return {
        "sample forward C=1": lambda: op.sample(vol, coords, "border"),
        "sample forward C=1 zeros": lambda: op.sample(vol, coords, "zeros"),
        "sample forward C=9": lambda: op.sample(vol9, coords, "border"),
        "warp forward C=1": lambda: op.warp(vol, disp, "border"),
        "sample backward C=1 coords": lambda: op.sample_backward(up1, vol, coords, "border", False, True),
        "sample backward C=1 both": lambda: op.sample_backward(up1, vol, coords, "border", True, True),
        "sample backward C=9 coords": lambda: op.sample_backward(up9, vol9, coords, "border", False, True),
        "sample backward C=9 both": lambda: op.sample_backward(up9, vol9, coords, "border", True, True),
        "lncc k=9 forward+backward": public(lncc_fwd_bwd),
        "jacobian_var forward+backward": public(lambda: da.jacobian_var(coords.clone().requires_grad_()).backward()),
        "invert_displacement forward+backward": public(
            lambda: da.invert_displacement(disp.clone().requires_grad_())[0].sum().backward()),
        "invert forward (coordinate map)": public(lambda: da.invert(coords)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=64, help="cube side (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the steadiest numbers)")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per row, best kept (default 15)")
    p.add_argument("--json", help="also write {row: ms} here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import deepatlas_fast as da

    da.set_check_finite(False)
    tree = os.path.dirname(os.path.dirname(os.path.abspath(da.__file__)))
    print(f"# C++ cpu kernels, {args.side}^3, {args.threads} thread(s), best of {args.repeats} calls; tree {tree}")
    print()
    print("| op | ms |")
    print("|---|---:|")
    results = {}
    for name, fn in cases(args.side).items():
        results[name] = best_ms(fn, args.repeats)
        print(f"| {name} | {results[name]:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
