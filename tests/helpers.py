"""Random inputs shared by the tests (CPU generators, moved to the device afterwards)."""

from __future__ import annotations

import math

import torch

from deepatlas_fast.coords import identity_coords


def g(seed: int) -> torch.Generator:
    """A seeded CPU generator (tests draw on the CPU and move tensors afterwards)."""
    return torch.Generator().manual_seed(seed)


def rand_coords(n, shape, generator, *, spread=1.3, dtype=torch.float64, device="cpu", borders=True):
    """Coordinates uniform in [-spread, spread] (out of range included), with some exact borders."""
    coords = (torch.rand(n, 3, *shape, generator=generator, dtype=dtype) * 2 - 1) * spread
    if borders:
        flat = coords.view(-1)
        picks = torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),), generator=generator)
        flat[picks] = torch.tensor([-1.0, 1.0], dtype=dtype)[torch.randint(0, 2, picks.shape, generator=generator)]
    return coords.to(device)


def rotation(angles):
    """3x3 rotation from three angles (radians) about the D, H, W axes."""
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]], dtype=torch.float64)
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]], dtype=torch.float64)
    return rx @ ry @ rz


def smooth_map(n, shape, seed, amplitude, dtype=torch.float64, *, stretch=1.0, displacement=False):
    """``stretch`` x identity plus a smooth random displacement (normalised units; 27 random control values
    per channel, interpolated), or the displacement alone (``displacement``)."""
    coarse = torch.randn(n, 3, 3, 3, 3, generator=g(seed), dtype=torch.float64) * amplitude
    disp = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    if displacement:
        return disp.to(dtype)
    return (stretch * identity_coords(tuple(shape), batch=n, dtype=torch.float64) + disp).to(dtype)


def cuda_and_reference_gradients(op, *inputs):
    """The gradients of op(*inputs) (weighted by ones) with respect to every input, through the cuda backend
    and through the reference backend: ``(cuda grads, reference grads)``."""
    import deepatlas_fast as da

    grads = {}
    for backend in ("cuda", "reference"):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with da.use_backend(backend):
            out = op(*leaves)
            grads[backend] = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return grads["cuda"], grads["reference"]


def _assert_backward_near(ours, expected, dtype):
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    scale = max(expected.abs().max().item(), 1.0)
    assert ours.dtype == dtype and ours.shape == expected.shape
    torch.testing.assert_close(ours.double().cpu(), expected, rtol=rel, atol=rel * scale)


def check_invert_backward(backward, coords, out_shape, seed, device, min_valid=0.2):
    """A raw invert backward (grad, coords, inverse, valid) against the reference's, at the reference's
    solution of invert(coords, out_shape); returns ours."""
    from deepatlas_fast.reference import inversion as reference

    inverse, valid = reference.invert_forward(coords.double(), out_shape, 8, 0.05)
    assert valid.float().mean() >= min_valid
    grad = torch.randn(inverse.shape, generator=g(seed), dtype=torch.float64)
    expected = reference.invert_backward(grad, coords.double(), inverse, valid)
    dtype = coords.dtype
    ours = backward(grad.to(device, dtype), coords.to(device), inverse.to(device, dtype), valid.to(device))
    _assert_backward_near(ours, expected, dtype)
    return ours


def check_invert_displacement_backward(backward, disp, seed, device):
    """A raw invert_displacement backward (grad, disp, inverse_disp, valid) against the reference's."""
    from deepatlas_fast.reference import inversion as reference

    inverse, valid = reference.invert_displacement_forward(disp.double(), 8, 0.05)
    assert valid.float().mean() > 0.5
    grad = torch.randn(inverse.shape, generator=g(seed), dtype=torch.float64)
    expected = reference.invert_displacement_backward(grad, disp.double(), inverse, valid)
    dtype = disp.dtype
    ours = backward(grad.to(device, dtype), disp.to(device), inverse.to(device, dtype), valid.to(device))
    _assert_backward_near(ours, expected, dtype)


def affine_coords(matrix, offset, shape, dtype=torch.float64):
    """coords(p) = matrix @ p + offset on the source grid ``shape`` (normalised units)."""
    ident = identity_coords(shape, dtype=torch.float64)
    field = torch.einsum("ij,njdhw->nidhw", matrix, ident) + torch.as_tensor(offset, dtype=torch.float64).view(1, 3, 1, 1, 1)
    return field.to(dtype)


def smooth_displacement(shape, generator, amplitude, *, batch=1, waves=3, dtype=torch.float64):
    """A sum of low-frequency sinusoids, ``[batch, 3, *shape]``, max amplitude about ``amplitude``."""
    ident = identity_coords(shape, batch=batch, dtype=torch.float64)
    disp = torch.zeros_like(ident)
    for _ in range(waves):
        freq = torch.rand(batch, 3, 3, generator=generator, dtype=torch.float64) * 2.0 + 0.5
        phase = torch.rand(batch, 3, 1, 1, 1, generator=generator, dtype=torch.float64) * 2 * math.pi
        arg = torch.einsum("nkj,njdhw->nkdhw", freq, ident) + phase
        disp = disp + torch.sin(arg) * (amplitude / waves)
    return disp.to(dtype)


def covering_map(src, generator, *, batch=1, amplitude=0.03, dtype=torch.float64):
    """A smooth map whose image strictly contains the target cube [-1, 1]^3 (every target point valid)."""
    base = affine_coords(rotation([0.05, -0.04, 0.03]) * 1.3, [0.02, -0.03, 0.01], src)
    return (base.expand(batch, -1, -1, -1, -1) + smooth_displacement(src, generator, amplitude, batch=batch)).to(dtype)


# ------------------------------------------------------------------------------------ NIfTI test files
def write_nifti(path, array, affine, dtype=None) -> str:
    """Write ``array`` with ``affine`` (sform and qform, code 1) as NIfTI; returns the path."""
    import nibabel as nib
    import numpy as np

    data = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def identity_model_file(path, spacing, shift=None) -> str:
    """An untrained (exactly identity) DeepAtlas saved at ``spacing`` mm; ``shift``: a constant added to
    the coordinates (normalised units, per template axis) through the coarsest head's bias."""
    from deepatlas_fast.checkpoint import save_model
    from deepatlas_fast.model import DeepAtlas

    model = DeepAtlas(base=4, levels=2, features=0, template_shape=(8, 8, 8))
    if shift is not None:
        with torch.no_grad():
            model.coordnet.heads[-1].bias.copy_(torch.tensor(shift) / model.coordnet.residual_scale)
    save_model(path, model, preprocessing={"spacing": spacing, "modality": "ct"})
    return str(path)


def rotation4(ax, ay, az):
    """4x4 homogeneous rotation (radians about x, then y, then z)."""
    import numpy as np

    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    r = np.eye(4)
    r[:3, :3] = (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
                 @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]))
    return r


def stored_variant(kind, array, affine):
    """The same exam stored another way: ``(array, affine)`` of the file (ras, flipped = LPS, lia,
    oblique = grid rotated in the scanner, anisotropic = every other S slice)."""
    import nibabel as nib
    import numpy as np

    if kind == "ras":
        return array, affine
    if kind in ("flipped", "lia"):  # same world positions
        codes = {"flipped": "LPS", "lia": "LIA"}[kind]
        axcodes2ornt = nib.orientations.axcodes2ornt
        ornt = nib.orientations.ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
        img = nib.Nifti1Image(array, affine).as_reoriented(ornt)
        return np.asarray(img.dataobj), img.affine
    if kind == "oblique":
        return array, rotation4(0.3, -0.2, 0.25) @ affine
    if kind == "anisotropic":
        return array[:, :, ::2], affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    raise ValueError(kind)


def phantom_arrays(shape, spacing, seed=3):
    """A phantom as stored in a file: ``(image float32 HU, labels int16, affine)`` numpy arrays."""
    import numpy as np

    from deepatlas_fast.data.phantoms import phantom_subject

    image, labels, affine = phantom_subject(seed, shape=shape, spacing=spacing)
    return image.numpy(), labels.numpy().astype(np.int16), affine


def reference_files(folder, image, labels, affine, spacing) -> dict:
    """A labelled reference written as NIfTI (image, labels as int16) plus an identity model file at
    ``spacing``: ``{"image", "labels", "model", "tmp"}``."""
    import numpy as np

    return {
        "image": write_nifti(folder / "ref.nii.gz", image, affine),
        "labels": write_nifti(folder / "ref_labels.nii.gz", np.asarray(labels).astype(np.int16), affine),
        "model": identity_model_file(folder / "model.pt", list(spacing)),
        "tmp": folder,
    }
