"""Stock-PyTorch equivalents of the ops, as a user would write them without this package: the
baselines every benchmark compares against, on the same inputs."""

from __future__ import annotations


from deepatlas_fast import stock
from deepatlas_fast.coords import identity_coords


# grid_sample and torch.gradient + linalg.det: the stock ops the training objective's --ops stock uses
sample = stock.sample


def lncc(a, b, kernel_size=9):
    """MONAI 1.6's LocalNormalizedCrossCorrelationLoss (separable conv3d) when installed."""
    from monai.losses import LocalNormalizedCrossCorrelationLoss

    return LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)(a, b)


def jacobian_var(field):
    """det via torch.gradient + torch.linalg.det, then the variance (VoxelMorph/FireANTs style)."""
    return stock.jacobian_var(field)


def invert_displacement(disp, iters=8):
    """Fixed-point iterations v <- -disp(x + v) with grid_sample, differentiated by autograd."""
    identity = identity_coords(disp.shape[2:], dtype=disp.dtype, device=disp.device)
    v = -disp
    for _ in range(iters):
        v = -sample(disp, identity + v)
    return v
