"""Peak memory of the DeepATLAS objective (the "loss side") or of a whole training step, by allocation site, on any device.

One forward + backward of ``deepatlas_loss`` from fixed network outputs (``train_step_gpu.py``'s loss side: the
coordinate map a leaf with gradient, frozen features, made before the measurement) under ``torch.profiler`` with memory profiling;
its allocation events are replayed in time order to find the peak of live bytes beyond what was allocated
before, and the allocations live at that moment are grouped by where they were made (the objective's line,
the op, or the autograd node of the backward). Sizes are also given in "volumes": one float32 channel of
one exam (``side^3 * 4`` bytes), so that a CPU run at a small size predicts a GPU run at 256^3.

    python benchmarks/loss_memory.py --side 96                     # CPU
    python benchmarks/loss_memory.py --side 256 --device cuda      # GPU
    python benchmarks/loss_memory.py --side 64 --whole-step --precision bf16 --checkpointing on

The device's kernels decide their own scratch (e.g. the CUDA lncc's chunk buffers), so the CPU table is a
lower bound for the GPU's.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

import deepatlas_fast.objective as objective

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step_gpu as steps  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", type=int, default=96, help="cube side of the pair (default 96)")
    p.add_argument("--batch", type=int, default=2, help="exams (default 2: one pair)")
    p.add_argument("--ops", default="fused", choices=["fused", "stock"])
    p.add_argument("--features", type=int, default=8, help="autoencoder channels (default 8)")
    p.add_argument("--template", type=int, default=64, help="template cube side (default 64)")
    p.add_argument("--whole-step", action="store_true",
                   help="measure a whole training step instead (network forward, objective, backward, AdamW update)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="--whole-step: autocast (default fp32)")
    p.add_argument("--checkpointing", default="off", choices=["off", "on"],
                   help="--whole-step: activation checkpointing (default off)")
    p.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                   help="--whole-step: layout of the convolutions (default contiguous, as train on a GPU; the CPU's "
                        "contiguous convolution backward holds blocked copies of its operands that channels_last "
                        "and cuDNN do not)")
    p.add_argument("--groups-as", type=int, default=256, metavar="SIDE",
                   help="split the LNCC terms' channels into the groups they get at this cube side (default 256, "
                        "so that volumes measured at a small side predict 256^3; objective.LNCC_GROUP_ELEMENTS "
                        "scaled by (side / SIDE)^3); 0: as at the measured side")
    p.add_argument("--rows", type=int, default=15, help="sites listed (default 15)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _site(event) -> str:
    """Where an allocation event was made: the autograd node of a backward, else the innermost frame of the
    package outside deepatlas_fast/ops (with the function it called), and the innermost op."""
    from torch._C._profiler import _EventType

    ops, frames = [], []
    parent = event.parent
    while parent is not None:
        if parent.tag == _EventType.TorchOp:
            ops.append(parent.name)
        elif parent.tag == _EventType.PyCall:
            frames.append(parent.name)
        parent = parent.parent
    op = ops[0] if ops else "?"
    nodes = [name for name in ops if name.startswith("autograd::engine::evaluate_function: ")]
    if nodes:
        ours = [name for name in ops if name.startswith("deepatlas_fast")]
        return f"backward of {nodes[-1].split(': ', 1)[1]} ({ours[0] if ours else op} {op})"
    for i, frame in enumerate(frames):
        if "deepatlas_fast/" in frame and "/ops/" not in frame:
            called = f" > {frames[i - 1].rsplit('/', 1)[-1]}" if i > 0 else ""
            return f"{frame.split('deepatlas_fast/', 1)[1]}{called} ({op})"
    return f"{' < '.join(ops[:3]) or '?'}"


def peak_by_site(profiler, device: torch.device):
    """(peak bytes, {site: bytes live at the peak}) from the profiler's allocation events on ``device``. The
    profiler does not see a block allocated before it started being freed: measure from a state where what
    the measured code frees was made inside the measurement."""
    from torch._C._profiler import _EventType

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag != _EventType.Allocation:
            continue
        fields = event.extra_fields
        if fields.device.type != device.type:
            continue
        events.append((event.start_time_ns, fields.ptr, fields.alloc_size, event))
    events.sort(key=lambda item: item[0])
    alive, current, peak, at_peak = {}, 0, 0, {}
    for _, ptr, size, event in events:
        if size > 0:
            alive[ptr] = (size, event)
            current += size
            if current > peak:
                peak, at_peak = current, dict(alive)
        elif ptr in alive:
            current -= alive.pop(ptr)[0]
    by_site = collections.Counter()
    for size, event in at_peak.values():
        by_site[_site(event)] += size
    return peak, by_site


def main(argv=None) -> int:
    args = parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    if args.groups_as:
        objective.LNCC_GROUP_ELEMENTS = max(1, objective.LNCC_GROUP_ELEMENTS * args.side**3 // args.groups_as**3)
    step_args = steps.parse_args(["--device", args.device, "--features", str(args.features),
                                  "--template", str(args.template),
                                  "--memory-format", args.memory_format])
    case = steps.Case(step_args, device, args.whole_step and args.checkpointing == "on")
    images = steps.make_pair(args.side, args.batch, device)
    if args.whole_step:
        return report_whole_step(args, case, images, device)
    once = steps.loss_side_step(case, images, args.ops)  # the network's outputs made here, before the measurement
    once()  # warm-up
    steps._sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, with_stack=True) as prof:
        once()
        steps._sync(device)
    print(f"loss side's peak on {device.type}: {args.batch} exams at {args.side}^3, {args.features + 1} feature "
          f"channels (autoencoder + intensity; LNCC channel groups as at {args.groups_as or args.side}^3), template "
          f"{args.template}^3, ops {args.ops}, torch {torch.__version__}")
    print_table(args, prof, device)
    return 0


def report_whole_step(args, case, images, device) -> int:
    """The same table for one whole training step (``train_step_gpu.py``'s Case.step), after a warm-up step
    (the optimiser state exists before the measured one)."""
    from torch.profiler import ProfilerActivity, profile

    bf16 = args.precision == "bf16"
    case.step(images, args.ops, bf16)
    steps._sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, with_stack=True) as prof:
        case.step(images, args.ops, bf16)
        steps._sync(device)
    print(f"training step's peak on {device.type}: {args.batch} exams at {args.side}^3, CoordNet base 16, 4 levels, "
          f"{args.features} autoencoder channels (LNCC channel groups as at {args.groups_as or args.side}^3), "
          f"template {args.template}^3, ops {args.ops}, {args.precision}, "
          f"checkpointing {args.checkpointing}, torch {torch.__version__}")
    print_table(args, prof, device)
    return 0


def print_table(args, prof, device) -> None:
    peak, by_site = peak_by_site(prof, device)
    volume = args.side**3 * 4
    print(f"peak {peak / 2**20:.1f} MiB beyond what was allocated before = {peak / volume:.1f} volumes "
          f"(1 volume = one float32 channel of one exam, {volume / 2**20:.2f} MiB); live at the peak:\n")
    print("| volumes | MiB | allocated at |")
    print("|---:|---:|---|")
    for site, size in by_site.most_common(args.rows):
        print(f"| {size / volume:.1f} | {size / 2**20:.1f} | `{site}` |")


if __name__ == "__main__":
    raise SystemExit(main())
