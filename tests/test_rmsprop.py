"""Parity of fusedopt.RMSprop with torch.optim.RMSprop on every backend."""

import itertools

import pytest
import torch
from conftest import backend_device_params
from parity import SHAPES, assert_same, clone_params, grads, make_params, max_err, set_grads, train

import fusedopt

BACKENDS = backend_device_params()

OPTIONS = [
    pytest.param(
        dict(centered=c, momentum=mo, weight_decay=wd, maximize=mx),
        id=f"cent{int(c)}-mom{mo}-wd{wd}-max{int(mx)}",
    )
    for c, mo, wd, mx in itertools.product((False, True), (0.0, 0.9), (0.0, 0.1), (False, True))
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_parity_fp32(backend, device, options, require_backend):
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.RMSprop(ref, lr=1e-2, **options)
    opt = fusedopt.RMSprop(ours, lr=1e-2, backend=backend, **options)
    train(ropt, ref, 6)
    train(opt, ours, 6)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_groups_and_missing_grads(backend, device, require_backend):
    """Groups with different options share one pass; grads come and go per parameter."""
    require_backend(backend, device)
    params = make_params(device=device)
    specs = [
        dict(lr=1e-2),
        dict(lr=3e-3, centered=True, momentum=0.5, alpha=0.9),
        dict(momentum=0.9, weight_decay=0.2, maximize=True),
    ]

    def build(mod, ps, **kw):
        return mod.RMSprop([dict(params=ps[i::3], **s) for i, s in enumerate(specs)], lr=5e-3, **kw)

    def none(step, i):
        return (step * 7 + i) % 4 == 0

    ref, ours = clone_params(params), clone_params(params)
    ropt, opt = build(torch.optim, ref), build(fusedopt, ours, backend=backend)
    train(ropt, ref, 6, none=none)
    train(opt, ours, 6, none=none)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_float64(backend, device, dtype, require_backend):
    """Error against float64 torch.optim at most twice torch.optim's own at this precision
    (max and RMS, params and every state); see test_adam for the choice of eps and sizes."""
    require_backend(backend, device)
    params = make_params(SHAPES + [(4096,)], device=device, dtype=dtype)
    ref64, lowp, ours = (
        clone_params(params, torch.float64),
        clone_params(params),
        clone_params(params),
    )
    kw = dict(lr=1e-3, eps=1e-6, centered=True, momentum=0.9, weight_decay=0.1)
    o64, olow = torch.optim.RMSprop(ref64, **kw), torch.optim.RMSprop(lowp, **kw)
    opt = fusedopt.RMSprop(ours, backend=backend, **kw)
    for k in range(8):
        gs = [g.to(dtype).double() for g in grads(k, params)]
        for o, ps in ((o64, ref64), (olow, lowp), (opt, ours)):
            set_grads(ps, gs)
            o.step()
    for key in [None, "square_avg", "momentum_buffer", "grad_avg"]:
        pick = (
            (lambda o, ps: list(ps))
            if key is None
            else (lambda o, ps, key=key: [o.state[p][key] for p in ps])
        )
        for norm in ("max", "rms"):
            err_ours = max_err(pick(opt, ours), pick(o64, ref64), norm)
            err_torch = max_err(pick(olow, lowp), pick(o64, ref64), norm)
            assert err_ours <= 2 * err_torch, (
                f"{key or 'param'} {norm}: {err_ours} > 2 * {err_torch}"
            )
