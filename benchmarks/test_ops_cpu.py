"""pytest-benchmark cases: each op (forward + backward) on each of our backends that runs here (the C++
``cpu`` kernels, the ``reference``; on a GPU ``cuda``/``triton``) against its stock-PyTorch baseline on the
same inputs. Finiteness checks are off (as in gpu_report.py): the kernels are timed, not the validation.
CPU-sized by default; run with

    .venv/bin/python -m pytest benchmarks/test_ops_cpu.py --benchmark-columns=median,iqr,rounds \
        --benchmark-json=out.json && .venv/bin/python benchmarks/table.py out.json

``DEEPATLAS_BENCH_SIZE`` sets the cube side (default 32). Never run by CI (tests/ only).
"""

import os
import sys

import pytest
import torch

import deepatlas_fast as da

sys.path.insert(0, os.path.dirname(__file__))
import baselines  # noqa: E402

SIZE = int(os.environ.get("DEEPATLAS_BENCH_SIZE", "32"))
SHAPE = (SIZE, SIZE, SIZE)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(seed=0):
    from deepatlas_fast.tour import blob_volume, smooth_map

    g = torch.Generator().manual_seed(seed)
    vol = blob_volume(SHAPE, g).to(DEVICE)
    coords = smooth_map(SHAPE, g).to(DEVICE)
    return vol, coords


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]

    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        out.sum().backward()
        synchronize()

    return step


def cases():
    vol, coords = inputs()
    moved = da.sample(vol, coords).detach()
    disp = 0.3 * (coords - da.identity_coords(SHAPE, device=DEVICE))
    # name: (op, ours, stock baseline, inputs that receive gradients)
    return {
        "sample_c1_coords_grad": ("sample", lambda c: da.sample(vol, c), lambda c: baselines.sample(vol, c), (coords,)),
        "sample_c1_both_grads": ("sample", da.sample, baselines.sample, (vol, coords)),
        "lncc_k9": ("lncc", lambda a, b: da.lncc(a, b, 9), lambda a, b: baselines.lncc(a, b, 9), (vol, moved)),
        "jacobian_var": ("jacobian_var", da.jacobian_var, baselines.jacobian_var, (coords,)),
        "invert_displacement_8": (
            "invert_displacement", lambda d: da.invert_displacement(d)[0], baselines.invert_displacement, (disp,)),
    }


@pytest.mark.parametrize("impl", ["cpu", "cuda", "triton", "reference", "stock"])
@pytest.mark.parametrize("name", list(cases()))
def test_op(benchmark, name, impl):
    op, ours, stock, tensors = cases()[name]
    if impl == "stock" and name.startswith("lncc"):
        pytest.importorskip("monai", reason="the LNCC baseline is MONAI's loss")
    if impl != "stock" and impl not in da.available_backends(DEVICE) or (impl != "stock" and op not in da.available_backends(DEVICE)[impl]):
        pytest.skip(f"backend {impl} does not run {op} on {DEVICE} in this build")
    if impl == "stock":
        fn = stock
    else:
        def fn(*args, _ours=ours, _impl=impl):
            with da.use_backend(_impl):
                return _ours(*args)
    benchmark.group = f"{name} {SIZE}^3 {DEVICE}"
    benchmark.extra_info.update(backend=impl, torch=torch.__version__, threads=torch.get_num_threads())
    da.set_check_finite(False)
    try:
        benchmark.pedantic(fwd_bwd(fn, *tensors), rounds=5, warmup_rounds=1)
    finally:
        da.set_check_finite(True)
