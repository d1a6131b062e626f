"""Data: NIfTI I/O (canonical RAS+, resampling, write-back on the input grid), intensity normalisation,
the procedural phantom cohort, SynthSeg-style image synthesis and the training dataset.

nibabel is imported only by the functions that read or write files.
"""

from .dataset import ImageDataset, PairBatchSampler, collate, pair_keys
from .io import (
    CT_WINDOW,
    MR_PERCENTILES,
    Volume,
    crop_to_foreground,
    crop_volume,
    detect_modality,
    foreground_mask,
    gaussian_smooth,
    load_labels,
    load_volume,
    normalize_intensity,
    read_label_table,
    resample_to_spacing,
    save_like,
    volume_from_array,
    write_label_table,
)
from .phantoms import PHANTOM_LABELS, phantom_cohort, phantom_seed, phantom_subject, write_phantom_cohort
from .synth import (
    BrainPriors,
    brain_eval_labels,
    brain_subject_paths,
    load_brain_priors,
    load_brain_subject,
    read_labels_table,
    synthesize_image,
)

__all__ = [
    "Volume",
    "load_volume",
    "load_labels",
    "volume_from_array",
    "save_like",
    "crop_volume",
    "crop_to_foreground",
    "normalize_intensity",
    "detect_modality",
    "foreground_mask",
    "gaussian_smooth",
    "resample_to_spacing",
    "write_label_table",
    "read_label_table",
    "CT_WINDOW",
    "MR_PERCENTILES",
    "PHANTOM_LABELS",
    "phantom_subject",
    "phantom_cohort",
    "phantom_seed",
    "write_phantom_cohort",
    "BrainPriors",
    "load_brain_priors",
    "load_brain_subject",
    "brain_subject_paths",
    "brain_eval_labels",
    "read_labels_table",
    "synthesize_image",
    "ImageDataset",
    "PairBatchSampler",
    "pair_keys",
    "collate",
]
