"""Semi-supervised fine-tuning of a trained CoordNet on a few labelled exams (``deepatlas-fast finetune``).

One-shot segmentation (:mod:`deepatlas_fast.segment`) propagates labels by matching coordinates; where
the self-supervised coordinates of two exams disagree on anatomy, the propagated labels are wrong.
A few labelled exams tell the network directly which voxels must share coordinates. Fine-tuning makes
label propagation between them agree with their labels, while the self-supervised objective and the
Jacobian regulariser keep the maps smooth and invertible.

Formulation (one step):

1. Draw ``min(K, max_per_step)`` of the K labelled exams (default 4; a seeded generator; every
   labelled exam is loaded once, at the model's spacing, with
   :func:`~deepatlas_fast.segment.load_reference`). The loss below is averaged over every ordered pair
   ``(a, b), a != b`` of them: with a few exams this costs one CoordNet pass per exam, and it is far
   less noisy than one pair per step (pairs differ a lot in overlap; one pair per step made the
   fine-tuning on phantoms unstable).
2. Coordinates **with gradient**: ``raw = model.coordnet(x[None, None], levels=L, bound=False)`` with
   ``L = preprocessing["levels"]`` as in :func:`~deepatlas_fast.segment.network_coordinates`, and
   ``c = bound_coords(raw)`` (the clamp with straight-through gradient inference uses).
3. **Soft label template of a**: a's one-hot labels are splatted (trilinear,
   :func:`~deepatlas_fast.propagate.splat_labels` with ``differentiable=True``: each voxel's weights go
   to its own label's channel only, so the cost does not grow with the label count; built from torch
   ops, so differentiable in ``c_a``) into a
   template grid (default :func:`~deepatlas_fast.segment.default_template_shape` of the labelled
   exams, as ``segment`` uses) and normalised by the splatted weight:
   ``P = total / (weight + eps)``.
4. **Read at b**: ``p_b = sample(P, c_b, "zeros")`` (:func:`deepatlas_fast.sample`, gradients to
   ``c_b``): per voxel of b, the label probabilities propagated from a (what ``segment`` computes, before
   the argmax).
5. **Loss**: ``(1 - mean soft Dice)`` over the foreground classes present in a or b
   (``Dice_k = 2 sum p_bk t_bk / (sum p_bk + sum t_bk)``, ``t_b`` b's one-hot labels)
   ``+ reg * (jacobian + logdet + folding + bound)`` of each drawn exam's raw map (averaged)
   (:func:`~deepatlas_fast.objective.jacobian_terms`, :func:`~deepatlas_fast.objective.bound_term`)
   ``+ self_supervised * deepatlas_loss`` on a pair drawn from all exams (labelled and unlabelled);
   a pair of the same network-grid shape is batched (explicit + implicit terms), otherwise each exam is
   scored alone (explicit term only).
6. AdamW on the CoordNet parameters only (the atlas and the feature autoencoder stay as they are).

Defaults: ``steps=200``, ``lr=1e-3``, ``weight_decay=0``, ``reg=0.1``, ``self_supervised=0.1``,
``seed=0``. Runs are deterministic for a given seed on the CPU (pair draws from a seeded
``torch.Generator``; no random augmentation). The model is returned in eval mode with
``model.finetune_info`` (references, steps, losses) set; :func:`save_finetuned` writes it as a model file
(same format as training's ``model.pt``, preprocessing copied, ``metadata["finetune"]`` added).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .model import bound_coords
from .objective import LossWeights, bound_term, deepatlas_loss, jacobian_terms
from .ops import sample
from .propagate import splat_labels
from .segment import (
    _preprocessing,
    _reference_volumes,
    default_template_shape,
    exam_intensities,
    load_exam,
)

__all__ = ["finetune", "save_finetuned", "soft_dice_loss", "propagation_loss"]

DEFAULT_STEPS = 200
DEFAULT_LR = 1e-3


def _label_channels(labels: Tensor, classes: Tensor) -> Tensor:
    """Channel index of each voxel's label id (``classes`` sorted, containing every id present)."""
    return torch.searchsorted(classes, labels.reshape(-1).long()).view(labels.shape)


def _one_hot(index: Tensor, num: int) -> Tensor:
    """``[D, H, W]`` channel indices -> ``[1, C, D, H, W]`` float32 one-hot."""
    return torch.nn.functional.one_hot(index, num).permute(3, 0, 1, 2).unsqueeze(0).float()


def soft_dice_loss(probs: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``1 - mean soft Dice`` over the foreground channels (1..C-1) present in ``probs`` or ``target``.

    Args: probs, target: ``[1, C, d, h, w]``, channel 0 background.
    """
    p, t = probs[:, 1:].flatten(2), target[:, 1:].flatten(2)
    inter = (p * t).sum(-1)
    denom = p.sum(-1) + t.sum(-1)
    present = denom > eps
    if not bool(present.any()):
        return probs.sum() * 0.0
    dice = 2 * inter / denom.clamp_min(eps)
    return 1.0 - dice[present].mean()


def propagation_loss(
    coords_a: Tensor, onehot_a: Tensor, coords_b: Tensor, onehot_b: Tensor, template_shape: Sequence[int]
) -> Tensor:
    """Soft-Dice loss of a's labels propagated to b through the coordinates (both with gradient).

    Args:
        coords_a, coords_b: ``[1, 3, *grid]`` bounded template coordinates.
        onehot_a, onehot_b: ``[1, C, *grid]`` one-hot labels (same C, channel 0 background).
    """
    # each voxel splats into its own label's channel only: the cost does not grow with the label count
    channels = onehot_a[0].argmax(0)
    weight, total = splat_labels(coords_a, channels, onehot_a.shape[1], template_shape, differentiable=True)
    probs = (total / (weight + 1e-6)).unsqueeze(0)  # [1, C, *template], 0 in empty cells
    read = sample(probs, coords_b.float(), "zeros")
    return soft_dice_loss(read, onehot_b)


def _regulariser(raw: Tensor, weights: LossWeights) -> Tensor:
    jac = jacobian_terms(raw, weights)
    return (weights.jacobian * jac["jacobian"] + weights.logdet * jac["logdet"] + weights.folding * jac["folding"]
            + weights.bound * bound_term(raw))


def finetune(
    model,
    labelled: Sequence[tuple],
    unlabelled: Sequence = (),
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.0,
    reg: float = 0.1,
    self_supervised: float = 0.1,
    template_shape: Optional[Sequence[int]] = None,
    seed: int = 0,
    max_per_step: int = 4,
    progress: bool = False,
    loss_weights: Optional[LossWeights] = None,
):
    """Fine-tune ``model``'s CoordNet in place on labelled exams (see the module docstring).

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas` (e.g. from
            :func:`~deepatlas_fast.checkpoint.load_model`; its ``preprocessing`` gives the spacing).
        labelled: at least 2 ``(image, labels)`` pairs, as :func:`~deepatlas_fast.segment.build_reference`
            takes them (NIfTI paths or Volumes; labels on their image's grid, a ValueError naming
            ``labelled[i]`` otherwise).
        unlabelled: images used only by the self-supervised term.
        steps, lr, weight_decay: AdamW optimisation of the CoordNet parameters.
        reg: weight of the Jacobian/folding/bound regulariser of the labelled pair's maps (the terms
            weighted by ``loss_weights``' jacobian, logdet, folding, bound).
        self_supervised: weight of :func:`~deepatlas_fast.objective.deepatlas_loss` (0: off).
        template_shape: splat grid; default the labelled exams' largest network grid (as ``segment``).
        seed: seeds the draws (which labelled exams a step uses, the self-supervised pair).
        max_per_step: labelled exams per step (all of them when fewer; at least 2).
        progress: show a tqdm bar.
        loss_weights: :class:`~deepatlas_fast.objective.LossWeights` of the self-supervised term and the
            regulariser (default: defaults).
    Returns: the model (eval mode) with ``model.finetune_info`` = ``{"references", "unlabelled",
        "steps", "lr", "seed", "reg", "self_supervised", "losses"}`` (``losses``: the propagation loss per
        step).
    """
    from tqdm.auto import tqdm

    if isinstance(labelled, (str, os.PathLike)) or len(labelled) < 2:
        raise ValueError(
            f"labelled: fine-tuning needs at least 2 labelled exams (labels are propagated from one to "
            f"another), got {0 if isinstance(labelled, (str, os.PathLike)) else len(labelled)}"
        )
    if isinstance(max_per_step, bool) or not isinstance(max_per_step, int) or max_per_step < 2:
        raise ValueError(f"max_per_step must be an int >= 2, got {max_per_step!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    for name, value in (("lr", lr), ("reg", reg), ("self_supervised", self_supervised), ("weight_decay", weight_decay)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    weights = loss_weights if loss_weights is not None else LossWeights()
    device = next(model.parameters()).device
    levels = _preprocessing(model).get("levels")

    images, label_maps, sources = [], [], []
    for index, pair in enumerate(labelled):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"labelled[{index}]: an (image, labels) pair is needed, got {pair!r}")
        try:
            volume, labels = _reference_volumes(model, index, *pair)
        except ValueError as exc:
            raise ValueError(f"labelled{str(exc)[len('references'):]}") from None
        images.append(exam_intensities(model, volume).to(device, torch.float32))
        label_maps.append(labels.data.long())
        sources.append(labels.path)
    extra = []
    for index, image in enumerate(unlabelled):
        try:
            extra.append(exam_intensities(model, load_exam(model, image)).to(device, torch.float32))
        except ValueError as exc:
            raise ValueError(f"unlabelled[{index}]: {exc}") from None
    if any(int(l.min()) < 0 for l in label_maps if l.numel()):
        raise ValueError("labelled: label ids must be >= 0")
    classes = torch.unique(torch.cat([torch.zeros(1, dtype=torch.int64)] + [l.reshape(-1) for l in label_maps]))
    onehots = [_one_hot(_label_channels(l, classes), len(classes)).to(device) for l in label_maps]
    if template_shape is None:
        template_shape = default_template_shape([x.shape for x in images])
    template_shape = tuple(int(s) for s in template_shape)
    everyone = images + extra

    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():  # each exam's frame once (an affine frame is a fit: not per step)
        frames = [model.coordnet.frame_of(x[None, None]) for x in everyone]
    params = [p for p in model.coordnet.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    try:
        with tqdm(range(steps), disable=not progress, unit="step", desc="finetune", dynamic_ncols=True) as bar:
            for _ in bar:
                chosen = torch.randperm(len(images), generator=generator)[:max_per_step].tolist()
                raws = {i: model.coordnet(images[i][None, None], levels=levels, bound=False, frame=frames[i])
                        for i in chosen}
                pairs = [(a, b) for a in chosen for b in chosen if a != b]
                prop = sum(
                    propagation_loss(bound_coords(raws[a]), onehots[a], bound_coords(raws[b]), onehots[b], template_shape)
                    for a, b in pairs
                ) / len(pairs)
                loss = prop
                if reg > 0:
                    loss = loss + reg * sum(_regulariser(raws[i], weights) for i in chosen) / len(chosen)
                if self_supervised > 0:
                    loss = loss + self_supervised * _self_supervised(model, everyone, frames, generator, weights, levels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(prop.detach()))
                bar.set_postfix(dice_loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        model.eval()
    model.finetune_info = {
        "references": [None if s is None else str(s) for s in sources],
        "unlabelled": [str(u) if isinstance(u, (str, os.PathLike)) else None for u in unlabelled],
        "steps": steps,
        "lr": float(lr),
        "seed": int(seed),
        "reg": float(reg),
        "self_supervised": float(self_supervised),
        "template_shape": list(template_shape),
        "losses": losses,
    }
    return model


def _self_supervised(model, exams: list, frames: list, generator: torch.Generator, weights: LossWeights,
                     levels) -> Tensor:
    """``deepatlas_loss`` on two exams drawn from ``exams`` (with their ``frames``, None for the grid frame):
    batched when their grids agree, else each alone with the implicit term off."""
    i, j = torch.randperm(len(exams), generator=generator)[:2].tolist()

    def loss(batch, picked, terms):
        frame = None if frames[picked[0]] is None else torch.cat([frames[k] for k in picked])
        return deepatlas_loss(model, batch, terms, levels=levels, outputs=model(batch, levels=levels, frame=frame))[0]

    if exams[i].shape == exams[j].shape:
        return loss(torch.stack([exams[i], exams[j]])[:, None], [i, j], weights)
    alone = LossWeights.from_dict({**weights.to_dict(), "implicit": 0.0})
    return 0.5 * sum(loss(exams[k][None, None], [k], alone) for k in (i, j))


def save_finetuned(path: Union[str, "os.PathLike[str]"], model, source_metadata: Optional[dict] = None):
    """Write a fine-tuned model as a model file (:func:`~deepatlas_fast.checkpoint.save_model`): the
    model's preprocessing copied, ``source_metadata`` (the original file's metadata) kept, and
    ``metadata["finetune"]`` = :attr:`model.finetune_info` without the per-step losses plus the first
    and last loss."""
    from .checkpoint import save_model

    info = dict(getattr(model, "finetune_info", None) or {})
    losses = info.pop("losses", [])
    if losses:
        info["loss_first"], info["loss_last"] = float(losses[0]), float(losses[-1])
    metadata = dict(source_metadata or {})
    metadata["finetune"] = info
    return save_model(path, model, _preprocessing(model), metadata)
