"""A tour of the four ops on a generated volume: what each does, how long it takes, how exact it is.

Run it with ``deepatlas-fast ops-tour`` (or ``python -m deepatlas_fast.tour``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from . import build_info, get_backend, invert, jacobian_det, jacobian_var, lncc, sample, warp
from .coords import identity_coords, to_grid


def blob_volume(shape, generator: torch.Generator) -> torch.Tensor:
    """A body-like test volume ``[1, 1, *shape]``: an ellipsoid with a few brighter and darker
    inner ellipsoids, smoothed, plus noise (values roughly in [0, 1])."""
    coords = identity_coords(shape)
    vol = torch.zeros(1, 1, *shape)
    centres = [(0.0, 0.0, 0.0)] + [tuple((torch.rand(3, generator=generator) - 0.5).tolist()) for _ in range(6)]
    radii = [(0.8, 0.7, 0.85)] + [tuple((0.12 + 0.2 * torch.rand(3, generator=generator)).tolist()) for _ in range(6)]
    levels = [0.4] + (0.2 + 0.8 * torch.rand(6, generator=generator)).tolist()
    for centre, radius, level in zip(centres, radii, levels):
        dist = sum(((coords[:, k] - centre[k]) / radius[k]) ** 2 for k in range(3))
        vol[:, 0][dist <= 1] = level
    vol = F.avg_pool3d(vol, 3, stride=1, padding=1, count_include_pad=False)
    return vol + 0.02 * torch.randn(vol.shape, generator=generator)


def smooth_map(shape, generator: torch.Generator, *, angle=0.35, scale=0.9, amplitude=0.05) -> torch.Tensor:
    """A coordinate map far from identity: rotation about the D axis, scaling, smooth ripples."""
    ident = identity_coords(shape)
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[1.0, 0, 0], [0, c, -s], [0, s, c]]) * scale
    field = torch.einsum("ij,njdhw->nidhw", rot, ident)
    freq = 1.0 + 2.0 * torch.rand(3, 3, generator=generator)
    phase = 2 * math.pi * torch.rand(3, generator=generator)
    for k in range(3):
        arg = sum(freq[k, j] * ident[:, j] for j in range(3)) + phase[k]
        field[:, k] += amplitude * torch.sin(arg)
    return field


def _timed(fn: Callable, repeats: int = 3):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return result, (time.perf_counter() - start) / repeats * 1e3


def run_tour(size: int = 40, seed: int = 0, device: str = "cpu", echo: Callable[[str], None] = print) -> dict:
    """Exercise every op on a generated ``size``^3 volume; print a report, return the numbers."""
    g = torch.Generator().manual_seed(seed)
    shape = (size, size, size)
    vol = blob_volume(shape, g).to(device)
    coords = smooth_map(shape, g).to(device)
    voxels = [(s - 1) / 2 for s in shape]
    rows, results = [], {}

    moved, ms = _timed(lambda: sample(vol, coords))
    stock = F.grid_sample(vol, to_grid(coords), mode="bilinear", padding_mode="border", align_corners=True)
    results["sample_max_diff_vs_grid_sample"] = (moved - stock).abs().max().item()
    rows.append(("sample", "sample", ms, f"warped the volume; max |diff| vs F.grid_sample {results['sample_max_diff_vs_grid_sample']:.1e}"))

    before, ms = _timed(lambda: lncc(vol, moved, 9))
    results["lncc_before"] = before.item()
    rows.append(("lncc", "lncc", ms, f"loss(original, warped) = {before.item():.4f} (k=9 box; -1 = identical)"))

    det, ms = _timed(lambda: jacobian_det(coords, voxels))
    var, folding = jacobian_var(coords, voxels, return_folding=True)
    results.update(det_min=det.min().item(), det_max=det.max().item(), folding=folding.item())
    rows.append(("jacobian", "jacobian_det", ms, f"det J in [{det.min().item():.3f}, {det.max().item():.3f}], var {var.item():.2e}, folding {100 * folding.item():.2f}%"))

    (inverse, valid), ms = _timed(lambda: invert(coords, shape))
    back = sample(coords, inverse)
    offset = (back - identity_coords(shape, device=device)) * torch.tensor(voxels, device=device).view(1, 3, 1, 1, 1)
    error = offset.norm(dim=1, keepdim=True)[valid]
    results.update(valid_fraction=valid.float().mean().item(), inverse_median_error_voxels=error.median().item(),
                   inverse_max_error_voxels=error.max().item())
    rows.append(("invert", "invert", ms, f"{100 * results['valid_fraction']:.1f}% of the target covered; round trip off by "
                 f"{error.median().item():.1e} (median), {error.max().item():.1e} (max) voxel"))

    restored = sample(moved, inverse) * valid
    after = lncc(vol * valid, restored, 9)
    results["lncc_after_unwarp"] = after.item()
    rows.append(("warp back", None, None, f"loss(original, unwarped) = {after.item():.4f} on the covered part"))

    disp = (coords - identity_coords(shape, device=device)).requires_grad_()
    loss = lncc(vol, warp(vol, disp), 9) + 0.1 * jacobian_var(identity_coords(shape, device=device) + disp, voxels)
    loss.backward()
    results["grad_norm"] = disp.grad.norm().item()
    rows.append(("backward", None, None, f"d(lncc + 0.1 jacobian_var)/d disp: |grad| = {results['grad_norm']:.3e}"))

    echo(f"deepatlas-fast ops tour: {size}^3 generated volume on {device}, torch {torch.__version__}")
    echo(f"{'step':<10} {'backend':<10} {'ms':>8}  result")
    for step, op, ms, text in rows:
        backend = get_backend(op, device) if op else "-"
        timing = f"{ms:8.1f}" if ms is not None else f"{'':8}"
        echo(f"{step:<10} {backend:<10} {timing}  {text}")
    echo(f"extension: {build_info()['extension']}")
    return results


if __name__ == "__main__":
    run_tour()
