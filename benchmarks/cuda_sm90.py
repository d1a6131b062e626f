"""Compile every CUDA source of the extension for sm_90 without a GPU and report each kernel's resources.

    python benchmarks/cuda_sm90.py [--out FILE.md] [--jobs 2]

Runs ``nvcc -c -arch=sm_90 -Xptxas -v`` on each ``csrc/cuda/*.cu`` with torch's headers (a CPU-only torch
wheel lacks ``c10/cuda/impl/cuda_cmake_macros.h``, a generated one-line header: a stand-in is written to a
temporary folder) and prints registers, stack and spills per kernel. Exit status 1 when a file does not
compile or a kernel spills, so that CI catches CUDA syntax and resource regressions on a machine without
a GPU. Needs ``nvcc`` on PATH (or CUDA_HOME/bin).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STANDARD = "-std=c++20"  # setup.py's cuda_standard

ROOT = Path(__file__).resolve().parents[1]
KERNEL = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")
SHARED = re.compile(r"(\d+) bytes smem")


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.exists() else None


def torch_includes():
    import torch

    base = Path(torch.__file__).parent / "include"
    return [base, base / "torch" / "csrc" / "api" / "include"]


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(name: str) -> str:
    """``void deepatlas_fast::(anonymous namespace)::forward_kernel<float, true>(...)`` -> ``forward_kernel<float, true>``."""
    name = name.replace("(anonymous namespace)::", "").split("(")[0]
    name = name[5:] if name.startswith("void ") else name
    head, _, args = name.partition("<")
    return head.rsplit("::", 1)[-1] + (f"<{args}" if args else "")


def compile_one(nvcc, source: Path, stub: Path):
    includes = [ROOT / "csrc" / "include", stub, *torch_includes()]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", STANDARD, "-arch=sm_90", "-O3", "-Xptxas", "-v", "-DDEEPATLAS_FAST_WITH_CUDA=1",
               *[f"-I{p}" for p in includes], str(source), "-o", str(Path(tmp) / "out.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    rows, current = [], None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := KERNEL.search(line):
            current = {"kernel": m.group(1)}
            rows.append(current)
        elif current is not None and (m := USAGE.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := REGISTERS.search(line)):
            current["registers"] = int(m.group(1))
            if m := SHARED.search(line):
                current["smem"] = int(m.group(1))
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = short(name)
    return source.name, proc.returncode, proc.stderr, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    parser.add_argument("--only", nargs="+", metavar="FILE.cu", help="compile these csrc/cuda files only")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda_sm90: nvcc not found (PATH, CUDA_HOME): nothing compiled", file=sys.stderr)
        return 2
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if args.only:
        unknown = set(args.only) - {s.name for s in sources}
        if unknown:
            parser.error(f"--only: no csrc/cuda/{sorted(unknown)[0]}")
        sources = [s for s in sources if s.name in args.only]
    with tempfile.TemporaryDirectory() as stub:
        header = Path(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h")
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, s, Path(stub)), sources))
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [f"# CUDA kernels compiled for sm_90 ({version})", "",
             "| file | kernel | registers | static smem B | stack B | spill stores B | spill loads B |",
             "|---|---|---:|---:|---:|---:|---:|"]
    failed = False
    for name, code, stderr, rows in results:
        if code != 0:
            failed = True
            lines.append(f"| {name} | COMPILE ERROR | | | | | |")
            print(f"cuda_sm90: {name} failed to compile:\n{stderr[-4000:]}", file=sys.stderr)
            continue
        for row in sorted(rows, key=lambda r: r["kernel"]):
            spilled = row.get("spill_stores", 0) or row.get("spill_loads", 0)
            failed |= bool(spilled)
            lines.append(f"| {name} | `{row['kernel']}` | {row.get('registers', '?')} | {row.get('smem', 0)} | "
                         f"{row.get('stack', '?')} | "
                         f"{row.get('spill_stores', '?')} | {row.get('spill_loads', '?')} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
