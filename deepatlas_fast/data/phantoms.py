"""Procedural torso phantoms: the embedded default cohort (no downloads).

Each subject is a torso-like body in CT Hounsfield units with 11 labelled organs (:data:`PHANTOM_LABELS`)
and unlabelled clutter (ribs, pelvis, femoral heads, vena cava, bowel gas). The anatomy is a fixed
layout in a template body frame, so labels correspond across subjects (one-shot propagation is
meaningful); each subject varies it by

* body habitus: per-axis body scale, subcutaneous fat thickness;
* organ shape: per-organ scale (per axis) and offset, plus a smooth random deformation (~8 mm);
* pose: small rotation (about 6 degrees axial, 3 degrees tilt) and translation in the scanner;
* field of view: the grid's centre along z (superior-inferior) moves by up to about +-45 mm, so the
  visible body extent differs (lung apices or bladder may leave the grid);
* image: partial-volume blur, per-subject noise level, organ texture.

World frame = scanner frame, RAS+ (x to subject Right, y Anterior, z Superior), mm. The image grid is
axis aligned: ``affine = diag(spacing)`` plus the origin, so the arrays are already canonical
(``data[i, j, k]``: i = R, j = A, k = S). Generation is deterministic per seed (torch CPU generator).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .io import gaussian_smooth, write_label_table

__all__ = [
    "PHANTOM_LABELS",
    "PHANTOM_FOV_MM",
    "phantom_subject",
    "phantom_cohort",
    "phantom_seed",
    "write_phantom_cohort",
]

PHANTOM_LABELS = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "stomach",
    6: "aorta",
    7: "spine",
    8: "lung_left",
    9: "lung_right",
    10: "heart",
    11: "bladder",
}
"""Label id -> organ name (0 is background / unlabelled tissue)."""

PHANTOM_FOV_MM = 384.0
"""Default in-plane field of view in mm: ``spacing = PHANTOM_FOV_MM / max(shape[0], shape[1])``."""

# HU of tissues
_AIR, _FAT, _SKIN, _MUSCLE, _VISCERA = -1000.0, -100.0, 30.0, 45.0, -40.0
_BONE_CORTICAL, _BONE_CANCELLOUS, _DISC, _CSF = 900.0, 300.0, 80.0, 15.0


def phantom_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of the cohort with cohort seed ``seed`` (stable, well mixed)."""
    return int(np.random.SeedSequence([int(seed), int(index), 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)


class _Rng:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(int(seed))

    def uniform(self, lo, hi, size=()) -> Tensor:
        return lo + (hi - lo) * torch.rand(size, generator=self.g, dtype=torch.float64)

    def normal(self, mean=0.0, std=1.0, size=()) -> Tensor:
        return mean + std * torch.randn(size, generator=self.g, dtype=torch.float64)

    def u(self, lo, hi) -> float:
        return float(self.uniform(lo, hi))

    def n(self, mean=0.0, std=1.0, clip=2.5) -> float:
        return float(mean + std * max(-clip, min(clip, float(self.normal()))))


def _rotation(rx: float, ry: float, rz: float) -> Tensor:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    mx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    my = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    mz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return mz @ my @ mx


class _Organs:
    """Evaluates shapes on template-frame coordinates with per-subject organ jitter."""

    def __init__(self, x: Tensor, y: Tensor, z: Tensor, rng: _Rng, organ_scale: float, organ_shift: float):
        self.x, self.y, self.z = x, y, z
        self.rng = rng
        self.organ_scale = organ_scale
        self.organ_shift = organ_shift

    def jitter(self, centre, semi):
        c = [c + self.rng.n(0.0, self.organ_shift) for c in centre]
        s = [s * (1.0 + self.rng.n(0.0, self.organ_scale, clip=2.0)) for s in semi]
        return c, s

    def ellipsoid(self, centre, semi, angle_z: float = 0.0, angle_y: float = 0.0, jitter: bool = True) -> Tensor:
        """Normalised radius squared (<= 1 inside) of a rotated ellipsoid."""
        if jitter:
            centre, semi = self.jitter(centre, semi)
        dx, dy, dz = self.x - centre[0], self.y - centre[1], self.z - centre[2]
        if angle_z:
            c, s = math.cos(angle_z), math.sin(angle_z)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if angle_y:
            c, s = math.cos(angle_y), math.sin(angle_y)
            dx, dz = c * dx - s * dz, s * dx + c * dz
        return (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2


def _smooth_noise(shape, rng: _Rng, control: int, std: float) -> Tensor:
    """Smooth random field on a grid of ``shape`` from ``control``^3 Gaussian control values."""
    coarse = rng.normal(0.0, std, (1, 1, control, control, control)).to(torch.float32)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def phantom_subject(
    seed: int,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Optional[Sequence[float]] = None,
    *,
    noise: Optional[float] = None,
    variation: float = 1.0,
) -> tuple:
    """Generate one phantom subject.

    Args:
        seed: subject seed (same seed -> bit-identical output).
        shape: grid size ``(D, H, W)`` = (R, A, S) axes, default 64^3.
        spacing: voxel size in mm (one number or 3); default isotropic ``384 / max(shape[0], shape[1])``
            (6 mm at 64^3), so the in-plane field of view is 384 mm and the z extent is ``shape[2]`` voxels.
        noise: CT noise std in HU; default drawn per subject in [8, 20].
        variation: scales every random variation (0: the template subject, centred, no deformation).
    Returns:
        ``(image, labels, affine)``: image float32 ``[D, H, W]`` in HU (air -1000), labels int64
        ``[D, H, W]`` with ids of :data:`PHANTOM_LABELS`, affine 4x4 float64 voxel -> world (mm).
    """
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be 3 ints, got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 4:
        raise ValueError(f"shape must be 3 sizes >= 4, got {tuple(shape)}")
    if spacing is None:
        sp = (PHANTOM_FOV_MM / max(dims[0], dims[1]),) * 3
    else:
        sp = tuple(float(s) for s in ((spacing,) * 3 if isinstance(spacing, (int, float)) else spacing))
        if len(sp) != 3 or not all(s > 0 and math.isfinite(s) for s in sp):
            raise ValueError(f"spacing must be one or 3 positive numbers in mm, got {spacing!r}")
    if not (variation >= 0 and math.isfinite(variation)):
        raise ValueError(f"variation must be a non-negative number, got {variation!r}")
    rng = _Rng(seed)
    v = float(variation)

    # ---- grid and pose: world (scanner) -> body frame -> template frame
    z_centre = v * rng.u(-45.0, 45.0)
    origin = [-(dims[0] - 1) / 2 * sp[0], -(dims[1] - 1) / 2 * sp[1], -(dims[2] - 1) / 2 * sp[2] + z_centre]
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = origin
    axes = [torch.arange(n, dtype=torch.float32) * s + o for n, s, o in zip(dims, sp, origin)]
    wx, wy, wz = torch.meshgrid(*axes, indexing="ij")
    rot = _rotation(v * rng.n(0, math.radians(3)), v * rng.n(0, math.radians(3)), v * rng.n(0, math.radians(6)))
    shift = [v * rng.n(0, 10.0), v * rng.n(0, 10.0) - 10.0 * 0, 0.0]
    r = rot.to(torch.float32)
    px, py, pz = wx - shift[0], wy - shift[1], wz - shift[2]
    # body = R^T (world - t)
    bx = r[0, 0] * px + r[1, 0] * py + r[2, 0] * pz
    by = r[0, 1] * px + r[1, 1] * py + r[2, 1] * pz
    bz = r[0, 2] * px + r[1, 2] * py + r[2, 2] * pz
    # smooth deformation (mm) and body habitus scale
    amp = 8.0 * v
    if amp > 0:
        bx = bx + _smooth_noise(dims, rng, 5, amp)
        by = by + _smooth_noise(dims, rng, 5, amp)
        bz = bz + _smooth_noise(dims, rng, 5, amp)
    scale = [1.0 + v * rng.n(0, 0.07), 1.0 + v * rng.n(0, 0.07), 1.0 + v * rng.n(0, 0.05)]
    x, y, z = bx / scale[0], by / scale[1], bz / scale[2]
    organs = _Organs(x, y, z, rng, organ_scale=0.08 * v, organ_shift=5.0 * v)

    hu = torch.full(dims, _AIR, dtype=torch.float32)
    labels = torch.zeros(dims, dtype=torch.int64)

    # ---- trunk: elliptic cross-section varying with z, flatter back
    semi_a = 160.0 - 14.0 * torch.exp(-(((z + 20.0) / 80.0) ** 2)) + 10.0 * torch.exp(-(((z - 150.0) / 90.0) ** 2))
    semi_b = 108.0 + 8.0 * torch.exp(-(((z - 140.0) / 90.0) ** 2)) + 6.0 * torch.exp(-(((z + 170.0) / 60.0) ** 2))
    yy = torch.where(y < 0, y * 1.12, y)
    rho = torch.sqrt((x / semi_a) ** 2 + (yy / semi_b) ** 2)
    depth = (1.0 - rho) * semi_b  # approximate depth below the skin in mm
    z_lo, z_hi = -235.0 * (1 + v * rng.n(0, 0.03)), 240.0 * (1 + v * rng.n(0, 0.03))
    trunk = (rho <= 1.0) & (z >= z_lo) & (z <= z_hi)
    fat_mm = 18.0 + v * rng.n(0, 6.0)
    fat_mm = max(6.0, fat_mm)
    muscle_mm = 12.0 * (1 + v * rng.n(0, 0.1))
    hu[trunk] = _SKIN
    hu[trunk & (depth > 2.5)] = _FAT
    hu[trunk & (depth > fat_mm)] = _MUSCLE
    cavity = trunk & (depth > fat_mm + muscle_mm)
    texture = _smooth_noise(dims, rng, 9, 12.0 * v)
    hu[cavity] = (_VISCERA + texture)[cavity]

    # ribs in the thorax: periodic bands in the muscle layer
    rib_band = trunk & (depth > fat_mm - 2.0) & (depth < fat_mm + 9.0) & (z > 40.0) & (z < 225.0)
    ribs = rib_band & (torch.sin(2 * math.pi * (z - 40.0) / 26.0) > 0.45)
    hu[ribs] = 650.0

    # ---- lungs (under the ribs, above the diaphragm domes)
    lung_l = organs.ellipsoid((-78.0, -5.0, 178.0), (66.0, 82.0, 112.0)) <= 1.0
    lung_r = organs.ellipsoid((78.0, -5.0, 172.0), (70.0, 82.0, 108.0)) <= 1.0
    dome_l = 112.0 + 14.0 * torch.exp(-(((x + 70.0) / 45.0) ** 2))
    dome_r = 128.0 + 16.0 * torch.exp(-(((x - 70.0) / 45.0) ** 2))
    lung_l &= cavity & (z > dome_l)
    lung_r &= cavity & (z > dome_r)
    lung_texture = -860.0 + 0.8 * texture * 4
    hu[lung_l | lung_r] = lung_texture[lung_l | lung_r]
    labels[lung_l] = 8
    labels[lung_r] = 9

    # ---- abdominal organs
    liver = (organs.ellipsoid((68.0, 5.0, 78.0), (92.0, 78.0, 66.0)) <= 1.0) | (
        organs.ellipsoid((-5.0, 35.0, 98.0), (52.0, 34.0, 30.0), angle_z=0.3) <= 1.0
    )
    liver &= cavity
    hu[liver] = 110.0 + texture[liver] * 0.5
    labels[liver] = 1

    stomach_r2 = organs.ellipsoid((-52.0, 32.0, 82.0), (46.0, 36.0, 48.0), angle_z=-0.4)
    stomach = cavity & (stomach_r2 <= 1.0)
    stomach_wall = stomach & (stomach_r2 > 0.72)
    gas = stomach & (z > 82.0 + 18.0) & (y > 30.0)
    hu[stomach] = 20.0
    hu[stomach_wall] = 60.0
    hu[gas & ~stomach_wall] = -950.0
    labels[stomach] = 5

    spleen = cavity & (organs.ellipsoid((-98.0, -42.0, 80.0), (30.0, 46.0, 54.0), angle_z=0.5) <= 1.0)
    hu[spleen] = 120.0
    labels[spleen] = 2

    for label, cx, cz, tilt in ((3, -70.0, 18.0, 0.25), (4, 70.0, 2.0, -0.25)):
        c, s = organs.jitter((cx, -52.0, cz), (27.0, 24.0, 52.0))
        kidney_r2 = organs.ellipsoid(c, s, angle_y=tilt, jitter=False)
        kidney = cavity & (kidney_r2 <= 1.0)
        hilum = kidney & (
            organs.ellipsoid((c[0] - math.copysign(10.0, c[0]), c[1] + 4.0, c[2]), (9.0, 9.0, 22.0), jitter=False) <= 1.0
        )
        hu[kidney] = 180.0
        hu[hilum] = 25.0
        labels[kidney] = label

    # bowel: lower abdomen, gas pockets from a thresholded smooth field (unlabelled, per-subject)
    bowel = cavity & (z < 60.0) & (z > -150.0) & (y > -30.0) & (labels == 0)
    gas_field = _smooth_noise(dims, rng, 12, 1.0) * (1.0 if v > 0 else 0.0)
    hu[bowel] = 10.0 + 0.5 * texture[bowel]
    hu[bowel & (gas_field > 1.1)] = -900.0

    # ---- heart (after the lungs: displaces them medially)
    heart_r2 = organs.ellipsoid((-18.0, 32.0, 150.0), (58.0, 46.0, 52.0), angle_z=0.5)
    heart = cavity & (heart_r2 <= 1.0) & (z > 105.0)
    hu[heart] = 55.0
    hu[heart & (heart_r2 < 0.45)] = 160.0  # contrast-filled chambers
    labels[heart] = 10

    # ---- vessels
    ax, ay = -20.0 + organs.rng.n(0, 3 * v), -42.0 + organs.rng.n(0, 3 * v)
    aorta_r = 11.5 * (1 + organs.rng.n(0, 0.08 * v))
    aorta = cavity & (((x - ax) ** 2 + (y - ay) ** 2) <= aorta_r**2) & (z > -120.0) & (z < 160.0)
    hu[aorta] = 170.0
    labels[aorta] = 6
    ivc = cavity & (((x - 24.0) ** 2 + (y + 38.0) ** 2) <= 11.0**2) & (z > -120.0) & (z < 110.0) & (labels == 0)
    hu[ivc] = 110.0

    # ---- spine: vertebral bodies + discs + posterior elements, spinal canal
    sx, sy = organs.rng.n(0, 2 * v), -78.0 + organs.rng.n(0, 3 * v)
    rs = 17.0 * (1 + organs.rng.n(0, 0.06 * v))
    radial = torch.sqrt((x - sx) ** 2 + (y - sy) ** 2)
    column = trunk & (radial <= rs) & (z > z_lo + 5) & (z < z_hi - 5)
    period = 30.0
    phase = torch.remainder(z + 200.0, period) / period
    disc = column & (phase < 0.17)
    hu[column] = _BONE_CANCELLOUS
    hu[column & (radial > rs - 2.5)] = _BONE_CORTICAL
    hu[disc] = _DISC
    canal = trunk & (torch.sqrt((x - sx) ** 2 + (y - (sy - rs - 8.0)) ** 2) <= 7.0) & (z > z_lo + 5) & (z < z_hi - 5)
    arch = trunk & (torch.sqrt((x - sx) ** 2 + (y - (sy - rs - 8.0)) ** 2) <= 13.0) & ~canal & (phase >= 0.17)
    arch &= (z > z_lo + 5) & (z < z_hi - 5)
    spinous = trunk & ((x - sx).abs() <= 4.0) & (y < sy - rs - 15.0) & (y > sy - rs - 38.0) & (phase >= 0.25)
    spinous &= (z > z_lo + 5) & (z < z_hi - 5)
    hu[arch | spinous] = 600.0
    hu[canal] = _CSF
    labels[column | arch | spinous] = 7
    labels[canal] = 0

    # ---- pelvis: iliac shells and femoral heads (unlabelled), bladder
    for side in (-1.0, 1.0):
        ilium_r2 = organs.ellipsoid((side * 98.0, -22.0, -165.0), (34.0, 58.0, 52.0), angle_z=side * 0.4)
        shell = trunk & (ilium_r2 <= 1.0) & (ilium_r2 >= 0.62) & (labels == 0)
        hu[shell] = 650.0
        femur = trunk & (organs.ellipsoid((side * 92.0, 8.0, -222.0), (24.0, 24.0, 26.0)) <= 1.0)
        hu[femur] = 500.0
    bladder = cavity & (organs.ellipsoid((0.0, 38.0, -178.0), (44.0, 34.0, 34.0)) <= 1.0) & (labels == 0)
    hu[bladder] = 8.0
    labels[bladder] = 11

    # ---- imaging: partial volume (PSF blur in mm -> voxels), noise
    sigma = [0.6 * max(1.0, 2.0 / s) for s in sp]
    image = gaussian_smooth(hu, sigma)
    sd = (8.0 + 12.0 * rng.u(0, 1)) if noise is None else float(noise)
    if sd > 0:
        image = image + sd * torch.randn(dims, generator=rng.g, dtype=torch.float32)
    return image.contiguous(), labels.contiguous(), affine


def phantom_cohort(
    n: int,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Optional[Sequence[float]] = None,
    **kwargs,
) -> list:
    """``n`` phantom subjects: a list of ``(image HU [D,H,W], labels [D,H,W], affine)`` tuples.

    Subject ``i`` uses :func:`phantom_seed` ``(seed, i)``, so cohorts of different sizes share subjects.
    ``kwargs`` go to :func:`phantom_subject`.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return [phantom_subject(phantom_seed(seed, i), shape, spacing, **kwargs) for i in range(n)]


def write_phantom_cohort(
    folder,
    n: int,
    seed: int = 0,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Optional[Sequence[float]] = None,
    **kwargs,
) -> dict:
    """Write a phantom cohort as NIfTI files.

    Layout: ``folder/images/phantom_XXX.nii.gz`` (int16 HU), ``folder/labels/phantom_XXX.nii.gz``
    (uint8 ids) and ``folder/labels.json`` (id -> name, 0 = background).
    Returns ``{"images": [paths], "labels": [paths], "table": path}``.
    """
    import nibabel as nib

    folder = os.fspath(folder)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    out = {"images": [], "labels": []}
    for i, (image, labels, affine) in enumerate(phantom_cohort(n, seed, shape, spacing, **kwargs)):
        name = f"phantom_{i:03d}.nii.gz"
        for kind, array, dtype in (("images", image.round().clamp(-1024, 3071), np.int16), ("labels", labels, np.uint8)):
            img = nib.Nifti1Image(array.numpy().astype(dtype), affine)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm")
            path = os.path.join(folder, kind, name)
            nib.save(img, path)
            out[kind].append(path)
    out["table"] = write_label_table(os.path.join(folder, "labels.json"), {0: "background", **PHANTOM_LABELS})
    return out
