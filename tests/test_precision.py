"""Low-precision options: fp32 master weights for bf16/fp16 parameters, bf16 optimizer state for
fp32 parameters, and stochastic rounding of bf16 parameters; every backend."""

import pytest
import torch
from conftest import backend_device_params
from parity import FP32, clone_params, grads, make_params, set_grads

import fusedopt

BACKENDS = backend_device_params()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop", "SGD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weights_follow_fp32(backend, device, cls, dtype, require_backend):
    """With master_weights=True the fp32 master takes exactly the fp32 update torch.optim makes
    from the same gradients, and the model's parameter is the master rounded to its dtype."""
    require_backend(backend, device)
    params = make_params(dtype=dtype, device=device)
    ref = clone_params(params, torch.float32)
    ours = clone_params(params)
    kw = {
        "AdamW": dict(lr=1e-2, weight_decay=0.1),
        "RMSprop": dict(lr=1e-3, momentum=0.9),
        "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
    }[cls]
    ropt = getattr(torch.optim, cls)(ref, **kw)
    opt = getattr(fusedopt, cls)(ours, backend=backend, master_weights=True, **kw)
    for k in range(5):
        gs = [g.to(dtype) for g in grads(k, params)]  # the low-precision grads, for both
        set_grads(ref, gs)
        set_grads(ours, gs)
        ropt.step()
        opt.step()
    for a, b in zip(ref, ours):
        master = opt.state[b]["master_param"]
        assert master.dtype == torch.float32 and b.dtype == dtype
        torch.testing.assert_close(master.cpu(), a.detach().cpu(), rtol=FP32["rtol"], atol=1e-7)
        assert torch.equal(b.detach(), master.to(dtype))
        for key, value in opt.state[b].items():
            if key not in ("step", "master_param"):
                assert value.dtype == torch.float32  # with a master, state defaults to fp32


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bf16_state_for_fp32_params(backend, device, require_backend):
    """state_dtype=torch.bfloat16: moments stored in bf16 (20 instead of 28 bytes per fp32
    parameter per step); the update is the fp32 math on the stored moments, so its error against
    the all-fp32 run is what the moments' rounding costs: about bf16's epsilon, relative."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1e-2)
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend, state_dtype=torch.bfloat16)
    for k in range(5):
        gs = grads(k, params)
        set_grads(ref, gs)
        set_grads(ours, gs)
        ropt.step()
        opt.step()
    for a, b in zip(ref, ours):
        assert opt.state[b]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[b]["exp_avg_sq"].dtype == torch.bfloat16
        # 5 updates of at most lr each, each off by ~2^-8 relative: well under 1e-3 absolute
        torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), rtol=0, atol=1e-3)
        # m was rounded to bf16 at each of the 5 steps, each time by at most half an ulp (2^-9)
        # of its size then, and the decayed errors add up: at most 5 * 2^-9 < 2^-6 of the
        # largest size m had, which bounds the error even where m has since cancelled to ~0
        m_ref = ropt.state[a]["exp_avg"].cpu()
        torch.testing.assert_close(
            opt.state[b]["exp_avg"].float().cpu(),
            m_ref,
            rtol=2**-6,
            atol=2**-6 * (m_ref.abs().amax().item() if m_ref.numel() else 0.0),
        )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend, device, require_backend):
    """Updates far below half a bf16 ulp: round-to-nearest never moves the parameter (stuck at
    1.0), stochastic rounding moves it by the right amount on average."""
    require_backend(backend, device)
    n, steps, lr = 4096, 20, 1e-4
    results = {}
    for sr in (False, True):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
        opt = fusedopt.Adam([p], lr=lr, backend=backend, stochastic_rounding=sr)
        for _ in range(steps):
            p.grad = torch.ones_like(p)  # Adam's step is then -lr every time
            opt.step()
        results[sr] = p.detach().float()
    assert torch.equal(results[False], torch.ones(n, device=device))
    expected = 1.0 - steps * lr
    # per element the result is a random walk over bf16 values 2^-8 apart: the mean of 4096 has a
    # standard error well under 1e-4
    assert abs(results[True].mean().item() - expected) < 3e-4
    assert results[True].unique().numel() > 1


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_stochastic_rounding_is_deterministic(backend, device, require_backend):
    """The noise is a hash of (element, tensor, step): the same run gives the same bits."""
    require_backend(backend, device)
    runs = []
    for _ in range(2):
        ps = clone_params(make_params(dtype=torch.bfloat16, device=device))
        opt = fusedopt.AdamW(ps, lr=1e-3, backend=backend, stochastic_rounding=True)
        for k in range(3):
            set_grads(ps, grads(k, ps))
            opt.step()
        runs.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_precision_options_validated():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fusedopt.AdamW([p], state_dtype=torch.int8)
    with pytest.raises(ValueError, match="Choose one"):
        fusedopt.AdamW([p], master_weights=True, stochastic_rounding=True)


def _train(make_opt, dtype, steps=120, seed=0):
    """A small regression MLP; returns the loss curve."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model = model.to(dtype)
    x = torch.randn(256, 16)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2]
    opt = make_opt(model.parameters())
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_low_precision_modes_converge_like_fp32(backend, require_backend):
    """A small model's loss curve in each mode stays within 15% of fp32 training's (relative to
    the loss, at every point of the last half of the run), where plain bf16 training need not."""
    require_backend(backend, "cpu")
    steps = 40 if backend == "triton" else 120  # the interpreter is slow
    fp32 = _train(lambda ps: torch.optim.AdamW(ps, lr=3e-3), torch.float32, steps)
    modes = {
        "bf16 state": (torch.float32, dict(state_dtype=torch.bfloat16)),
        "bf16 + master": (torch.bfloat16, dict(master_weights=True)),
        "bf16 + stochastic rounding": (torch.bfloat16, dict(stochastic_rounding=True)),
    }
    for name, (dtype, kw) in modes.items():
        curve = _train(lambda ps: fusedopt.AdamW(ps, lr=3e-3, backend=backend, **kw), dtype, steps)
        for a, b in list(zip(fp32, curve))[steps // 2 :]:
            assert abs(b - a) <= 0.15 * a, f"{name}: loss {b} vs fp32 {a}"
    assert fp32[-1] < 0.5 * fp32[0]  # the run does learn
