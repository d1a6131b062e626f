"""PNG pictures without imaging libraries: a minimal PNG writer and three-plane label overlays.

Display convention for canonical RAS+ data (``data[i, j, k]``: ``i`` towards the subject's Right,
``j`` Anterior, ``k`` Superior), as radiologists read it:

- axial (a ``k`` slice, seen from the feet): the subject's right on the picture's left, anterior up;
- coronal (a ``j`` slice, seen from the front): the subject's right on the picture's left, superior up;
- sagittal (an ``i`` slice, seen from the subject's left): anterior on the picture's left, superior up.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .data.io import quantiles

__all__ = ["PALETTE", "label_colour", "write_png", "overlay_png"]

PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
)  # fmt: skip
"""Label colours (RGB): label ``l >= 1`` is drawn in ``PALETTE[(l - 1) % len(PALETTE)]``."""

BACKGROUND = 60
"""Grey level of the picture where no image is given."""

PathLike = Union[str, "os.PathLike[str]"]
ArrayLike = Union[Tensor, np.ndarray]


def label_colour(label: int) -> tuple:
    """The RGB colour of label id ``label`` (>= 1) in every picture."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: PathLike, rgb: ArrayLike) -> str:
    """Write an 8-bit RGB PNG from a ``[H, W, 3]`` uint8 array or tensor; returns the path.

    Rows are stored unfiltered (filter type 0) in one zlib-compressed IDAT chunk; parent folders are created.
    """
    array = rgb.detach().cpu().numpy() if isinstance(rgb, Tensor) else np.asarray(rgb)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"rgb must have shape [H, W, 3] with H, W >= 1, got {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8, got {array.dtype}")
    height, width = array.shape[:2]
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)  # a leading 0 per row: filter type "None"
    rows[:, 1:] = array.reshape(height, 3 * width)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
    png += _chunk(b"IEND", b"")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png)
    return path


def _volume(x: Optional[ArrayLike], name: str) -> Optional[Tensor]:
    if x is None:
        return None
    t = x.detach().cpu() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 3:
        raise ValueError(f"{name} must be a [D, H, W] volume, got shape {tuple(t.shape)}")
    return t


def _view(volume: Tensor, fixed: int, index: int, size: tuple) -> Tensor:
    """Slice ``index`` across axis ``fixed`` in display orientation, stretched to ``size`` (rows, cols).

    The remaining two axes of the slice are (horizontal, vertical); the highest index of each ends up
    on the left and at the top (subject's right / anterior / superior, see the module docstring).
    """
    plane = volume.select(fixed, index).T.flip(0, 1)
    rows = ((torch.arange(size[0]) + 0.5) * plane.shape[0] / size[0]).long()
    cols = ((torch.arange(size[1]) + 0.5) * plane.shape[1] / size[1]).long()
    return plane.index_select(0, rows).index_select(1, cols)


def _colours(labels: Tensor) -> Tensor:
    """``[..., 3]`` float RGB of each (nonzero) label id."""
    palette = torch.tensor(PALETTE, dtype=torch.float32)
    return palette[(labels.long() - 1).remainder(len(PALETTE))]


def _outline(labels: Tensor) -> Tensor:
    """Pixels of nonzero labels with a 4-neighbour of another value (outside the picture counts as 0)."""
    p = torch.nn.functional.pad(labels[None, None].float(), (1, 1, 1, 1))[0, 0]
    centre = p[1:-1, 1:-1]
    different = (p[:-2, 1:-1] != centre) | (p[2:, 1:-1] != centre) | (p[1:-1, :-2] != centre) | (p[1:-1, 2:] != centre)
    return (labels != 0) & different


def overlay_png(
    image: Optional[ArrayLike],
    labels: Optional[ArrayLike],
    path: PathLike,
    *,
    contour: Optional[ArrayLike] = None,
    spacing: Optional[Sequence[float]] = None,
    centre: Optional[Sequence[int]] = None,
    alpha: float = 0.45,
    gap: int = 4,
    min_size: int = 256,
) -> str:
    """Write one PNG with the axial, coronal and sagittal slices side by side (see the module docstring).

    Args:
        image: ``[D, H, W]`` canonical RAS+ intensities, shown in grey with a 1st-99th percentile
            window; None: a neutral grey background.
        labels: ``[D, H, W]`` integer label map drawn filled (blended with ``alpha``) in
            :func:`label_colour`; None: no fill.
        path: the PNG file (parent folders are created).
        contour: a second ``[D, H, W]`` label map drawn as 1-pixel outlines in the same colours (e.g. the
            truth over a filled prediction).
        spacing: voxel size in mm per axis; pixels are stretched (nearest neighbour) so that every
            panel has the true aspect, one pixel per finest spacing. Default isotropic.
        min_size: small volumes are enlarged (nearest neighbour) until the longest panel side has at
            least this many pixels.
        centre: the voxel the three slices go through; default the centroid of the labelled voxels
            (``labels`` or ``contour``), or the volume centre when nothing is labelled.
        alpha: opacity of the filled labels; gap: black pixels between panels.
    Returns: the path written.
    """
    vols = {name: _volume(x, name) for name, x in (("image", image), ("labels", labels), ("contour", contour))}
    given = {k: v for k, v in vols.items() if v is not None}
    if not given:
        raise ValueError("overlay_png needs at least one of image, labels, contour")
    shape = next(iter(given.values())).shape
    for name, v in given.items():
        if v.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)} like the other volumes, got {tuple(v.shape)}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
    if centre is None:
        labelled = torch.zeros(shape, dtype=torch.bool)
        for name in ("labels", "contour"):
            if vols[name] is not None:
                labelled |= vols[name] != 0
        index = torch.nonzero(labelled)
        centre = index.double().mean(0).round().long().tolist() if len(index) else [s // 2 for s in shape]
    centre = [int(c) for c in centre]
    if len(centre) != 3 or not all(0 <= c < s for c, s in zip(centre, shape)):
        raise ValueError(f"centre must be a voxel index inside {tuple(shape)}, got {centre!r}")

    if vols["image"] is not None:
        grey_volume = vols["image"].float()
        lo, hi = quantiles(grey_volume, [1.0, 99.0])
        grey_volume = ((grey_volume - lo) / max(hi - lo, 1e-12)).clamp(0, 1) * 255
    else:
        grey_volume = torch.full(shape, float(BACKGROUND))
    base = min(min(spacing), max(n * s for n, s in zip(shape, spacing)) / max(1, min_size))  # mm per pixel
    panels = []
    # (fixed axis, horizontal axis, vertical axis): axial, coronal, sagittal
    for fixed, across, up in ((2, 0, 1), (1, 0, 2), (0, 1, 2)):
        size = (max(1, round(shape[up] * spacing[up] / base)), max(1, round(shape[across] * spacing[across] / base)))
        rgb = _view(grey_volume, fixed, centre[fixed], size)[..., None].repeat(1, 1, 3)
        if vols["labels"] is not None:
            fill = _view(vols["labels"], fixed, centre[fixed], size)
            on = fill != 0
            rgb[on] = (1 - alpha) * rgb[on] + alpha * _colours(fill[on])
        if vols["contour"] is not None:
            outline = _view(vols["contour"], fixed, centre[fixed], size)
            edge = _outline(outline)
            rgb[edge] = _colours(outline[edge])
        panels.append(rgb.round().clamp(0, 255).to(torch.uint8))
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    canvas = torch.zeros((height, width, 3), dtype=torch.uint8)
    x = 0
    for p in panels:
        canvas[: p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + gap
    return write_png(path, canvas)
