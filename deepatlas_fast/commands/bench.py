"""``deepatlas-fast bench``: time every op against stock PyTorch (and peers) on this machine."""

from __future__ import annotations

import json
import sys

from ._common import _add_device_argument, _device, _fail, _positive_int

DEFAULT_SIZES = {"cpu": [32, 64], "cuda": [64, 128, 256]}


def _names(values) -> list:
    """``--ops a b,c`` -> [a, b, c] (spaces or commas between names)."""
    return [name for value in values or [] for name in value.split(",") if name]


def run(args) -> int:
    import torch

    from .. import available_backends, bench

    try:
        device = torch.device(_device(args))
        ops = _names(args.ops) or list(bench.OPS)
        unknown = sorted(set(ops) - set(bench.OPS))
        if unknown:
            raise ValueError(f"--ops: unknown op(s) {', '.join(unknown)} (known: {', '.join(bench.OPS)})")
        available = available_backends(device)
        backends = _names(args.backends) or [b for b in ("cuda", "triton", "cpu") if available.get(b)] or ["reference"]
        missing = [b for b in backends if b not in available]
        if missing:
            raise ValueError(f"--backends: unknown backend(s) {', '.join(missing)} (known: {', '.join(available)})")
        sizes = args.sizes or DEFAULT_SIZES.get(device.type, DEFAULT_SIZES["cpu"])
        cases = bench.build_cases(device, [(s, 1) for s in sizes], backends, ops=ops,
                                  with_compile=args.compile and device.type == "cuda")
        for case in cases:
            case.reps = min(case.reps, args.reps)

        def progress(line: str) -> None:
            row = json.loads(line)
            took = f"{row['fwd_bwd_ms']:.3f} ms" if "fwd_bwd_ms" in row else row.get("error", "")
            print(f"{row['op']} {row['case']} {row['impl']}: {took}", file=sys.stderr, flush=True)

        info, rows = bench.run(device, cases, args.out, echo=(lambda line: None) if args.quiet else progress)
        print(bench.write(args.out, info, rows), end="")
        picture = bench.plot_png(rows, f"{args.out}/plot.png")
        print(f"written: {args.out}/report.md, {args.out}/report.json" + (f", {picture}" if picture else ""))
    except (ValueError, TypeError, OSError) as exc:
        return _fail("bench", exc)
    return 0


def add_parser(sub) -> None:
    from ..bench import OPS

    bench = sub.add_parser(
        "bench",
        help="time every op (ours and stock PyTorch / peers) on this machine; table and plot",
        description="Times forward, backward and forward+backward of every op at each cube size, for each of "
        "our backends that runs here, stock PyTorch (MONAI's LNCC when installed) and the peers that import; "
        "on a GPU also the peak extra memory and the share of the memory roofline. Prints the table (the time "
        "ratio against stock is the last column) and writes DIR/report.md, DIR/report.json and DIR/plot.png "
        "(time, and GPU memory, against size per implementation). Timings from a busy machine are noisy.",
    )
    bench.add_argument("--ops", nargs="+", metavar="OP", help=f"ops to time, spaces or commas between (default all: {', '.join(OPS)})")
    bench.add_argument("--sizes", nargs="+", type=_positive_int, metavar="N",
                       help="cube sides (default 32 64 on the CPU, 64 128 256 on a GPU)")
    bench.add_argument("--backends", nargs="+", metavar="NAME",
                       help="our backends to time (default: those available here; the reference joins at the "
                       "smallest size)")
    bench.add_argument("--reps", type=_positive_int, default=10, metavar="N",
                       help="timed repetitions per measurement, median reported (default 10)")
    bench.add_argument("--compile", action="store_true", help="also time stock PyTorch under torch.compile (GPU)")
    bench.add_argument("--out", default="bench-out", metavar="DIR", help="folder for the report (default bench-out)")
    _add_device_argument(bench)
    bench.add_argument("--quiet", action="store_true", help="no per-measurement progress lines")
    bench.set_defaults(run=run)
