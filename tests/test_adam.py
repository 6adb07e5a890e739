"""Parity of fusedopt.Adam / AdamW with torch.optim on every backend."""

import itertools

import pytest
import torch
from conftest import backend_device_params
from parity import (
    FP32,
    SHAPES,
    assert_same,
    clone_params,
    grads,
    make_params,
    max_err,
    set_grads,
    train,
)

import fusedopt

BACKENDS = backend_device_params()

OPTIONS = [
    pytest.param(
        cls,
        dict(amsgrad=a, maximize=m, weight_decay=wd),
        id=f"{cls}-ams{int(a)}-max{int(m)}-wd{wd}",
    )
    for cls, a, m, wd in itertools.product(
        ("Adam", "AdamW"), (False, True), (False, True), (0.0, 0.1)
    )
]


def pair(cls, params, **kw):
    backend = kw.pop("backend")
    ref = clone_params(params)
    ours = clone_params(params)
    return (
        ref,
        getattr(torch.optim, cls)(ref, **kw),
        ours,
        getattr(fusedopt, cls)(ours, backend=backend, **kw),
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cls,options", OPTIONS)
def test_parity_fp32(backend, device, cls, options, require_backend):
    require_backend(backend, device)
    ref, ropt, ours, opt = pair(
        cls, make_params(device=device), backend=backend, lr=3e-2, **options
    )
    train(ropt, ref, 6)
    train(opt, ours, 6)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_betas_lerp_branches_and_eps(backend, device, require_backend):
    """beta1 < 0.5 takes torch.lerp's other formula; a large eps dominates the denominator."""
    require_backend(backend, device)
    ref, ropt, ours, opt = pair(
        "AdamW",
        make_params(device=device),
        backend=backend,
        lr=1e-2,
        betas=(0.3, 0.5),
        eps=0.5,
        weight_decay=0.3,
    )
    train(ropt, ref, 5)
    train(opt, ours, 5)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_groups_with_different_options(backend, device, require_backend):
    """Several groups, each with its own lr/betas/decay/amsgrad/maximize, in one fused pass."""
    require_backend(backend, device)
    params = make_params(device=device)
    specs = [
        dict(lr=1e-2),
        dict(lr=3e-2, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.2),
        dict(lr=5e-3, maximize=True, eps=1e-6),
    ]

    def build(mod, ps, **kw):
        groups = [dict(params=ps[i::3], **spec) for i, spec in enumerate(specs)]
        return mod.AdamW(groups, weight_decay=0.05, **kw)

    ref, ours = clone_params(params), clone_params(params)
    ropt, opt = build(torch.optim, ref), build(fusedopt, ours, backend=backend)
    train(ropt, ref, 5)
    train(opt, ours, 5)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_params_without_grads_some_steps(backend, device, require_backend):
    """A parameter without a grad is skipped: no update, its step does not advance, and its
    state appears only at its first real step."""
    require_backend(backend, device)

    def none(step, i):
        return i == 2 and step < 3 or (step + i) % 3 == 0

    ref, ropt, ours, opt = pair(
        "Adam", make_params(device=device), backend=backend, lr=1e-2, amsgrad=True
    )
    set_grads(ours, grads(0, ours, none=none))
    opt.step()
    assert ours[2] not in opt.state or not opt.state[ours[2]]
    train(ropt, ref, 7, none=none)
    train(opt, ours, 6, start=1, none=none)
    assert_same(ropt, ref, opt, ours)
    steps = sorted({float(opt.state[p]["step"]) for p in ours})
    assert len(steps) > 1, "the grad pattern should give parameters different step counts"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("sched", ["StepLR", "CosineAnnealingLR", "LambdaLR", "ReduceLROnPlateau"])
def test_torch_lr_schedulers(backend, device, lr_kind, sched, require_backend):
    """torch.optim LR schedulers write group['lr'] (a float, or in place into a tensor lr)."""
    require_backend(backend, device)
    params = make_params(device=device)
    lr = 1e-2 if lr_kind == "float" else torch.tensor(1e-2, device=device)
    make = {
        "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
        "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
        "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (e + 1)),
        "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    }[sched]
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=lr.clone() if lr_kind == "tensor" else lr)
    opt = fusedopt.AdamW(ours, lr=lr.clone() if lr_kind == "tensor" else lr, backend=backend)
    rs, s = make(ropt), make(opt)
    for k in range(6):
        for o, ps, sc in ((ropt, ref, rs), (opt, ours, s)):
            set_grads(ps, grads(k, ps))
            o.step()
            if sched == "ReduceLROnPlateau":
                sc.step(1.0)  # a flat metric: the lr drops every step
            else:
                sc.step()
    assert float(opt.param_groups[0]["lr"]) != 1e-2, "the scheduler should have changed lr"
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "cls,options",
    [
        pytest.param("AdamW", dict(weight_decay=0.1), id="adamw"),
        pytest.param("Adam", dict(amsgrad=True, weight_decay=0.1), id="adam-amsgrad"),
    ],
)
def test_low_precision_against_float64(backend, device, dtype, cls, options, require_backend):
    """bf16/fp16 parameters: fusedopt's error against a float64 run of torch.optim is at most
    twice torch.optim's own error at that precision, for params and every state tensor, in both
    max and RMS norm. eps=1e-6: torch's default 1e-8 is 0 in fp16, and torch's own fp16 run then
    divides 0 by 0 where v underflows (NaN), which would leave nothing to compare against. The
    4096-element tensor makes the max-error statistic stable; a few hundred elements is noise."""
    require_backend(backend, device)
    params = make_params(SHAPES + [(4096,)], device=device, dtype=dtype)
    ref64 = clone_params(params, torch.float64)
    lowp = clone_params(params)
    ours = clone_params(params)
    kw = dict(lr=1e-2, eps=1e-6, **options)
    o64 = getattr(torch.optim, cls)(ref64, **kw)
    olow = getattr(torch.optim, cls)(lowp, **kw)
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)
    for k in range(8):
        # every run sees the same (low-precision) gradient values
        gs = [g.to(dtype).double() for g in grads(k, params)]
        for o, ps in ((o64, ref64), (olow, lowp), (opt, ours)):
            set_grads(ps, gs)
            o.step()
    keys = [k for k in o64.state[ref64[1]] if k != "step"]
    for key in [None] + keys:
        pick = (
            (lambda o, ps: list(ps))
            if key is None
            else (lambda o, ps, key=key: [o.state[p][key] for p in ps])
        )
        ref = pick(o64, ref64)
        for norm in ("max", "rms"):
            err_ours = max_err(pick(opt, ours), ref, norm)
            err_torch = max_err(pick(olow, lowp), ref, norm)
            assert err_ours <= 2 * err_torch, (
                f"{key or 'param'} {norm}: {err_ours} > 2 * {err_torch}"
            )
    for p in ours:
        assert all(opt.state[p][k].dtype == dtype for k in opt.state[p] if k != "step")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_dtypes_one_optimizer(backend, device, require_backend):
    """fp32 and bf16 parameters in one optimizer: one bucket each; fp32 ones match torch."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ours_bf16 = clone_params(params, torch.bfloat16)
    ropt = torch.optim.AdamW(ref, lr=1e-2)
    opt = fusedopt.AdamW(ours + ours_bf16, lr=1e-2, backend=backend)
    for k in range(4):
        gs = grads(k, params)
        set_grads(ref, gs)
        set_grads(ours, gs)
        set_grads(ours_bf16, gs)
        ropt.step()
        opt.step()
    assert_same(ropt, ref, opt, ours)
    err = max_err(ours_bf16, ref)
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dense_non_contiguous_param_updated_in_place(backend, device, require_backend):
    """A transposed (dense, non-contiguous) parameter is updated in its own storage."""
    require_backend(backend, device)
    base = make_params([(5, 3)], device=device)[0]
    ref = torch.nn.Parameter(base.clone().t())
    ours = torch.nn.Parameter(base.clone().t())
    assert not ours.is_contiguous()
    storage = ours.data_ptr()
    ropt = torch.optim.Adam([ref], lr=1e-2)
    opt = fusedopt.Adam([ours], lr=1e-2, backend=backend)
    for k in range(4):
        g = grads(k, [ref])[0]
        ref.grad = g.float().to(device)
        ours.grad = g.float().to(device).contiguous()  # a grad with other strides than its param
        ropt.step()
        opt.step()
    assert ours.data_ptr() == storage
    assert_same(ropt, [ref], opt, [ours])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_dense_param_rejected_unchanged(backend, device, require_backend):
    require_backend(backend, device)
    full = torch.randn(4, 6, device=device)
    strided = torch.nn.Parameter(full[:, ::2])  # every other column: not dense
    other = torch.nn.Parameter(torch.randn(3, device=device))
    opt = fusedopt.Adam([other, strided], backend=backend)
    strided.grad = torch.ones_like(strided)
    other.grad = torch.ones_like(other)
    before = other.detach().clone()
    with pytest.raises(ValueError, match="not dense"):
        opt.step()
    assert torch.equal(other, before) and not opt.state


@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
def test_fp32_tolerance_is_tight(cls):
    """The parity tolerance can fail: an lr off by one part in 10^4 is caught."""
    ps = make_params()
    a, b = clone_params(ps), clone_params(ps)
    oa = getattr(torch.optim, cls)(a, lr=1e-2)
    ob = getattr(torch.optim, cls)(b, lr=1e-2 * (1 + 1e-4))
    train(oa, a, 3)
    train(ob, b, 3)
    with pytest.raises(AssertionError):
        assert_same(oa, a, ob, b, **FP32)
