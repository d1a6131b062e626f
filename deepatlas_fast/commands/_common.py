"""Small helpers shared by the command modules: argument types, shared options, errors that name the
command-line option they came from, output paths and files.

Only the standard library is imported here; anything heavy is imported inside the function that needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


# --- argument types and shared options -------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model RUN_DIR/model.pt`` (required), as every command that runs a trained model takes it."""
    parser.add_argument("--model", required=True, metavar="RUN_DIR/model.pt", help="a trained model")


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device {cpu,cuda}``, default None: cuda when available (see :func:`_device`)."""
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")


# --- errors ----------------------------------------------------------------------------------------------


def _option(option: str, load, *args):
    """``load(*args)`` with its ValueError prefixed by the command-line option it came from."""
    try:
        return load(*args)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


def _fail(command: str, exc: Exception) -> int:
    """Print ``deepatlas-fast COMMAND: error: ...`` to stderr; the exit status of a usage/data error (2)."""
    print(f"deepatlas-fast {command}: error: {exc}", file=sys.stderr)
    return 2


# --- options shared by several commands ------------------------------------------------------------------


def _device(args) -> str:
    """``--device``, default cuda when available."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_model_option(args):
    """The ``--model`` (on ``--device``, default cuda when available), checked to carry its spacing."""
    from ..checkpoint import load_model
    from ..segment import model_spacing

    model = _option("--model", load_model, args.model, _device(args))
    _option("--model", model_spacing, model)
    return model


def _reference_pairs(args, model) -> list:
    """The repeated ``--reference`` / ``--reference-labels`` pairs, loaded on the model's network grid:
    ``[(image Volume, labels Volume)]``; errors name the option (count mismatch, unreadable file, labels on
    another grid than their image)."""
    from .. import segment as seg
    from ..data.io import load_labels

    if len(args.reference_labels) != len(args.reference):
        raise ValueError(f"--reference-labels: got {len(args.reference_labels)} label map(s) for "
                         f"{len(args.reference)} --reference image(s); give one per reference, in the same order")
    pairs = []
    for image_path, labels_path in zip(args.reference, args.reference_labels):
        image = _option("--reference", seg.load_exam, model, image_path)
        pairs.append((image, _option("--reference-labels", load_labels, labels_path, image)))
    return pairs


def _template_shape(sizes: Optional[Sequence[int]]) -> Optional[tuple]:
    """``--template-shape`` as 3 sizes (one size: a cube); None when not given."""
    if sizes is None:
        return None
    if len(sizes) not in (1, 3) or min(sizes) < 2:
        raise ValueError(f"--template-shape: give 1 or 3 sizes >= 2, got {sizes}")
    return tuple(sizes) * (3 // len(sizes))


def _label_names(path: Optional[str]) -> Optional[dict]:
    """The ``--labels`` names table (errors naming ``--labels``); None when not given."""
    if not path:
        return None
    from ..data.io import read_label_table

    return read_label_table(path, "--labels")


# --- output paths and files ------------------------------------------------------------------------------


def _nifti_stem(path: str) -> Optional[str]:
    """The file name without its .nii/.nii.gz suffix; None when it has neither."""
    name = os.path.basename(path)
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_path(option: str, path: str) -> str:
    """``path`` when it names a NIfTI file (.nii / .nii.gz), else a ValueError naming ``option``."""
    if _nifti_stem(path) is None:
        raise ValueError(f"{option}: {path!r} must end in .nii or .nii.gz")
    return path


def _nifti_output(option: str, path: Optional[str], *inputs: str) -> None:
    """A ValueError naming ``option`` unless ``path`` (when given) is a .nii/.nii.gz file name that is
    not one of the ``inputs``."""
    if path is None:
        return
    _nifti_path(option, path)
    if os.path.abspath(path) in {os.path.abspath(p) for p in inputs}:
        raise ValueError(f"{option}: {path!r} would overwrite an input")


def _write_file(option: str, path: str, write, *args, **kwargs) -> str:
    """``write(*args, **kwargs)``, an OSError turned into a ValueError naming ``option``; returns ``path``."""
    try:
        write(*args, **kwargs)
    except OSError as exc:
        raise ValueError(f"{option}: cannot write {path!r} ({exc})") from None
    return path


def _dump_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_json(option: str, path: str, obj: dict) -> str:
    """``obj`` written to ``path`` as indented JSON (folders created), errors naming ``option``; returns ``path``."""
    return _write_file(option, path, _dump_json, path, obj)
