"""A 3x3x3 convolution of an upsampled tensor, made a slab of planes at a time: the upsampled tensor is never whole.

A CoordNet decoder convolves the next coarser level's features resized to its own grid (32 channels at full
resolution with base 16, the largest tensor of a training step). :func:`upsampled_conv3d` resizes the planes one
slab of output planes needs (with its one-plane halo), convolves them and drops them; its backward makes them
again the same way and sends each slab's gradient straight to the coarse tensor. A step then never holds the
resized input (nor, in the backward, the resized input and its gradient together): the coarse input, a slab's
worth of planes and the output instead.

The resize is ``F.interpolate(h, size, mode="trilinear", align_corners=...)`` (True: the CoordNet's "corners"
grid; False: the feature autoencoder's context path), computed within each coarse plane, then between them (a
matrix of two weights per fine plane applied to the coarse planes), in float32 (or float64) and rounded once to
``h``'s dtype: equal to the trilinear op up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["Upsampled", "upsampled_conv3d", "slab_rows"]

SLABS = 8
"""Slabs a volume is cut into (fewer when that would make a slab thinner than :data:`MIN_ROWS` planes)."""
MIN_ROWS = 16


def slab_rows(depth: int) -> int:
    """Output planes per slab for an output ``depth`` planes deep."""
    return max(MIN_ROWS, -(-depth // SLABS))


@dataclass(frozen=True)
class Upsampled:
    """Stands for ``F.interpolate(source, size, mode="trilinear", align_corners=align_corners)`` as a part of a
    convolution's input (:func:`deepatlas_fast.model._convolve_parts`), which then runs :func:`upsampled_conv3d`
    on it instead of holding the resized tensor."""

    source: Tensor
    size: tuple
    align_corners: bool = True

    @property
    def channels(self) -> int:
        return self.source.shape[1]

    def materialize(self) -> Tensor:
        return _resize(self.source, self.size, self.align_corners)


def _resize(h: Tensor, size: Sequence[int], align_corners: bool = True) -> Tensor:
    if tuple(h.shape[2:]) == tuple(size):
        return h
    return F.interpolate(h, size=tuple(size), mode="trilinear", align_corners=align_corners)


class _PlaneTable:
    """Fine plane ``j`` = ``(1 - t[j]) * coarse[lo[j]] + t[j] * coarse[hi[j]]`` (``F.interpolate``'s positions)."""

    def __init__(self, fine: int, coarse: int, device, align_corners: bool = True):
        self.fine, self.coarse, self.device, self.align_corners = fine, coarse, device, align_corners
        # the planes each slab reads, on the host (the same positions as the device's matrix below)
        self.lo = [min(int(p), coarse - 1) for p in self._positions(torch.arange(fine, dtype=torch.float64)).tolist()]
        self.hi = [min(lo + 1, coarse - 1) for lo in self.lo]
        self._matrices = {}

    def _positions(self, fine_index: Tensor) -> Tensor:
        if self.align_corners:
            scale = (self.coarse - 1) / (self.fine - 1) if self.fine > 1 else 0.0
            return fine_index * scale
        return ((fine_index + 0.5) * (self.coarse / self.fine) - 0.5).clamp_min(0.0)  # pixel centres, clamped

    def weights(self, first_coarse: int, last_coarse: int, start: int, stop: int, dtype) -> Tensor:
        """``[stop - start, last_coarse - first_coarse]``: fine planes ``[start, stop)`` from those coarse planes.
        The whole ``[fine, coarse]`` matrix is made once per dtype on the device (no copy from the host, which
        would synchronise with a GPU at every slab)."""
        matrix = self._matrices.get(dtype)
        if matrix is None:
            fine_index = torch.arange(self.fine, dtype=torch.float64, device=self.device)
            position = self._positions(fine_index)
            lo = position.floor().clamp_max(self.coarse - 1)
            t = position - lo
            rows = fine_index.long()
            matrix = torch.zeros(self.fine, self.coarse, dtype=torch.float64, device=self.device)
            matrix.index_put_((rows, lo.long()), 1.0 - t, accumulate=True)
            matrix.index_put_((rows, (lo + 1).clamp_max(self.coarse - 1).long()), t, accumulate=True)
            matrix = self._matrices[dtype] = matrix.to(dtype)
        return matrix[start:stop, first_coarse:last_coarse]

    def planes(self, h_rows: Tensor, first_coarse: int, start: int, stop: int, plane_size: Sequence[int]) -> Tensor:
        """Fine planes ``[start, stop)`` from ``h_rows`` = coarse planes from ``first_coarse`` on."""
        # (a slab of a channels-last tensor is not channels-last contiguous: resized whole that way, it is)
        x = h_rows.to(_accumulation(h_rows)).contiguous(memory_format=_layout(h_rows))
        # not under autocast (its matmul in bfloat16 would round the weights; the backward's remake runs without it)
        with torch.autocast(h_rows.device.type, enabled=False):
            if tuple(x.shape[3:]) != tuple(plane_size):  # within the planes first: fewer coarse planes than fine ones
                x = F.interpolate(x, size=(x.shape[2], *plane_size), mode="trilinear",
                                  align_corners=self.align_corners)
            weights = self.weights(first_coarse, first_coarse + x.shape[2], start, stop, x.dtype)
            return _mix_planes(weights, x).to(h_rows.dtype)


def _mix_planes(weights: Tensor, x: Tensor) -> Tensor:
    """``y[:, :, i] = sum_k weights[i, k] x[:, :, k]`` as one matrix product over whole planes, in ``x``'s layout
    (with channels last a plane is the contiguous block [H, W, C])."""
    if _layout(x) == torch.channels_last_3d:
        planes = x.permute(0, 2, 3, 4, 1).contiguous()  # a view unless x is not channels-last contiguous
        n, r, hh, ww, c = planes.shape
        return torch.matmul(weights, planes.view(n, r, -1)).view(n, -1, hh, ww, c).permute(0, 4, 1, 2, 3)
    x = x.contiguous()
    n, c, r, hh, ww = x.shape
    return torch.matmul(weights, x.view(n * c, r, hh * ww)).view(n, c, -1, hh, ww)


def _fine_range(depth: int, out_start: int, out_stop: int) -> tuple:
    """The resized planes output planes ``[out_start, out_stop)`` read (their one-plane halo within the volume)."""
    return max(out_start - 1, 0), min(out_stop + 1, depth)


def _coarse_range(table: _PlaneTable, start: int, stop: int) -> tuple:
    """The coarse planes resized planes ``[start, stop)`` are made from."""
    return table.lo[start], table.hi[stop - 1] + 1


def _slab_input(h_rows: Tensor, first_coarse: int, table: _PlaneTable, size: Sequence[int], out_start: int,
                out_stop: int, memory_format) -> Tensor:
    """The resized planes output planes ``[out_start, out_stop)`` convolve (made from the coarse planes
    ``h_rows``, the first of them ``first_coarse``), zero-padded where the volume ends, in ``memory_format``."""
    start, stop = _fine_range(size[0], out_start, out_stop)
    x = table.planes(h_rows, first_coarse, start, stop, size[1:])
    below, above = start - (out_start - 1), (out_stop + 1) - stop
    if below or above:  # the convolution's zero padding at the volume's first / last plane
        x = F.pad(x, (0, 0, 0, 0, below, above))
    return x.contiguous(memory_format=memory_format)


_STRIDE, _PADDING, _DILATION = [1, 1, 1], [0, 1, 1], [1, 1, 1]  # padding within planes; across them by the slab


def _slabs(table: _PlaneTable, depth: int, rows: int):
    """(out_start, out_stop, first coarse plane, last + 1) of each slab."""
    for out_start in range(0, depth, rows):
        out_stop = min(out_start + rows, depth)
        yield (out_start, out_stop, *_coarse_range(table, *_fine_range(depth, out_start, out_stop)))


class _UpsampledConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, size, rows, align_corners):
        layout = _layout(weight)
        table = _PlaneTable(size[0], h.shape[2], h.device, align_corners)
        out = None
        for out_start, out_stop, first, last in _slabs(table, size[0], rows):
            x = _slab_input(h[:, :, first:last], first, table, size, out_start, out_stop, layout)
            y = F.conv3d(x, weight, None, _STRIDE, _PADDING)  # (autocast decides its dtype)
            if out is None:
                out = torch.empty((h.shape[0], weight.shape[0], *size), dtype=y.dtype, device=y.device,
                                  memory_format=layout)
            out[:, :, out_start:out_stop] = y
        ctx.save_for_backward(h, weight)
        ctx.size, ctx.rows, ctx.layout, ctx.align_corners = tuple(size), rows, layout, align_corners
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        size, rows, layout = ctx.size, ctx.rows, ctx.layout
        need_h, need_w = ctx.needs_input_grad[:2]
        table = _PlaneTable(size[0], h.shape[2], h.device, ctx.align_corners)
        dtype = grad.dtype  # the forward convolution's (autocast's) dtype
        w = weight.detach().to(dtype).contiguous(memory_format=layout)  # (a slice of a weight is not)
        # slabs overlap on coarse planes: their gradients are summed in at least float32
        grad_h = torch.zeros(h.shape, dtype=_accumulation(h), device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_accumulation(weight), device=weight.device) if need_w else None
        for out_start, out_stop, first, last in _slabs(table, size[0], rows):
            with torch.enable_grad():
                h_rows = h[:, :, first:last].detach().requires_grad_(need_h)
                x = _slab_input(h_rows, first, table, size, out_start, out_stop, layout)
            g = grad[:, :, out_start:out_stop].contiguous(memory_format=layout)
            grad_x, grad_slab_w, _ = torch.ops.aten.convolution_backward(
                g, x.detach().to(dtype), w, None, _STRIDE, _PADDING, _DILATION, False, [0, 0, 0], 1,
                [need_h, need_w, False])
            if need_h:  # through the resize, to the coarse planes
                grad_h[:, :, first:last] += torch.autograd.grad(x, h_rows, grad_x.to(x.dtype))[0]
            if need_w:
                grad_w += grad_slab_w
        return (grad_h.to(h.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None, None, None, None)


def _accumulation(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _layout(t: Tensor) -> torch.memory_format:
    """channels_last_3d for a tensor (or a slab of one) whose channels are its innermost dimension."""
    return torch.channels_last_3d if t.stride(1) == 1 and t.shape[1] > 1 else torch.contiguous_format


def upsampled_conv3d(h: Tensor, weight: Tensor, size: Sequence[int], rows: Optional[int] = None,
                     align_corners: bool = True) -> Tensor:
    """``F.conv3d(F.interpolate(h, size, mode="trilinear", align_corners=align_corners), weight, padding=1)`` (no bias;
    stride 1; ``weight [C_out, C_in, 3, 3, 3]``) made ``rows`` output planes at a time (default
    :func:`slab_rows`), forward and backward, without holding the resized tensor (a single slab still makes it
    whole, briefly, in the forward and again in the backward). Under ``torch.compile`` it is that expression
    itself."""
    if not isinstance(h, Tensor) or h.dim() != 5:
        raise ValueError(f"h must be a tensor [N, C, D, H, W], got {tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be [C_out, {h.shape[1]}, 3, 3, 3], got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size must be three sizes >= 1, got {size}")
    rows = slab_rows(size[0]) if rows is None else int(rows)
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if torch.compiler.is_compiling():
        return F.conv3d(_resize(h, size, align_corners), weight, None, 1, 1)
    return _UpsampledConv3d.apply(h, weight, size, rows, bool(align_corners))
