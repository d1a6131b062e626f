"""A cohort of deformed copies of one labelled CT, with known synthetic deformations.

    python benchmarks/ct_cohort.py --ct ct.nii.gz --labels labels.nii.gz --out /tmp/ct_cohort --count 24 --seed 0

Subject ``i`` (``subject_001`` ... ``subject_N``) is the input moved by its own seeded transform

    y = c + R S (x - c) + t + v(x)

(``x``: a world point of the output grid in mm, ``y``: where it is read in the input; ``c`` the grid
centre; ``R`` rotations up to ``--rotation`` degrees per axis, ``S`` scales within ``1 +/- --scale``,
``t`` a translation up to ``--translation`` mm per axis, ``v`` Gaussian-smoothed noise (sigma
``--smoothness`` mm) scaled to a peak displacement drawn in [``--displacement``/2, ``--displacement``]
mm). The map must not fold: det J > 0 everywhere (checked; the field is halved until it holds).
The transform is a :class:`deepatlas_fast.register.DeformableResult` (the package's own
world-coordinate transform), applied with :func:`~deepatlas_fast.register.warp_image` (trilinear;
outside the field of view: the minimum, air) and :func:`~deepatlas_fast.register.warp_labels`
(one-hot sampling + argmax). The image then gets a global HU offset, a smooth HU bias field and
Gaussian noise. Outputs are on the input's grid and affine (same world frame):
``subject_XXX_ct.nii.gz`` (int16 HU), ``subject_XXX_labels.nii.gz`` and ``cohort.json`` (parameters,
det J range).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

import deepatlas_fast as da
from deepatlas_fast.data.io import gaussian_smooth, load_labels, load_volume, save_like
from deepatlas_fast.register import AffineResult, DeformableResult, coordinates, warp_image, warp_labels


def rotation(angles_deg) -> np.ndarray:
    m = np.eye(3)
    for axis, angle in enumerate(np.radians(angles_deg)):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
        m = r @ m
    return m


def smooth_noise(shape, sigma_vox, g: torch.Generator, channels: int = 1) -> torch.Tensor:
    """Gaussian-smoothed white noise ``[channels, *shape]`` scaled to a peak of 1 (largest vector norm)."""
    field = gaussian_smooth(torch.randn((channels, *shape), generator=g, dtype=torch.float64), sigma_vox)
    return field / field.norm(dim=0).max()


def random_transform(volume, g: torch.Generator, args) -> DeformableResult:
    def u(lo, hi, n=None):
        x = torch.rand(n or 1, generator=g, dtype=torch.float64).numpy()
        return lo + (hi - lo) * (x if n else x[0])

    spacing = float(np.mean(volume.spacing))
    centre = volume.affine[:3, :3] @ ((np.array(volume.shape) - 1) / 2) + volume.affine[:3, 3]
    linear = rotation(u(-args.rotation, args.rotation, 3)) @ np.diag(u(1 - args.scale, 1 + args.scale, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre - linear @ centre + u(-args.translation, args.translation, 3)
    peak = u(args.displacement / 2, args.displacement)
    field = smooth_noise(volume.shape, args.smoothness / spacing, g, channels=3).float()
    affine = AffineResult(matrix, volume.affine, volume.shape, spacing, math.nan, math.nan, 0.0)
    scale = [(n - 1) / 2 for n in volume.shape]
    while True:
        result = DeformableResult(affine, field * peak, volume.affine, volume.shape, math.nan, 0.0, 0.0)
        det = da.jacobian_det(coordinates(result, volume).double(), scale=scale)
        if float(det.min()) > 0 or peak < 0.5:
            break
        peak /= 2  # would fold: halve the displacement
    result.folding = float((det <= 0).double().mean())
    result.params = {"matrix": matrix.round(6).tolist(), "peak_displacement_mm": round(peak, 3),
                     "det_j_min": round(float(det.min()), 4), "det_j_max": round(float(det.max()), 4)}
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", required=True, help="the CT (NIfTI, HU)")
    parser.add_argument("--labels", required=True, help="its label map (same grid)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rotation", type=float, default=10.0, help="max degrees per axis (default 10)")
    parser.add_argument("--scale", type=float, default=0.1, help="max relative scale change per axis (0.1)")
    parser.add_argument("--translation", type=float, default=15.0, help="max mm per axis (15)")
    parser.add_argument("--displacement", type=float, default=10.0, help="max peak of the smooth field, mm (10)")
    parser.add_argument("--smoothness", type=float, default=25.0, help="Gaussian sigma of the field, mm (25)")
    parser.add_argument("--noise", type=float, default=20.0, help="max noise std, HU (20)")
    parser.add_argument("--bias", type=float, default=30.0, help="max peak of the smooth bias field, HU (30)")
    parser.add_argument("--offset", type=float, default=20.0, help="max global HU offset (20)")
    args = parser.parse_args(argv)

    ct = load_volume(args.ct)
    labels = load_labels(args.labels, like=ct)
    os.makedirs(args.out, exist_ok=True)
    summary = {"ct": args.ct, "labels": args.labels, "seed": args.seed, "options": vars(args), "subjects": {}}
    spacing = float(np.mean(ct.spacing))
    for i in range(1, args.count + 1):
        g = torch.Generator().manual_seed(args.seed * 100003 + i)
        transform = random_transform(ct, g, args)
        image = warp_image(transform, ct)
        offset = args.offset * (2 * float(torch.rand((), generator=g)) - 1)
        bias = args.bias * float(torch.rand((), generator=g)) * smooth_noise(ct.shape, 60.0 / spacing, g)[0]
        noise = args.noise * float(torch.rand((), generator=g)) * torch.randn(ct.shape, generator=g)
        image = image + offset + bias.float() + noise
        name = f"subject_{i:03d}"
        save_like(image, ct, os.path.join(args.out, f"{name}_ct.nii.gz"), dtype=np.int16)
        save_like(warp_labels(transform, labels), ct, os.path.join(args.out, f"{name}_labels.nii.gz"))
        summary["subjects"][name] = {**transform.params, "hu_offset": round(offset, 2)}
        print(f"{name}: peak displacement {transform.params['peak_displacement_mm']:.1f} mm, "
              f"det J in [{transform.params['det_j_min']:.3f}, {transform.params['det_j_max']:.3f}]", flush=True)
    with open(os.path.join(args.out, "cohort.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
