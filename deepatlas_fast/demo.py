"""The demo (``deepatlas-fast demo``): the whole job on a fresh machine, no data and no network needed.

1. **Cohort**: held-out phantoms (:func:`~deepatlas_fast.data.phantoms.write_phantom_cohort`, cohort seed
   ``1000 + seed``, never trained on) written as NIfTI: phantom 0 is the labelled reference, the others
   the targets, with their true labels.
2. **Training**: self-supervised on ``subjects`` other phantoms (the embedded cohort, no labels) for the
   time budget (:data:`DEMO_CONFIG`, stopped by ``max_minutes``); ``RUN/model.pt`` as ``train`` writes it.
3. **Segmentation**: the reference's labels propagated to every target through the coordinates
   (:func:`~deepatlas_fast.segment.segment`), written as NIfTI on the target's grid with a PNG overlay.
4. **Baselines on the same pairs**: no alignment (the reference's labels where they lie), affine and
   affine + deformable registration (:mod:`deepatlas_fast.register`).
5. **Table**: Dice per method (mean, min, max over the targets) and the seconds per target, printed and
   written to ``OUT/results.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

__all__ = ["DEMO_CONFIG", "EVALUATION_MINUTES", "STEPS_PER_SECOND", "run_demo", "format_table"]

DEMO_CONFIG = {
    "spacing": 12.0,
    "feature_steps": 0,
    "model": {"features": 0, "template_shape": [20, 20, 20], "frame": "affine"},
    "loss": {"folding": 10.0, "jacobian": 3.0, "kernel_size": 5},
    "augment": False,
    "stages": [{"steps": 1000, "size": [32, 32, 32]}],  # steps: set from the time budget (run_demo)
    "log_every": 50,
    "checkpoint_every": 500,
}
"""The training run: phantoms at 12 mm (32^3, the whole body in one crop), intensity only, a 20^3 template,
LNCC windows of 5 voxels (60 mm) and no augmentation: on held-out phantoms after 800 steps these gave one-shot
Dice 0.653 / 0.674 (two seeds) against 0.618-0.638 (three runs) with the 9-voxel window and augmentation, whose
spatial part kept the network from fitting even its training exams
(``benchmarks/results/2026-11-28-objective-window-augmentation.md``). On 2 CPU cores it makes about 3 steps a
second; the one-shot Dice it reaches is in the README's Limits."""

STEPS_PER_SECOND = {"cpu": 4.0, "cuda": 40.0}
"""Upper bounds of the training speed, for the step count of the schedule; the time budget stops it first."""

EVALUATION_MINUTES = 0.5
"""What the budget keeps for the cohort, the segmentations and the registrations (about 1-2 s per target
on 2 CPU cores); the rest of ``minutes`` trains."""


def _training_minutes(minutes: float) -> float:
    return max(0.25 * minutes, minutes - EVALUATION_MINUTES)


def _check(minutes, targets, subjects) -> None:
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0:
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    for name, value, low in (("targets", targets, 1), ("subjects", subjects, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def run_demo(
    out: str = "deepatlas-demo",
    minutes: float = 5.0,
    device: Optional[str] = None,
    *,
    targets: int = 5,
    subjects: int = 32,
    seed: int = 0,
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the demo into the new folder ``out``; returns the results dict also written as ``out/results.json``.

    Args:
        minutes: total time budget (default 5); training gets all of it but :data:`EVALUATION_MINUTES`.
        device: "cpu" | "cuda" (None: CUDA when available).
        targets: held-out phantoms the reference is propagated to (default 5).
        subjects: phantoms trained on (default 32).
        seed: seeds the training and the held-out cohort.
        quiet: no progress bars (the table is still returned; ``echo`` still prints it).
    """
    from .checkpoint import load_model
    from .data.io import load_labels, load_volume, save_like
    from .data.phantoms import write_phantom_cohort
    from .evaluate import resample_to_grid
    from .pictures import overlay_png
    from .propagate import dice, mean_dice
    from .register import affine_register, deformable_register, warp_labels
    from .segment import build_reference, segment
    from .train import train
    from tqdm.auto import tqdm

    _check(minutes, targets, subjects)
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"out: {out!r} already exists and is not an empty folder; give a new folder")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"

    cohort = write_phantom_cohort(os.path.join(out, "data"), 1 + targets, seed=1000 + seed, shape=(32, 32, 32),
                                  spacing=12.0)
    echo(f"cohort: {1 + targets} held-out phantoms in {os.path.join(out, 'data')} (phantom 0 is the reference)")
    budget = _training_minutes(minutes)
    echo(f"training on {subjects} other phantoms for {budget:.1f} min ({device})")
    steps = max(10, int(budget * 60 * STEPS_PER_SECOND.get(torch.device(device).type, 4.0)))
    config = dict(DEMO_CONFIG, seed=seed, stages=[dict(DEMO_CONFIG["stages"][0], steps=steps)])

    def train_echo(line: str) -> None:  # the demo reports its own training summary
        if not line.startswith("deepatlas-fast train: stopped at step"):
            echo(line)

    result = train(config, phantoms=subjects, out_dir=os.path.join(out, "run"), device=device, max_minutes=budget,
                   quiet=quiet, echo=train_echo)
    echo(f"trained {result.step} steps ({result.status.replace('_', ' ')})")
    model = load_model(result.model_path, device=device)

    reference, reference_labels = cohort["images"][0], cohort["labels"][0]
    atlas = build_reference(model, [(reference, reference_labels)])
    moving, moving_labels = load_volume(reference), load_labels(reference_labels)
    rows = {name: [] for name in ("deepatlas one-shot", "no alignment", "affine", "iterative")}
    pairs = list(zip(cohort["images"][1:], cohort["labels"][1:]))
    for image, labels in tqdm(pairs, disable=quiet, unit="target", desc="segment + register", file=sys.stderr):
        truth, fixed = load_labels(labels).data, load_volume(image)

        def record(method: str, predicted, seconds: float) -> None:
            rows[method].append((mean_dice(dice(predicted.cpu(), truth)), seconds))

        name = os.path.basename(image)
        start = time.perf_counter()
        found = segment(model, atlas, image)
        record("deepatlas one-shot", found.labels.data, time.perf_counter() - start)
        save_like(found.labels.data, found.labels, os.path.join(out, "segmentations", name), dtype=atlas.dtype)
        overlay_png(fixed.data, found.labels.data, os.path.join(out, "pictures", name.split(".nii")[0] + ".png"),
                    spacing=fixed.spacing)
        record("no alignment", resample_to_grid(moving_labels, fixed), 0.0)  # where they lie in the world
        start = time.perf_counter()
        affine = affine_register(fixed, moving, device=device, quiet=True)
        affine_labels = warp_labels(affine, moving_labels, device=device)
        affine_seconds = time.perf_counter() - start
        record("affine", affine_labels, affine_seconds)
        start = time.perf_counter()
        deformable = deformable_register(fixed, moving, affine, device=device, quiet=True)
        record("iterative", warp_labels(deformable, moving_labels, device=device),
               affine_seconds + time.perf_counter() - start)

    results = {
        "training": {"steps": result.step, "status": result.status, "minutes": budget, "device": device,
                     "subjects": subjects, "model": str(result.model_path)},
        "reference": reference,
        "targets": [image for image, _ in pairs],
        "methods": {
            method: {"mean_dice": statistics.mean(d for d, _ in found), "min_dice": min(d for d, _ in found),
                     "max_dice": max(d for d, _ in found), "seconds_per_target": statistics.mean(s for _, s in found),
                     "dice": [d for d, _ in found]}
            for method, found in rows.items()
        },
    }
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    echo(format_table(results))
    echo(f"labels: {os.path.join(out, 'segmentations')}  pictures: {os.path.join(out, 'pictures')}  "
         f"model: {result.model_path}")
    return results


def format_table(results: dict) -> str:
    """The demo's markdown table: method, mean / min / max Dice, seconds per target."""
    lines = [f"one-shot Dice of phantom 0's labels on {len(results['targets'])} held-out phantoms "
             f"(trained {results['training']['steps']} steps, {results['training']['minutes']:.1f} min):",
             "| method | mean Dice | min | max | s per target |", "|---|---|---|---|---|"]
    for method, row in results["methods"].items():
        lines.append(f"| {method} | {row['mean_dice']:.3f} | {row['min_dice']:.3f} | {row['max_dice']:.3f} | "
                     f"{row['seconds_per_target']:.2f} |")
    return "\n".join(lines)
