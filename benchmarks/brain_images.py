"""Write synthesised MR-like brain images (one per label map) as NIfTI, for `deepatlas-fast train --images`.

    python benchmarks/brain_images.py --labelmaps ../shared/data/brain_labelmaps --out /tmp/brains --spacing 2

Each ``subject_XX.nii.gz`` label map is loaded in RAS+ at ``--spacing`` mm (nearest), cropped to its
head plus a margin, and turned into an image by :func:`deepatlas_fast.data.synth.synthesize_image`
(per-label Gaussian intensities from the priors, smoothing, bias field, noise; seed ``--seed + i``).
The images are written on that grid with its affine, so ``load_volume`` reads them back unchanged.
Use a ``--seed`` other than the evaluation's (``one_shot_dice.py --seed``, default 1000) so that the
images trained on are not the ones evaluated.
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv=None) -> list:
    import nibabel as nib

    from deepatlas_fast.data.synth import brain_subject_paths, load_brain_priors, load_brain_subject, synthesize_image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelmaps", required=True, help="folder of subject_*.nii.gz label maps and priors")
    parser.add_argument("--out", required=True, help="folder for the images (created)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of subject 1 (then +1 per subject)")
    args = parser.parse_args(argv)

    priors = load_brain_priors(args.labelmaps)
    os.makedirs(args.out, exist_ok=True)
    written = []
    for i, path in enumerate(brain_subject_paths(args.labelmaps)):
        labels = load_brain_subject(path, spacing=args.spacing, crop=True, margin=4)
        image = synthesize_image(labels, priors, torch.Generator().manual_seed(args.seed + i))
        stem = os.path.basename(path).split(".nii")[0]
        target = os.path.join(args.out, f"{stem}_t1.nii.gz")
        nib.save(nib.Nifti1Image(image.numpy(), labels.affine), target)
        written.append(target)
        print(f"{target}: {tuple(image.shape)} at {args.spacing} mm", flush=True)
    return written


if __name__ == "__main__":
    main()
