import sys
from pathlib import Path

import pytest
import torch

from fusedopt import backends

# `python3 -m pytest` (the README's test command) puts the working directory, the checkout, first
# on sys.path. There its top-level kernels/ (installed as fusedopt.kernels) shadows the PyPI
# package `kernels` that transformers 5 imports (hub_kernels: "cannot import name
# 'CUDAProperties' from 'kernels'"). fusedopt itself is installed: the checkout is not needed there.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: none on this machine (the GPU machine runs these)")


def backend_device_params(names=("torch", "triton", "cpu", "cuda")):
    """(backend, device) pairs: CPU ones run here, CUDA ones are marked for the GPU machine. The
    native backends are named after the one device each runs."""
    out = []
    for device in ("cpu", "cuda"):
        for name in names:
            if name in ("cpu", "cuda") and name != device:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            if name == "triton":
                marks.append(pytest.mark.triton)
            out.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return out


def need_backend(name, device):
    """Skip, with the reason, when backend ``name`` cannot run on ``device`` here. On a machine
    with a GPU a GPU backend that is missing is a failure: the tests it would run must not pass as
    skips. The one exception is Triton under TRITON_INTERPRET=1 (the CPU test command), which
    cannot run on CUDA tensors: run ``pytest -m cuda`` without it."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.unavailable(name, device)
    if reason is None:
        return
    message = f"backend {name!r} unavailable on {device}: {reason}"
    interpreted = name == "triton" and "TRITON_INTERPRET" in reason
    if torch.device(device).type == "cuda" and not interpreted:
        pytest.fail(f"{message} (this machine has a GPU: the GPU backends must be built)")
    pytest.skip(message)


@pytest.fixture
def require_backend():
    return need_backend
