import pytest
import torch

from fusedopt import backends


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


@pytest.fixture
def require_backend():
    def check(name, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        reason = backends.unavailable(name, device)
        if reason is not None:
            pytest.skip(f"backend {name!r} unavailable on {device}: {reason}")

    return check
