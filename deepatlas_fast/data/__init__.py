"""Data: NIfTI I/O (canonical RAS+, resampling, write-back on the input grid), intensity normalisation,
the procedural phantom cohort, SynthSeg-style image synthesis and the training dataset.

nibabel is imported only by the functions that read or write files.
"""

from . import dataset, io, phantoms, synth
from .dataset import *  # noqa: F401,F403 - each submodule's __all__ is the package's API
from .io import *  # noqa: F401,F403
from .phantoms import *  # noqa: F401,F403
from .synth import *  # noqa: F401,F403

__all__ = [*io.__all__, *phantoms.__all__, *synth.__all__, *dataset.__all__]
