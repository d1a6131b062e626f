"""Stock-PyTorch equivalents of the ops, as a user would write them without this package: the
baselines every benchmark compares against, on the same inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepatlas_fast.coords import identity_coords, to_grid


def sample(vol, coords, padding="border"):
    return F.grid_sample(vol, to_grid(coords), mode="bilinear", padding_mode=padding, align_corners=True)


def lncc(a, b, kernel_size=9):
    """MONAI 1.6's LocalNormalizedCrossCorrelationLoss (separable conv3d) when installed."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)(a, b)


def jacobian_var(field):
    """det via torch.gradient + torch.linalg.det, then the variance (VoxelMorph/FireANTs style)."""
    rows = [torch.stack(torch.gradient(field[:, k], dim=(1, 2, 3)), dim=-1) for k in range(3)]
    det = torch.linalg.det(torch.stack(rows, dim=-2))
    return det.flatten(1).var(dim=1, unbiased=False).mean()


def invert_displacement(disp, iters=8):
    """Fixed-point iterations v <- -disp(x + v) with grid_sample, differentiated by autograd."""
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    v = -disp
    for _ in range(iters):
        v = -sample(disp, identity + v)
    return v
