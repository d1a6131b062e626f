"""Peak memory and time of one DeepATLAS training step: fused vs stock ops, fp32 vs bf16, checkpointing.

One step = forward of the whole objective (``deepatlas_loss``: CoordNet, frozen autoencoder features,
explicit and implicit terms, Jacobian regularisers) on a pair of volumes, backward, gradient-norm
clipping and an AdamW update, exactly as ``deepatlas_fast.train`` runs it. For each cube side,
``--ops`` x ``--precision`` x ``--checkpointing`` it prints the median step time (CUDA events) and
the peak allocated GPU memory (``torch.cuda.max_memory_allocated``: model, optimiser state and
activations together); then the largest cube (batch 2) and the largest batch (at ``--batch-side``^3)
that fit, per ops and memory setting.

    python benchmarks/train_step_gpu.py                          # 128^3, 192^3, 256^3 on cuda
    python benchmarks/train_step_gpu.py --sizes 128 --no-find-max
    python benchmarks/train_step_gpu.py --quick --device cpu     # tiny sizes, runs anywhere (CI)

Results: ``--out FILE`` writes the markdown table with device, versions and date (commit it under
``benchmarks/results/``). On a CPU the memory column reads n/a (no allocator statistics) and "fits"
only means "ran without an error".
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepatlas_fast  # noqa: E402
from deepatlas_fast.model import DeepAtlas, bound_coords  # noqa: E402
from deepatlas_fast.objective import LossWeights, deepatlas_loss  # noqa: E402
from deepatlas_fast.tour import blob_volume  # noqa: E402
from deepatlas_fast.model import preferred_memory_format, set_convolution_memory_format  # noqa: E402
from deepatlas_fast.train import enable_activation_checkpointing  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256], help="cube sides (default 128 192 256)")
    p.add_argument("--ops", nargs="+", default=["fused", "stock"], choices=["fused", "stock"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--batch", type=int, default=2, help="exams per step (default 2: one pair)")
    p.add_argument("--base", type=int, default=16, help="CoordNet width (default 16)")
    p.add_argument("--levels", type=int, default=4, help="CoordNet levels (default 4)")
    p.add_argument("--features", type=int, default=8, help="autoencoder channels (default 8)")
    p.add_argument("--template", type=int, default=64, help="template cube side (default 64)")
    p.add_argument("--frame", default="moments", choices=["moments", "grid"],
                   help="CoordNet frame (default moments, computed from the images in every step; train's default "
                        "affine frame is computed once per exam before training, so its steps cost no more)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case, after one warm-up (default 3)")
    p.add_argument("--loss-side", dest="loss_side", action="store_true", default=True,
                   help="also time the loss side alone (objective fwd+bwd from fixed network outputs; default on)")
    p.add_argument("--no-loss-side", dest="loss_side", action="store_false")
    p.add_argument("--find-max", dest="find_max", action="store_true", default=True,
                   help="search the largest cube and batch that fit (default on)")
    p.add_argument("--no-find-max", dest="find_max", action="store_false")
    p.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                   help="layout of the convolution weights and activations (train's config.memory_format)")
    p.add_argument("--cudnn-benchmark", dest="cudnn_benchmark", action="store_true", default=True,
                   help="let cuDNN time its convolution algorithms for each shape, as train does (default on; its "
                        "choice can also change the workspace memory)")
    p.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    p.add_argument("--time-breakdown", action="store_true",
                   help="also profile one loss-side forward + backward: time by kernel (first size and ops)")
    p.add_argument("--memory-breakdown", action="store_true",
                   help="CUDA: record one step of the first setting (first size, ops, precision, checkpointing) and "
                        "list what is allocated at its peak, by the deepatlas_fast line that allocated it")
    p.add_argument("--max-side", type=int, default=512, help="largest cube side tried (default 512)")
    p.add_argument("--side-step", type=int, default=32, help="cube side granularity of the search (default 32)")
    p.add_argument("--batch-side", type=int, default=128, help="cube side of the batch search (default 128)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch tried (default 64)")
    p.add_argument("--fit-memory-gib", type=float, default=None,
                   help="cap the CUDA allocator at this many GiB for the largest-size search only (e.g. 79 to "
                        "answer for an 80 GB H100 on a larger card); default: the whole device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and model (16^3; search up to 16^3 / batch 3): a CPU smoke run")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [16]
        args.base, args.levels, args.features, args.template = 4, 3, 2, 8
        args.repeats = 1
        args.max_side, args.side_step, args.batch_side, args.max_batch = 16, 8, 12, 3
    return args


class Case:
    """A model + optimiser on one device, reused across sizes (the state is what a run holds)."""

    def __init__(self, args, device, checkpointing: bool):
        torch.manual_seed(0)
        self.model = DeepAtlas(base=args.base, levels=args.levels, features=args.features,
                               template_shape=(args.template,) * 3, frame=args.frame).to(device)
        self.model.freeze_features()
        set_convolution_memory_format(self.model, preferred_memory_format(device, args.memory_format))
        if checkpointing:
            enable_activation_checkpointing(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.weights = LossWeights()
        self.device = device

    def step(self, images, ops: str, bf16: bool) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if bf16 else _null()
        with ctx:
            loss, _ = deepatlas_loss(self.model, images, self.weights, ops=ops)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        return float(loss.detach())


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_pair(side: int, batch: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(side)
    vols = [blob_volume((side,) * 3, g) for _ in range(batch)]
    return torch.cat(vols, 0).clamp(0, 1).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _oom(exc) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(case: Case, images, ops, bf16, repeats):
    """Median step ms, peak MiB (None on CPU), loss of the first step (from the seeded initialisation,
    comparable across rows); raises on OOM."""
    device = case.device
    loss = case.step(images, ops, bf16)  # warm-up (kernel compile, allocator)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            case.step(images, ops, bf16)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            case.step(images, ops, bf16)
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak, loss


def loss_side_step(case: Case, images, ops):
    """The objective alone, as the anchor's "loss side": a function running forward + backward of
    ``deepatlas_loss`` from network outputs (fp32): the coordinate map a leaf with gradient, the features
    without (the autoencoder is frozen in training), the frame as the model gave it."""
    with torch.no_grad():
        fixed = case.model(images)
    # the network's outputs exist before the measurement (the loss's inputs, not its working memory; until
    # 2026-11-27 each call copied them, 24 channel volumes of a pair counted in "+MiB")
    leaf_raw = fixed["coords_raw"].detach().float().requires_grad_()
    feats = fixed["features"].detach().float()

    def once():
        outputs = {"coords_raw": leaf_raw, "coords": bound_coords(leaf_raw), "features": feats,
                   "atlas": case.model.atlas.view_as(case.model.atlas)}
        if fixed.get("frame") is not None:
            outputs["frame"] = fixed["frame"]
        loss, _ = deepatlas_loss(case.model, images, case.weights, ops=ops, outputs=outputs)
        loss.backward()
        leaf_raw.grad = None  # made in each call (as the step's gradient to the network's output)

    return once


def measure_loss_side(case: Case, images, ops, repeats):
    """:func:`loss_side_step`'s median ms and peak MiB beyond what was allocated before (images, outputs,
    model) - the loss's own working memory."""
    device = case.device
    once = loss_side_step(case, images, ops)
    once()  # warm-up
    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def table_cells(make_case, cells, oom_cells: str, device) -> str:
    """``cells(case)`` for a fresh case, or ``oom_cells`` when it runs out of memory; frees the case."""
    case = None
    try:
        case = make_case()
        return cells(case)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if not _oom(exc):
            raise
        return oom_cells
    finally:
        del case
        _free(device)


def fits(args, device, ops, bf16, ckpt, side, batch) -> bool:
    case = images = None
    try:
        case = Case(args, device, ckpt)
        images = make_pair(side, batch, device)
        loss = case.step(images, ops, bf16)
        _sync(device)
        return math.isfinite(loss)
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        if _oom(exc):
            return False
        raise
    finally:
        del case, images
        _free(device)


def largest(candidates, ok) -> object:
    """Largest candidate (ascending list) for which ok() holds, assuming monotonicity; None if none."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_step_gpu: --device cuda but no CUDA device; use --device cpu (with --quick)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # (train sets it: fixed crop shapes per stage)
    lines = [
        "# DeepATLAS training step: memory and time",
        "",
        f"- device: {name}",
        f"- torch {torch.__version__}, deepatlas-fast {deepatlas_fast.__version__}, "
        f"date {datetime.date.today().isoformat()}",
        f"- model: CoordNet base {args.base}, {args.levels} levels, {args.frame} frame; autoencoder {args.features} channels (frozen); "
        f"template {args.template}^3; batch {args.batch}; AdamW + clipping; default LossWeights; "
        f"{args.memory_format} convolutions" + (", cuDNN benchmark mode" if device.type == "cuda" and args.cudnn_benchmark
                                                 else ""),
        f"- backends (fused): " + ", ".join(f"{op}={deepatlas_fast.get_backend(op, device.type)}"
                                             for op in ("sample", "lncc", "jacobian_var", "invert")),
        "- step ms: median of {} steps after a warm-up{}; peak MiB: max allocated during those steps "
        "(weights, optimiser state, activations)".format(args.repeats, " (CUDA events)" if device.type == "cuda" else ""),
        "",
        "| cube | ops | precision | checkpointing | step ms | peak MiB | first loss |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)

    def emit(*rows):
        print("\n".join(rows), flush=True)
        lines.extend(rows)

    try:
        step_table(args, device, emit)
        if args.loss_side:
            loss_side_table(args, device, emit)
        if args.find_max:
            fit_table(args, device, emit)
        if args.memory_breakdown and device.type == "cuda":
            memory_breakdown(args, device, emit)
        if args.time_breakdown:
            time_breakdown(args, device, emit)
    finally:  # what was measured, also when a later section fails
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def step_table(args, device, emit):
    """One row per cube side x checkpointing x ops x precision, from the same seeded weights."""
    for side in args.sizes:
        images = make_pair(side, args.batch, device)
        for ckpt in args.checkpointing:
            for ops in args.ops:
                for precision in args.precision:
                    def step_row(case, ops=ops, precision=precision):
                        ms, peak, loss = measure(case, images, ops, precision == "bf16", args.repeats)
                        return f"{ms:.1f} | {'n/a' if peak is None else f'{peak:.0f}'} | {loss:.4f} |"

                    emit(f"| {side}^3 | {ops} | {precision} | {ckpt} | " + table_cells(
                        lambda: Case(args, device, ckpt == "on"), step_row, "OOM | OOM | - |", device))
        del images
        _free(device)


def loss_side_table(args, device, emit):
    emit("", "loss side alone (objective forward + backward from fixed network outputs, fp32; +MiB beyond "
         "images, outputs and model)", "", "| cube | ops | loss ms | +MiB |", "|---:|---|---:|---:|")
    for side in args.sizes:
        images = make_pair(side, args.batch, device)
        for ops in args.ops:
            def loss_row(case, ops=ops):
                ms, peak = measure_loss_side(case, images, ops, args.repeats)
                return f"{ms:.1f} | {'n/a' if peak is None else f'{peak:.0f}'} |"

            emit(f"| {side}^3 | {ops} | " + table_cells(lambda: Case(args, device, False), loss_row, "OOM | OOM |", device))
        del images
        _free(device)


def peak_allocations(events, frame_of) -> tuple[int, dict]:
    """Replay allocator trace events (``alloc`` / ``free_completed`` with ``addr``, ``size``, ``frames``):
    the peak of live bytes and, at that moment, the bytes by ``frame_of(frames)``."""
    alive, current, peak, at_peak = {}, 0, 0, {}
    for event in events:
        action, addr = event.get("action"), event.get("addr")
        if action == "alloc":
            alive[addr] = (event["size"], frame_of(event.get("frames", [])))
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(alive)
        elif action == "free_completed" and addr in alive:
            current -= alive.pop(addr)[0]
    by_site: dict = {}
    for size, site in at_peak.values():
        by_site[site] = by_site.get(site, 0) + size
    return peak, by_site


def deepatlas_frame(frames) -> str:
    """The innermost deepatlas_fast frame of an allocation (file:line function), else the innermost frame."""
    for frame in frames:
        if "deepatlas_fast" in frame.get("filename", "") and "/ops/" not in frame.get("filename", ""):
            return f"{Path(frame['filename']).name}:{frame.get('line')} {frame.get('name')}"
    return f"{frames[0].get('name')}" if frames else "?"


def memory_breakdown(args, device, emit, rows: int = 15):
    side, ops, precision, ckpt = args.sizes[0], args.ops[0], args.precision[0], args.checkpointing[0]
    case = Case(args, device, ckpt == "on")
    images = make_pair(side, args.batch, device)
    case.step(images, ops, precision == "bf16")  # warm-up
    _sync(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        case.step(images, ops, precision == "bf16")
        _sync(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    peak, by_site = peak_allocations(snapshot["device_traces"][index], deepatlas_frame)
    emit("", f"allocations of one step at its peak ({side}^3, batch {args.batch}, {ops}, {precision}, checkpointing "
         f"{ckpt}): {peak / 2**30:.2f} GiB beyond what was allocated before the step", "",
         "| GiB | allocated at |", "|---:|---|")
    for site, size in sorted(by_site.items(), key=lambda item: -item[1])[:rows]:
        emit(f"| {size / 2**30:.2f} | `{site}` |")
    del case, images
    _free(device)


def time_breakdown(args, device, emit, rows: int = 15):
    """Where the loss side's time goes: torch.profiler's kernel table (on a CPU: its ops) for one forward +
    backward of the objective (first size, first ops), after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from kernel_profile import kernel_table

    side, ops = args.sizes[0], args.ops[0]
    case = Case(args, device, False)
    images = make_pair(side, args.batch, device)
    once = loss_side_step(case, images, ops)
    once()  # warm-up
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        once()
        _sync(device)
    emit("", f"loss side's time by kernel ({side}^3, batch {args.batch}, {ops}, fp32; one forward + backward)", "",
         kernel_table(prof, device, rows))
    del case, images, once
    _free(device)


def fit_table(args, device, emit):
    """The largest cube (batch ``--batch``) and batch (at ``--batch-side``) whose step runs, per ops and memory
    setting (fp32 without checkpointing, bf16 with), optionally under an allocator cap."""
    sides = list(range(args.side_step, args.max_side + 1, args.side_step))
    batches = list(range(2, args.max_batch + 1))  # the implicit term needs pairs
    cap = ""
    if args.fit_memory_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.fit_memory_gib * 2**30 / total), index)
        cap = f", with the allocator capped at {args.fit_memory_gib:g} GiB"
    emit("", f"largest cube (batch {args.batch}, sides in steps of {args.side_step} up to {args.max_side}) and "
         f"largest batch (at {args.batch_side}^3, up to {args.max_batch}) that fit"
         + cap + ("" if device.type == "cuda" else " (CPU: ran without an error)"),
         "", "| ops | precision | checkpointing | largest cube | largest batch |", "|---|---|---|---:|---:|")
    settings = [(p, c) for p, c in (("fp32", "off"), ("bf16", "on")) if p in args.precision and c in args.checkpointing]
    for ops in args.ops:
        for precision, ckpt in settings:
            bf16, on = precision == "bf16", ckpt == "on"
            side = largest(sides, lambda s: fits(args, device, ops, bf16, on, s, args.batch))
            batch = largest(batches, lambda b: fits(args, device, ops, bf16, on, args.batch_side, b))
            emit(f"| {ops} | {precision} | {ckpt} | {'none' if side is None else f'{side}^3'} | "
                 f"{'none' if batch is None else batch} |")


if __name__ == "__main__":
    sys.exit(main())
