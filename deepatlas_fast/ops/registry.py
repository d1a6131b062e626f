"""Backend registry: which implementation runs each op on each device.

Backends are ``reference`` (pure PyTorch, always present), ``triton``, ``cuda`` and ``cpu`` (C++).
A backend is a module providing, for each op it implements, ``<op>(...)`` and
``<op>_backward(...)`` with the signatures of :mod:`deepatlas_fast.ops.backend_reference`, plus
``DEVICES`` (device types it runs on) and ``IMPLEMENTS`` (op names).

Choice, highest priority first:
1. :func:`use_backend` context manager (process-wide while active, so the autograd engine's
   threads see it too);
2. :func:`set_backend`;
3. the environment variable ``DEEPATLAS_FAST_BACKEND``: ``triton`` (every op) or
   ``lncc=triton,sample=cuda`` (per op), read at import;
4. the default order per device type, :data:`DEFAULT_ORDER` (fastest measured first).

A requested backend that cannot run an op (not built, import failed, wrong device, op not
implemented) falls back to the default order with one :class:`BackendFallbackWarning` per
(op, backend, device type, reason); results are never silently wrong.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from contextlib import contextmanager
from types import ModuleType
from typing import Iterable, Optional, Union

BACKENDS = ("reference", "triton", "cuda", "cpu")
OPS = ("sample", "warp", "lncc", "jacobian_det", "jacobian_var", "invert", "invert_displacement")
ENV_VAR = "DEEPATLAS_FAST_BACKEND"

# Modules that provide each backend in this build. Kernel backends add themselves here when they land.
PROVIDERS: dict[str, str] = {
    "reference": "deepatlas_fast.ops.backend_reference",
    "triton": "deepatlas_fast.ops.backend_triton",
    "cpu": "deepatlas_fast.ops.backend_cpu",
    "cuda": "deepatlas_fast.ops.backend_cuda",
}

# Preference per device type; the first available backend implementing the op wins. Backends not
# provided by this build are skipped silently. Set from the measured tables in benchmarks/results (fastest
# first). On CUDA the C++ "cuda" kernels were fastest for every op at 256^3 on an H200, fwd+bwd
# (2026-11-27-h200-kernels.md: sample 2.20 vs 2.35 ms triton, coords-only 1.09 vs 1.19, lncc 7.3 vs 15.3,
# jacobian_var 1.58 vs 2.44, invert_displacement 9.7 vs 10.4) and pass the GPU tests; triton next, then
# the reference. On the CPU the C++ kernels beat stock PyTorch and the reference (2026-11-26-cpu-kernels.md).
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
FALLBACK_ORDER: tuple[str, ...] = ("reference",)


class BackendFallbackWarning(UserWarning):
    """A requested backend could not run an op; another backend ran it instead."""


_lock = threading.RLock()
_loaded: dict[str, Union[ModuleType, Exception]] = {}
_warned: set[tuple] = set()
_set: dict[str, str] = {}
_context_stack: list[dict[str, str]] = []


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must name a backend in {BACKENDS}, got {name!r}")
    return name


def _expand(name: Optional[str], ops: Union[None, str, Iterable[str]], source: str) -> dict[str, Optional[str]]:
    if name is not None:
        _check_name(name, source)
    if ops is None:
        selected = OPS
    else:
        selected = (ops,) if isinstance(ops, str) else tuple(ops)
        for op in selected:
            if op not in OPS:
                raise ValueError(f"ops must name ops in {OPS}, got {op!r}")
    return {op: name for op in selected}


def parse_env(value: Optional[str]) -> dict[str, str]:
    """``"triton"`` -> every op; ``"lncc=triton,sample=cuda"`` -> per op."""
    choices: dict[str, str] = {}
    if not value or not value.strip():
        return choices
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            op, name = (part.strip() for part in item.split("=", 1))
            if op not in OPS:
                raise ValueError(f"{ENV_VAR} names an unknown op {op!r}; ops are {OPS}")
            choices[op] = _check_name(name, ENV_VAR)
        else:
            for op in OPS:
                choices[op] = _check_name(item, ENV_VAR)
    return choices


_env = parse_env(os.environ.get(ENV_VAR))


def set_backend(name: Optional[str], ops: Union[None, str, Iterable[str]] = None) -> None:
    """Use backend ``name`` for ``ops`` (all ops when None) from now on; ``name=None`` restores
    the default choice for those ops."""
    with _lock:
        for op, choice in _expand(name, ops, "name").items():
            if choice is None:
                _set.pop(op, None)
            else:
                _set[op] = choice


@contextmanager
def use_backend(name: str, ops: Union[None, str, Iterable[str]] = None):
    """Run ``ops`` (all when None) on backend ``name`` inside the ``with`` block."""
    layer = {op: choice for op, choice in _expand(name, ops, "name").items() if choice is not None}
    with _lock:
        _context_stack.append(layer)
    try:
        yield
    finally:
        with _lock:
            _context_stack.remove(layer)


def requested_backend(op: str) -> Optional[str]:
    """The backend explicitly requested for ``op`` (context, then set_backend, then env), or None."""
    with _lock:
        for layer in reversed(_context_stack):
            if op in layer:
                return layer[op]
        return _set.get(op) or _env.get(op)


def _load(name: str) -> Union[ModuleType, Exception]:
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = importlib.import_module(PROVIDERS[name])
            except Exception as error:  # noqa: BLE001 - any import failure makes the backend unavailable
                _loaded[name] = error
        return _loaded[name]


def unavailable_reason(name: str, op: str, device_type: str) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on ``device_type``, or None if it can."""
    if name not in PROVIDERS:
        return f"backend {name!r} is not part of this build"
    module = _load(name)
    if isinstance(module, Exception):
        return f"backend {name!r} failed to load: {type(module).__name__}: {module}"
    devices = getattr(module, "DEVICES", None)
    if devices is not None and device_type not in devices:
        return f"backend {name!r} runs on {sorted(devices)}, not {device_type}"
    if op not in getattr(module, "IMPLEMENTS", ()):
        return f"backend {name!r} does not implement {op}"
    return None


def _warn_once(op: str, name: str, device_type: str, reason: str, used: str) -> None:
    key = (op, name, device_type, reason)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"deepatlas_fast.{op} on {device_type}: {reason}; using backend {used!r} instead",
        BackendFallbackWarning,
        stacklevel=4,
    )


def _default(op: str, device_type: str) -> str:
    broken = []
    chosen = "reference"
    for name in DEFAULT_ORDER.get(device_type, FALLBACK_ORDER):
        if name not in PROVIDERS:
            continue
        reason = unavailable_reason(name, op, device_type)
        if reason is None:
            chosen = name
            break
        if isinstance(_load(name), Exception):
            broken.append((name, reason))
    for name, reason in broken:  # a backend this build provides failed to load: say so once
        _warn_once(op, name, device_type, reason, chosen)
    return chosen


def backend_name(op: str, device_type: str) -> str:
    """The backend that runs ``op`` on ``device_type`` now, warning once if a request falls back."""
    requested = requested_backend(op)
    if requested is not None:
        reason = unavailable_reason(requested, op, device_type)
        if reason is None:
            return requested
        used = _default(op, device_type)
        _warn_once(op, requested, device_type, reason, used)
        return used
    return _default(op, device_type)


def backend_for(op: str, device_type: str) -> ModuleType:
    """The module implementing ``op`` on ``device_type`` (see :func:`backend_name`)."""
    name = backend_name(op, device_type)
    module = _load(name)
    if isinstance(module, Exception):
        raise RuntimeError(f"deepatlas_fast: backend {name!r} cannot run {op}: {module}") from module
    return module


def backend_module(name: str, op: str) -> ModuleType:
    """The module of backend ``name`` (a name :func:`backend_name` returned earlier), for ``op``."""
    module = _load(_check_name(name, "backend"))
    if isinstance(module, Exception):
        raise RuntimeError(f"deepatlas_fast: backend {name!r} cannot run {op}: {module}") from module
    return module


def get_backend(op: str, device: Union[str, "object"] = "cpu") -> str:
    """Name of the backend that would run ``op`` on ``device`` now."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    return backend_name(op, device_type)


def available_backends(device: Union[str, "object"] = "cpu") -> dict[str, list[str]]:
    """For each backend, the ops it can run on ``device`` in this build and environment."""
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    return {
        name: [op for op in OPS if unavailable_reason(name, op, device_type) is None] for name in BACKENDS
    }
