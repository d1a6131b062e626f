"""The DeepATLAS objective (DESIGN §5) and the autoencoder's reconstruction loss.

For a batch of exams ``x [N >= 2, 1, D, H, W]`` with coordinate maps ``c = CoordNet(x)`` and
similarity features ``f = E(x) ++ x`` (frozen autoencoder features plus the normalised intensity):

* ``explicit``:  ``lncc(f, sample(A, c))`` (the loss ``-mean NCC``, channel-wise) with ``A`` the
  learnable atlas feature volume: atlas-to-exam registration.
* ``implicit``: of the raw maps (before the clamp to the template cube, whose Jacobian is singular where it
  binds): for each pair ``(a, b) = (i, (i + 1) mod N)``: ``psi_b, valid_b = invert(c_b,
  template_shape)``, ``T = sample(psi_b, c_a)`` (where in exam b lies the anatomy voxel p of exam a
  is mapped to), ``-masked mean NCC(f_a, sample(f_b, T))`` with the mask
  ``sample(valid_b, c_a, "zeros") >= 0.5``; no gradient flows through masked points.
* ``jacobian``: ``var(det J)`` over voxels (``jacobian_var``'s value, from the ``jacobian_det`` map the next
  terms need anyway), J = d c / d voxel index scaled by
  ``(size - 1) / 2`` per axis of the exam grid so that the identity has det 1.
* ``logdet``: ``(mean log max(det J, 1e-3))^2`` keeps the mean volume ratio near 1 (the exam fills
  the template); with ``jacobian`` and ``folding`` it is the prototype's
  ``var(det J) + (mean log det J)^2 + mean relu(-det J)``.
* ``folding``: ``mean relu(-det J)``.
* ``collapse``: ``mean_k relu(ratio - var_k(c) / var_k(identity))^2``: fires when a coordinate's
  spatial spread falls below ``collapse_ratio`` of the identity's (a collapse towards a point or a
  plane; 0 otherwise).
* ``bound``: ``mean relu(|c_raw| - 1)^2``: the raw map's excursion beyond the template cube (the
  output itself is clamped with a straight-through gradient, see :func:`deepatlas_fast.model.bound_coords`).

With a "moments" frame (:mod:`deepatlas_fast.frame`) ``jacobian``, ``logdet``, ``folding`` and
``collapse`` see the map taken back through the inverse of the exam's frame (the deformation the
network adds to the frame): the frame's own scale and rotation cost nothing.

Trivial solutions and their guards: collapse to a point -> ``collapse`` and ``logdet``; intensity
look-up (each voxel sent to an atlas location of like intensity, spatially incoherent) -> it needs
folds and wildly varying det J, which ``jacobian`` and ``folding`` price; leaving the cube -> ``bound``.

``ops="fused"`` runs every op through :mod:`deepatlas_fast` (fused kernels / registry backend),
``ops="stock"`` through :mod:`deepatlas_fast.stock` (``grid_sample``, conv3d LNCC, ``torch.gradient``
+ ``det``, grid-sample Newton inversion) on the same model: sample, lncc and the Jacobian terms
agree to float rounding, the implicit term to the inversion tolerance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .coords import identity_coords
from .recompute import recomputed_when_saved
from .stock import get_ops

__all__ = [
    "LossWeights",
    "TERMS",
    "deepatlas_loss",
    "explicit_term",
    "implicit_term",
    "jacobian_terms",
    "collapse_term",
    "bound_term",
    "reconstruction_loss",
]

TERMS = ("explicit", "implicit", "jacobian", "logdet", "folding", "collapse", "bound")
STATISTICS = ("folding_fraction", "valid_fraction", "det_mean")


@dataclass
class LossWeights:
    """Weights of the objective's terms and the options of its ops (all plain numbers, YAML-friendly).

    A term whose weight is 0 is not computed (reported as 0).

    Attributes:
        explicit, implicit, jacobian, logdet, folding, collapse, bound: term weights
            (defaults 1, 1, 1, 1, 1, 10, 10).
        kernel_size: LNCC window side in voxels (odd, default 9). kernel: ``"box"`` | ``"gaussian"``.
        eps: LNCC variance floor (default 1e-5).
        invert_iters: Newton steps of the inversion (default 6). invert_tol: validity threshold of
            the inversion in template voxels (default 0.25; the op's contract is 0.05 on smooth
            maps, a looser threshold keeps more points while the maps are rough).
        collapse_ratio: minimal coordinate spread relative to the identity before ``collapse``
            fires (default 0.25).
        det_floor: floor of det J inside the log of ``logdet`` (default 1e-3).
    """

    explicit: float = 1.0
    implicit: float = 1.0
    jacobian: float = 1.0
    logdet: float = 1.0
    folding: float = 1.0
    collapse: float = 10.0
    bound: float = 10.0
    kernel_size: int = 9
    kernel: str = "box"
    eps: float = 1e-5
    invert_iters: int = 6
    invert_tol: float = 0.25
    collapse_ratio: float = 0.25
    det_floor: float = 1e-3

    def __post_init__(self):
        for name in TERMS + ("eps", "invert_tol", "collapse_ratio", "det_floor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        for name in ("eps", "invert_tol", "det_floor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LossWeights.{name} must be > 0, got {getattr(self, name)!r}")
        if isinstance(self.kernel_size, bool) or not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"LossWeights.kernel_size must be an odd int >= 1, got {self.kernel_size!r}")
        if self.kernel not in ("box", "gaussian"):
            raise ValueError(f"LossWeights.kernel must be 'box' or 'gaussian', got {self.kernel!r}")
        if isinstance(self.invert_iters, bool) or not isinstance(self.invert_iters, int) or self.invert_iters < 0:
            raise ValueError(f"LossWeights.invert_iters must be an int >= 0, got {self.invert_iters!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Optional[dict]) -> "LossWeights":
        """Build from a dict; unknown keys raise a ValueError naming them."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown loss weight key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _voxel_scale(shape: Sequence[int]) -> list[float]:
    """(size - 1) / 2 per axis: with it det(d coords / d index) is 1 for the identity."""
    return [(s - 1) / 2.0 for s in shape]


LNCC_GROUP_ELEMENTS = 3 * 256**3
"""An LNCC term samples and correlates at most this many elements (channels x voxels) of one exam at a time,
and at least one channel: its backward's working set is a group's sampled channels (sampled again) and their
gradient. 3 channels at 256^3; the 9 feature channels of the default model in one group up to ~180^3, where
the extra sample and LNCC calls of smaller groups cost more time than their memory is worth (on the CPU, groups
of 3 made the loss side 17 % slower at 96^3)."""


def _channel_group(channels: int, voxels: int) -> int:
    return max(1, min(channels, LNCC_GROUP_ELEMENTS // max(voxels, 1)))


def _sampled_lncc(ops, source: Tensor, where: Tensor, features: Tensor, weights: LossWeights, reduction: str,
                  remake_where=None):
    """``lncc(features, sample(source, where))`` for one exam, reduced: ``"mean"`` -> the mean over channels and
    voxels; ``"sum"`` -> the NCC map summed over the channels, ``[1, 1, D, H, W]``.

    Made a group of channels at a time on large volumes (:data:`LNCC_GROUP_ELEMENTS`; sampling and LNCC are
    channel-wise), and the sampled volume is sampled again in the backward instead of held (the LNCC backward
    needs it): the backward then holds a group's channels, not C. ``remake_where`` (a function returning
    ``where``'s values): the resampling makes ``where`` again too instead of holding it.
    """
    channels = features.shape[1]
    group = _channel_group(channels, features[0, 0].numel())
    total = None
    for start in range(0, channels, group):
        stop = min(start + group, channels)
        group_source, group_features = source[:, start:stop], features[:, start:stop]
        warped = ops.sample(group_source, where)
        # the recipe binds these tensors now: the backward calls it after the caller's loop has moved on
        if remake_where is None:
            remake = partial(ops.sample, group_source.detach(), where.detach())
        else:
            remake = partial(_sample_at_remade, ops, group_source.detach(), remake_where)
        with recomputed_when_saved(warped, remake):
            if reduction == "mean":
                part = ops.lncc(group_features, warped, weights.kernel_size, weights.kernel, weights.eps, "mean")
                part = part * ((stop - start) / channels)
            else:
                part = ops.lncc(group_features, warped, weights.kernel_size, weights.kernel, weights.eps, "none")
                part = part.sum(dim=1, keepdim=True)
        total = part if total is None else total + part
    return total


def _sample_at_remade(ops, source: Tensor, remake_where) -> Tensor:
    return ops.sample(source, remake_where())


def explicit_term(coords: Tensor, features: Tensor, atlas: Tensor, weights: LossWeights, ops="fused") -> Tensor:
    """Atlas-to-exam LNCC loss ``-mean NCC(features, sample(atlas, coords))``.

    Args:
        coords: ``[N, 3, D, H, W]`` template coordinates. features: ``[N, C, D, H, W]``.
        atlas: ``[1, C, *template]`` (or ``[N, C, *template]``).
    """
    ops = get_ops(ops)
    n = coords.shape[0]
    if atlas.shape[0] not in (1, n):
        raise ValueError(f"atlas must have batch 1 or {n}, got shape {tuple(atlas.shape)}")
    atlas, coords, features = atlas.float(), coords.float(), features.float()
    total = None
    # one exam at a time (every exam has the same voxel count, so the mean of the exams' means is the mean):
    # the LNCC backward's working set (the sampled atlas features, sampled again, and their gradient) is one
    # exam's, and the atlas is sampled as it is instead of expanded to N copies
    # (unbound, not sliced: each slice's backward made a zero map of the whole batch's size)
    for a, exam in enumerate(coords.unbind(0)):
        source = atlas[a : a + 1] if atlas.shape[0] == n else atlas
        term = _sampled_lncc(ops, source, exam.unsqueeze(0), features[a : a + 1], weights, "mean")
        total = term if total is None else total + term
    return total / n


def implicit_term(
    coords: Tensor,
    features: Tensor,
    template_shape: Sequence[int],
    weights: LossWeights,
    ops="fused",
    pairs: Optional[Tensor] = None,
    return_valid_fraction: bool = False,
):
    """Exam-to-exam LNCC loss through the inverse coordinate maps (masked by validity).

    Args:
        coords: ``[N >= 2, 3, D, H, W]`` template coordinates. features: ``[N, C, D, H, W]``.
        template_shape: grid (D, H, W) the maps are inverted onto.
        pairs: ``[N]`` long, partner b of each exam a (default ``(i + 1) mod N``); read on the host (a
            synchronisation on a GPU).

    Returns:
        ``-sum(mask * NCC) / (C * max(sum(mask), 1))`` (0 with no gradient if nothing is valid);
        with ``return_valid_fraction`` also the mask's mean.
    """
    ops = get_ops(ops)
    n = coords.shape[0]
    if n < 2:
        raise ValueError(f"coords must hold at least 2 exams for the implicit term, got batch {n}")
    if pairs is None:
        partners = [(a + 1) % n for a in range(n)]
    else:
        if not isinstance(pairs, torch.Tensor) or pairs.shape != (n,):
            raise ValueError(f"pairs must be a tensor of {n} exam indices, got {getattr(pairs, 'shape', pairs)!r}")
        partners = [int(b) for b in pairs.tolist()]
        if not all(0 <= b < n for b in partners):
            raise ValueError(f"pairs must hold exam indices in [0, {n}), got {partners}")
    coords = coords.float()
    features = features.float()
    psi, valid = ops.invert(coords, tuple(template_shape), weights.invert_iters, weights.invert_tol)
    mask = ops.sample(valid[partners].to(coords.dtype), coords.detach(), "zeros") >= 0.5  # [N, 1, D, H, W]
    maskf = mask.to(coords.dtype)
    sources = features.detach()
    total = None
    # one exam at a time, on batch views: no permuted copy of the feature volumes is made, and the LNCC backward's
    # working set is one exam's (the NCC map's gradient, the mask broadcast over the channels, reaches the C++
    # kernels unexpanded). The exam's targets (where in exam b lies the anatomy each voxel of exam a maps to) are
    # sampled again in the backward instead of held; the maps are unbound, not sliced (each slice's backward made
    # a zero map of the whole batch's size).
    for a, (b, exam) in enumerate(zip(partners, coords.unbind(0))):
        exam = exam.unsqueeze(0)
        remake_target = partial(ops.sample, psi[b : b + 1].detach(), exam.detach())
        target = ops.sample(psi[b : b + 1], exam)
        target = torch.where(mask[a : a + 1], target, target.detach())  # no gradient through invalid points
        with recomputed_when_saved(target, remake_target):
            # channels summed before the mask: one volume of temporary instead of a masked copy of the NCC map
            ncc = _sampled_lncc(ops, sources[b : b + 1], target, features[a : a + 1], weights, "sum", remake_target)
        del target
        masked = (ncc * maskf[a : a + 1]).sum()
        total = masked if total is None else total + masked
    count = maskf.sum() * features.shape[1]
    loss = -total / count.clamp_min(1.0)
    if return_valid_fraction:
        return loss, maskf.mean().detach()
    return loss


class _SpatialVariance(torch.autograd.Function):
    """Population variance over dim 2 of ``x [N, K, P]`` -> ``[N, K]``, holding ``x`` and the means for the
    backward, whose gradient ``2 (x - mean) g / P`` it builds in one allocation (autograd's var made two of
    x's size: a coordinate map's, the backward's peak at full resolution)."""

    @staticmethod
    def forward(ctx, x):
        var, mean = torch.var_mean(x, dim=2, unbiased=False)
        ctx.save_for_backward(x, mean)
        return var

    @staticmethod
    def backward(ctx, grad):
        x, mean = ctx.saved_tensors
        return (x - mean.unsqueeze(2)).mul_((2.0 / x.shape[2]) * grad.unsqueeze(2))


def _frame_linear_inverse(frame: Tensor) -> Tensor:
    """``[N, 3, 3]``: the inverse of the linear part of ``frame [N, 3, 4]`` (float32; ``inv_ex``: no error check,
    which would synchronise with a GPU, the frames are invertible by construction)."""
    return torch.linalg.inv_ex(frame[:, :, :3].double())[0].float()


def jacobian_terms(coords_raw: Tensor, weights: LossWeights, ops="fused", frame: Optional[Tensor] = None) -> dict:
    """``{"jacobian", "logdet", "folding"}`` of the raw map plus statistics ``folding_fraction``
    (share of det J <= 0) and ``det_mean``. det J is in voxel-consistent units (identity -> 1).

    ``frame [N, 3, 4]``: measure the map relative to the exam's frame, ``frame^-1(c)``, whose det J is the map's
    divided by the frame's determinant (the frame is affine), so the relative map is never made.
    """
    ops = get_ops(ops)
    coords_raw = coords_raw.float()
    scale = _voxel_scale(coords_raw.shape[2:])
    out = {}
    # one determinant map serves every term: its variance per exam is jacobian_var's value (which would make
    # a second pass, forward and backward, and a second gradient map of the coordinates' size)
    det = ops.jacobian_det(coords_raw, scale)
    if frame is not None:
        det = det * (1.0 / torch.linalg.det(frame[:, :, :3].double())).float().view(-1, 1, 1, 1, 1)
    out["jacobian"] = _SpatialVariance.apply(det.flatten(2)).mean()
    out["logdet"] = torch.log(det.clamp_min(weights.det_floor)).flatten(1).mean(dim=1).pow(2).mean()
    out["folding"] = F.relu(-det).mean()
    out["folding_fraction"] = (det.detach() <= 0).float().mean()
    out["det_mean"] = det.detach().mean()
    return out


def _identity_variance(size: int) -> float:
    """Population variance of ``linspace(-1, 1, size)``: (size + 1) / (3 (size - 1))."""
    return (size + 1) / (3.0 * (size - 1)) if size > 1 else 0.0


class _SpatialCovariance(torch.autograd.Function):
    """Population covariance over dim 2 of ``x [N, K, P]`` -> ``[N, K, K]``, holding ``x`` and the means for the
    backward (a gradient of x's size made in one allocation)."""

    @staticmethod
    def forward(ctx, x):
        mean = x.mean(dim=2, keepdim=True)
        centred = x - mean
        ctx.save_for_backward(x, mean)
        return torch.bmm(centred, centred.transpose(1, 2)) / x.shape[2]

    @staticmethod
    def backward(ctx, grad):
        x, mean = ctx.saved_tensors
        symmetric = (grad + grad.transpose(1, 2)) * (1.0 / x.shape[2])
        return torch.baddbmm(-(symmetric @ mean), symmetric, x)


def collapse_term(coords: Tensor, ratio: float = 0.25, frame: Optional[Tensor] = None) -> Tensor:
    """``mean_{n,k} relu(ratio - var_k(c_n) / var_k(identity))^2`` over the spatial grid; 0 for the identity.

    ``frame [N, 3, 4]``: of the map relative to the exam's frame, ``frame^-1(c)``, whose variances come from the
    map's covariance (the relative map is never made).
    """
    cov = _SpatialCovariance.apply(coords.float().flatten(2))  # [N, 3, 3]
    if frame is not None:
        inverse = _frame_linear_inverse(frame)
        cov = inverse @ cov @ inverse.transpose(1, 2)
    var = torch.diagonal(cov, dim1=1, dim2=2)
    ref = torch.tensor([_identity_variance(s) for s in coords.shape[2:]], device=coords.device).clamp_min(1e-12)
    return F.relu(ratio - var / ref).pow(2).mean()


class _BoundLoss(torch.autograd.Function):
    """``mean relu(|c| - 1)^2`` holding only ``c`` for the backward, whose gradient it builds in place:
    at full resolution the autograd chain of abs, relu and pow kept a map and made three in its backward."""

    @staticmethod
    def forward(ctx, c):
        ctx.save_for_backward(c)
        return c.abs().sub_(1.0).clamp_min_(0.0).square_().mean()

    @staticmethod
    def backward(ctx, grad):
        (c,) = ctx.saved_tensors
        excess = torch.copysign(c.abs().sub_(1.0).clamp_min_(0.0), c)
        return excess.mul_(grad * (2.0 / max(c.numel(), 1)))


def bound_term(coords_raw: Tensor) -> Tensor:
    """``mean relu(|c| - 1)^2``: excursion of the raw map beyond the template cube."""
    return _BoundLoss.apply(coords_raw.float())


def _autocast_off(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def deepatlas_loss(
    model,
    images: Tensor,
    weights: Optional[LossWeights] = None,
    ops: Union[str, object] = "fused",
    levels: Optional[int] = None,
    outputs: Optional[dict] = None,
):
    """The DeepATLAS training objective on one batch.

    Args:
        model: a :class:`~deepatlas_fast.model.DeepAtlas` or a wrapper whose ``forward(images,
            levels=...)`` returns its output dict (e.g. ``DistributedDataParallel``); the model's
            forward runs under any autocast the caller set, the loss itself in float32.
        images: ``[N >= 2, C, D, H, W]`` normalised exams (N >= 2 when ``implicit`` > 0).
        weights: :class:`LossWeights` (default: defaults) or a dict of its fields.
        ops: ``"fused"`` | ``"stock"``.
        levels: active CoordNet decoder levels (staged training), None = all.
        outputs: a precomputed ``model(images, levels)`` dict (then ``model`` is only used for the
            template shape).

    Returns:
        ``(total, terms)``: ``total`` a scalar with gradient, ``terms`` a dict of detached scalars:
        the unweighted terms :data:`TERMS` (0 where the weight is 0) and the statistics
        ``folding_fraction``, ``valid_fraction`` (share of exam voxels the implicit term used) and
        ``det_mean``, which are logged but not part of ``total``.
    """
    if weights is None:
        weights = LossWeights()
    elif isinstance(weights, dict):
        weights = LossWeights.from_dict(weights)
    elif not isinstance(weights, LossWeights):
        raise TypeError(f"weights must be a LossWeights or dict, got {type(weights).__name__}")
    ops = get_ops(ops)
    if not isinstance(images, torch.Tensor) or images.dim() != 5:
        raise ValueError(f"images must be a tensor [N, C, D, H, W], got {getattr(images, 'shape', type(images))}")
    if weights.implicit > 0 and images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 exams (the implicit term pairs them), got batch {images.shape[0]}")
    core = getattr(model, "module", model)
    template_shape = tuple(core.atlas.shape[2:])
    if outputs is None:
        outputs = model(images, levels=levels)
    device = images.device
    zero = torch.zeros((), device=device)
    terms: dict = {}
    with _autocast_off(device):
        coords, raw, feats = outputs["coords"].float(), outputs["coords_raw"].float(), outputs["features"].float()
        terms["explicit"] = (
            explicit_term(coords, feats, outputs["atlas"], weights, ops) if weights.explicit > 0 else zero
        )
        if weights.implicit > 0:
            # of the raw maps: where the clamp to the template cube binds, a clamped map's Jacobian is singular,
            # and its inverse near the cube's faces sent a few voxels there 99 % of the term's gradient (which
            # changed by 60 % when the images changed by 1e-6)
            terms["implicit"], valid_fraction = implicit_term(
                raw, feats, template_shape, weights, ops, return_valid_fraction=True
            )
        else:
            terms["implicit"], valid_fraction = zero, zero
        # the regularisers measure the map relative to the exam's frame (the identity for "grid")
        frame = outputs.get("frame")
        frame = None if frame is None else frame.float()
        jac = jacobian_terms(raw, weights, ops, frame) if (weights.jacobian or weights.logdet or weights.folding) else None
        for name in ("jacobian", "logdet", "folding"):
            terms[name] = jac[name] if jac is not None and getattr(weights, name) > 0 else zero
        terms["collapse"] = collapse_term(raw, weights.collapse_ratio, frame) if weights.collapse > 0 else zero
        terms["bound"] = bound_term(raw) if weights.bound > 0 else zero
        total = sum(getattr(weights, name) * terms[name] for name in TERMS)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            total = total + 0.0 * raw.sum()  # keep a graph (e.g. every weight 0)
    report = {name: terms[name].detach() for name in TERMS}
    report["folding_fraction"] = jac["folding_fraction"] if jac is not None else zero
    report["valid_fraction"] = valid_fraction
    report["det_mean"] = jac["det_mean"] if jac is not None else zero
    return total, report


def reconstruction_loss(
    features,
    images: Tensor,
    noise_std: float = 0.05,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Denoising reconstruction loss of the feature autoencoder: ``mse(features(x + noise), x)``.

    Args:
        features: a :class:`~deepatlas_fast.model.FeatureNet` (or a DeepAtlas, whose ``.features`` is
            used; a DDP-wrapped FeatureNet works too).
        images: ``[N, C, D, H, W]`` normalised exams.
        noise_std: std of the Gaussian noise added to the input (intensity units; 0 = plain
            autoencoder). generator: for the noise (CPU generator; default the global RNG).
    """
    net = features
    core = getattr(net, "module", net)
    if hasattr(core, "coordnet"):
        if core.features is None:
            raise ValueError("features must be a FeatureNet; this DeepAtlas has features=0 (intensity only)")
        net = core.features
    if not isinstance(images, torch.Tensor) or images.dim() != 5:
        raise ValueError(f"images must be a tensor [N, C, D, H, W], got {getattr(images, 'shape', type(images))}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    noisy = images
    if noise_std > 0:
        noise = torch.randn(images.shape, generator=generator, dtype=torch.float32)
        noisy = images + noise_std * noise.to(device=images.device, dtype=images.dtype)
    recon = net(noisy)
    return F.mse_loss(recon.float(), images.float())
