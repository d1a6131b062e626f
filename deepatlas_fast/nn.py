"""``nn.Module`` wrappers for embedding the ops in other frameworks' code."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coords import displacement_to_normalized, identity_coords, to_grid
from .ops import jacobian_var, lncc, warp

_MONAI_KERNELS = {"rectangular": "box", "gaussian": "gaussian"}


class LNCCLoss(nn.Module):
    """Drop-in for ``monai.losses.LocalNormalizedCrossCorrelationLoss`` (3-D), on the fused op.

    Same arguments and outputs as MONAI 1.6: ``forward(pred, target)`` returns ``-mean(ncc)``
    (``reduction="mean"``), ``-sum(ncc)`` (``"sum"``) or the map ``-ncc`` (``"none"``).
    ``kernel_type`` is ``"rectangular"`` or ``"gaussian"``; ``smooth_nr`` must be 0 (MONAI's default).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        kernel_size: int = 3,
        kernel_type: str = "rectangular",
        reduction: str = "mean",
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"spatial_dims must be 3 (this loss is 3-D only), got {spatial_dims}")
        if kernel_type not in _MONAI_KERNELS:
            raise ValueError(f"kernel_type must be one of {tuple(_MONAI_KERNELS)}, got {kernel_type!r}")
        reduction = getattr(reduction, "value", reduction)  # accept monai.utils.LossReduction
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
        if float(smooth_nr) != 0.0:
            raise ValueError(f"smooth_nr must be 0 (the fused op has no numerator smoothing), got {smooth_nr}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.kernel = _MONAI_KERNELS[kernel_type]
        self.reduction = reduction
        self.smooth_dr = float(smooth_dr)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.dim() != 5:
            raise ValueError(f"pred must be [B, C, D, H, W], got shape {tuple(pred.shape)}")
        if self.reduction == "mean":
            return lncc(pred, target, self.kernel_size, self.kernel, self.smooth_dr, "mean")
        ncc = lncc(pred, target, self.kernel_size, self.kernel, self.smooth_dr, "none")
        return -ncc.sum() if self.reduction == "sum" else -ncc

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, kernel={self.kernel!r}, reduction={self.reduction!r}, smooth_dr={self.smooth_dr}"


class SpatialTransformer(nn.Module):
    """Drop-in for VoxelMorph's ``SpatialTransformer(size, mode)``: warps ``src`` by a dense
    displacement ``flow`` given in voxels, channel k along spatial dim k (D, H, W), zero padding.

    ``mode="bilinear"`` runs the fused :func:`~deepatlas_fast.warp` (no identity grid is built);
    ``mode="nearest"`` (labels; not differentiable w.r.t. ``flow``) uses ``F.grid_sample``.
    """

    def __init__(self, size: Optional[Sequence[int]] = None, mode: str = "bilinear", padding: str = "zeros") -> None:
        super().__init__()
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        if size is not None and len(size) != 3:
            raise ValueError(f"size must be 3 sizes (D, H, W), got {tuple(size)}")
        self.size = None if size is None else tuple(int(s) for s in size)
        self.mode = mode
        self.padding = padding

    def forward(self, src: Tensor, flow: Tensor) -> Tensor:
        if flow.dim() != 5 or flow.shape[1] != 3:
            raise ValueError(f"flow must be [B, 3, D, H, W] (voxels), got shape {tuple(flow.shape)}")
        if self.size is not None and tuple(flow.shape[2:]) != self.size:
            raise ValueError(f"flow must have spatial shape {self.size} (the size given), got {tuple(flow.shape[2:])}")
        disp = displacement_to_normalized(flow, flow.shape[2:])
        if self.mode == "bilinear":
            return warp(src, disp, self.padding)
        coords = identity_coords(flow.shape[2:], dtype=disp.dtype, device=disp.device) + disp
        return F.grid_sample(src, to_grid(coords), mode="nearest", padding_mode=self.padding, align_corners=True)


class JacobianVarianceLoss(nn.Module):
    """Regulariser: variance of the Jacobian determinant of a field (see
    :func:`~deepatlas_fast.jacobian_var`). After each call, ``last_folding_fraction`` holds the
    share of voxels with det <= 0 (detached), computed in the same pass."""

    def __init__(self, scale: Optional[Sequence[float]] = None, normalized: bool = False) -> None:
        super().__init__()
        self.scale = None if scale is None else [float(s) for s in scale]
        self.normalized = bool(normalized)
        self.last_folding_fraction: Optional[Tensor] = None

    def forward(self, field: Tensor) -> Tensor:
        var, folding = jacobian_var(field, self.scale, self.normalized, return_folding=True)
        self.last_folding_fraction = folding.detach()
        return var

    def extra_repr(self) -> str:
        return f"scale={self.scale}, normalized={self.normalized}"
