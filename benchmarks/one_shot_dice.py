"""Does a trained model put the same anatomy at the same coordinate? One-shot Dice on held-out data.

    python benchmarks/one_shot_dice.py --model RUN/model.pt --phantoms 6 --spacing 6
    python benchmarks/one_shot_dice.py --model RUN/model.pt --brains ../shared/data/brain_labelmaps --spacing 2

Subject 0 is the labelled reference; its labels are propagated to every other subject four ways:
* ``deepatlas``: through the model's coordinates (splat into the template grid, sample at the target's
  coordinates; :func:`deepatlas_fast.propagate.propagate_labels`);
* ``identity``: the reference's label map read on the target's grid as it is (same world frame);
* ``frame only`` (models with the "moments" frame): through the frame alone, where an untrained network
  puts each exam (:func:`deepatlas_fast.frame.moment_frame`), so what training adds shows;
* ``affine``: after :func:`deepatlas_fast.register.affine_register` of the reference to the target
  (12 parameters, Adam on local NCC over a 3-level pyramid, started from the foreground centres of
  mass), labels carried by :func:`deepatlas_fast.register.warp_labels` (one-hot sampling + argmax);
* ``iterative``: the same affine followed by :func:`deepatlas_fast.register.deformable_register`
  (multi-scale displacement field, local NCC + Jacobian-variance penalty, Gaussian-smoothed).
Prints mean Dice per target and method, the time per target (``iterative`` includes its affine), the
iterative registration's folding fraction, and the coordinate maps' Jacobian statistics (det of
d coords / d voxel scaled so that the identity has det 1; folding = det <= 0, on the raw map: the
output clamped to the template cube is flat, det 0, where it leaves the cube).
Phantoms use seeds the training run did not see (``--seed``, default 1000).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import deepatlas_fast as da
from deepatlas_fast.checkpoint import load_model
from deepatlas_fast.data.io import volume_from_array
from deepatlas_fast.model import bound_coords
from deepatlas_fast.propagate import dice, mean_dice, propagate_labels
from deepatlas_fast.segment import network_coordinates
from deepatlas_fast.register import affine_register, deformable_register, warp_labels


def phantom_subjects(count: int, seed: int, spacing: float):
    from deepatlas_fast.data.io import normalize_intensity
    from deepatlas_fast.data.phantoms import PHANTOM_FOV_MM, phantom_seed, phantom_subject

    side = int(round(PHANTOM_FOV_MM / spacing))
    subjects = []
    for i in range(count):
        image, labels, _ = phantom_subject(phantom_seed(seed, i), shape=(side, side, side), spacing=spacing)
        subjects.append((torch.as_tensor(normalize_intensity(image, modality="ct"), dtype=torch.float32), labels))
    return subjects, None


def brain_subjects(folder: str, count: int, spacing: float, seed: int):
    from deepatlas_fast.data.synth import (brain_eval_labels, brain_subject_paths, load_brain_priors,
                                           load_brain_subject, synthesize_image)

    priors = load_brain_priors(folder)
    subjects = []
    for i, path in enumerate(brain_subject_paths(folder)[:count]):
        labels = load_brain_subject(path, spacing=spacing, crop=True, margin=4).data.long()
        image = synthesize_image(labels, priors, torch.Generator().manual_seed(seed + i))
        subjects.append((image.float(), labels))
    return subjects, brain_eval_labels(folder)


def common_shape(subjects):
    """Centre-crop/pad every subject to the same grid (the brains differ by a voxel or two)."""
    shape = [max(s[0].shape[k] for s in subjects) for k in range(3)]

    def fit(x, fill):
        pads = []
        for k in reversed(range(3)):
            extra = shape[k] - x.shape[k]
            pads += [extra // 2, extra - extra // 2]
        return F.pad(x, pads, value=fill)

    return [(fit(img, 0.0), fit(lab, 0)) for img, lab in subjects]


def relabel(labels: torch.Tensor, ids) -> torch.Tensor:
    """Map label ids to 0..K (0 background; ids not listed -> 0)."""
    lut = torch.zeros(int(labels.max()) + 1, dtype=torch.long)
    for k, label in enumerate(ids, start=1):
        if label < lut.numel():
            lut[label] = k
    return lut[labels]


def at_model_spacing(model, image: torch.Tensor, spacing: float) -> torch.Tensor:
    """``image`` (on a ``spacing`` mm grid) area-resampled to the spacing the model was trained at."""
    from deepatlas_fast.train import rescale_volume

    model_spacing = float(model.preprocessing.get("spacing") or spacing)
    return image if abs(model_spacing - spacing) < 1e-6 else rescale_volume(image, spacing / model_spacing)


def exam_frame(model, image: torch.Tensor, spacing: float):
    """The frame ``[1, 3, 4]`` the model gives ``image`` (None for the "grid" frame)."""
    return model.coordnet.frame_of(at_model_spacing(model, image, spacing)[None, None])


def model_coordinates(model, image: torch.Tensor, spacing: float) -> torch.Tensor:
    """Raw (unclamped) coordinates ``[1, 3, *image.shape]`` of an image on a ``spacing`` mm grid.

    The network runs at the spacing it was trained at (``model.preprocessing["spacing"]``): the image
    is area-downsampled to it and the coordinate map upsampled back (trilinear, half-voxel aligned,
    which matches area downsampling)."""
    raw = network_coordinates(model, at_model_spacing(model, image, spacing), bound=False)
    if tuple(raw.shape[2:]) != tuple(image.shape):
        raw = F.interpolate(raw, size=tuple(image.shape), mode="trilinear", align_corners=False)
    return raw


def relative_to_frame(model, raw: torch.Tensor, image: torch.Tensor, spacing: float) -> torch.Tensor:
    """The map taken back through the inverse of ``image``'s frame (unchanged for the "grid" frame), as
    the objective's regularisers see it: exam-grid units, so det J and displacements read in voxels."""
    from deepatlas_fast.frame import apply_frame, invert_frame

    frame = exam_frame(model, image, spacing)
    return raw if frame is None else apply_frame(invert_frame(frame), raw)


def grid_pinning(model, image: torch.Tensor, labels: torch.Tensor, spacing: float, shift: int = 2) -> float:
    """How much the coordinates of the same anatomy change (in voxels of the exam grid) when the anatomy
    moves by ``shift`` voxels along the last axis inside the field of view: 0 for coordinates that follow
    the anatomy, ``shift`` for coordinates pinned to the grid. With a "moments" frame both maps are read
    through the unshifted image's frame, so a frame that follows the body counts as following it."""
    moved = torch.zeros_like(image)
    moved[..., shift:] = image[..., :-shift]
    with torch.no_grad():
        before = relative_to_frame(model, model_coordinates(model, image, spacing), image, spacing)[0, ..., :-shift]
        after = relative_to_frame(model, model_coordinates(model, moved, spacing), image, spacing)[0, ..., shift:]
    half = torch.tensor([(n - 1) / 2 for n in image.shape]).view(3, 1, 1, 1)
    body = (labels > 0)[..., :-shift]
    return float(((after - before) * half).norm(dim=0)[body].mean())


def jacobian_stats(raw: torch.Tensor, relative: Optional[torch.Tensor] = None) -> tuple[float, float, float, float]:
    """det J mean, std and folding fraction (det <= 0) of the raw (unclamped) map, or of ``relative`` (the
    map relative to its frame, :func:`relative_to_frame`) when given, and the share of voxels ``raw`` maps
    outside the template cube. The bounded map is flat (det 0) where it is clamped, which is not a fold,
    so folding is measured on the raw map."""
    scale = [(s - 1) / 2 for s in raw.shape[2:]]
    det = da.jacobian_det((raw if relative is None else relative).double(), scale=scale)
    outside = (raw.abs() > 1).any(dim=1)
    return float(det.mean()), float(det.std()), float((det <= 0).double().mean()), float(outside.double().mean())


def registration_baselines(img, ref_img, ref_lab, lab, spacing: float, labels) -> dict:
    """Dice of the reference's labels carried to the target by affine and by affine + deformable registration,
    their seconds (``iterative`` includes its affine) and the deformable map's folding fraction. The subjects
    share one grid and world frame: volumes with the same affine."""
    grid = np.diag([spacing] * 3 + [1.0])
    fixed, moving = volume_from_array(img, grid), volume_from_array(ref_img, grid)
    moving_labels = volume_from_array(ref_lab, grid, labels=True)
    t0 = time.perf_counter()
    affine = affine_register(fixed, moving, quiet=True)
    pulled = warp_labels(affine, moving_labels)
    t_affine = time.perf_counter() - t0
    t0 = time.perf_counter()
    deformable = deformable_register(fixed, moving, affine, quiet=True)
    deformed = warp_labels(deformable, moving_labels)
    t_iterative = t_affine + time.perf_counter() - t0
    return {"affine": mean_dice(dice(pulled, lab, labels)), "iterative": mean_dice(dice(deformed, lab, labels)),
            "t_affine_s": t_affine, "t_iterative_s": t_iterative, "iterative_folding": deformable.folding}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of a training run")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--phantoms", type=int, help="evaluate on this many held-out phantoms")
    source.add_argument("--brains", help="folder of brain label maps (../shared/data/brain_labelmaps)")
    parser.add_argument("--spacing", type=float, default=2.0, help="mm, grid of the labels and Dice (the network runs at its own training spacing)")
    parser.add_argument("--count", type=int, default=10, help="brain subjects to use")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--template", type=int, default=48, help="template grid side for the label splat")
    parser.add_argument("--no-registration", action="store_true",
                        help="skip the affine and iterative registrations (the slow part): deepatlas, identity, frame only")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = load_model(args.model)
    if args.phantoms:
        subjects, ids = phantom_subjects(args.phantoms, args.seed, args.spacing)
    else:
        subjects, ids = brain_subjects(args.brains, args.count, args.spacing, args.seed)
    subjects = common_shape(subjects)
    if ids is not None:
        subjects = [(img, relabel(lab, ids)) for img, lab in subjects]
    num_labels = int(max(int(lab.max()) for _, lab in subjects)) + 1
    print(f"{len(subjects)} subjects, grid {tuple(subjects[0][0].shape)} at {args.spacing} mm, {num_labels - 1} labels; "
          f"network at {model.preprocessing.get('spacing')} mm")

    with torch.no_grad():
        raw = [model_coordinates(model, img, args.spacing) for img, _ in subjects]
    coords = [bound_coords(r) for r in raw]
    frame_coords = None
    if model.coordnet.frame != "grid":  # where an untrained network with the same frame puts each exam
        from deepatlas_fast.frame import apply_frame

        frame_coords = [bound_coords(apply_frame(exam_frame(model, img, args.spacing), da.identity_coords(img.shape)))
                        for img, _ in subjects]
    ref_img, ref_lab = subjects[0]
    rows = []
    template = (args.template,) * 3
    for i, (img, lab) in enumerate(subjects[1:], start=1):
        t0 = time.perf_counter()
        pred, _ = propagate_labels(coords[0], ref_lab, coords[i], num_labels, template_shape=template)
        t_deep = time.perf_counter() - t0
        labels = range(1, num_labels)
        if frame_coords is not None:
            framed_pred, _ = propagate_labels(frame_coords[0], ref_lab, frame_coords[i], num_labels, template_shape=template)
        row = {
            "target": i,
            "deepatlas": mean_dice(dice(pred, lab, labels)),
            "identity": mean_dice(dice(ref_lab, lab, labels)),
            "frame only": mean_dice(dice(framed_pred, lab, labels)) if frame_coords is not None else None,
            "t_deepatlas_s": t_deep,
        }
        if not args.no_registration:
            row.update(registration_baselines(img, ref_img, ref_lab, lab, args.spacing, labels))
        rows.append(row)
        registered = ("" if args.no_registration else
                      f" affine {row['affine']:.3f} iterative {row['iterative']:.3f}"
                      f" ({t_deep:.2f} s / {row['t_affine_s']:.2f} s / {row['t_iterative_s']:.2f} s)")
        print(f"target {i}: Dice deepatlas {row['deepatlas']:.3f} identity {row['identity']:.3f}{registered}", flush=True)
    print("\n| method | mean Dice | min | max | s per target |\n|---|---|---|---|---|")
    methods = [("deepatlas", "t_deepatlas_s"), ("identity", None)]
    if not args.no_registration:
        methods += [("affine", "t_affine_s"), ("iterative", "t_iterative_s")]
    if frame_coords is not None:
        methods.insert(1, ("frame only", None))
    for method, timing in methods:
        values = [r[method] for r in rows]
        seconds = statistics.mean(r[timing] for r in rows) if timing else 0.0
        print(f"| {method} | {statistics.mean(values):.3f} | {min(values):.3f} | {max(values):.3f} | {seconds:.2f} |")
    if not args.no_registration:
        print(f"\niterative registration: largest folding fraction {max(r['iterative_folding'] for r in rows):.4f}")
    pinning = [grid_pinning(model, img, lab, args.spacing) for img, lab in subjects]
    print(f"\nanatomy shifted by 2 voxels in the field of view: its coordinates move by "
          f"{statistics.mean(pinning):.2f} voxels (0 = they follow the anatomy, 2 = pinned to the grid)")
    stats = [jacobian_stats(r, relative_to_frame(model, r, img, args.spacing)) for r, (img, _) in zip(raw, subjects)]
    print(f"\ndet J of the coordinate maps: mean {statistics.mean(s[0] for s in stats):.3f}, "
          f"std {statistics.mean(s[1] for s in stats):.3f}, folding fraction max {max(s[2] for s in stats):.4f}; "
          f"share of voxels mapped outside the template cube: mean {statistics.mean(s[3] for s in stats):.3f}")
    return rows


if __name__ == "__main__":
    main()
