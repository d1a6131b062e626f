"""Loading of the optional compiled extension ``deepatlas_fast._C``."""

from __future__ import annotations

import importlib
from typing import Optional

_state: dict = {}


def load_extension() -> tuple[Optional[object], Optional[str]]:
    """``(module, None)`` when the C++ extension loads, else ``(None, reason)``."""
    if "result" not in _state:
        try:
            module = importlib.import_module("deepatlas_fast._C")
            _state["result"] = (module, None)
        except ImportError as error:
            _state["result"] = (None, f"{type(error).__name__}: {error}")
    return _state["result"]
