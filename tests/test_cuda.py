"""CUDA-only checks, for the GPU machine: no host-device sync inside step()."""

import pytest
import torch
from parity import clone_params, grads, make_params, set_grads

import fusedopt
from fusedopt import backends

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lr_kind", ["float", "tensor", "noam"])
@pytest.mark.parametrize("cls", ["AdamW", "Adam", "RMSprop"])
def test_step_never_syncs(backend, lr_kind, cls):
    reason = backends.unavailable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    params = clone_params(
        make_params(device="cuda") + make_params(dtype=torch.bfloat16, device="cuda")
    )
    lr = {
        "float": 1e-3,
        "tensor": torch.tensor(1e-3, device="cuda"),
        "noam": fusedopt.Noam(64, 10),
    }[lr_kind]
    kw = dict(amsgrad=True) if cls != "RMSprop" else dict(centered=True, momentum=0.9)
    opt = getattr(fusedopt, cls)(params, lr=lr, backend=backend, **kw)
    all_grads = [[g.cuda() if g is not None else None for g in grads(k, params)] for k in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(4):  # the first step creates state and builds the metadata tables
            set_grads(params, all_grads[k])
            opt.step()
            if lr_kind == "float":
                opt.param_groups[0]["lr"] *= 0.9  # a new lr is uploaded without a sync too
            opt.get_last_lr()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(float(opt.state[p]["step"]) == 4 for p in params)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensor_beyond_2_31_elements(backend):
    """64-bit offsets: every element of a 2^31 + 64-element bf16 tensor gets the same update
    (identical inputs everywhere), including those past 2^31, where int32 indexing would wrap."""
    reason = backends.unavailable(backend, "cuda")
    if reason:
        pytest.skip(reason)
    n = 2**31 + 64
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 2:
        pytest.skip(f"needs {5 * n * 2 / 2**30:.0f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.full_like(p, 0.25)
    opt = fusedopt.AdamW([p], lr=1e-2, backend=backend)
    for _ in range(2):
        opt.step()
    head = p[:64].detach().clone()
    assert not torch.equal(head, torch.full_like(head, 0.5)), "the step should change p"
    for start in (2**31 - 64, 2**31, n - 64):
        assert torch.equal(p[start : start + 64].detach(), head), start
        assert torch.equal(
            opt.state[p]["exp_avg"][start : start + 64], opt.state[p]["exp_avg"][:64]
        )
