"""Stock-PyTorch equivalents of the ops, as a user would write them without this package: the
baselines every benchmark compares against, on the same inputs (one copy, in ``deepatlas_fast.bench``)."""

from __future__ import annotations

from deepatlas_fast import bench, stock

# grid_sample and torch.gradient + linalg.det: the stock ops the training objective's --ops stock uses
sample = stock.sample
jacobian_var = stock.jacobian_var
# MONAI 1.6's LocalNormalizedCrossCorrelationLoss (separable conv3d) when installed
lncc = bench.stock_lncc
# fixed-point iterations v <- -disp(x + v) with grid_sample, differentiated by autograd
invert_displacement = bench.stock_invert_displacement
