"""Fit a trained network further on whole exams, all of them in every step, without augmentation.

Where ``objective_ceiling.py`` optimises free per-exam fields (what the objective allows on these exams), this
optimises the network itself on the same objective and exams: full batch, whole volumes, no crops, no
augmentation, a fresh AdamW (1e-3, weight decay 1e-4 on the network, none on the atlas), gradient-norm
clipping at 1. It prints the one-shot Dice of exam 0's labels on the other exams of the first seed as it goes
(at the model's spacing; structures as in ``one_shot_dice.py``) and can save the fitted model, whose one-shot
Dice on other exams ``one_shot_dice.py`` then measures: does what the network fits carry over?

``--seeds`` takes several seeds: the brains' syntheses (or phantom cohorts) of each are fitted together, so
with brains the same anatomy comes in several appearances.

    python benchmarks/network_fit.py --model RUN/model.pt --brains ../shared/data/brain_labelmaps \\
        --seeds 0,100,200 --steps 60 --save FIT.pt
    python benchmarks/one_shot_dice.py --model FIT.pt --brains ../shared/data/brain_labelmaps --spacing 2 \\
        --no-registration      # held-out syntheses (seeds 1000-1009)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from deepatlas_fast.checkpoint import load_model, save_model
from deepatlas_fast.objective import LossWeights, deepatlas_loss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from objective_ceiling import load_exams, one_shot_dice  # noqa: E402


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds must not repeat a seed, got {text!r}")
    return seeds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model.pt of a training run")
    parser.add_argument("--brains", help="folder of brain label maps: fit the synthesised brains instead of phantoms")
    parser.add_argument("--subjects", type=int, default=10, help="exams per seed (default 10)")
    parser.add_argument("--seeds", type=_seeds, default=[0],
                        help="comma-separated synthesis / phantom cohort seeds, fitted together (default 0: the "
                             "training images of brain_images.py and of a phantom run with seed 0)")
    parser.add_argument("--data-spacing", type=float, default=2.0,
                        help="--brains: spacing (mm) the images are synthesised at before resampling (default 2)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW rate of network and atlas (default 1e-3)")
    parser.add_argument("--loss", default="{}", help='LossWeights fields as JSON, over {"folding": 10, "jacobian": 3}')
    parser.add_argument("--every", type=int, default=10, help="steps between Dice prints")
    parser.add_argument("--splat", type=int, default=64, help="template grid side of the Dice's label splat (default 64)")
    parser.add_argument("--save", help="write the fitted model here (a model.pt like training's)")
    args = parser.parse_args(argv)
    if args.subjects < 2:
        parser.error("--subjects must be >= 2 (the implicit term pairs exams, the Dice needs a target)")
    if args.steps < 0 or args.every < 1:
        parser.error("--steps must be >= 0 and --every >= 1")

    torch.manual_seed(0)
    model = load_model(args.model)
    spacing = float(model.preprocessing.get("spacing") or 12.0)
    subjects = load_exams(spacing, args.subjects, args.seeds, args.brains, args.data_spacing)
    images = torch.stack([image for image, _ in subjects])[:, None]
    labels = [lab for _, lab in subjects]
    num_labels = int(max(int(lab.max()) for lab in labels)) + 1
    weights = LossWeights.from_dict(dict({"folding": 10.0, "jacobian": 3.0}, **json.loads(args.loss)))
    with torch.no_grad():
        frames = torch.cat([model.coordnet.frame_of(image[None]) for image in images])
    model.train()
    network = [p for name, p in model.named_parameters() if name != "atlas"]
    optimiser = torch.optim.AdamW([{"params": network, "weight_decay": 1e-4},
                                   {"params": [model.atlas], "weight_decay": 0.0}], lr=args.lr)
    print(f"{images.shape[0]} exams ({len(args.seeds)} seeds x {args.subjects}) {tuple(images.shape[2:])} at "
          f"{spacing} mm, loss {weights.to_dict()}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        outputs = model(images, frame=frames)
        loss, terms = deepatlas_loss(model, images, weights, outputs=outputs)
        if step % args.every == 0 or step == args.steps:
            terms = {name: float(value.detach()) for name, value in terms.items()}
            first = outputs["coords_raw"][:args.subjects]
            print(f"step {step} ({time.perf_counter() - start:.0f} s): one-shot Dice "
                  f"{one_shot_dice(first, labels[:args.subjects], num_labels, args.splat):.3f}  loss {float(loss.detach()):.4f} "
                  f"explicit {terms['explicit']:.3f} implicit {terms['implicit']:.3f} "
                  f"jacobian {terms['jacobian']:.4f}", flush=True)
        if step < args.steps:
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
    if args.save:
        model.eval()
        save_model(args.save, model, preprocessing=model.preprocessing)
        print(f"fitted model written to {args.save}")


if __name__ == "__main__":
    main()
