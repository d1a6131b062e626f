"""Dice per method through the product's own path, on NIfTI files, with the time per target.

    python benchmarks/product_dice.py --model RUN/model.pt --images 'COHORT/*_ct.nii.gz' \
        --labels 'COHORT/*_labels.nii.gz' --references 3 --json out.json

``--images`` / ``--labels`` (files, folders or globs, in matching order): the first ``--references``
K subjects are the labelled references, the rest the targets. Methods (``--methods``, default all):

* ``one-shot``: :func:`deepatlas_fast.segment.build_reference` on reference 0, then
  :func:`~deepatlas_fast.segment.segment` per target (what ``deepatlas-fast segment`` does);
* ``few-shot``: the same with the K references pooled;
* ``cascade``: the one-shot atlas through :func:`deepatlas_fast.cascade.cascade_segment` (coarse pass at
  the model's default coarse spacing, one fine pass around every structure found; ``segment --cascade``);
* ``fine-tuned one-shot`` / ``fine-tuned few-shot``: the same after :func:`deepatlas_fast.finetune.finetune`
  of a copy of the model on the K references (``--finetune-steps``, default the command's);
* ``affine`` / ``iterative``: :func:`deepatlas_fast.register.affine_register` (then
  :func:`~deepatlas_fast.register.deformable_register`) of reference 0 to the target, labels carried
  by :func:`~deepatlas_fast.register.warp_labels` (what ``deepatlas-fast register`` does);
* ``identity``: reference 0's labels read on the target's grid as they lie in world coordinates.

Every method predicts on the target IMAGE's grid; Dice is measured on the target's LABEL grid (the
prediction resampled there by nearest neighbour in world coordinates,
:func:`deepatlas_fast.evaluate.resample_to_grid`), over ``--eval-labels`` (a SynthSeg
``labels_table.txt`` or a JSON id -> name table) or by default every id in the target's truth.
A label missing from both maps is skipped, one missing from one map scores 0.
Seconds per target: for the DeepATLAS rows ``segment`` on an exam already loaded at the model's spacing
(network pass + propagation + return to the file's grid); building the references and fine-tuning are
timed once and reported apart. ``iterative`` includes its affine stage.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import time

import torch

from deepatlas_fast.cascade import cascade_segment
from deepatlas_fast.checkpoint import load_model
from deepatlas_fast.data.io import load_labels, load_volume, read_label_table, same_grid
from deepatlas_fast.data.synth import read_labels_table
from deepatlas_fast.evaluate import resample_to_grid
from deepatlas_fast.finetune import DEFAULT_STEPS, finetune
from deepatlas_fast.propagate import dice
from deepatlas_fast.register import affine_register, deformable_register, warp_labels
from deepatlas_fast.segment import build_reference, load_exam, segment
from deepatlas_fast.train import resolve_images

METHODS = ("identity", "one-shot", "few-shot", "cascade", "fine-tuned one-shot", "fine-tuned few-shot", "affine",
           "iterative")


def eval_ids(path):
    """Label ids to score from a labels_table.txt or a JSON table (0 dropped); None: every truth id."""
    if path is None:
        return None
    table = read_label_table(path, "--eval-labels") if path.endswith(".json") else read_labels_table(path)
    return [k for k in table if k != 0]


def score(pred, truth, ids) -> dict:
    """Dice per label of a label Volume against the truth Volume, on the truth's grid."""
    data = pred.data if same_grid(pred.affine, pred.shape, truth.affine, truth.shape) else resample_to_grid(pred, truth)
    labels = ids if ids is not None else [int(k) for k in torch.unique(truth.data) if k != 0]
    return {k: v for k, v in dice(data, truth.data, labels).items() if v == v}  # nan: absent from both


def reference_pair(model, image: str, labels: str):
    """An (image, labels) reference for build_reference / finetune: the paths when the label file is on
    the image file's grid, else the exam at the model's spacing and the labels read onto it (nearest
    neighbour in world coordinates; build_reference only takes labels on the image file's grid)."""
    truth = load_labels(labels)
    image_volume = load_volume(image)
    if same_grid(truth.original_affine, truth.original_shape, image_volume.original_affine, image_volume.original_shape):
        return image, labels
    exam = load_exam(model, image)
    return exam, dataclasses.replace(exam, data=resample_to_grid(truth, exam), path=labels)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of a training run")
    parser.add_argument("--images", required=True, nargs="+", help="NIfTI images: files, folders or globs")
    parser.add_argument("--labels", required=True, nargs="+", help="their label maps, same order")
    parser.add_argument("--references", type=int, default=1, help="K: the first K subjects are labelled references")
    parser.add_argument("--eval-labels", help="ids to score: labels_table.txt or a JSON id->name table")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--finetune-steps", type=int, default=DEFAULT_STEPS, help=f"default {DEFAULT_STEPS}")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)

    images, labels = [str(p) for p in resolve_images(args.images)], [str(p) for p in resolve_images(args.labels)]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if len(images) != len(labels) or not 1 <= args.references < len(images) or unknown:
        parser.error(f"need as many --labels as --images ({len(labels)} vs {len(images)}), 1 <= --references < "
                     f"{len(images)}, known --methods (unknown: {sorted(unknown)})")
    k = args.references
    ids = eval_ids(args.eval_labels)
    torch.manual_seed(0)
    model = load_model(args.model)
    refs = [reference_pair(model, i, l) for i, l in zip(images[:k], labels[:k])]
    targets = list(zip(images[k:], labels[k:]))
    print(f"{k} reference(s), {len(targets)} target(s); network at {model.preprocessing.get('spacing')} mm", flush=True)

    setup = {}  # seconds spent once: building references, fine-tuning
    atlases = {}
    models = {"": model}
    if any(m.startswith("fine-tuned") for m in methods):
        start = time.perf_counter()
        models["fine-tuned "] = finetune(copy.deepcopy(model), refs, steps=args.finetune_steps, seed=0)
        setup["finetune"] = time.perf_counter() - start
    for prefix, net in models.items():
        for name, chosen in (("one-shot", refs[:1]), ("few-shot", refs)):
            if prefix + name in methods or (name == "one-shot" and not prefix and "cascade" in methods):
                start = time.perf_counter()
                atlases[prefix + name] = (net, build_reference(net, chosen))
                setup[f"build_reference {prefix + name}"] = time.perf_counter() - start

    if atlases:  # warm-up (first-call costs: lazy imports, thread pools), untimed
        net, atlas = next(iter(atlases.values()))
        segment(net, atlas, load_exam(net, targets[0][0]))
    moving = load_volume(images[0])
    moving_labels = load_labels(labels[0])
    rows = {m: [] for m in methods}
    for image, label in targets:
        truth = load_labels(label)
        fixed = load_volume(image)
        line = []
        for method in methods:
            start = time.perf_counter()
            if method in atlases or method == "cascade":
                net, atlas = atlases["one-shot" if method == "cascade" else method]
                exam = load_exam(net, image)
                start = time.perf_counter()
                pred = (cascade_segment if method == "cascade" else segment)(net, atlas, exam).labels
            elif method == "identity":
                pred = dataclasses.replace(fixed, data=resample_to_grid(moving_labels, fixed))
            elif method == "affine":
                pred = dataclasses.replace(fixed, data=warp_labels(affine_register(fixed, moving, quiet=True), moving_labels))
            else:  # iterative
                result = deformable_register(fixed, moving, affine_register(fixed, moving, quiet=True), quiet=True)
                pred = dataclasses.replace(fixed, data=warp_labels(result, moving_labels))
            seconds = time.perf_counter() - start
            scores = score(pred, truth, ids)
            rows[method].append({"target": image, "dice": statistics.mean(scores.values()), "seconds": seconds,
                                 "per_label": scores})
            line.append(f"{method} {rows[method][-1]['dice']:.3f} ({seconds:.1f} s)")
        print(f"{image}: " + ", ".join(line), flush=True)

    print("\n| method | mean Dice | min | max | s per target |\n|---|---|---|---|---|")
    for method, found in rows.items():
        d = [r["dice"] for r in found]
        print(f"| {method} | {statistics.mean(d):.3f} | {min(d):.3f} | {max(d):.3f} | "
              f"{statistics.mean(r['seconds'] for r in found):.2f} |")
    print("\none-time costs: " + ", ".join(f"{name} {s:.1f} s" for name, s in setup.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "references": images[:k], "methods": rows, "setup_seconds": setup,
                       "finetune_steps": args.finetune_steps, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()
