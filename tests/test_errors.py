"""Bad inputs raise ValueError/TypeError naming the argument, expected and received values."""

import pytest
import torch

import deepatlas_fast as da

VOL = torch.zeros(1, 2, 4, 5, 6)
COORDS = torch.zeros(1, 3, 3, 3, 3)
FIELD = torch.zeros(1, 3, 4, 4, 4)


def nan_like(x):
    y = x.clone()
    y.view(-1)[0] = float("nan")
    return y


CASES = [
    # sample / warp
    (lambda: da.sample(VOL[0], COORDS), ValueError, "vol must be a 5-D tensor"),
    (lambda: da.sample(VOL, COORDS[:, :2]), ValueError, "coords must have 3 channels"),
    (lambda: da.sample(VOL, COORDS[0]), ValueError, "coords must be a 5-D tensor"),
    (lambda: da.sample(VOL.long(), COORDS), TypeError, "vol must have dtype"),
    (lambda: da.sample(VOL, COORDS.half()), TypeError, "coords must have dtype"),
    (lambda: da.sample(VOL, torch.zeros(2, 3, 3, 3, 3)), ValueError, "coords must have the batch size of vol"),
    (lambda: da.sample(VOL, COORDS, "reflection"), ValueError, "padding must be one of"),
    (lambda: da.sample(VOL.numpy(), COORDS), TypeError, "vol must be a torch.Tensor"),
    (lambda: da.sample(VOL, nan_like(COORDS)), ValueError, "coords must be finite"),
    (lambda: da.sample(VOL, COORDS.to("meta")), ValueError, "coords must be on the same device as vol"),
    (lambda: da.sample(torch.zeros(1, 0, 4, 4, 4), COORDS), ValueError, "vol must not be empty"),
    (lambda: da.warp(VOL, nan_like(COORDS)), ValueError, "disp must be finite"),
    (lambda: da.warp(VOL, COORDS[:, :1]), ValueError, "disp must have 3 channels"),
    # lncc
    (lambda: da.lncc(VOL, VOL[:, :1]), ValueError, "b must have the shape of a"),
    (lambda: da.lncc(VOL, VOL.double()), TypeError, "b must have the dtype of a"),
    (lambda: da.lncc(VOL, VOL, kernel_size=4), ValueError, "kernel_size must be odd"),
    (lambda: da.lncc(VOL, VOL, kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (lambda: da.lncc(VOL, VOL, kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (lambda: da.lncc(VOL, VOL, kernel="triangular"), ValueError, "kernel must be one of"),
    (lambda: da.lncc(VOL, VOL, eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda: da.lncc(VOL, VOL, reduction="sum"), ValueError, "reduction must be one of"),
    (lambda: da.lncc(nan_like(VOL), VOL), ValueError, "a must be finite"),
    (lambda: da.lncc(VOL, nan_like(VOL)), ValueError, "b must be finite"),
    (lambda: da.lncc(VOL[0], VOL[0]), ValueError, "a must be a 5-D tensor"),
    # jacobian
    (lambda: da.jacobian_det(FIELD[:, :2]), ValueError, "field must have 3 channels"),
    (lambda: da.jacobian_det(FIELD.half()), TypeError, "field must have dtype"),
    (lambda: da.jacobian_det(FIELD, scale=[1.0, 2.0]), ValueError, "scale must hold 3 numbers"),
    (lambda: da.jacobian_det(FIELD, scale="abc"), TypeError, "scale must be None or 3 numbers"),
    (lambda: da.jacobian_det(FIELD, scale=[1.0, float("inf"), 1.0]), ValueError, "scale must be finite"),
    (lambda: da.jacobian_var(nan_like(FIELD)), ValueError, "field must be finite"),
    (lambda: da.jacobian_var(FIELD, normalized="yes"), TypeError, "normalized must be a bool"),
    # invert
    (lambda: da.invert(FIELD, (4, 4)), ValueError, "out_shape must be 3 sizes"),
    (lambda: da.invert(FIELD, (4, 1, 4)), ValueError, "out_shape must have every size >= 2"),
    (lambda: da.invert(FIELD, (4, 4.5, 4)), TypeError, "out_shape must hold ints"),
    (lambda: da.invert(FIELD, iters=-1), ValueError, "iters must be >= 0"),
    (lambda: da.invert(FIELD, tol=0), ValueError, "tol must be a finite number > 0"),
    (lambda: da.invert(torch.zeros(1, 3, 4, 1, 4)), ValueError, "coords must have every spatial size >= 2"),
    (lambda: da.invert(nan_like(FIELD)), ValueError, "coords must be finite"),
    (lambda: da.invert_displacement(FIELD[:, :2]), ValueError, "disp must have 3 channels"),
    (lambda: da.invert_displacement(nan_like(FIELD)), ValueError, "disp must be finite"),
]


@pytest.mark.parametrize("call,error,message", CASES, ids=[c[2] for c in CASES])
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_error_messages_show_what_was_received():
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 5, 6\)"):
        da.sample(VOL[0], COORDS)
    with pytest.raises(TypeError, match="got int64"):
        da.sample(VOL.long(), COORDS)


def test_direct_torch_ops_calls_are_validated_too():
    with pytest.raises(ValueError, match="coords must have 3 channels"):
        torch.ops.deepatlas_fast.sample(VOL, COORDS[:, :2], "border")


def test_finite_checks_can_be_switched_off():
    bad = nan_like(COORDS)
    with da.finite_checks(False):
        out = da.sample(VOL, bad)  # the user asked for no data checks: runs, NaN propagates
    assert out.shape == (1, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="coords must be finite"):
        da.sample(VOL, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_counts_every_kind_of_bad_value_and_passes_large_finite_values(dtype):
    """The check sums first (no temporaries): an infinity of either sign or a NaN anywhere fails with the
    exact count; finite values whose sum overflows (and +inf beside -inf, whose sum is NaN) are told apart
    by the exact pass."""
    big = torch.finfo(dtype).max
    vol = torch.full((1, 2, 4, 5, 6), big, dtype=dtype)
    assert da.lncc(vol, vol.clone()).dtype == torch.float32  # sum overflows, every value finite: no error
    for bad in ([float("inf")], [float("-inf")], [float("nan")], [float("inf"), float("-inf")]):
        a = torch.zeros_like(vol)
        a.view(-1)[: len(bad)] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(ValueError, match=f"a must be finite, got {len(bad)} NaN/inf"):
            da.lncc(a, vol)


def test_the_cpp_error_probe_tells_a_crash_from_a_raise(monkeypatch):
    """conftest's probe (which decides whether bad-input tests of CUDA code can run on a machine) reports a
    process killed by a signal, and only that."""
    import conftest

    for script, crashes in [("import ctypes; ctypes.string_at(0)", True), ("raise SystemExit(3)", False),
                            ("raise SystemExit(0)", False)]:
        monkeypatch.setattr(conftest, "_CPP_ERROR_PROBE", script)
        conftest._cpp_errors_kill_cuda_processes.cache_clear()
        assert conftest._cpp_errors_kill_cuda_processes() is crashes
    conftest._cpp_errors_kill_cuda_processes.cache_clear()
    conftest.skip_if_cpp_errors_kill_cuda_processes("cpu")  # never probes nor skips for the CPU
