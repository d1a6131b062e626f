"""Argument checks shared by the public ops. Every error names the argument and says what was
expected and what was received. Structural checks read only metadata; the finiteness check reads
the data (one reduction and a host sync) and can be switched off for speed."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FULL_DTYPES = (torch.float32, torch.float64)

_check_finite = os.environ.get("DEEPATLAS_FAST_CHECK_FINITE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_check_finite(enabled: bool) -> None:
    """Turn the finiteness checks of the public ops on or off (default on; env
    ``DEEPATLAS_FAST_CHECK_FINITE=0`` starts with them off). Each check costs one pass over the
    input and, on a GPU, a host synchronisation; they are always skipped under ``torch.compile``
    and during CUDA-graph capture."""
    global _check_finite
    _check_finite = bool(enabled)


def check_finite_enabled() -> bool:
    return _check_finite


@contextmanager
def finite_checks(enabled: bool):
    """Context manager form of :func:`set_check_finite`."""
    previous = _check_finite
    set_check_finite(enabled)
    try:
        yield
    finally:
        set_check_finite(previous)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x,
    *,
    ndim: Optional[int] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    channels: Optional[int] = None,
    min_spatial: int = 1,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        layout = "[N, C, D, H, W]" if channels is None else f"[N, {channels}, D, H, W]"
        raise ValueError(f"{name} must be a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {str(x.dtype).replace('torch.', '')}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels in dim 1, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if ndim == 5 and min(x.shape[2:]) < min_spatial:
        raise ValueError(
            f"{name} must have every spatial size >= {min_spatial}, got spatial shape {tuple(x.shape[2:])}"
        )


def check_same_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")


def check_batch(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.shape[0] != ref.shape[0]:
        raise ValueError(
            f"{name} must have the batch size of {ref_name} ({ref.shape[0]}), got shape {tuple(x.shape)}"
        )


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_shape3(name: str, value, *, minimum: int) -> list[int]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{name} must be 3 sizes (D, H, W), got {value!r}")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        if s < minimum:
            raise ValueError(f"{name} must have every size >= {minimum}, got {tuple(value)}")
    return [int(s) for s in value]


def check_scale(name: str, value) -> Optional[list[float]]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    try:
        scale = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be None or 3 numbers (one per channel), got {value!r}") from None
    if len(scale) != 3:
        raise ValueError(f"{name} must hold 3 numbers (one per channel), got {len(scale)}: {value!r}")
    if not all(abs(s) < float("inf") for s in scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return scale


def _skip_data_checks(x: torch.Tensor) -> bool:
    if not _check_finite or torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_finite(name: str, x: torch.Tensor) -> None:
    if _skip_data_checks(x):
        return
    # A finite sum proves every element finite (a NaN or an infinity makes the sum NaN or infinite) in one
    # reduction without temporaries; torch.isfinite(x).all() made several of x's size (a bool map, abs).
    # Only a non-finite sum (bad input, or finite values overflowing the sum) pays for the exact count.
    if bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} must be finite, got {bad} NaN/inf value(s) of {x.numel()} "
            "(disable this check with deepatlas_fast.set_check_finite(False))"
        )
