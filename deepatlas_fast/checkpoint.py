"""Training checkpoints and the inference bundle ``model.pt``.

Everything written here is a plain structure of tensors, Python scalars, strings, lists and dicts, so
every file loads with ``torch.load(path, weights_only=True)`` (no pickled classes, no code run on load).

* ``RUN_DIR/checkpoint.pt`` — the full training state (model, optimisers, step, RNG states of torch
  CPU/CUDA, Python ``random`` and NumPy, metric accumulators): :func:`save_checkpoint` /
  :func:`load_checkpoint`; resuming from it continues the run exactly.
* ``RUN_DIR/model.pt`` — what inference needs (network and atlas weights, the model's constructor
  arguments, the preprocessing settings, the template shape, label-free metadata):
  :func:`save_model` / :func:`load_model` / :func:`read_model`.

Writes are atomic (a temporary file in the same folder, then ``os.replace``), so an interrupted write
never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

MODEL_FORMAT = "deepatlas-fast/model"
CHECKPOINT_FORMAT = "deepatlas-fast/checkpoint"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------- I/O
def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _load(path: PathLike, what: str, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: no such file {str(path)!r}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means "not our file"
        raise ValueError(f"{what}: cannot read {str(path)!r} as a deepatlas-fast file ({exc})") from exc
    if not isinstance(obj, dict) or "format" not in obj:
        raise ValueError(f"{what}: {str(path)!r} is not a deepatlas-fast file (no 'format' entry)")
    return obj


# ------------------------------------------------------------------------------------------ RNG
def get_rng_state() -> dict:
    """RNG states of torch (CPU and every CUDA device), Python ``random`` and NumPy, as tensors.

    Returns a dict of tensors / ints / None only, so it survives ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python_version": int(version),
        "python_state": torch.tensor(internal, dtype=torch.int64),
        "python_gauss_next": None if gauss_next is None else float(gauss_next),
        "numpy_name": str(np_name),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_cached),
    }
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore the states returned by :func:`get_rng_state` (CUDA states only where devices exist)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        count = min(len(cuda), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda[index].cpu(), index)
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), state["python_gauss_next"])
    )
    np.random.set_state(
        (
            state["numpy_name"],
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )


# ----------------------------------------------------------------------------------- checkpoints
def _cpu(obj):
    """Tensors to CPU inside nested dicts/lists (checkpoints load on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: PathLike, **state) -> Path:
    """Write a training checkpoint: ``state`` holds plain structures (state dicts, ints, floats, lists).

    ``format``/``version`` entries are added; tensors are moved to the CPU. Returns the path.
    """
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION}
    payload.update(_cpu(state))
    return atomic_save(payload, path)


def load_checkpoint(path: PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``).

    Raises ``ValueError`` naming ``path`` when it is missing, unreadable or not a checkpoint.
    """
    obj = _load(path, "checkpoint", map_location)
    if obj["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: {str(path)!r} holds {obj['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"checkpoint: {str(path)!r} has format version {obj['version']}, this build reads <= {FORMAT_VERSION}"
        )
    return obj


# ------------------------------------------------------------------------------ inference bundle
def save_model(
    path: PathLike,
    model: torch.nn.Module,
    preprocessing: Mapping,
    metadata: Optional[Mapping] = None,
) -> Path:
    """Write ``model.pt``: everything inference needs to rebuild and apply a trained DeepAtlas.

    Args:
        path: output file (conventionally ``RUN_DIR/model.pt``).
        model: a :class:`deepatlas_fast.model.DeepAtlas` (its ``config`` dict holds the constructor
            arguments).
        preprocessing: how exams were prepared for the network (``spacing`` in mm, ``modality``,
            intensity window/percentiles, crop/input ``size`` in voxels, ...).
        metadata: label-free facts about the run (steps, ops, package version, data description).

    The file holds ``{"format", "version", "model_config", "state_dict", "template_shape",
    "preprocessing", "metadata"}``, loadable with ``torch.load(weights_only=True)``.
    """
    config = dict(getattr(model, "config", {}) or {})
    if "preprocessing" in config:  # DeepAtlas keeps its preprocessing in its constructor arguments
        config["preprocessing"] = dict(preprocessing)
    atlas = getattr(model, "atlas", None)
    template_shape = list(atlas.shape[2:]) if isinstance(atlas, torch.Tensor) else config.get("template_shape")
    payload = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "model_config": _plain(config),
        "state_dict": _cpu(dict(model.state_dict())),
        "template_shape": None if template_shape is None else [int(s) for s in template_shape],
        "preprocessing": _plain(dict(preprocessing)),
        "metadata": _plain(dict(metadata or {})),
    }
    return atomic_save(payload, path)


def read_model(path: PathLike, map_location="cpu") -> dict:
    """The raw ``model.pt`` dict (see :func:`save_model`), validated; no model is built."""
    obj = _load(path, "model", map_location)
    if obj["format"] != MODEL_FORMAT:
        raise ValueError(f"model: {str(path)!r} holds {obj['format']!r}, expected {MODEL_FORMAT!r}")
    return obj


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", with_metadata: bool = False):
    """Rebuild the trained :class:`~deepatlas_fast.model.DeepAtlas` from ``model.pt``.

    Args:
        path: a ``model.pt`` written by training.
        device: where to put the model (default ``"cpu"``).
        with_metadata: also return the bundle's ``{"preprocessing", "metadata", "template_shape",
            "model_config"}``.

    Returns:
        the model in eval mode, its convolutions in the device's preferred layout
        (:func:`~deepatlas_fast.model.preferred_memory_format`), with the bundle's ``preprocessing`` dict
        attached as ``model.preprocessing``; or ``(model, info)`` when ``with_metadata``.
    """
    from .model import DeepAtlas, preferred_memory_format, set_convolution_memory_format

    obj = read_model(path)
    config = dict(obj["model_config"])
    config.setdefault("locate", False)  # model files written before the anchor head existed
    config.setdefault("grid", "corners")  # ... and before the grid option
    config.setdefault("frame", "grid")  # ... and before the frame option
    model = DeepAtlas(**config)
    missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"model: {str(path)!r} does not match DeepAtlas({obj['model_config']}): "
            f"missing keys {list(missing)}, unexpected keys {list(unexpected)}"
        )
    model = set_convolution_memory_format(model.to(device).eval(), preferred_memory_format(device))
    model.preprocessing = dict(obj.get("preprocessing") or {})
    if with_metadata:
        info = {k: obj.get(k) for k in ("preprocessing", "metadata", "template_shape", "model_config")}
        return model, info
    return model


def _plain(obj):
    """Coerce tuples/numpy scalars/paths into types ``weights_only`` loading accepts."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, bool):
        return obj
    for kind in (int, float, str):  # exact builtins (e.g. torch.__version__ is a str subclass)
        if isinstance(obj, kind):
            return kind(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a weights_only file: {obj!r}")
