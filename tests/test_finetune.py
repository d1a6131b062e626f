"""finetune: semi-supervised fine-tuning of the CoordNet on a few labelled exams (API and command).

Tiny phantoms (16^3 at 24 mm) from an identity model file: propagating labels between different
phantoms is poor at the start (the identity ignores anatomy), and the soft-Dice objective must improve it.
"""

import numpy as np
import pytest
import torch

import deepatlas_fast as da

nib = pytest.importorskip("nibabel")

import deepatlas_fast.segment as seg  # noqa: E402
from deepatlas_fast.checkpoint import load_model, read_model  # noqa: E402
from deepatlas_fast.cli import main  # noqa: E402
from deepatlas_fast.data.io import volume_from_array  # noqa: E402
from deepatlas_fast.data.phantoms import phantom_subject  # noqa: E402
from deepatlas_fast.finetune import finetune, propagation_loss, save_finetuned  # noqa: E402
from deepatlas_fast.propagate import dice, mean_dice  # noqa: E402
from helpers import identity_model_file, write_nifti  # noqa: E402

SHAPE = (16, 16, 16)
SPACING = 24.0
STEPS, LR = 40, 2e-3


def _vols(seed):
    image, labels, affine = phantom_subject(seed, shape=SHAPE, spacing=SPACING)
    return volume_from_array(image, affine), volume_from_array(labels, affine, labels=True)


def _dice(model, reference, target) -> float:
    atlas = seg.build_reference(model, [reference])
    return mean_dice(dice(seg.segment(model, atlas, target[0]).labels.data, target[1].data))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft")
    path = identity_model_file(folder / "m.pt", [SPACING] * 3)
    labelled = [_vols(s) for s in range(4)]
    held_out = _vols(5)
    before = load_model(path)
    model = finetune(load_model(path), labelled, [_vols(4)[0]], steps=STEPS, lr=LR, seed=1)
    return {"path": path, "labelled": labelled, "held_out": held_out, "before": before, "after": model, "folder": folder}


def test_loss_decreases(tuned):
    losses = tuned["after"].finetune_info["losses"]
    assert len(losses) == STEPS
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05


def test_dice_improves_on_held_in_exams(tuned):
    ref, held_in = tuned["labelled"][0], tuned["labelled"][1:]
    before = np.mean([_dice(tuned["before"], ref, t) for t in held_in])
    after = np.mean([_dice(tuned["after"], ref, t) for t in held_in])
    out_before = _dice(tuned["before"], ref, tuned["held_out"])
    out_after = _dice(tuned["after"], ref, tuned["held_out"])
    print(f"held-in Dice {before:.3f} -> {after:.3f}; held-out {out_before:.3f} -> {out_after:.3f}")
    assert after > before + 0.05


def test_gradients_reach_the_coordnet(tuned):
    model = load_model(tuned["path"])
    (xa, la), (xb, lb) = tuned["labelled"][:2]
    classes = torch.unique(torch.cat([la.data.reshape(-1), lb.data.reshape(-1), torch.zeros(1, dtype=torch.int64)]))
    onehot = [torch.nn.functional.one_hot(torch.searchsorted(classes, l.data.long()), len(classes))
              .permute(3, 0, 1, 2)[None].float() for l in (la, lb)]
    ca, cb = (model.coordnet(seg.exam_intensities(model, x)[None, None], bound=True) for x in (xa, xb))
    propagation_loss(ca, onehot[0], cb, onehot[1], SHAPE).backward()
    grads = [p.grad for p in model.coordnet.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    # through the splat (c_a) as well as through the read (c_b)
    ca2 = ca.detach().requires_grad_(True)
    propagation_loss(ca2, onehot[0], cb.detach(), onehot[1], SHAPE).backward()
    assert float(ca2.grad.abs().sum()) > 0


def test_saved_model_loads_and_segments(tuned):
    out = save_finetuned(tuned["folder"] / "tuned.pt", tuned["after"], {"note": "kept"})
    model, info = load_model(out, with_metadata=True)
    assert info["preprocessing"]["spacing"] == [SPACING] * 3
    assert info["metadata"]["note"] == "kept"
    assert info["metadata"]["finetune"]["steps"] == STEPS
    result = seg.segment(model, seg.build_reference(model, [tuned["labelled"][0]]), tuned["labelled"][1][0])
    assert result.labels.shape == SHAPE


def test_deterministic_with_a_seed(tuned):
    labelled = tuned["labelled"][:3]
    a = finetune(load_model(tuned["path"]), labelled, steps=3, lr=LR, seed=7).finetune_info["losses"]
    b = finetune(load_model(tuned["path"]), labelled, steps=3, lr=LR, seed=7).finetune_info["losses"]
    assert a == b


def test_one_labelled_exam_is_an_error(tuned):
    with pytest.raises(ValueError, match="at least 2 labelled"):
        finetune(load_model(tuned["path"]), tuned["labelled"][:1], steps=1)


def _files(folder, seeds):
    out = []
    for s in seeds:
        image, labels, affine = phantom_subject(s, shape=SHAPE, spacing=SPACING)
        out.append((write_nifti(folder / f"x{s}.nii.gz", image.numpy(), affine),
                    write_nifti(folder / f"l{s}.nii.gz", labels.numpy().astype(np.int16), affine)))
    return out


def test_cli_end_to_end(tmp_path, capsys):
    model = identity_model_file(tmp_path / "m.pt", [SPACING] * 3)
    (x0, l0), (x1, l1), (x2, _) = _files(tmp_path, [0, 1, 2])
    out = str(tmp_path / "tuned.pt")
    rc = main(["finetune", "--model", model, "--reference", x0, "--reference-labels", l0, "--reference", x1,
               "--reference-labels", l1, "--images", x2, "-o", out, "--steps", "3", "--quiet", "--device", "cpu"])
    assert rc == 0
    meta = read_model(out)["metadata"]["finetune"]
    assert meta["steps"] == 3 and meta["references"] == [l0, l1] and meta["unlabelled"] == [x2]
    seg_out = str(tmp_path / "s.nii.gz")
    assert main(["segment", "--model", out, "--reference", x0, "--reference-labels", l0, "-i", x1, "-o", seg_out,
                 "--quiet", "--device", "cpu"]) == 0
    assert nib.load(seg_out).shape == SHAPE


def test_cli_bad_inputs(tmp_path, capsys):
    model = identity_model_file(tmp_path / "m.pt", [SPACING] * 3)
    (x0, l0), (x1, _) = _files(tmp_path, [0, 1])
    out = str(tmp_path / "tuned.pt")
    assert main(["finetune", "--model", model, "--reference", x0, "--reference-labels", l0, "-o", out,
                 "--quiet", "--device", "cpu"]) == 2
    assert "--reference: fine-tuning needs at least 2 labelled" in capsys.readouterr().err
    other = write_nifti(tmp_path / "other.nii.gz", np.zeros((12, 12, 12), np.int16), np.diag([30.0, 30, 30, 1]))
    assert main(["finetune", "--model", model, "--reference", x0, "--reference-labels", l0, "--reference", x1,
                 "--reference-labels", other, "-o", out, "--quiet", "--device", "cpu"]) == 2
    assert "--reference-labels:" in capsys.readouterr().err


def test_propagation_loss_equals_the_dense_one_hot_splat():
    """The label-indexed splat gives the dense one-hot splat's loss and gradients (it only skips the zeros)."""
    from deepatlas_fast import sample
    from deepatlas_fast.finetune import soft_dice_loss
    from deepatlas_fast.propagate import splat

    gen = torch.Generator().manual_seed(0)
    grid, template, classes = (7, 6, 5), (5, 6, 4), 4
    ids = [torch.randint(0, classes, grid, generator=gen) for _ in range(2)]
    onehot = [torch.nn.functional.one_hot(i, classes).permute(3, 0, 1, 2)[None].float() for i in ids]
    coords = [(0.9 * identity + 0.05 * torch.randn(identity.shape, generator=gen)).requires_grad_()
              for identity in (da.identity_coords(grid), da.identity_coords(grid))]
    loss = propagation_loss(coords[0], onehot[0], coords[1], onehot[1], template)
    grads = torch.autograd.grad(loss, coords)

    weight, total = splat(coords[0].reshape(1, 3, -1), onehot[0].reshape(1, classes, -1), template)
    dense = soft_dice_loss(sample((total / (weight + 1e-6)).unsqueeze(0), coords[1], "zeros"), onehot[1])
    torch.testing.assert_close(loss, dense)
    for ours, theirs in zip(grads, torch.autograd.grad(dense, coords)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
