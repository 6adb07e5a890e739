"""CUDA-only checks, for the GPU machine: no host-device sync inside step(), 64-bit offsets, and
kernels that run on the parameters' device whichever device is current."""

import pytest
import torch
from conftest import need_backend
from parity import assert_same, clone_params, grads, make_params, set_grads

import fusedopt

pytestmark = pytest.mark.cuda

GPU_BACKENDS = ["cuda", "triton", "torch"]


def _no_sync_steps(opt, params, all_grads, each_step=lambda k: None):
    """Steps ``opt`` under ``set_sync_debug_mode("error")``: any host-device sync raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k, gs in enumerate(all_grads):  # the first step creates state and builds the tables
            set_grads(params, gs)
            each_step(k)
            opt.step()
            opt.get_last_lr()
            opt.last_grad_norm
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor", "noam", "wsd", "multistep"])
@pytest.mark.parametrize("cls", ["AdamW", "Adam", "RMSprop", "SGD"])
def test_step_never_syncs(backend, lr_kind, cls):
    need_backend(backend, "cuda")
    params = clone_params(
        make_params(device="cuda") + make_params(dtype=torch.bfloat16, device="cuda")
    )
    lr = {
        "float": 1e-3,
        "tensor": torch.tensor(1e-3, device="cuda"),
        "noam": fusedopt.Noam(64, 10),
        "wsd": fusedopt.schedules.wsd(1e-3, 2, 3, total=10, decay_type="1-sqrt"),
        "multistep": fusedopt.schedules.multistep(1e-3, [1, 2], gamma=0.5),
    }[lr_kind]
    kw = {
        "RMSprop": dict(centered=True, momentum=0.9),
        "SGD": dict(momentum=0.9, nesterov=True, weight_decay=0.1),
    }.get(cls, dict(amsgrad=True))
    opt = getattr(fusedopt, cls)(params, lr=lr, backend=backend, **kw)
    all_grads = [[g.cuda() if g is not None else None for g in grads(k, params)] for k in range(4)]

    def new_lr(k):
        if lr_kind == "float":
            opt.param_groups[0]["lr"] *= 0.9  # a new lr is uploaded without a sync too

    _no_sync_steps(opt, params, all_grads, new_lr)
    assert all(float(opt._step_of(p)) == 4 for p in params)


FEATURES = {
    "stochastic": dict(dtype=torch.bfloat16, kw=dict(stochastic_rounding=True)),
    "master": dict(dtype=torch.bfloat16, kw=dict(master_weights=True)),
    "bf16-state": dict(dtype=torch.float32, kw=dict(state_dtype=torch.bfloat16)),
    "clip": dict(dtype=torch.float32, kw=dict(max_grad_norm=0.5)),
    "gradscaler": dict(dtype=torch.float32, kw=dict(max_grad_norm=0.5), scaler=True),
}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop", "SGD"])
def test_training_features_never_sync(backend, feature, cls):
    """Stochastic rounding, master weights, bf16 state, clipping and GradScaler (an inf step
    included) add no sync either, on every GPU backend."""
    need_backend(backend, "cuda")
    spec = FEATURES[feature]
    params = clone_params(make_params(dtype=spec["dtype"], device="cuda"))
    opt = getattr(fusedopt, cls)(params, lr=1e-3, backend=backend, **spec["kw"])
    all_grads = [[g.cuda() if g is not None else None for g in grads(k, params)] for k in range(4)]

    def scale(k):
        if spec.get("scaler"):
            opt.grad_scale = torch.full((), 2.0, device="cuda")
            opt.found_inf = torch.full((), float(k == 2), device="cuda")  # step 2 is skipped

    _no_sync_steps(opt, params, all_grads, scale)
    expected = 3 if spec.get("scaler") else 4
    assert all(float(opt._step_of(p)) == expected for p in params if p.numel())


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tensor_beyond_2_31_elements(backend):
    """64-bit offsets: every element of a 2^31 + 64-element bf16 tensor gets the same update
    (identical inputs everywhere), including those past 2^31, where int32 indexing would wrap."""
    need_backend(backend, "cuda")
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_parameters_on_another_gpu(backend, cls):
    """Parameters on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (launched on the
    current device they would fault on cuda:1's addresses or read them unordered) and match
    torch.optim there, with GradScaler and clipping."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    need_backend(backend, "cuda:1")
    torch.cuda.set_device(0)
    params = make_params(device="cuda:1")
    ref, ours = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, lr=1e-2, foreach=False)
    opt = getattr(fusedopt, cls)(ours, lr=1e-2, backend=backend, max_grad_norm=1e9)
    for k in range(4):
        gs = grads(k, params)
        set_grads(ref, gs)
        set_grads(ours, gs)
        opt.grad_scale = torch.ones((), device="cuda:1")
        opt.found_inf = torch.zeros((), device="cuda:1")
        ropt.step()
        opt.step()
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize("cuda:1")
    assert_same(ropt, ref, opt, ours)
