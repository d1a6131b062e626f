"""Kernel report (DESIGN §8) on one device: the issue-3 table (``deepatlas_fast.bench`` does the measuring).

    python benchmarks/gpu_report.py --out DIR            # the issue-3 table on a GPU
    python benchmarks/gpu_report.py --quick --device cpu # tiny smoke run (any machine)

Cases: every op at 160³ and 256³, batch 1 and 2; sample with 16 channels at 160³ and LNCC over 2 x 16
channels at 128³. Writes ``report.json`` and ``report.md`` to ``--out`` after every row.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import deepatlas_fast as da
from deepatlas_fast import bench

POINTS = [(160, 1), (256, 1), (160, 2), (256, 2)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for report.json/.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="sizes / 10, 3 repetitions (smoke test)")
    parser.add_argument("--points", default=None, type=_points,
                        help="comma list of SIDExBATCH cases, e.g. 256x1,160x2 (default: 160x1,256x1,160x2,256x2)")
    parser.add_argument("--no-multichannel", action="store_true", help="skip the 16-channel sample and LNCC cases")
    parser.add_argument("--backends", default=None, help="comma list of our backends (default: those available)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--ops", default=None, help="comma list of ops to run (default: all)")
    parser.add_argument("--impls", default=None,
                        help="comma list of substrings: run only implementations whose name contains one")
    parser.add_argument("--skip-impls", default=None,
                        help="comma list of substrings: skip implementations whose name (or, for a variant, the "
                             "setting that selects it, e.g. DEEPATLAS_FAST_CUDA_JACOBIAN) contains one")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 20; 5 for the largest)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="REPORT_JSON",
                        help="only merge earlier report.json files (same device) into one report.md")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)

    device = torch.device(args.device)
    available = da.available_backends(device)
    backends = args.backends.split(",") if args.backends else [b for b in ("cuda", "triton", "cpu") if available[b]]
    points = args.points or POINTS
    points = [(side // 10, n) for side, n in points] if args.quick else points
    cases = bench.build_cases(device, points, backends or ["reference"], ops=args.ops.split(",") if args.ops else bench.OPS,
                              with_compile=not args.no_compile and device.type == "cuda", multichannel=not args.no_multichannel)
    for case in cases:
        case.reps = 3 if args.quick else case.reps
        if args.reps:
            case.reps = min(case.reps, args.reps)
    info, rows = bench.run(device, cases, args.out, only=args.impls.split(",") if args.impls else None,
                           skip=args.skip_impls.split(",") if args.skip_impls else (),
                           echo=lambda line: print(line, flush=True))
    print(bench.write(args.out, info, rows))


def _points(text):
    try:
        points = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
        if any(len(p) != 2 or min(p) < 1 for p in points):
            raise ValueError
        return points
    except ValueError:
        raise argparse.ArgumentTypeError(f"--points: expected SIDExBATCH[,SIDExBATCH...], got {text!r}") from None


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
    print(bench.write(out, reports[0]["environment"], rows))


if __name__ == "__main__":
    main()
