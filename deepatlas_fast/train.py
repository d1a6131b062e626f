"""Training DeepATLAS: configuration, the staged loop, DDP, checkpoints, metrics.

Python API (the ``deepatlas-fast train`` command is a thin wrapper)::

    from deepatlas_fast.train import TrainConfig, train
    config = TrainConfig.from_yaml("my.yaml")            # or TrainConfig() for the CPU defaults
    result = train(config, images=["a.nii.gz", "b.nii.gz"], out_dir="runs/x")   # or phantoms=8
    model = deepatlas_fast.checkpoint.load_model("runs/x/model.pt")

The run folder gets ``config.yaml`` (the full configuration), ``metrics.csv`` (one row per logged
step), ``checkpoint.pt`` (everything needed to resume exactly) and ``model.pt`` (everything inference
needs). See :func:`train` for the schedule.

Several GPUs (or CPU processes, gloo): launch the same command under torchrun, e.g.
``torchrun --nproc_per_node=4 -m deepatlas_fast.cli train --images exams/ --out runs/x``; each
process trains on its own crops, gradients are averaged (DistributedDataParallel) and rank 0 writes
the run folder.

Determinism: the crops and augmentations of a step are a pure function of (seed, stage, step, rank,
micro-batch), and the checkpoint holds the optimiser and every RNG state, so on a CPU a resumed run
is bitwise identical to an uninterrupted one (on a GPU up to the non-determinism of its kernels).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .model import preferred_memory_format, set_convolution_memory_format

PathLike = Union[str, os.PathLike]

AMP_MODES = ("auto", "bf16", "off")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
OPS_MODES = ("fused", "stock")
MODALITIES = ("auto", "ct", "mr")
# keys that may change between a run and its resumption (they do not change what is computed)
RESUMABLE_KEYS = frozenset({"log_every", "checkpoint_every"})


class ConfigError(ValueError):
    """A training configuration that is malformed, or does not match the run being resumed."""


# ----------------------------------------------------------------------------------- configuration
@dataclass
class Stage:
    """One stage of the multi-resolution schedule.

    Attributes:
        steps: optimiser steps in this stage (> 0).
        size: network input crop (D, H, W) in voxels at this stage's spacing (an int means a cube);
            every side >= 8. Volumes smaller than the crop are zero-padded.
        spacing: voxel size in mm the exams are resampled to for this stage; ``None`` (default) keeps
            the data spacing ``TrainConfig.spacing``. Coarse stages use a larger value.
        levels: how many CoordNet decoder levels are active (passed as ``levels=`` to the model;
            coarse stages use fewer); ``None`` (default) = all.
        lr: learning rate of this stage; ``None`` (default) = ``TrainConfig.lr``.
        whole: ``True``: every step takes every exam, whole, without augmentation (a full-batch fit, e.g. a
            last stage): each exam centred in ``size`` (``None`` = the smallest grid holding every exam at
            this spacing; a larger exam is cropped around its foreground box), the exams in a new order every
            step (the implicit term pairs each with the next), split over the ``grad_accumulation``
            micro-batches (and the processes under torchrun), at least 2 exams each; ``batch_size`` and
            ``augment`` do not apply. After the cropped stages, 420 such steps raised held-out one-shot Dice on
            synthesised brains from 0.474 to 0.530 where the cohort holds three syntheses of each anatomy (not
            where it holds one: 0.473 -> 0.471 after 60), 200 on phantoms from 0.631 to 0.641
            (``benchmarks/results/2026-11-28-whole-exam-stage.md``).
    """

    steps: int
    size: Optional[Sequence[int]] = (32, 32, 32)
    spacing: Optional[float] = None
    levels: Optional[int] = None
    lr: Optional[float] = None
    whole: bool = False


def _default_stages() -> list:
    return [
        Stage(steps=200, size=(32, 32, 32), spacing=4.0, levels=3),
        Stage(steps=100, size=(40, 40, 40), spacing=None, levels=None),
    ]


def _default_model() -> dict:
    return {"base": 16, "levels": 4, "features": 4, "feature_width": 16, "template_shape": [32, 32, 32],
            "frame": "affine"}


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as ``RUN_DIR/config.yaml``).

    The defaults suit a CPU and a few minutes (about 5 on 2 cores): data at 2 mm, 50 autoencoder steps,
    200 steps at 4 mm on 32^3 crops with the three coarsest decoder levels, then 100 steps at 2 mm on
    40^3 crops with every level; a 4-channel autoencoder (LNCC over F + 1 channels dominates a CPU
    step). On a GPU raise the sizes, steps and ``model.features`` (e.g. 8).

    Attributes:
        stages: the schedule, a list of :class:`Stage` (or dicts with its fields).
        spacing: data voxel size in mm (isotropic) the exams are resampled to on loading (2.0).
        modality: intensity normalisation, ``"auto"`` | ``"ct"`` (HU window) | ``"mr"`` (percentiles).
        phantom_shape: field of view of the generated phantoms, as their grid (D, H, W) at the
            generator's native spacing ``384 / max(D, H)`` mm ((64, 64, 64): 6 mm, 384 mm); they are
            generated directly at ``spacing``.
        model: keyword arguments of :class:`deepatlas_fast.model.DeepAtlas` (default: base 16,
            4 levels, 4 feature channels, width 16, template 32^3, the "affine" frame; a partial mapping
            overrides just its keys). ``frame: moments`` / ``frame: grid`` train from the earlier frames
            (one-shot Dice on held-out phantoms after 800 steps, two seeds: "affine" 0.619 / 0.620,
            "moments" 0.461 / 0.451, "grid" 0.405 / 0.401).
        loss: fields of :class:`deepatlas_fast.objective.LossWeights` ({} = its defaults).
        feature_steps: autoencoder pretraining steps before the coordinate stages (then frozen) (50).
        feature_lr: learning rate of the autoencoder pretraining (1e-3).
        batch_size: exams per micro-batch and process (>= 2: the implicit term pairs them) (2).
        grad_accumulation: micro-batches per optimiser step (1).
        lr: AdamW learning rate of the coordinate stages (1e-3); ``atlas_lr`` that of the atlas volume
            (``None`` = ``lr``); ``weight_decay`` AdamW decay of the network (not the atlas) (1e-4).
        atlas_momentum: ``None`` (default): the atlas is a parameter trained by the objective's
            gradient. A number in [0, 1): the atlas is instead a running mean of the exams themselves,
            after every step ``atlas = m * atlas + (1 - m) * mean`` where ``mean`` is the step's exam
            features splatted into the template at their coordinates (template voxels the step's exams
            reach with less than half a voxel's weight each keep their value); the atlas then gets no
            gradient (:func:`update_atlas`).
        warmup_steps: linear learning-rate warm-up at the start of every stage (20).
        grad_clip: gradient-norm clipping (1.0; 0 disables).
        amp: ``"auto"`` (bf16 autocast on a GPU that supports it, off on CPU) | ``"bf16"`` | ``"off"``.
        activation_checkpointing: recompute CoordNet activations in the backward (less memory).
        memory_format: layout of the convolution weights (and so of the activations): ``"auto"``
            (:func:`deepatlas_fast.model.preferred_memory_format`: ``channels_last`` on CPU, ``contiguous`` on
            a GPU) | ``"channels_last"`` | ``"contiguous"``.
        augment: random intensity and spatial augmentation of the crops (True).
        seed: seeds model initialisation, phantoms, crops and augmentation (0).
        log_every: steps per ``metrics.csv`` row (values are means over those steps) (10).
        checkpoint_every: steps between ``checkpoint.pt`` writes (also written when the run stops) (100).
    """

    stages: list = field(default_factory=_default_stages)
    spacing: float = 2.0
    modality: str = "auto"
    phantom_shape: Sequence[int] = (64, 64, 64)
    model: dict = field(default_factory=_default_model)
    loss: dict = field(default_factory=dict)
    feature_steps: int = 50
    feature_lr: float = 1e-3
    batch_size: int = 2
    grad_accumulation: int = 1
    lr: float = 1e-3
    atlas_lr: Optional[float] = None
    atlas_momentum: Optional[float] = None
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    amp: str = "auto"
    activation_checkpointing: bool = False
    memory_format: str = "auto"
    augment: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation / conversion
    def validate(self) -> "TrainConfig":
        """Check every field (types, ranges), normalising sequences and stage dicts; returns self.

        Raises :class:`ConfigError` (a ``ValueError``) naming the field, e.g. ``config.stages[1].size``.
        """
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ConfigError(f"config.stages must be a non-empty list of stages, got {self.stages!r}")
        stages = []
        for i, stage in enumerate(self.stages):
            name = f"config.stages[{i}]"
            if isinstance(stage, dict):
                stage = _from_mapping(Stage, stage, name)
            elif not isinstance(stage, Stage):
                raise ConfigError(f"{name} must be a mapping with keys {_field_names(Stage)}, got {stage!r}")
            whole = _bool(stage.whole, f"{name}.whole")
            if stage.size is None and not whole:
                raise ConfigError(f"{name}.size must be set (null is for whole-exam stages, whole: true)")
            stage = Stage(
                steps=_int(stage.steps, f"{name}.steps", minimum=1),
                size=None if stage.size is None else _shape3(stage.size, f"{name}.size", minimum=8),
                spacing=None if stage.spacing is None else _float(stage.spacing, f"{name}.spacing", positive=True),
                levels=None if stage.levels is None else _int(stage.levels, f"{name}.levels", minimum=1),
                lr=None if stage.lr is None else _float(stage.lr, f"{name}.lr", positive=True),
                whole=whole,
            )
            stages.append(stage)
        self.stages = stages
        self.spacing = _float(self.spacing, "config.spacing", positive=True)
        self.modality = _choice(self.modality, "config.modality", MODALITIES)
        self.phantom_shape = _shape3(self.phantom_shape, "config.phantom_shape", minimum=8)
        for key in ("model", "loss"):
            value = getattr(self, key)
            if value is None:
                value = {}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"config.{key} must be a mapping of keyword arguments, got {value!r}")
            setattr(self, key, dict(value))
        self.model = {**_default_model(), **self.model}  # keys left out keep the CPU-sized defaults
        self.feature_steps = _int(self.feature_steps, "config.feature_steps", minimum=0)
        self.feature_lr = _float(self.feature_lr, "config.feature_lr", positive=True)
        self.batch_size = _int(self.batch_size, "config.batch_size", minimum=2)
        self.grad_accumulation = _int(self.grad_accumulation, "config.grad_accumulation", minimum=1)
        self.lr = _float(self.lr, "config.lr", positive=True)
        self.atlas_lr = None if self.atlas_lr is None else _float(self.atlas_lr, "config.atlas_lr", positive=True)
        if self.atlas_momentum is not None:
            self.atlas_momentum = _float(self.atlas_momentum, "config.atlas_momentum", minimum=0.0)
            if not self.atlas_momentum < 1.0:
                raise ConfigError(f"config.atlas_momentum must be in [0, 1) or null, got {self.atlas_momentum!r}")
        self.weight_decay = _float(self.weight_decay, "config.weight_decay", minimum=0.0)
        self.warmup_steps = _int(self.warmup_steps, "config.warmup_steps", minimum=0)
        self.grad_clip = _float(self.grad_clip, "config.grad_clip", minimum=0.0)
        self.amp = _choice(self.amp, "config.amp", AMP_MODES)
        self.activation_checkpointing = _bool(self.activation_checkpointing, "config.activation_checkpointing")
        self.memory_format = _choice(self.memory_format, "config.memory_format", MEMORY_FORMATS)
        self.augment = _bool(self.augment, "config.augment")
        self.seed = _int(self.seed, "config.seed", minimum=0)
        self.log_every = _int(self.log_every, "config.log_every", minimum=1)
        self.checkpoint_every = _int(self.checkpoint_every, "config.checkpoint_every", minimum=1)
        return self

    @property
    def total_steps(self) -> int:
        """Feature pretraining steps plus every stage's steps."""
        return self.feature_steps + sum(s.steps for s in self.stages)

    def to_dict(self) -> dict:
        """Plain dict (lists, not tuples) suitable for YAML and ``weights_only`` checkpoints."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "stages":
                value = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(s).items()} for s in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = _plain_tree(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Optional[dict], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming them and ``source``."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of configuration keys, got {type(data).__name__}")
        try:
            return _from_mapping(cls, data, "config")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_yaml(self, path: Optional[PathLike] = None) -> str:
        """YAML text of :meth:`to_dict`; also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: PathLike) -> "TrainConfig":
        """Read a YAML file (a subset of keys is fine: the rest keep their defaults)."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {str(path)!r}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {str(path)!r} is not valid YAML ({exc})") from None
        return cls.from_dict(data, source=f"config {str(path)!r}")


def config_differences(a: TrainConfig, b: TrainConfig, ignore=RESUMABLE_KEYS) -> list:
    """Dotted names of the fields where two configurations differ (``ignore`` skips top-level keys)."""
    out: list = []

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) | set(y), key=str):
                walk(x.get(key, _MISSING), y.get(key, _MISSING), f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{prefix}[{i}]")
        elif x != y:
            out.append(prefix)

    da_, db_ = a.to_dict(), b.to_dict()
    for key in ignore:
        da_.pop(key, None)
        db_.pop(key, None)
    walk(da_, db_, "")
    return out


_MISSING = object()


def _field_names(cls) -> list:
    return [f.name for f in dataclasses.fields(cls)]


def _from_mapping(cls, data: dict, name: str):
    known = _field_names(cls)
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {name} (known keys: {known})")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{name} is missing required key(s) {missing}")
    return cls(**data)


def _plain_tree(value):
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_tree(v) for v in value]
    return value


def _int(value, name, minimum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(value, name, positive=False, minimum=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(value, name) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _choice(value, name, choices) -> str:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _shape3(value, name, minimum=1) -> tuple:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{name} must be an int or a list of 3 ints (D, H, W), got {value!r}")
    return tuple(_int(v, name, minimum=minimum) for v in value)


# -------------------------------------------------------------------------------------------- data
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def resolve_images(images: Union[PathLike, Sequence[PathLike]]) -> list:
    """Expand ``images`` (files, folders and glob patterns, in any mix) into a sorted list of paths.

    A folder contributes every ``*.nii`` / ``*.nii.gz`` directly inside it; a pattern with ``*?[``
    is globbed. Raises ``ValueError`` naming ``images`` when nothing is found or an entry does not
    exist.
    """
    if images is None:
        raise ValueError("images: no input given (pass NIfTI files, a folder or a glob)")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    found: list = []
    for entry in images:
        entry = os.fspath(entry)
        path = Path(entry)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
            if not files:
                raise ValueError(f"images: folder {entry!r} holds no .nii/.nii.gz files")
            found.extend(files)
        elif any(ch in entry for ch in "*?["):
            files = sorted(Path(p) for p in glob.glob(entry, recursive=True) if Path(p).is_file())
            if not files:
                raise ValueError(f"images: pattern {entry!r} matches no files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"images: no such file or folder {entry!r}")
    if not found:
        raise ValueError("images: no input files given")
    unique, seen = [], set()
    for p in found:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(Path(key))
    return unique


def load_training_volumes(paths: Sequence[PathLike], config: TrainConfig) -> list:
    """Load, reorient, resample (to ``config.spacing`` mm) and normalise each exam.

    Returns float32 tensors ``[D, H, W]`` with intensities roughly in [0, 1]. Errors from unreadable,
    2-D or 4-D files are ``ValueError`` naming the file.
    """
    from .data.io import load_volume, normalize_intensity

    out = []
    for path in paths:
        volume = load_volume(path, spacing=config.spacing)
        data = normalize_intensity(volume.data, modality=config.modality)
        out.append(torch.as_tensor(data, dtype=torch.float32).contiguous())
    return out


def phantom_volumes(count: int, config: TrainConfig) -> list:
    """``count`` exams of the embedded phantom cohort, HU-windowed to [0, 1], float32 ``[D, H, W]``.

    Subject ``i`` is :func:`~deepatlas_fast.data.phantoms.phantom_subject` with seed
    ``phantom_seed(config.seed, i)``, generated directly at ``config.spacing`` mm over the field of
    view ``config.phantom_shape`` describes at its native spacing (default 64^3 at 6 mm = 384 mm).
    """
    from .data.io import normalize_intensity
    from .data.phantoms import PHANTOM_FOV_MM, phantom_seed, phantom_subject

    native = PHANTOM_FOV_MM / max(config.phantom_shape[0], config.phantom_shape[1])
    shape = tuple(max(8, int(round(s * native / config.spacing))) for s in config.phantom_shape)
    out = []
    for i in range(count):
        image = phantom_subject(phantom_seed(config.seed, i), shape=shape, spacing=config.spacing)[0]
        data = normalize_intensity(image, modality="ct")
        out.append(torch.as_tensor(data, dtype=torch.float32).contiguous())
    return out


def rescale_volume(volume: torch.Tensor, factor: float) -> torch.Tensor:
    """Resample ``[D, H, W]`` by ``factor`` (new size = round(size * factor), each side >= 8).

    Downsampling averages (``area``), upsampling is trilinear; ``factor == 1`` returns the input.
    """
    if abs(factor - 1.0) < 1e-9:
        return volume
    size = [max(8, int(round(s * factor))) for s in volume.shape]
    x = volume[None, None]
    if factor < 1:
        y = F.interpolate(x, size=size, mode="area")
    else:
        y = F.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return y[0, 0].contiguous()


def _seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (NumPy's SeedSequence hashing: well mixed, stable)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


class _StageData:
    """Crops for one stage: the exams rescaled to the stage spacing, in an :class:`ImageDataset`.

    ``batch(size, step, rank, micro)`` is a pure function of its arguments and the seed: the same
    step gives the same crops in every run (what makes resuming exact) and different crops per rank.
    Subjects are distinct within a batch when there are enough exams. A whole-exam stage (``parts``
    given: micro-batches x processes) returns every exam, centred, in a new order each step, split into
    ``parts`` shares (``rank * accumulation + micro`` picks one).
    """

    def __init__(self, volumes, size, factor, augment, seed, stage_index, frames=None, parts=None):
        from .data.dataset import ImageDataset

        self.volumes = [rescale_volume(v, factor) for v in volumes]
        self.parts = parts
        if size is None:  # whole exams: the smallest grid that holds every one
            size = [max(v.shape[a] for v in self.volumes) for a in range(3)]
        self.size = tuple(size)
        self.seed = seed
        self.stage_index = stage_index
        self.frames = frames in ("moments", "affine")  # "affine": computed once the template exists (set_frames)
        whole = parts is not None
        self.dataset = ImageDataset(self.volumes, crop_shape=self.size, augment=augment and not whole, seed=seed,
                                    normalize=None, random_crop=not whole, whole_frames=frames == "moments")

    @property
    def cropped(self) -> int:
        """How many exams are larger than the stage size along some axis (a whole-exam stage crops them)."""
        return sum(any(n > s for n, s in zip(v.shape, self.size)) for v in self.volumes)

    def share_weight(self, count: int) -> float:
        """The weight of a micro-batch of ``count`` exams in its step's mean over micro-batches and processes:
        1 for equal shares (cropped stages); in a whole-exam stage, whose ``parts`` shares of the exams differ
        by one where they do not divide evenly, ``count`` over the mean share, so every exam weighs the same."""
        return 1.0 if self.parts is None else count * self.parts / len(self.volumes)

    def set_frames(self, frame_of) -> None:
        """Each exam's whole-volume frame from ``frame_of`` (``[N, 1, D, H, W] -> [N, 3, 4]``)."""
        self.dataset.set_whole_frames(frame_of)

    def batch(self, batch_size: int, step: int, rank: int, micro: int, accumulation: int = 1) -> tuple:
        """``([batch_size, 1, *size] float32 crops, [batch_size, 3, 4] frames or None)`` of training step
        ``step`` on ``rank``; the frames (with a "moments" or "affine" frame) are each exam's whole-volume frame
        composed with its crop's geometry (:class:`~deepatlas_fast.data.dataset.ImageDataset` ``whole_frames``).
        A whole-exam stage ignores ``batch_size`` and returns share ``rank * accumulation + micro``."""
        if self.frames and self.dataset.frames is None:
            raise RuntimeError("the exams' frames are not computed yet (set_frames)")
        n = len(self.volumes)
        if self.parts is not None:  # one order per step, the same on every rank: the shares partition the exams
            gen = torch.Generator().manual_seed(_seed_for(self.seed, self.stage_index, step))
            subjects = torch.randperm(n, generator=gen)[(rank * accumulation + micro) % self.parts::self.parts].tolist()
            draws = [0] * len(subjects)
        else:
            gen = torch.Generator().manual_seed(_seed_for(self.seed, self.stage_index, step, rank, micro))
            if n >= batch_size:
                subjects = torch.randperm(n, generator=gen)[:batch_size].tolist()
            else:
                subjects = torch.randint(0, n, (batch_size,), generator=gen).tolist()
            draws = torch.randint(0, 2**47, (batch_size,), generator=gen).tolist()
        items = [self.dataset.sample(s, d) for s, d in zip(subjects, draws)]
        images = torch.stack([item["image"] for item in items], 0).to(torch.float32)
        frames = torch.stack([item["frame"] for item in items], 0) if self.frames else None
        return images, frames


class _Prefetcher:
    """Micro-batches by (step, micro), optionally made one ahead on a CPU thread.

    Crops are a pure function of the step, so prefetching changes only the time: on a GPU the next
    micro-batch is cropped, augmented and pinned while the current step runs.
    """

    def __init__(self, data_of, batch_size, rank, accumulation, total_steps, device, threaded):
        self.data_of, self.batch_size, self.rank = data_of, batch_size, rank
        self.accumulation, self.total_steps, self.device = accumulation, total_steps, device
        self.pin = device.type == "cuda"
        self.pending: dict = {}
        self.pool = None
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepatlas-crops")

    def make(self, step: int, micro: int) -> tuple:
        images, frames = self.data_of(step).batch(self.batch_size, step, self.rank, micro, self.accumulation)
        return images.pin_memory() if self.pin else images, frames

    def get(self, step: int, micro: int) -> tuple:
        """``(images [batch_size, 1, *size], frames [batch_size, 3, 4] or None)`` on the device for
        micro-batch ``micro`` of step ``step``."""
        future = self.pending.pop((step, micro), None)
        batch = future.result() if future is not None else self.make(step, micro)
        if self.pool is not None:
            nxt = (step, micro + 1) if micro + 1 < self.accumulation else (step + 1, 0)
            if nxt[0] < self.total_steps and nxt not in self.pending:
                self.pending[nxt] = self.pool.submit(self.make, *nxt)
        images, frames = batch
        return images.to(self.device, non_blocking=self.pin), None if frames is None else frames.to(self.device)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.pending.clear()


@torch.no_grad()
def update_atlas(model, coords: list, features: list, momentum: float, world: int = 1) -> None:
    """Move ``model.atlas`` towards the mean of exams splatted at their coordinates (running mean).

    ``coords``/``features``: the step's ``[N, 3, *S]`` bounded coordinates and ``[N, C, *S]`` features
    (one entry per micro-batch). Under DDP the splatted sums are all-reduced, so every rank keeps the
    same atlas. Template voxels with less than half a voxel's weight per exam keep their value.
    """
    import torch.distributed as dist

    from .propagate import splat

    atlas = model.atlas
    weight = torch.zeros(1, *atlas.shape[2:], device=atlas.device)
    total = torch.zeros(atlas.shape[1], *atlas.shape[2:], device=atlas.device)
    exams = torch.zeros((), device=atlas.device)
    for c, f in zip(coords, features):
        w, t = splat(c.flatten(2), f.flatten(2), atlas.shape[2:])
        weight += w
        total += t
        exams += c.shape[0]
    if world > 1:
        for value in (weight, total, exams):
            dist.all_reduce(value)
    reached = weight > 0.5 * exams
    mean = total / weight.clamp_min(1e-12)
    atlas.copy_(torch.where(reached, momentum * atlas[0] + (1.0 - momentum) * mean, atlas[0])[None])


class _LossModule(torch.nn.Module):
    """Wraps a loss function around a module so DistributedDataParallel sees one ``forward``."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, images, **kwargs):
        return self.fn(self.module, images, **kwargs)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        out_dir: the run folder. step: optimiser steps done in total (over every resumption).
        total_steps: steps of the full schedule. status: ``"completed"`` | ``"max_steps"`` |
        ``"max_minutes"`` | ``"interrupted"`` (SIGINT/SIGTERM). model_path / checkpoint_path: files
        written (``None`` on ranks other than 0). last_metrics: the last ``metrics.csv`` row.
    """

    out_dir: Path
    step: int
    total_steps: int
    status: str
    model_path: Optional[Path]
    checkpoint_path: Optional[Path]
    last_metrics: dict


class _StopSignal:
    """SIGINT/SIGTERM handler: the first signal asks for a checkpoint at the next step boundary."""

    def __init__(self, echo):
        self.requested = 0
        self.echo = echo
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        self.echo(f"deepatlas-fast train: {signal.Signals(signum).name} received; saving a checkpoint at the "
                  "end of this step (send SIGINT again to abort without saving)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _Metrics:
    """``metrics.csv``: one row per logged step, columns grow when new loss terms appear."""

    BASE = ["step", "stage", "phase", "loss", "lr", "grad_norm", "skipped", "time", "sec_per_step"]

    def __init__(self, path: Optional[Path], resume_step: Optional[int]):
        self.path = path
        self.header = list(self.BASE)
        self.rows: list = []
        if path is None:
            return
        if resume_step is not None and path.is_file():
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                self.header = list(reader.fieldnames or self.BASE)
                self.rows = [r for r in reader if int(r["step"]) <= resume_step]
            self._rewrite()
        else:
            self._rewrite()

    def _rewrite(self):
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.header, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def write(self, row: dict):
        row = {k: _fmt(v) for k, v in row.items()}
        self.rows.append(row)
        if self.path is None:
            return
        new = [k for k in row if k not in self.header]
        if new:
            self.header.extend(new)
            self._rewrite()
        else:
            with self.path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.header, restval="").writerow(row)


def _fmt(value):
    if isinstance(value, float):
        return repr(value)
    return value


def _setup_distributed(device: str):
    """Initialise torch.distributed when launched by torchrun with WORLD_SIZE > 1.

    Returns ``(rank, world_size, local_rank, created)``; gloo on CPU, NCCL on CUDA.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, False
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank, True


def _resolve_device(device: Optional[str], local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but torch sees no CUDA device (use --device cpu)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def _phase_of(step: int, config: TrainConfig):
    """``(phase, stage number, stage or None, step within the phase)`` of 0-based ``step``.

    Stage number 0 is the feature pretraining; 1..n are ``config.stages``.
    """
    if step < config.feature_steps:
        return "features", 0, None, step
    rest = step - config.feature_steps
    for i, stage in enumerate(config.stages):
        if rest < stage.steps:
            return "coords", i + 1, stage, rest
        rest -= stage.steps
    return "done", len(config.stages), None, rest


def _phase_end(step: int, config: TrainConfig) -> int:
    """The (exclusive) global step at which the phase containing 0-based ``step`` ends."""
    end = config.feature_steps
    if step < end:
        return end
    for stage in config.stages:
        end += stage.steps
        if step < end:
            return end
    return end


def _build_model(config: TrainConfig):
    from .model import DeepAtlas

    try:
        model = DeepAtlas(**config.model)
    except TypeError as exc:
        raise ConfigError(f"config.model: {exc}") from None
    levels = _model_levels(model)
    for i, stage in enumerate(config.stages):
        if levels is not None and stage.levels is not None and stage.levels > levels:
            raise ConfigError(f"config.stages[{i}].levels = {stage.levels} exceeds the model's {levels} levels")
    return model


def _model_levels(model) -> Optional[int]:
    for obj in (model, getattr(model, "coordnet", None)):
        value = getattr(obj, "levels", None)
        if isinstance(value, int):
            return value
    cfg = getattr(model, "config", None) or {}
    value = cfg.get("levels")
    return value if isinstance(value, int) else None


def _loss_weights(config: TrainConfig):
    from .objective import LossWeights

    try:
        return LossWeights(**config.loss)
    except TypeError as exc:
        known = [f.name for f in dataclasses.fields(LossWeights)] if dataclasses.is_dataclass(LossWeights) else []
        raise ConfigError(f"config.loss: {exc} (known keys: {known})") from None


def enable_activation_checkpointing(model) -> None:
    """Recompute CoordNet's convolution blocks in the backward instead of storing their activations.

    Uses the model's own switch when it has one (``set_activation_checkpointing``), otherwise wraps
    the ``forward`` of every encoder/decoder/bottleneck block of ``model.coordnet`` in
    non-reentrant :func:`torch.utils.checkpoint.checkpoint` (instance attribute: the state dict is
    unchanged). Costs about one extra CoordNet forward per step.
    """
    from torch.utils.checkpoint import checkpoint

    net = getattr(model, "coordnet", model)
    for obj in (model, net):
        setter = getattr(obj, "set_activation_checkpointing", None)
        if callable(setter):
            setter(True)
            return
    blocks = [m for name in ("encoders", "decoders") for m in getattr(net, name, [])]
    if getattr(net, "bottleneck", None) is not None:
        blocks.append(net.bottleneck)
    if not blocks:
        raise ConfigError("config.activation_checkpointing: this model has no CoordNet blocks to checkpoint")
    for block in blocks:
        if getattr(block, "_deepatlas_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False)
            return _inner(*args)

        block.forward = forward
        block._deepatlas_checkpointed = True  # also read by model._ConvBlock: no recomputation recipes inside


# -------------------------------------------------------------------------------------------- train
def train(
    config: Union[TrainConfig, dict, PathLike, None] = None,
    images: Union[PathLike, Sequence[PathLike], None] = None,
    phantoms: Optional[int] = None,
    out_dir: PathLike = "runs/deepatlas",
    device: Optional[str] = "cpu",
    ops: str = "fused",
    resume: bool = False,
    max_steps: Optional[int] = None,
    max_minutes: Optional[float] = None,
    quiet: bool = False,
    echo: Optional[Callable[[str], None]] = None,
    extend_steps: Optional[int] = None,
    whole_steps: Optional[int] = None,
) -> TrainResult:
    """Train DeepATLAS on unlabelled exams (``images``) or the embedded phantom cohort (``phantoms``).

    Schedule: ``config.feature_steps`` steps of autoencoder pretraining (reconstruction loss; the
    autoencoder is then frozen), then every stage of ``config.stages`` in order (exams resampled to
    the stage spacing, random crops of the stage size or, in a ``whole`` stage, every exam whole; the
    stage's active decoder levels), each step
    minimising ``deepatlas_loss`` with AdamW (learning-rate warm-up per stage, gradient-norm clipping
    ``config.grad_clip``, ``config.grad_accumulation`` micro-batches, bf16 autocast per ``config.amp``).
    A step whose loss or gradient is not finite is skipped (counted in the ``skipped`` column).

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, a YAML path, or ``None`` (the defaults;
            on ``resume`` the run's own ``config.yaml``).
        images: NIfTI files, folders or glob patterns (see :func:`resolve_images`).
        phantoms: number of embedded phantom exams instead of ``images`` (>= 2).
        out_dir: the run folder (created). Refuses a folder that already holds a run unless ``resume``.
        device: ``"cpu"`` | ``"cuda"`` (``None``: CUDA when available). Under torchrun with
            WORLD_SIZE > 1 each process uses ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo); crops
            differ per rank, gradients are averaged (DDP), only rank 0 writes files.
        ops: ``"fused"`` (this package's ops) | ``"stock"`` (stock PyTorch ops), same model.
        resume: continue the run in ``out_dir`` from ``checkpoint.pt``: same step, weights, optimiser
            and RNG states, so the continuation is identical to an uninterrupted run. A given
            ``config`` must match the saved one (except ``log_every``/``checkpoint_every``); the
            data default to the run's own.
        max_steps: stop once this many steps are done in total (a cap on the schedule, counted over
            resumptions), saving a checkpoint.
        max_minutes: stop at the first step boundary after this much wall time in this call (data
            loading included), saving a checkpoint.
        quiet: no progress bar (messages about stopping and resuming still go to ``echo``).
        echo: where messages go (default: stderr; only rank 0 speaks).
        extend_steps: with ``resume``, lengthen the run's last stage by this many steps (the run may have
            completed): the schedule in ``config.yaml`` and the checkpoint grows, and the continuation is the
            run that had the longer last stage from the start (the learning rate is constant within a stage
            after its warm-up, and every step's crops depend only on the seed, the stage and the step).
            Each call adds its steps again: an extension that was interrupted continues with ``resume`` alone.
        whole_steps: with ``resume``, append a whole-exam stage (:class:`Stage` ``whole``) of this many steps
            at the last stage's spacing, levels and learning rate, with ``size`` null, to the run's schedule
            (the run may have completed); as with ``extend_steps`` the result is the run that had the stage from
            the start. A run that already ends with a whole-exam stage is lengthened with ``extend_steps``.

    Returns:
        a :class:`TrainResult`. SIGINT/SIGTERM during training save a checkpoint and ``model.pt`` at
        the next step boundary and return with ``status="interrupted"``.
    """
    import sys

    wall_start = time.monotonic()
    if echo is None:
        echo = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if ops not in OPS_MODES:
        raise ValueError(f"ops must be one of {list(OPS_MODES)}, got {ops!r}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be a non-negative integer, got {max_steps!r}")
    for name, value, does in (("extend_steps", extend_steps, "lengthens a run being resumed"),
                              ("whole_steps", whole_steps, "appends a stage to a run being resumed")):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not resume:
            raise ValueError(f"{name} {does} (resume=True); a new run takes its schedule from config.stages")
    if extend_steps is not None and whole_steps is not None:
        raise ValueError("extend_steps and whole_steps: give one of them (lengthen the last stage, or append a "
                         "whole-exam stage)")
    if max_minutes is not None:
        if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0:
            raise ValueError(f"max_minutes must be a positive number, got {max_minutes!r}")
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / "checkpoint.pt"
    model_path = out_dir / "model.pt"

    # -------------------------------------------------------------- configuration and data source
    if isinstance(config, (str, os.PathLike)):
        config = TrainConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    elif config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, a dict, a YAML path or None, got {type(config).__name__}")
    if images is not None and phantoms is not None:
        raise ValueError("images and phantoms: give one of them, not both")
    if phantoms is not None and (isinstance(phantoms, bool) or not isinstance(phantoms, int) or phantoms < 2):
        raise ValueError(f"phantoms must be an integer >= 2, got {phantoms!r}")

    state = None
    if resume:
        if not checkpoint_path.is_file():
            raise ValueError(f"resume: {str(out_dir)!r} holds no checkpoint.pt to resume from")
        state = ckpt.load_checkpoint(checkpoint_path)
        if isinstance(state["config"].get("model"), dict):  # runs from before the frame option used the grid
            state["config"]["model"].setdefault("frame", "grid")
        saved = TrainConfig.from_dict(state["config"], source=f"checkpoint {str(checkpoint_path)!r}")
        if config is None:
            config = saved
        else:
            diffs = config_differences(saved, config)
            if diffs:
                raise ConfigError(
                    f"config does not match the run being resumed in {str(out_dir)!r}; differing keys: {diffs} "
                    "(only log_every and checkpoint_every may change on resume)"
                )
        if extend_steps is not None:
            config = _with_longer_last_stage(config, extend_steps)
        if whole_steps is not None:
            config = _with_whole_last_stage(config, whole_steps)
        source = state["data"]
        if images is None and phantoms is None:
            images = source.get("images")
            phantoms = source.get("phantoms")
        else:
            given = {"images": [str(p) for p in resolve_images(images)] if images is not None else None,
                     "phantoms": phantoms}
            if given["images"] != source.get("images") or given["phantoms"] != source.get("phantoms"):
                raise ValueError(
                    f"resume: the data differ from the run's own (run: {_describe_source(source)}; given: "
                    f"{_describe_source(given)}); omit images/phantoms to reuse the run's data"
                )
    else:
        if checkpoint_path.exists():
            raise ValueError(
                f"out_dir: {str(out_dir)!r} already holds a training run (checkpoint.pt); pass resume=True "
                "(--resume) to continue it, or choose another folder"
            )
        if config is None:
            config = TrainConfig()
    if images is None and phantoms is None:
        raise ValueError("images: no training data given (pass images=... or phantoms=N)")
    image_paths = resolve_images(images) if images is not None else None
    source = {"images": [str(p) for p in image_paths] if image_paths is not None else None, "phantoms": phantoms}

    # ------------------------------------------------------------------------------- processes
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank, created_group = _setup_distributed(str(device))
    try:
        return _train(config, source, image_paths, phantoms, out_dir, checkpoint_path, model_path, device,
                      ops, state, max_steps, max_minutes, quiet, echo, rank, world, local_rank, wall_start)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _with_longer_last_stage(config: TrainConfig, extra: int) -> TrainConfig:
    data = config.to_dict()
    data["stages"][-1]["steps"] += extra
    return TrainConfig.from_dict(data, source="extend_steps")


def _with_whole_last_stage(config: TrainConfig, steps: int) -> TrainConfig:
    last = config.stages[-1]
    if last.whole:
        raise ConfigError(f"whole_steps: the run already ends with a whole-exam stage ({last.steps} steps); "
                          "lengthen it with extend_steps (--extend-steps)")
    data = config.to_dict()
    data["stages"].append(dict(data["stages"][-1], steps=steps, size=None, whole=True))
    return TrainConfig.from_dict(data, source="whole_steps")


def _describe_source(source: dict) -> str:
    if source.get("phantoms") is not None:
        return f"{source['phantoms']} phantoms"
    images = source.get("images") or []
    return f"{len(images)} image file(s)" + (f" starting {images[0]!r}" if images else "")


def _train(config, source, image_paths, phantoms, out_dir, checkpoint_path, model_path, device, ops, state,
           max_steps, max_minutes, quiet, echo, rank, world, local_rank, wall_start) -> TrainResult:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from ._version import __version__
    from .objective import deepatlas_loss, reconstruction_loss

    is_main = rank == 0
    dev = _resolve_device(device, local_rank)
    weights = _loss_weights(config)
    if not is_main:
        echo = lambda msg: None  # noqa: E731

    # ------------------------------------------------------------------------------------ data
    if image_paths is not None:
        volumes = load_training_volumes(image_paths, config)
        modality = config.modality
    else:
        volumes = phantom_volumes(phantoms, config)
        modality = "ct"
    stage_data = []
    parts = config.grad_accumulation * world
    for stage in config.stages:  # built up front: errors surface before training, and threads may read them
        spacing = stage.spacing if stage.spacing is not None else config.spacing
        name = f"config.stages[{len(stage_data)}]"
        if stage.whole and len(volumes) < 2 * parts:
            raise ConfigError(
                f"{name}.whole: {len(volumes)} exams split over {parts} micro-batch(es) (grad_accumulation x "
                "processes) leave fewer than 2 in one (the implicit term pairs them)")
        data = _StageData(volumes, stage.size, config.spacing / spacing, config.augment, config.seed,
                          len(stage_data), frames=config.model.get("frame"), parts=parts if stage.whole else None)
        if stage.whole and (data.cropped or not quiet):
            note = f", {data.cropped} of them cropped to it (larger)" if data.cropped else ""
            echo(f"deepatlas-fast train: stage {len(stage_data) + 1} takes all {len(volumes)} exams whole every "
                 f"step, centred in {list(data.size)} at {spacing:g} mm{note}")
        stage_data.append(data)

    def data_for(stage_index: int) -> _StageData:
        """Crops of ``config.stages[stage_index]``."""
        return stage_data[stage_index]

    def data_of(at_step: int) -> Optional[_StageData]:
        phase, stage_no, _, _ = _phase_of(at_step, config)
        if phase == "features":
            return data_for(at_step % len(config.stages))  # every stage's resolution in turn
        return data_for(stage_no - 1) if phase == "coords" else None

    batches = _Prefetcher(data_of, config.batch_size, rank, config.grad_accumulation, config.total_steps, dev,
                          threaded=dev.type == "cuda")

    # ----------------------------------------------------------------------------------- model
    torch.manual_seed(config.seed)
    model = _build_model(config)
    if config.feature_steps and model.features is None:
        raise ConfigError(
            f"config.feature_steps = {config.feature_steps} pretrains the feature autoencoder, but config.model "
            "has features: 0 (intensity only); set feature_steps: 0"
        )
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    model.to(dev)
    set_convolution_memory_format(model, preferred_memory_format(dev, config.memory_format))
    feature_params = list(model.features.parameters()) if model.features is not None else []
    net_params = [p for n, p in model.named_parameters() if not n.startswith("features.") and n != "atlas"]
    coord_params = net_params + [model.atlas]
    if config.atlas_momentum is not None:  # a running mean, not a trained parameter
        model.atlas.requires_grad_(False)
        coord_params = net_params
    feat_opt = torch.optim.AdamW(feature_params, lr=config.feature_lr, weight_decay=0.0) if feature_params else None
    coord_opt = torch.optim.AdamW(
        [
            {"params": net_params, "weight_decay": config.weight_decay, "lr_scale": 1.0},
            {"params": [model.atlas], "weight_decay": 0.0, "lr_scale": (config.atlas_lr or config.lr) / config.lr},
        ][: 2 if config.atlas_momentum is None else 1],
        lr=config.lr,
    )

    step = 0
    elapsed_before = 0.0
    skipped_total = 0
    accum: dict = {}
    if state is not None:
        model.load_state_dict(state["model"])
        if feat_opt is not None and state["optimizers"].get("features") is not None:
            feat_opt.load_state_dict(state["optimizers"]["features"])
        coord_opt.load_state_dict(state["optimizers"]["coords"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        skipped_total = int(state.get("skipped", 0))
        accum = dict(state.get("metric_accumulators") or {})
        ckpt.set_rng_state(state["rng"])
        if int(state.get("world_size", 1)) != world:
            echo(f"deepatlas-fast train: resuming a run saved with {state.get('world_size', 1)} process(es) "
                 f"on {world}: the crops of each step change")

    if config.model.get("frame") == "affine":  # the template (saved in the model, so a resume keeps it), then frames
        if not bool(model.coordnet.frame_template_built):
            progress = None if quiet else echo
            if progress is not None:
                progress(f"deepatlas-fast train: building the affine frame's template from {len(volumes)} exams")
            model.coordnet.build_frame_template(volumes, progress=progress)
        for data in stage_data:
            data.set_frames(lambda x: model.coordnet.frame_of(x.to(dev)))

    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes per stage
    amp_on = config.amp == "bf16" or (config.amp == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())

    def autocast():
        if not amp_on:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def distributed(module, find_unused):
        if world <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=find_unused)

    wrappers: dict = {}
    model_levels = _model_levels(model)

    seen: dict = {"coords": [], "features": []}  # this step's maps, for a running-mean atlas

    def coordinate_loss(m, x, levels, frame=None):
        outputs = m(x, levels=levels, frame=frame)
        if config.atlas_momentum is not None:
            seen["coords"].append(outputs["coords"].detach().float())
            seen["features"].append(outputs["features"].detach().float())
        return deepatlas_loss(m, x, weights, ops=ops, levels=levels, outputs=outputs)

    def wrapper_for(phase: str, stage: Optional[Stage]):
        """The loss module of a phase (DDP-wrapped under torchrun). One wrapper lives at a time: two
        live DDP wrappers over the same parameters would both reduce; a dropped one unhooks itself."""
        levels = None if stage is None else stage.levels
        key = (phase, levels)
        if key not in wrappers:
            wrappers.clear()
            if phase == "features":
                module = _LossModule(model.features, lambda m, x, generator: (
                    _as_terms(reconstruction_loss(m, x, generator=generator), "reconstruction")))
                wrappers[key] = distributed(module, find_unused=False)
            else:
                module = _LossModule(model, coordinate_loss)
                # inactive decoder levels (coarse stages) and a zero-weight atlas get no gradient
                partial = levels is not None and model_levels is not None and levels < model_levels
                wrappers[key] = distributed(module, find_unused=partial or weights.explicit == 0)
        return wrappers[key]

    def enter_coordinates():
        """Freeze the autoencoder and initialise the atlas (deterministically, same on every rank)."""
        if not bool(model.features_frozen):
            model.freeze_features()
        if not bool(model.atlas_initialized):
            data = data_for(0)
            count = max(config.batch_size, min(len(volumes), 16))
            images, frames = data.batch(count, _ATLAS_INIT_KEY, 0, 0)
            model.init_atlas(images.to(dev), None if frames is None else frames.to(dev))

    # ------------------------------------------------------------------------------- run files
    metrics = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(out_dir / "config.yaml")
        metrics = _Metrics(out_dir / "metrics.csv", resume_step=step if state is not None else None)

    total = config.total_steps
    limit = total if max_steps is None else min(total, max_steps)
    start = time.monotonic()
    interval_start = start
    last_row: dict = {}
    status = "completed"
    consecutive_skips = 0
    lr = 0.0

    def save(final_step: int):
        if not is_main:
            return
        elapsed = elapsed_before + (time.monotonic() - start)
        ckpt.save_checkpoint(
            checkpoint_path,
            step=final_step,
            total_steps=total,
            config=config.to_dict(),
            data=source,
            model=model.state_dict(),
            optimizers={"features": feat_opt.state_dict() if feat_opt is not None else None,
                        "coords": coord_opt.state_dict()},
            rng=ckpt.get_rng_state(),
            metric_accumulators=dict(accum),
            elapsed_seconds=elapsed,
            skipped=skipped_total,
            world_size=world,
            ops=ops,
            package_version=__version__,
        )
        final_stage = config.stages[-1]
        ckpt.save_model(
            model_path,
            model,
            preprocessing={
                "spacing": final_stage.spacing if final_stage.spacing is not None else config.spacing,
                "data_spacing": config.spacing,
                "modality": modality,
                "size": list(stage_data[-1].size),
                "levels": final_stage.levels,
                "orientation": "RAS",
            },
            metadata={
                "step": final_step,
                "total_steps": total,
                "complete": final_step >= total,
                "ops": ops,
                "amp": config.amp,
                "package_version": __version__,
                "torch_version": torch.__version__,
                "data": {"kind": "images" if source["images"] is not None else "phantoms", "count": len(volumes)},
                "world_size": world,
                "config": config.to_dict(),
            },
        )

    def log_row(done_step: int, phase: str, stage_no: int, lr: float):
        nonlocal interval_start, last_row
        count = accum.get("_count", 0)
        if not count:
            return
        means = {k: float(v) / count for k, v in accum.items() if not k.startswith("_")}
        if world > 1:  # every rank logs at the same steps with the same keys
            keys = sorted(means)
            t = torch.tensor([means[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            means = {k: float(v) / world for k, v in zip(keys, t.tolist())}
        now = time.monotonic()
        row = {
            "step": done_step, "stage": stage_no, "phase": phase, "loss": means.pop("loss", float("nan")),
            "lr": lr, "grad_norm": means.pop("grad_norm", float("nan")), "skipped": int(accum.get("_skipped", 0)),
            "time": round(elapsed_before + now - start, 3), "sec_per_step": round((now - interval_start) / count, 4),
        }
        row.update(sorted(means.items()))
        accum.clear()
        interval_start = now
        last_row = row
        if metrics is not None:
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", stage=stage_no, refresh=False)

    codes = {None: 0, "completed": 1, "max_steps": 2, "max_minutes": 3, "interrupted": 4}
    bar = tqdm(total=total, initial=step, disable=quiet or not is_main, unit="step", dynamic_ncols=True,
               desc="deepatlas train")
    try:
        with _StopSignal(echo) as stopper:
            while True:
                # ------------------------------------------------------ stop checks (step boundary)
                reason = None
                if step >= total:
                    reason = "completed"
                elif step >= limit:
                    reason = "max_steps"
                elif max_minutes is not None and time.monotonic() - wall_start >= max_minutes * 60.0:
                    reason = "max_minutes"
                elif stopper.requested:
                    reason = "interrupted"
                if world > 1:  # every rank stops at the same step
                    flag = torch.tensor([codes[reason]], dtype=torch.int64, device=dev if dev.type == "cuda" else "cpu")
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    reason = {v: k for k, v in codes.items()}[int(flag.item())]
                if reason is not None:
                    status = reason
                    break

                # ---------------------------------------------------------------------- one step
                phase, stage_no, stage, _ = _phase_of(step, config)
                if phase == "features":
                    model.features.train()
                    optimizer, params = feat_opt, feature_params
                    lr = config.feature_lr * _warmup(step, config.warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                else:
                    enter_coordinates()
                    model.train()
                    optimizer, params = coord_opt, coord_params
                    stage_start = _phase_end(step, config) - stage.steps
                    lr = (stage.lr or config.lr) * _warmup(step - stage_start, config.warmup_steps)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                module = None  # drop the previous phase's wrapper before building the next
                module = wrapper_for(phase, stage)
                optimizer.zero_grad(set_to_none=True)
                seen["coords"].clear()
                seen["features"].clear()
                step_loss = torch.zeros((), dtype=torch.float64)
                step_terms: dict = {}
                step_exams = 0
                for micro in range(config.grad_accumulation):
                    batch, frames = batches.get(step, micro)
                    sync = contextlib.nullcontext()
                    if world > 1 and micro < config.grad_accumulation - 1:
                        sync = module.no_sync()
                    with sync:
                        with autocast():
                            if phase == "features":
                                gen = torch.Generator().manual_seed(_seed_for(config.seed, 99, step, rank, micro))
                                loss, terms = module(batch, generator=gen)
                            else:
                                loss, terms = module(batch, levels=stage.levels, frame=frames)
                        share = data_of(step).share_weight(batch.shape[0]) / config.grad_accumulation
                        (loss.float() * share).backward()
                    # logged: this process's mean over its exams (the shares' weights are over all processes)
                    exams = batch.shape[0]
                    step_exams += exams
                    step_loss += loss.detach().double().cpu() * exams
                    for k, v in terms.items():
                        v = torch.as_tensor(v).detach().double().cpu()
                        step_terms[k] = step_terms.get(k, 0.0) + v * exams
                step_loss /= step_exams
                step_terms = {k: v / step_exams for k, v in step_terms.items()}
                grads = [p for p in params if p.grad is not None]
                if config.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(grads, config.grad_clip)
                elif grads:
                    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in grads]))
                else:
                    grad_norm = torch.zeros(())
                grad_norm = float(grad_norm)
                if math.isfinite(grad_norm) and bool(torch.isfinite(step_loss)):
                    optimizer.step()
                    if phase != "features" and config.atlas_momentum is not None:
                        update_atlas(model, seen["coords"], seen["features"], config.atlas_momentum, world)
                    consecutive_skips = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    skipped_total += 1
                    consecutive_skips += 1
                    accum["_skipped"] = accum.get("_skipped", 0) + 1
                    if consecutive_skips >= 20:
                        raise RuntimeError(
                            f"training diverged: 20 consecutive steps with a non-finite loss or gradient "
                            f"(step {step + 1}, {phase}, stage {stage_no}); lower the learning rate or raise "
                            "the jacobian/folding weights in config.loss"
                        )
                step += 1
                # ------------------------------------------------------------ accumulate and log
                accum["_count"] = accum.get("_count", 0) + 1
                accum["loss"] = accum.get("loss", 0.0) + float(step_loss)
                accum["grad_norm"] = accum.get("grad_norm", 0.0) + grad_norm
                for k, v in step_terms.items():
                    accum[k] = accum.get(k, 0.0) + float(v)
                bar.update(1)
                phase_done = step == _phase_end(step - 1, config)
                if step % config.log_every == 0 or phase_done or step >= limit:
                    log_row(step, phase, stage_no, lr)
                if step % config.checkpoint_every == 0 and step < limit:
                    save(step)
            # ----------------------------------------------------------------------- final save
            if accum.get("_count"):
                phase, stage_no, _, _ = _phase_of(max(step - 1, 0), config)
                log_row(step, phase, stage_no, lr)
            save(step)
    finally:
        bar.close()
        batches.close()
    if status == "interrupted":
        echo(f"deepatlas-fast train: interrupted at step {step}; checkpoint saved in {str(out_dir)!r} "
             "(continue with --resume)")
    elif status != "completed":
        echo(f"deepatlas-fast train: stopped at step {step}/{total} ({status}); continue with --resume")
    return TrainResult(
        out_dir=out_dir, step=step, total_steps=total, status=status,
        model_path=model_path if is_main else None, checkpoint_path=checkpoint_path if is_main else None,
        last_metrics=last_row,
    )


_ATLAS_INIT_KEY = 2**40  # the "step" whose crops initialise the atlas (never a real step)


def _warmup(step_in_stage: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step_in_stage + 1) / warmup_steps)


def _as_terms(result, name: str):
    """``reconstruction_loss`` may return a tensor or ``(tensor, terms)``; normalise to the latter."""
    if isinstance(result, tuple):
        loss, terms = result
        return loss, dict(terms)
    return result, {name: result}
