"""Which of our implementations won each case of a GPU report, and the defaults that implies.

    python benchmarks/pick_defaults.py OUT/report.json [MORE/report.json ...]

Reads the rows of ``benchmarks/gpu_report.py`` (or ``deepatlas-fast bench``) and prints, for every op and case,
our implementations (the backends ``cuda`` / ``triton`` and their variants, e.g. ``cuda (tiled)``) fastest
first by forward+backward median, each with its time relative to the fastest; then, per op, the winner of the
first case of the largest cube side (the issues' targets: 256³, batch 1) and what makes it the default: the backend order of ``DEFAULT_ORDER["cuda"]``
(deepatlas_fast/ops/registry.py) and, for a variant, the setting recorded with its rows (an environment
variable of deepatlas_fast/ops/_cpp.py whose default it would become). Prints only; changes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OURS = ("cuda", "triton", "cpu")  # our backends; "reference" is the oracle, not a candidate


def ours(impl: str) -> bool:
    return impl.split(" ")[0] in OURS


def winners(rows):
    """{(op, case): [(impl, fwd_bwd_ms, setting)], fastest first} over our timed implementations."""
    table = {}
    for row in rows:
        if "error" in row or "fwd_bwd_ms" not in row or not ours(row["impl"]):
            continue
        table.setdefault((row["op"], row["case"]), []).append((row["impl"], row["fwd_bwd_ms"], row.get("setting")))
    return {key: sorted(entries, key=lambda e: e[1]) for key, entries in table.items()}


def side_of(rows, op, case):
    return max((r.get("side", 0) for r in rows if r["op"] == op and r["case"] == case), default=0)


def report(rows) -> str:
    table = winners(rows)
    lines = ["| op | case | fastest first (fwd+bwd ms, x the fastest) |", "|---|---|---|"]
    for (op, case), entries in table.items():
        best = entries[0][1]
        ranked = ", ".join(f"{impl} {ms:.3f} ({ms / best:.2f}x)" for impl, ms, _ in entries)
        lines.append(f"| {op} | {case} | {ranked} |")
    lines.append("")
    for op in dict.fromkeys(op for op, _ in table):
        cases = [case for o, case in table if o == op]
        largest = max(cases, key=lambda c: side_of(rows, op, c))  # the first of the largest side: batch 1 there
        impl, ms, setting = table[(op, largest)][0]
        backends = list(dict.fromkeys(i.split(" ")[0] for i, _, _ in table[(op, largest)]))
        advice = f"{op}: {impl} wins at {largest} ({ms:.3f} ms); DEFAULT_ORDER['cuda'] order for it: {backends}"
        if " (" in impl:
            advice += f"; make the variant the default: {setting or '(setting not recorded in this report)'}"
        lines.append(advice)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files")
    args = parser.parse_args(argv)
    rows = []
    for path in args.reports:
        if not path.exists():
            print(f"pick_defaults: {path} not found", file=sys.stderr)
            return 2
        rows.extend(json.loads(path.read_text())["rows"])
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
