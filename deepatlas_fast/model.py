"""The DeepATLAS networks: CoordNet (voxel -> template coordinate), the feature autoencoder and the
learnable atlas (DESIGN §5).

* :class:`CoordNet`: a 3-D U-Net whose decoder emits, at every level ``s`` (coarsest first), a
  coordinate map refined as ``c_s = up(c_{s+1}) + Δ_s``. It is implemented on displacements from
  the identity of each level's grid (``up`` is trilinear with ``align_corners=True``, which maps an
  identity grid exactly onto the finer identity grid; ``grid="strided"`` places level voxels where
  the stride-2 convolutions centre them instead), and every residual head is zero-initialised,
  so a fresh network returns **exactly** ``identity_coords`` of its input grid. Each decoder level
  also sees the current coordinate estimate as 3 extra input channels (it has to place voxels in an
  absolute frame). The output is bounded to the template cube ``[-1, 1]^3`` by
  :func:`bound_coords`: a clamp whose backward is the identity (straight-through), so gradients never
  die at the cube's faces; the objective penalises the raw map's excursion beyond the cube instead.
* :class:`FeatureNet`: a small convolutional autoencoder, ``encode(x) -> [N, F, D, H, W]`` at the
  input resolution, trained first by :func:`deepatlas_fast.objective.reconstruction_loss`, then
  frozen (:meth:`DeepAtlas.freeze_features`).
* :class:`DeepAtlas`: both networks plus the atlas, a learnable feature volume ``[1, F + 1, *template]``
  (F autoencoder channels + the normalised intensity), and ``config`` (its constructor arguments),
  so ``DeepAtlas(**config)`` plus ``load_state_dict`` rebuilds a saved model.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coords import identity_coords
from .frame import FRAMES, TEMPLATE_SIDE, affine_frame, apply_frame, build_template, moment_frame
from .recompute import recomputed_when_saved
from .upsampled_conv import Upsampled, upsampled_conv3d

__all__ = ["anchor_shift", "bound_coords", "CoordNet", "FeatureNet", "DeepAtlas"]


class _StraightThroughClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def bound_coords(raw: Tensor) -> Tensor:
    """Clamp coordinates to ``[-1, 1]`` in the forward pass; pass the gradient unchanged (straight-through).

    A plain clamp would give zero gradient to any voxel once it leaves the cube (the identity's own
    border voxels sit exactly on it), so those voxels could never be pulled back by the similarity;
    the objective's ``bound`` term penalises ``relu(|raw| - 1)^2`` instead.
    """
    return _StraightThroughClamp.apply(raw)


def anchor_shift(logits: Tensor, grid: Tensor) -> Tensor:
    """Offset ``[N, 3, 1, 1, 1]`` of the softmax-weighted centroid of a heatmap from the grid's centre.

    ``logits [N, 1, *S]`` is a learned heatmap on the grid whose coordinates are ``grid [N, 3, *S]``.
    The centroid moves with whatever the heatmap fires on, so subtracting the offset from the identity
    makes the coordinate map follow the anatomy when it moves within the field of view, rather than the
    grid (a convolutional map alone is pinned to the grid by the padding). Zero for a flat heatmap.
    """
    weights = torch.softmax(logits.flatten(2), dim=2)
    # (w - 1/S) is exactly 0 for a flat heatmap, so a fresh network stays exactly the identity
    excess = weights - 1.0 / weights.shape[2]
    return (excess * grid.flatten(2)).sum(dim=2).view(-1, 3, 1, 1, 1)


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class LowPrecisionGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) that keeps autocast's lower precision.

    CUDA autocast runs ``group_norm`` in float32: the bfloat16 convolution output is copied to float32
    (held by the norm for its backward), the float32 output is held again by the in-place activation and
    the next convolution holds a bfloat16 copy of it: 10 bytes per activation element and layer, more than
    without autocast (8). Here the norm runs on the convolution's own dtype (the kernels accumulate its
    statistics in float32; weight and bias are cast to that dtype): 4 bytes. Without autocast, or on inputs
    not in autocast's dtype, it is ``nn.GroupNorm``. (CPU autocast already keeps the norm in bfloat16.)
    """

    def low_precision(self, x: Tensor) -> bool:
        """Whether autocast is on for ``x``'s device with ``x`` in its dtype (then the norm keeps it)."""
        device = x.device.type
        return torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device)

    def normalize(self, x: Tensor, low_precision: bool) -> Tensor:
        """The forward with the autocast decision given (a recomputation in the backward repeats it)."""
        if not low_precision:
            return super().forward(x)
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.low_precision(x))


class _ConvBlock(nn.Sequential):
    """Two (conv 3x3x3 -> GroupNorm -> LeakyReLU) layers; ``stride`` on the first conv.

    ``block(a, b, ...)`` is ``block(torch.cat([a, b, ...], dim=1))`` without the concatenation: the first
    convolution is linear in its input channels, so it runs on each part with its slice of the weight and
    the results are added. The concatenation (a decoder's upsampled features, skip and coarser coordinates:
    51 channels at full resolution with base 16) is then never held for the backward, and the backward
    makes each part's input gradient separately instead of the whole concatenation's at once. A part given as
    :class:`~deepatlas_fast.upsampled_conv.Upsampled` (a decoder's coarser features and the grid to resize them
    to) is resized and convolved a slab of planes at a time (:func:`~deepatlas_fast.upsampled_conv.upsampled_conv3d`),
    never whole.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
            LowPrecisionGroupNorm(_groups(cout), cout),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1),
            LowPrecisionGroupNorm(_groups(cout), cout),
            nn.LeakyReLU(0.2, inplace=True),
        )

    REMADE_INPUT_CHANNELS = 2
    """A first convolution of at most this many input channels (an image's) is repeated in the backward instead
    of its output being held: it costs a fraction of the block's other convolution."""

    def forward(self, *parts: Tensor) -> Tensor:
        conv1, norm1, act1, conv2, norm2, act2 = self
        image = parts[0] if len(parts) == 1 and isinstance(parts[0], Tensor) else None
        x1 = conv1(image) if image is not None else _convolve_parts(conv1, parts)
        low = norm1.low_precision(x1)
        # Not in a checkpointed block (train.enable_activation_checkpointing), which recomputes all of it:
        # recipes saved there held more at the backward's peak, not less.
        if getattr(self, "_deepatlas_checkpointed", False):
            return act2(norm2(conv2(act1(norm1.normalize(x1, low)))))
        if image is not None and conv1.in_channels <= self.REMADE_INPUT_CHANNELS:
            # the norm's saved input (the convolution's output) is convolved again from the image
            remake_x1 = partial(_convolve_as, conv1, image.detach(), x1.dtype)
            with recomputed_when_saved(x1, remake_x1):
                z1 = norm1.normalize(x1, low)
        else:
            held = x1.detach()  # by the norm anyway
            remake_x1 = lambda: held  # noqa: E731
            z1 = norm1.normalize(x1, low)
        # the first layer's activation, held by the in-place activation and by the second convolution, is
        # made again from the norm's input in the backward: one tensor per layer instead of two
        with recomputed_when_saved(z1, lambda: act1(norm1.normalize(remake_x1(), low))):
            h = conv2(act1(z1))
        return act2(norm2(h))


def _convolve_parts(conv: nn.Conv3d, parts: Sequence[Union[Tensor, Upsampled]]) -> Tensor:
    """``conv(torch.cat(parts, dim=1))`` without the concatenation: each part convolved with its slice of the
    weight, the results added; an :class:`~deepatlas_fast.upsampled_conv.Upsampled` part resized by slabs as it
    is convolved (:func:`~deepatlas_fast.upsampled_conv.upsampled_conv3d`)."""
    channels = [p.channels if isinstance(p, Upsampled) else p.shape[1] for p in parts]
    if sum(channels) != conv.in_channels:
        raise ValueError(f"parts must have {conv.in_channels} channels together, got {channels}")
    out, start = None, 0
    for part, count in zip(parts, channels):
        weight = conv.weight[:, start : start + count]
        start += count
        if isinstance(part, Upsampled) and conv.stride == (1, 1, 1) and conv.padding == (1, 1, 1):
            y = upsampled_conv3d(part.source, weight, part.size, align_corners=part.align_corners)
        else:
            part = part.materialize() if isinstance(part, Upsampled) else part
            y = F.conv3d(part, weight, None, conv.stride, conv.padding)
        out = y if out is None else out.add_(y)  # a convolution's output is not saved: in place is safe
    if conv.bias is not None:
        out = out.add_(conv.bias.to(out.dtype).view(1, -1, 1, 1, 1))
    return out


def _convolve_as(conv: nn.Conv3d, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``conv(x)`` computed in ``dtype`` as autocast computed it in the forward (a recomputation runs without
    autocast)."""
    bias = conv.bias.to(dtype) if conv.bias is not None else None
    return F.conv3d(x.to(dtype), conv.weight.to(dtype), bias, conv.stride, conv.padding)


def _check_images(name: str, x, in_channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, {in_channels}, D, H, W], got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != in_channels:
        raise ValueError(f"{name} must have shape [N, {in_channels}, D, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if min(x.shape[2:]) < 2:
        raise ValueError(f"{name} must have every spatial size >= 2, got {tuple(x.shape[2:])}")


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize with ``align_corners=True`` (the "corners" grid geometry: first and last voxels of every
    level coincide)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear", align_corners=True)


GRIDS = ("strided", "corners")
"""Where a U-Net level's voxels sit on the input grid (:class:`CoordNet` ``grid``)."""


def _upsample_strided(x: Tensor, size: Sequence[int]) -> Tensor:
    """Level ``l + 1`` -> level ``l`` in the "strided" geometry: fine voxel ``j`` reads coarse index ``j / 2``
    (a stride-2 convolution's output ``i`` is centred on its input ``2 i``), linearly, for any sizes.

    ``align_corners=True`` resizing of ``n`` voxels to ``2 n - 1`` puts output ``k`` exactly at input
    ``k / 2``. An even fine size needs one more coarse voxel: the last fine voxel sits half a coarse
    voxel past the last coarse centre, where the field is extended linearly (so a linear field, e.g. an
    identity or an affine map, stays exactly linear).
    """
    for axis, (n, c) in enumerate(zip(size, x.shape[2:])):
        if n >= 2 * c:
            last = x.narrow(axis + 2, c - 1, 1)
            extra = 2 * last - x.narrow(axis + 2, c - 2, 1) if c >= 2 else last
            x = torch.cat([x, extra], dim=axis + 2)
    full = [2 * c - 1 for c in x.shape[2:]]
    if tuple(full) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=full, mode="trilinear", align_corners=True)
    return x[:, :, : size[0], : size[1], : size[2]]


def _level_identity(shape: Sequence[int], input_shape: Sequence[int], step: int, batch: int, device) -> Tensor:
    """Identity coordinates ``[batch, 3, *shape]`` of a level whose voxel ``j`` sits on input voxel ``j * step``."""
    axes = []
    for n, size in zip(shape, input_shape):
        position = torch.arange(n, dtype=torch.float32, device=device) * step
        axes.append(position * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros(n, device=device))
    field = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return field.unsqueeze(0).expand(batch, 3, *shape).contiguous()


class CoordNet(nn.Module):
    """3-D U-Net mapping an exam to template coordinates, refined coarse to fine.

    Args:
        in_channels: image channels (default 1).
        base: channels of the finest level (doubled per level, capped at ``8 * base``); default 16.
        levels: resolution levels (>= 1); level ``l`` has the grid ``ceil(size / 2^l)``. Default 4.
        residual_scale: factor on every head's output (default 0.01, normalised units). The heads start
            at zero, and with Adam-type optimisers the first steps move each weight by about ``lr``
            whatever the gradient, so an unscaled head moves coordinates by several voxels per step
            and folds the map; the factor sets the size of those steps.
        locate: anchor the map on the anatomy (default True): a 1x1 head on the bottleneck gives a
            heatmap whose softmax centroid is subtracted from the identity (:func:`anchor_shift`), so
            coordinates move with the anatomy when the field of view moves. Zero-initialised (no effect
            at the start).
        grid: where each level's voxels sit on the input grid. "corners" (default): every level spans the
            input's first to last voxel (``align_corners=True`` resizing), which matches where the stride-2
            convolutions centre the voxels only for sizes ``k * 2^(levels-1) + 1``. "strided": level ``l``'s
            voxel ``j`` is input voxel ``j * 2^l`` for every size (:func:`_upsample_strided`). Measured
            on phantoms (800 steps, one seed each), "strided" gave one-shot Dice 0.394 against 0.432, so
            it is not the default.
        frame: where a fresh network places the exam in the template cube (:mod:`deepatlas_fast.frame`).
            "grid": the field of view fills the cube (the identity). "moments" (the image's
            intensity-weighted centre and principal axes, scaled by their spread, onto the cube's centre
            and axes, :func:`~deepatlas_fast.frame.moment_frame`): the starting map already follows the
            body's position, size and modest rotations. "affine": an affine fit of the exam (from the moments
            frame and from that frame recentred, the better kept) onto an intensity template (the buffer
            ``frame_template``, built from training exams by :meth:`build_frame_template`;
            :func:`~deepatlas_fast.frame.affine_frame`): less moved than the moments by what the field of
            view cuts off. Every level's identity is replaced by the frame applied to it, so a fresh network
            returns exactly the frame.

    ``forward(x, levels=None, bound=True) -> coords [N, 3, D, H, W]`` (float32, normalised
    ``[-1, 1]``, channel k = spatial dim k of the template). ``levels`` = how many decoder levels
    are active, counted from the coarsest (``None`` = all); the finer, inactive levels are skipped
    (no compute, zero refinement) and the active finest map is upsampled to the input grid, so the
    output always has the input's shape. A staged schedule trains ``levels=1, 2, ...`` while raising
    the input resolution. ``bound=False`` returns the raw map (can leave the cube; what the objective
    regularises). Any input size >= 2 works (odd sizes included). A fresh network returns exactly
    the identity.

    ``init`` (``[N, 3, D, H, W]``, coordinates on the input's grid) replaces the maps of the levels
    ``init_level`` (default: the coarsest) and coarser by ``init`` read at their voxels (no anchor, no
    heads there; their decoders still run for the features); the finer active levels refine it as
    usual. The cascade's fine pass on a crop starts this way from the whole exam's coarse-pass
    coordinates (``init_level`` 1 when the coarse pass ran at twice the spacing: its finest level is
    the fine pass's level 1), so the crop's own, smaller field of view does not decide where it lies
    in the template. With zero refinement heads the output is ``init`` read down and interpolated back
    up (exactly ``init`` where it is linear, given at least two voxels per axis on ``init_level``).

    Staged training leaves the inactive levels' parameters unused: under DDP pass
    ``find_unused_parameters=True`` (or train all levels).
    """

    def __init__(self, in_channels: int = 1, base: int = 16, levels: int = 4, residual_scale: float = 0.01,
                 locate: bool = True, grid: str = "corners", frame: str = "grid"):
        super().__init__()
        for name, value, minimum in (("in_channels", in_channels, 1), ("base", base, 1), ("levels", levels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if isinstance(residual_scale, bool) or not isinstance(residual_scale, (int, float)) or not residual_scale > 0:
            raise ValueError(f"residual_scale must be a number > 0, got {residual_scale!r}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(map(repr, GRIDS))}, got {grid!r}")
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(map(repr, FRAMES))}, got {frame!r}")
        self.frame = frame
        if frame == "affine":
            self.register_buffer("frame_template", torch.zeros(1, 1, *(TEMPLATE_SIDE,) * 3))
            self.register_buffer("frame_template_built", torch.tensor(False))
        self.in_channels = in_channels
        self.residual_scale = float(residual_scale)
        self.num_levels = levels
        self.grid = grid
        widths = [min(base * 2**l, 8 * base) for l in range(levels)]
        self.encoders = nn.ModuleList(
            [_ConvBlock(in_channels, widths[0])]
            + [_ConvBlock(widths[l - 1], widths[l], stride=2) for l in range(1, levels)]
        )
        # decoder level l (l < levels-1) fuses up(decoder l+1), skip l and the coarser coordinates
        self.decoders = nn.ModuleList(
            [_ConvBlock(widths[l + 1] + widths[l] + 3, widths[l]) for l in range(levels - 1)]
        )
        self.bottleneck = _ConvBlock(widths[-1] + 3, widths[-1])
        self.heads = nn.ModuleList([nn.Conv3d(w, 3, 3, padding=1) for w in widths])
        for head in self.heads:  # exact identity at initialisation
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.locator = None
        if locate:
            self.locator = nn.Conv3d(widths[-1], 1, 1)
            nn.init.zeros_(self.locator.weight)
            nn.init.zeros_(self.locator.bias)

    def forward(
        self,
        x: Tensor,
        levels: Optional[int] = None,
        bound: bool = True,
        return_levels: bool = False,
        init: Optional[Tensor] = None,
        init_level: Optional[int] = None,
        frame: Optional[Tensor] = None,
    ):
        """``x [N, in_channels, D, H, W]`` -> coordinates ``[N, 3, D, H, W]`` (float32).

        With ``return_levels`` returns ``(coords, [c_coarsest, ..., c_finest_active])`` (raw maps on
        each active level's grid). ``frame`` (``[N, 3, 4]``): the value of :meth:`frame_of` when the
        caller has it already.
        """
        _check_images("x", x, self.in_channels)
        if init is not None and (
            not isinstance(init, Tensor) or tuple(init.shape) != (x.shape[0], 3, *x.shape[2:])
        ):
            shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise ValueError(f"init must be coordinates [N, 3, D, H, W] on x's grid {tuple(x.shape[2:])}, got {shape}")
        if levels is None:
            levels = self.num_levels
        if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= self.num_levels:
            raise ValueError(f"levels must be an int in [1, {self.num_levels}] or None, got {levels!r}")
        top = self.num_levels - 1
        if init_level is None:
            init_level = top if init is not None else self.num_levels
        elif init is None:
            raise ValueError("init_level needs init")
        elif isinstance(init_level, bool) or not isinstance(init_level, int) or not 0 <= init_level <= top:
            raise ValueError(f"init_level must be an int in [0, {top}], got {init_level!r}")
        if frame is None and init is None:  # with init the frame cancels out (init - frame + frame): not needed
            frame = self.frame_of(x)
        skips = []
        h = x
        for encoder in self.encoders:
            h = encoder(h)
            skips.append(h)
        shape = skips[top].shape[2:]
        ident = self._identity(top, shape, x, frame)
        h = self.bottleneck(h, ident.to(h.dtype))
        if self.locator is not None and init is None:
            shift = anchor_shift(self.locator(h).float(), ident)
        else:
            shift = torch.zeros(1, 3, 1, 1, 1, device=x.device)
        ident = ident - shift
        if init is None:
            disp = self.residual_scale * self.heads[top](h).float()
        else:
            disp = self._to_level(init.to(x.device, torch.float32), top, shape) - ident
        maps = [ident + disp]
        for level in range(top - 1, top - levels, -1):
            shape = skips[level].shape[2:]
            disp = self._up(disp, shape)
            ident = self._identity(level, shape, x, frame) - shift
            if level >= init_level:  # still given by init: the decoder runs for its features only
                disp = self._to_level(init.to(x.device, torch.float32), level, shape) - ident
            coarse = (ident + disp).to(h.dtype)
            if self.grid == "corners":  # h resized a slab of planes at a time as it is convolved, never whole
                h = self.decoders[level](Upsampled(h, tuple(shape)), skips[level], coarse)
            else:  # (the largest input of a step: 32 channels at full resolution with base 16)
                up = self._up(h, shape)
                # the block's first convolution saves its input for the weight gradient: upsampled again from h
                # (held anyway) in the backward instead of held
                with recomputed_when_saved(up, lambda h=h.detach(), shape=shape: self._up(h, shape)):
                    h = self.decoders[level](up, skips[level], coarse)
                del up
            if level < init_level:
                disp = disp + self.residual_scale * self.heads[level](h).float()
            maps.append(ident + disp)
        if self.grid == "corners":
            disp = _upsample(disp, x.shape[2:])
        else:  # through the inactive finer levels, one factor 2 at a time
            for level in range(top - levels, -1, -1):
                disp = _upsample_strided(disp, skips[level].shape[2:])
        coords = self._framed(identity_coords(x.shape[2:], batch=x.shape[0], device=x.device), frame) - shift + disp
        if bound:
            coords = bound_coords(coords)
        return (coords, maps) if return_levels else coords

    def frame_of(self, x: Tensor) -> Optional[Tensor]:
        """The exam's frame ``[N, 3, 4]`` (None for the "grid" frame, the identity)."""
        if self.frame == "moments":
            return moment_frame(x)
        if self.frame == "affine":
            if not bool(self.frame_template_built):
                raise RuntimeError('the "affine" frame needs its template: call build_frame_template(images) '
                                   "with training exams first (train does)")
            return affine_frame(x, self.frame_template)
        return None

    @torch.no_grad()
    def build_frame_template(self, images, progress=None) -> None:
        """Build the "affine" frame's template from training exams (``[D, H, W]`` tensors, intensities
        normalised as the network sees them; :func:`~deepatlas_fast.frame.build_template`)."""
        if self.frame != "affine":
            raise ValueError(f'build_frame_template is for the "affine" frame, this network uses {self.frame!r}')
        device = self.frame_template.device
        template = build_template([torch.as_tensor(x).to(device) for x in images], TEMPLATE_SIDE, progress=progress)
        self.frame_template.copy_(template)
        self.frame_template_built.fill_(True)

    @staticmethod
    def _framed(ident: Tensor, frame: Optional[Tensor]) -> Tensor:
        return ident if frame is None else apply_frame(frame, ident)

    def _identity(self, level: int, shape: Sequence[int], x: Tensor, frame: Optional[Tensor]) -> Tensor:
        if self.grid == "corners":
            ident = identity_coords(shape, batch=x.shape[0], device=x.device)
        else:
            ident = _level_identity(shape, x.shape[2:], 2**level, x.shape[0], x.device)
        return self._framed(ident, frame)

    def _up(self, t: Tensor, shape: Sequence[int]) -> Tensor:
        """One level finer (the "corners" geometry resizes straight to ``shape``)."""
        return _upsample(t, shape) if self.grid == "corners" else _upsample_strided(t, shape)

    def _to_level(self, field: Tensor, level: int, shape: Sequence[int]) -> Tensor:
        """An input-grid field read at a level's voxels."""
        if self.grid == "corners":
            return _upsample(field, shape)
        step = 2**level
        return field[:, :, ::step, ::step, ::step][:, :, : shape[0], : shape[1], : shape[2]]


class FeatureNet(nn.Module):
    """Small 3-D convolutional autoencoder whose code is a dense feature map at the input resolution.

    ``encode(x [N, C, D, H, W]) -> [N, features, D, H, W]`` combines a full-resolution path with a
    half-resolution path (context); ``decode`` maps features back to ``[N, C, D, H, W]``;
    ``forward(x) = decode(encode(x))`` (the reconstruction). Train it with
    :func:`deepatlas_fast.objective.reconstruction_loss` (denoising), then freeze it.

    Args:
        in_channels: image channels (default 1). features: code channels F (default 8).
        width: hidden channels (default 16).
    """

    def __init__(self, in_channels: int = 1, features: int = 8, width: int = 16):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("features", features), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.in_channels = in_channels
        self.num_features = features
        act = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        self.fine = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), act(), nn.Conv3d(width, width, 3, padding=1), act())
        self.coarse = nn.Sequential(
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), act(), nn.Conv3d(2 * width, 2 * width, 3, padding=1), act()
        )
        self.code = nn.Sequential(nn.Conv3d(3 * width, width, 3, padding=1), act(), nn.Conv3d(width, features, 1))
        self.decoder = nn.Sequential(
            nn.Conv3d(features, width, 3, padding=1), act(), nn.Conv3d(width, width, 3, padding=1), act(),
            nn.Conv3d(width, in_channels, 1),
        )

    def encode(self, x: Tensor) -> Tensor:
        """``[N, C, D, H, W]`` -> features ``[N, F, D, H, W]``.

        ``code(cat([fine, resize(coarse)]))``, computed without either: the code's first convolution runs on the
        fine path with its slice of the weight and on the coarse path by slabs as it is resized
        (:func:`~deepatlas_fast.upsampled_conv.upsampled_conv3d`), so the 48 channels of the concatenation and the
        32 of the resized context never exist at full resolution (they were a training step's peak with
        activation checkpointing).
        """
        _check_images("x", x, self.in_channels)
        fine = self.fine(x)
        conv, activation, head = self.code
        context = Upsampled(self.coarse(fine), tuple(x.shape[2:]), align_corners=False)
        return head(activation(_convolve_parts(conv, [fine, context])))

    def decode(self, features: Tensor) -> Tensor:
        """``[N, F, D, H, W]`` -> reconstruction ``[N, C, D, H, W]``."""
        return self.decoder(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def _sync_frozen_flag(module, incompatible_keys) -> None:
    """After ``load_state_dict``: a saved frozen autoencoder is frozen again."""
    if bool(module.features_frozen):
        module.freeze_features()


class DeepAtlas(nn.Module):
    """CoordNet + frozen feature autoencoder + learnable atlas.

    Args:
        in_channels: image channels (default 1).
        base, levels: :class:`CoordNet` width and depth (defaults 16, 4).
        features: autoencoder code channels F (default 8); 0 uses the normalised intensity alone
            (``self.features`` is then None; the DESIGN's CPU prototype found raw intensity better
            than a briefly trained autoencoder at 4 mm).
        feature_width: autoencoder hidden channels (default 16).
        template_shape: atlas / template grid (D, H, W), default (32, 32, 32); the implicit term
            inverts coordinate maps onto this grid.
        preprocessing: free-form dict saved with the model (spacing, intensity normalisation ...),
            for inference.
        residual_scale: :class:`CoordNet` head output factor (default 0.01); locate: its anatomy anchor (default
            True); grid: its levels' geometry (default "corners"); frame: where a fresh network places an
            exam (default "grid", see :class:`CoordNet`; ``train``'s default configuration uses "affine").

    Attributes: ``coordnet``, ``features`` (FeatureNet or None), ``atlas`` (``nn.Parameter``
    ``[1, F + 1, *template_shape]``: F feature channels then intensity), ``config`` (the
    constructor arguments, plain Python types), buffers ``atlas_initialized`` and
    ``features_frozen`` (bool scalars, saved in the state dict).

    ``forward(images, levels=None)`` returns a dict (the one call a DDP wrapper needs):
    ``coords_raw`` ``[N, 3, D, H, W]`` float32 unbounded, ``coords`` (bounded, straight-through),
    ``features`` ``[N, F + 1, D, H, W]`` float32 (E(x) ++ x, no gradient once frozen), ``atlas`` and
    ``frame`` (``[N, 3, 4]``, :mod:`deepatlas_fast.frame`; None for the "grid" frame).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 16,
        levels: int = 4,
        features: int = 8,
        feature_width: int = 16,
        template_shape: Sequence[int] = (32, 32, 32),
        preprocessing: Optional[dict] = None,
        residual_scale: float = 0.01,
        locate: bool = True,
        grid: str = "corners",
        frame: str = "grid",
    ):
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 0:
            raise ValueError(f"features must be an int >= 0, got {features!r}")
        try:
            template_shape = tuple(int(s) for s in template_shape)
        except TypeError:
            raise TypeError(f"template_shape must be 3 ints (D, H, W), got {template_shape!r}") from None
        if len(template_shape) != 3 or min(template_shape) < 2:
            raise ValueError(f"template_shape must be 3 sizes >= 2 (D, H, W), got {template_shape}")
        self.config = {
            "in_channels": in_channels,
            "base": base,
            "levels": levels,
            "features": features,
            "feature_width": feature_width,
            "template_shape": list(template_shape),
            "preprocessing": dict(preprocessing or {}),
            "residual_scale": float(residual_scale),
            "locate": bool(locate),
            "grid": grid,
            "frame": frame,
        }
        self.in_channels = in_channels
        self.template_shape = template_shape
        self.coordnet = CoordNet(in_channels, base, levels, residual_scale, locate, grid, frame)
        self.features = FeatureNet(in_channels, features, feature_width) if features > 0 else None
        channels = features + in_channels
        # a smooth random pattern: never constant (a constant atlas gives LNCC no gradient at all)
        gen = torch.Generator().manual_seed(0)
        pattern = torch.rand(1, channels, *(max(2, s // 4) for s in template_shape), generator=gen)
        self.atlas = nn.Parameter(F.interpolate(pattern, size=template_shape, mode="trilinear", align_corners=True))
        self.register_buffer("atlas_initialized", torch.tensor(False))
        self.register_buffer("features_frozen", torch.tensor(features == 0))
        self._frozen = features == 0  # Python mirror of the buffer: no device sync per forward
        self.register_load_state_dict_post_hook(_sync_frozen_flag)

    @property
    def feature_channels(self) -> int:
        """Channels of the similarity features and the atlas: F + in_channels."""
        return self.atlas.shape[1]

    def freeze_features(self) -> None:
        """Freeze the autoencoder (no gradients, eval mode) for coordinate training. The state is
        saved in the ``features_frozen`` buffer and restored by ``load_state_dict``."""
        if self.features is not None:
            self.features.requires_grad_(False)
            self.features.eval()
        self.features_frozen.fill_(True)
        self._frozen = True

    def train(self, mode: bool = True):
        super().train(mode)
        if self.features is not None and self._frozen:
            self.features.eval()
        return self

    def feature_stack(self, images: Tensor) -> Tensor:
        """``images [N, C, D, H, W]`` -> ``[N, F + C, D, H, W]`` float32: autoencoder features then intensity.
        Computed without gradient once the autoencoder is frozen."""
        _check_images("images", images, self.in_channels)
        if self.features is None:
            return images.float()
        if self._frozen:
            with torch.no_grad():
                feats = self.features.encode(images)
        else:
            feats = self.features.encode(images)
        return torch.cat([feats.float(), images.float()], dim=1)

    @torch.no_grad()
    def init_atlas(self, images: Tensor, frames: Optional[Tensor] = None) -> None:
        """Set the atlas to the batch mean of :meth:`feature_stack` resampled onto the template grid
        (the identity map a fresh CoordNet starts from). Call once before coordinate training, and
        before wrapping in DDP (which then broadcasts rank 0's atlas).

        With a "moments" or "affine" frame the exams are splatted into the template at their frame coordinates
        instead (trilinear weights, normalised; ``frames`` replaces the frames computed from ``images``, as in
        :meth:`forward`); template voxels no exam reaches get the features' mean."""
        feats = self.feature_stack(images)
        if self.coordnet.frame == "grid":
            atlas = F.interpolate(feats.mean(dim=0, keepdim=True), size=self.template_shape, mode="trilinear",
                                  align_corners=True)
        else:
            from .propagate import splat

            coords = bound_coords(self._framed_identity(images, frames))
            weight, total = splat(coords.flatten(2), feats.flatten(2), self.template_shape)
            fill = feats.mean(dim=(0, 2, 3, 4)).view(-1, 1, 1, 1)
            reached = weight > 1e-3 * weight.max().clamp_min(1e-30)
            atlas = torch.where(reached, total / weight.clamp_min(1e-30), fill)[None]
        self.atlas.copy_(atlas)
        self.atlas_initialized.fill_(True)

    def _framed_identity(self, images: Tensor, frames: Optional[Tensor] = None) -> Tensor:
        """Where a fresh CoordNet puts each voxel of ``images``: its frame applied to the identity."""
        ident = identity_coords(images.shape[2:], batch=images.shape[0], device=images.device)
        return self.coordnet._framed(ident, self.coordnet.frame_of(images) if frames is None else frames)

    def coordinates(self, images: Tensor, levels: Optional[int] = None) -> Tensor:
        """Bounded template coordinates ``[N, 3, D, H, W]`` of ``images`` (inference helper)."""
        return self.coordnet(images, levels=levels)

    def forward(self, images: Tensor, levels: Optional[int] = None, frame: Optional[Tensor] = None) -> dict:
        """See the class docstring. ``frame [N, 3, 4]`` replaces the frame computed from ``images`` (a
        training crop gets its whole exam's frame, composed with the crop's geometry)."""
        if frame is None:
            frame = self.coordnet.frame_of(images)
        # the features first: the autoencoder's temporaries (a frozen, no-grad pass) then come and go before
        # the CoordNet's activations are held, instead of on top of them (the step's peak: 805 -> 655
        # channel volumes for a 64^3 pair on the CPU, benchmarks/loss_memory.py --whole-step)
        features = self.feature_stack(images)
        raw = self.coordnet(images, levels=levels, bound=False, frame=frame)
        return {
            "frame": frame,
            "coords_raw": raw,
            "coords": bound_coords(raw),
            "features": features,
            # a view, not the parameter itself: DDP (find_unused_parameters) must find the atlas
            # through the graph, or it marks it ready twice
            "atlas": self.atlas.view_as(self.atlas),
        }


def preferred_memory_format(device, choice: str = "auto") -> torch.memory_format:
    """The convolution layout for ``choice`` on ``device``: "channels_last", "contiguous", or "auto" =
    channels_last on a CPU (oneDNN's 3-D convolutions prefer it: a 64^3 pair's training step on 2 cores
    3.2 -> 2.3 s, a 96^3 CoordNet forward 2.2 -> 1.65 s) and contiguous on a GPU (not yet measured)."""
    if choice == "auto":
        choice = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last_3d if choice == "channels_last" else torch.contiguous_format


def set_convolution_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """Lays out the weights of the model's 3-D (transposed) convolutions in ``memory_format`` (their
    activations follow); other parameters and buffers (the atlas, frames) keep theirs. Returns the model."""
    for module in model.modules():
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            module.to(memory_format=memory_format)
    return model
