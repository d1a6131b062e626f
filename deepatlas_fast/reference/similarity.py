"""Reference local normalised cross-correlation, term for term MONAI 1.6's
``LocalNormalizedCrossCorrelationLoss(spatial_dims=3)`` with ``smooth_nr=0``.

Window sums use zero padding and the separable window ``w`` (box: ones; gaussian:
``exp(-x^2 / (2 sigma^2))`` with ``sigma = kernel_size / 3``, unnormalised, as MONAI). With
``S[f] = sum_window w f`` and ``V = (sum w)^3``::

    cross = S[ab] - S[a] S[b] / V
    var_a = max(S[a^2] - S[a]^2 / V, eps)      (likewise var_b)
    ncc   = cross^2 / (var_a var_b)

The ``eps`` floor sits inside a max, so a constant window gives a finite value (0 up to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sampling import compute_dtype

KERNELS = ("box", "gaussian")


def window_weights(kernel_size: int, kernel: str, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """The 1-D window (``[kernel_size]``) applied along each axis."""
    half = kernel_size // 2
    if kernel == "box":
        return torch.ones(kernel_size, dtype=dtype, device=device)
    if kernel == "gaussian":
        sigma = kernel_size / 3.0
        x = torch.arange(-half, half + 1, dtype=torch.float64)
        return torch.exp(-0.5 / (sigma * sigma) * x**2).to(dtype=dtype, device=device)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def window_sum(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Zero-padded separable window sum of each channel of ``x`` ``[N, C, D, H, W]``."""
    n, c = x.shape[:2]
    k = weights.numel()
    half = k // 2
    y = x.reshape(n * c, 1, *x.shape[2:])
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k
        padding = [0, 0, 0, 0, 0, 0]
        padding[2 * (2 - axis)] = padding[2 * (2 - axis) + 1] = half
        y = F.conv3d(F.pad(y, padding), weights.view(shape))
    return y.reshape(x.shape)


def _statistics(a, b, kernel_size, kernel):
    dtype = compute_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    weights = window_weights(kernel_size, kernel, dtype=dtype, device=a.device)
    window_volume = weights.sum() ** 3
    a_sum, b_sum = window_sum(a, weights), window_sum(b, weights)
    a2_sum, b2_sum, ab_sum = window_sum(a * a, weights), window_sum(b * b, weights), window_sum(a * b, weights)
    cross = ab_sum - b_sum / window_volume * a_sum
    var_a = a2_sum - a_sum / window_volume * a_sum
    var_b = b2_sum - b_sum / window_volume * b_sum
    return a, b, weights, window_volume, a_sum, b_sum, cross, var_a, var_b


def lncc_map(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 9, kernel: str = "box", eps: float = 1e-5):
    """The squared local NCC map ``[N, C, D, H, W]`` (per channel), in float32 or float64."""
    *_, cross, var_a, var_b = _statistics(a, b, kernel_size, kernel)
    return cross * cross / (var_a.clamp_min(eps) * var_b.clamp_min(eps))


def lncc(
    a: torch.Tensor,
    b: torch.Tensor,
    kernel_size: int = 9,
    kernel: str = "box",
    eps: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """``reduction="mean"``: the loss ``-mean(ncc)``; ``"none"``: the NCC map (positive)."""
    ncc = lncc_map(a, b, kernel_size, kernel, eps)
    if reduction == "mean":
        return -ncc.mean()
    if reduction == "none":
        return ncc
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def lncc_backward(grad, a, b, kernel_size: int, kernel: str, eps: float, reduction: str, need_a: bool, need_b: bool):
    """Explicit backward of :func:`lncc` (recomputing the window sums): the requested gradients.

    With ``q = var_a var_b`` (floored) and ``g`` the gradient of the NCC map::

        g_cross = 2 g cross / q          g_var_a = -g ncc / var_a   (0 where the floor is active)
        g_S[a]  = -(g_cross S[b] + 2 g_var_a S[a]) / V       g_S[a^2] = g_var_a     g_S[ab] = g_cross
        grad_a  = W(g_S[a]) + 2 a W(g_S[a^2]) + b W(g_S[ab])

    ``W`` is the window sum again: a zero-padded symmetric window is its own transpose.
    """
    a_in, b_in = a, b
    a, b, weights, volume, a_sum, b_sum, cross, var_a, var_b = _statistics(a, b, kernel_size, kernel)
    if reduction == "mean":
        g = (-grad / cross.numel()).to(cross.dtype).expand(cross.shape)
    else:
        g = grad.to(cross.dtype)
    floored_a, floored_b = var_a.clamp_min(eps), var_b.clamp_min(eps)
    ncc = cross * cross / (floored_a * floored_b)
    g_cross = 2 * g * cross / (floored_a * floored_b)
    grads = []
    for need, x, y, x_sum, y_sum, var_x, floored_x, like in (
        (need_a, a, b, a_sum, b_sum, var_a, floored_a, a_in),
        (need_b, b, a, b_sum, a_sum, var_b, floored_b, b_in),
    ):
        if not need:
            continue
        g_var = -g * ncc / floored_x * (var_x >= eps)
        g_sum = -(g_cross * y_sum + 2 * g_var * x_sum) / volume
        grad_x = window_sum(g_sum, weights) + 2 * x * window_sum(g_var, weights) + y * window_sum(g_cross, weights)
        grads.append(grad_x.to(like.dtype))
    return grads
