"""How good is the objective's own optimum? Free per-exam displacement fields, no network.

Optimises one displacement field per phantom (a coarse control grid, trilinearly upsampled, on top of the
exam's frame from a trained model) and the atlas under :func:`deepatlas_fast.objective.deepatlas_loss`, all
exams in one batch (the implicit term pairs exam i with i + 1), and prints the one-shot Dice of phantom 0's
labels on the others through the coordinates as it goes. What a network trained on the same exams can at
best reach under this objective (a network also has to generalise); comparing loss settings here costs a
minute or two each instead of a training run.

    python benchmarks/objective_ceiling.py --model RUN/model.pt --steps 400 --control 16 --loss '{"kernel_size": 5}'

The phantoms are the training cohort's first subjects (``--seed`` = the run's seed) at the model's spacing.
``--brains FOLDER`` optimises the synthesised brains of ``../shared/data/brain_labelmaps`` instead (images
synthesised at ``--data-spacing`` mm, 2 by default, then area-resampled to the model's spacing as training and
``one_shot_dice.py`` resample them; the label of largest share per voxel; Dice over the evaluation structures).
``--start network`` starts the fields from the trained network's coordinates instead of the frames: how far the
network is from what the objective reaches on the same exams.

    python benchmarks/objective_ceiling.py --model RUN/model.pt --brains ../shared/data/brain_labelmaps --splat 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import deepatlas_fast as da
from deepatlas_fast.checkpoint import load_model
from deepatlas_fast.frame import apply_frame
from deepatlas_fast.model import bound_coords
from deepatlas_fast.objective import LossWeights, deepatlas_loss
from deepatlas_fast.propagate import dice, mean_dice, propagate_labels
from deepatlas_fast.train import rescale_volume

sys.path.insert(0, str(Path(__file__).resolve().parent))
from one_shot_dice import (brain_subjects, common_shape, exam_frame, model_coordinates, phantom_subjects,  # noqa: E402
                           relabel)


class _AtlasHolder:
    """What ``deepatlas_loss`` reads from a model when given its outputs: the atlas."""

    def __init__(self, atlas: torch.Tensor):
        self.atlas = atlas


def one_shot_dice(coords: torch.Tensor, labels: list, num_labels: int, splat: int = 48) -> float:
    """Mean Dice of exam 0's labels propagated to every other exam through ``coords [N, 3, ...]`` (labels
    splatted into a ``splat``^3 template grid)."""
    bounded = bound_coords(coords.detach())
    scores = []
    for i in range(1, coords.shape[0]):
        pred, _ = propagate_labels(bounded[:1], labels[0], bounded[i:i + 1], num_labels, template_shape=(splat,) * 3)
        scores.append(mean_dice(dice(pred, labels[i], range(1, num_labels))))
    return sum(scores) / len(scores)


def at_spacing(image: torch.Tensor, labels: torch.Tensor, factor: float):
    """``image`` area-resampled by ``factor`` (as training resamples its exams) and ``labels`` on the same grid
    (the label of largest share in each new voxel)."""
    if abs(factor - 1.0) < 1e-9:
        return image, labels
    one_hot = F.one_hot(labels).movedim(-1, 0).float()
    shares = torch.stack([rescale_volume(channel, factor) for channel in one_hot])
    return rescale_volume(image, factor), shares.argmax(0)


def load_exams(spacing: float, count: int, seeds, brains=None, data_spacing: float = 2.0) -> list:
    """``(image, labels)`` pairs on the model's ``spacing`` mm grid, seed after seed: ``count`` phantoms of each
    cohort seed, or with ``brains`` (a label-map folder) the brains synthesised with each seed at
    ``data_spacing`` mm, brought to one grid and area-resampled (labels: largest share; evaluation ids 1..K)."""
    subjects = []
    for seed in seeds:
        if brains:
            synthesised, ids = brain_subjects(brains, count, data_spacing, seed)
            subjects += [(image, relabel(labels, ids)) for image, labels in synthesised]
        else:
            subjects += phantom_subjects(count, seed, spacing)[0]
    if brains:
        subjects = [at_spacing(image, labels, data_spacing / spacing) for image, labels in common_shape(subjects)]
    return subjects


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of a training run (its frames, spacing and template)")
    parser.add_argument("--subjects", type=int, default=8, help="exams optimised together (default 8)")
    parser.add_argument("--brains", help="folder of brain label maps: optimise the synthesised brains instead of phantoms")
    parser.add_argument("--data-spacing", type=float, default=2.0,
                        help="--brains: spacing (mm) the images are synthesised at before resampling to the model's, "
                             "as brain_images.py and one_shot_dice.py do (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="phantom cohort seed (default 0: the training run's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--control", type=int, default=16, help="control grid side of each field (default 16)")
    parser.add_argument("--template", type=int, help="atlas / inversion grid side (default: the model's)")
    parser.add_argument("--loss", default="{}", help='LossWeights fields as JSON, over {"folding": 10, "jacobian": 3}')
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam rate of the fields (the atlas: half of it)")
    parser.add_argument("--every", type=int, default=40, help="steps between Dice prints")
    parser.add_argument("--splat", type=int, default=48, help="template grid side of the Dice's label splat (default 48)")
    parser.add_argument("--start", choices=("frame", "network"), default="frame",
                        help="fields start from the exams' frames (default) or from the trained network's coordinates")
    args = parser.parse_args(argv)
    if args.subjects < 2:
        parser.error("--subjects must be >= 2 (the implicit term pairs exams)")

    torch.manual_seed(0)
    model = load_model(args.model)
    spacing = float(model.preprocessing.get("spacing") or 12.0)
    subjects = load_exams(spacing, args.subjects, [args.seed], args.brains, args.data_spacing)
    images = torch.stack([image for image, _ in subjects])[:, None]
    labels = [lab for _, lab in subjects]
    num_labels = int(max(int(lab.max()) for lab in labels)) + 1
    n, shape = images.shape[0], tuple(images.shape[2:])
    with torch.no_grad():
        frames = None
        if model.coordnet.frame != "grid":
            frames = torch.cat([exam_frame(model, image, spacing) for image, _ in subjects])
        if args.start == "network":
            start = torch.cat([model_coordinates(model, image, spacing) for image, _ in subjects])
        else:
            start = da.identity_coords(shape, batch=n)
            if frames is not None:
                start = apply_frame(frames, start)
    template = (args.template,) * 3 if args.template else tuple(model.atlas.shape[2:])
    atlas = torch.nn.Parameter(F.interpolate(images.mean(0, keepdim=True), size=template, mode="trilinear",
                                             align_corners=True))
    fields = torch.zeros(n, 3, *(args.control,) * 3, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [fields], "lr": args.lr}, {"params": [atlas], "lr": args.lr / 2}])
    weights = LossWeights.from_dict(dict({"folding": 10.0, "jacobian": 3.0}, **json.loads(args.loss)))
    kind = "brains" if args.brains else "phantoms"
    print(f"{n} {kind} {shape} at {spacing} mm, start {args.start}, template {template}, control {args.control}^3, "
          f"loss {weights.to_dict()}")
    for step in range(args.steps + 1):
        raw = start + F.interpolate(fields, size=shape, mode="trilinear", align_corners=True)
        outputs = {"frame": frames, "coords_raw": raw, "coords": bound_coords(raw), "features": images, "atlas": atlas}
        loss, terms = deepatlas_loss(_AtlasHolder(atlas), images, weights, outputs=outputs)
        if step % args.every == 0 or step == args.steps:
            print(f"step {step}: one-shot Dice {one_shot_dice(raw, labels, num_labels, args.splat):.3f}  "
                  f"explicit {float(terms['explicit']):.3f} implicit {float(terms['implicit']):.3f} "
                  f"jacobian {float(terms['jacobian']):.4f} valid {float(terms['valid_fraction']):.2f}", flush=True)
        if step < args.steps:
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()


if __name__ == "__main__":
    main()
