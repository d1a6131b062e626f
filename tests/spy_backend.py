"""A test backend: implements only ``sample`` (by delegating to the reference) and records calls."""

from deepatlas_fast.reference import sampling

DEVICES = {"cpu"}
IMPLEMENTS = frozenset({"sample"})
calls = []


def sample(vol, coords, padding):
    calls.append("sample")
    return sampling.sample(vol, coords, padding)


def sample_backward(grad, vol, coords, padding, need_vol, need_coords):
    calls.append(("sample_backward", need_vol, need_coords))
    return sampling.sample_backward(grad, vol, coords, padding, need_vol, need_coords)
