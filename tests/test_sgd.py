"""Parity of fusedopt.SGD with torch.optim.SGD on every backend: options, groups, missing grads,
tensor and scheduled lrs, GradScaler, bf16/fp16 against float64, state_dicts both ways, bad input,
and torch's own SGD test inputs (optim_db)."""

import itertools

import pytest
import torch
from conftest import backend_device_params
from parity import (
    FP32,
    SHAPES,
    assert_same,
    assert_unchanged,
    clone_params,
    grads,
    make_params,
    max_err,
    roundtrip,
    set_grads,
    snapshot,
    train,
)

import fusedopt

BACKENDS = backend_device_params()

OPTIONS = [
    pytest.param(
        dict(momentum=mo, dampening=d, nesterov=n, weight_decay=wd, maximize=mx),
        id=f"mom{mo}-damp{d}-nest{int(n)}-wd{wd}-max{int(mx)}",
    )
    for mo, d, n, wd, mx in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.1), (False, True)
    )
    if not (n and (mo == 0 or d != 0)) and not (mo == 0 and d != 0)
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_parity_fp32(backend, device, options, require_backend):
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.SGD(ref, lr=1e-2, **options)
    opt = fusedopt.SGD(ours, lr=1e-2, backend=backend, **options)
    train(ropt, ref, 6)
    train(opt, ours, 6)
    assert_same(ropt, ref, opt, ours)  # state keys too: momentum_buffer only with momentum


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_groups_missing_grads_and_tensor_lr(backend, device, require_backend):
    """Groups with different options share one pass (one without momentum: no state at all);
    a parameter whose first grad comes late gets its buffer from that grad; a tensor lr is read
    on the device each step."""
    require_backend(backend, device)
    params = make_params(device=device)
    lr = torch.tensor(2e-2, device=device)
    specs = [
        dict(lr=1e-2),
        dict(lr=3e-3, momentum=0.9, nesterov=True, weight_decay=0.05),
        dict(momentum=0.5, dampening=0.5, maximize=True),
    ]

    def build(mod, ps, **kw):
        groups = [dict(params=ps[i::3], **s) for i, s in enumerate(specs)]
        return mod.SGD(groups, lr=lr, **kw)

    def none(step, i):
        return (step * 7 + i) % 4 == 0 or (i == 4 and step < 3)

    ref, ours = clone_params(params), clone_params(params)
    ropt, opt = build(torch.optim, ref), build(fusedopt, ours, backend=backend)
    train(ropt, ref, 6, none=none)
    train(opt, ours, 6, none=none)
    assert_same(ropt, ref, opt, ours)
    assert not any(p in opt.state for p in ours[0::3])  # as torch: no state without momentum


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_schedule_matches_lambdalr(backend, device, require_backend):
    """SGD with warmup + cosine in the kernel (the seed articles' SGD-with-warmup recipe) against
    torch.optim.SGD stepped by LambdaLR with the same function."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    sched = fusedopt.schedules.cosine(0.1, warmup=3, total=10)
    ropt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    lam = torch.optim.lr_scheduler.LambdaLR(ropt, lambda u: sched.rate(u + 1) / 0.1)
    opt = fusedopt.SGD(ours, lr=sched, momentum=0.9, backend=backend)
    train(ropt, ref, 8, sched=lam)
    train(opt, ours, 8)
    assert_same(ropt, ref, opt, ours)
    torch.testing.assert_close(
        torch.as_tensor(opt.get_last_lr()[0]).double().cpu(),
        torch.tensor(sched.rate(8), dtype=torch.float64),
        rtol=1e-14,  # the host rate uses torch ops; the kernel transformers' float64 order
        atol=0,
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradscaler_skipped_first_step(backend, device, require_backend):
    """Under GradScaler: grads unscaled in the kernel, an inf step changes nothing, and a
    parameter whose first update was skipped still starts its buffer from its next grad (its
    update count did not advance). Against torch.optim.SGD under the same scaler."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    kw = dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1)
    ropt, opt = torch.optim.SGD(ref, **kw), fusedopt.SGD(ours, backend=backend, **kw)
    for o, ps in ((ropt, ref), (opt, ours)):
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
        scaler.scale(torch.ones((), device=device))  # creates its scale tensor
        for k in range(5):
            scale = float(scaler.get_scale())
            gs = grads(k, ps, none=lambda step, i: i == 2 and step == 0)
            for i, (p, g) in enumerate(zip(ps, gs)):
                p.grad = None if g is None else (g * scale).to(p.dtype).to(device)
                if k == 1 and i == 2:
                    p.grad[0] = float("inf")  # param 2's first grad: the step is skipped
            scaler.step(o)
            scaler.update()
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_against_float64(backend, device, dtype, require_backend):
    """Error against float64 torch.optim at most twice torch.optim's own at this precision (max
    and RMS, params and the momentum buffer): the kernels compute in float32 and round once."""
    require_backend(backend, device)
    params = make_params(SHAPES + [(4096,)], device=device, dtype=dtype)
    ref64, lowp, ours = (
        clone_params(params, torch.float64),
        clone_params(params),
        clone_params(params),
    )
    kw = dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1)
    o64, olow = torch.optim.SGD(ref64, **kw), torch.optim.SGD(lowp, **kw)
    opt = fusedopt.SGD(ours, backend=backend, **kw)
    for k in range(8):
        gs = [g.to(dtype).double() for g in grads(k, params)]
        for o, ps in ((o64, ref64), (olow, lowp), (opt, ours)):
            set_grads(ps, gs)
            o.step()
    for key in [None, "momentum_buffer"]:
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


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_both_ways(backend, device, direction, require_backend):
    """A checkpoint taken by one after 3 steps (torch.save / weights_only load) resumes in the
    other for 3 more, matching an uninterrupted torch.optim run; the resumed side does not treat
    its next update as a first one (the buffer is kept, not reset to the gradient)."""
    require_backend(backend, device)
    params = make_params(device=device)
    kw = dict(lr=1e-2, momentum=0.9, dampening=0.1)
    ref = clone_params(params)
    ropt = torch.optim.SGD(ref, **kw)
    train(ropt, ref, 6)

    first = clone_params(params)

    def make(kind, ps):
        if kind == "torch":
            return torch.optim.SGD(ps, **kw)
        return fusedopt.SGD(ps, backend=backend, **kw)

    src, dst = direction.split("_to_")
    o1 = make(src, first)
    train(o1, first, 3)
    sd = roundtrip(o1.state_dict())
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    second = clone_params([p.detach() for p in first])
    o2 = make(dst, second)
    o2.load_state_dict(sd)
    train(o2, second, 3, start=3)
    assert_same(ropt, ref, o2, second)


def test_bad_hyperparameters_give_torchs_message():
    p = torch.nn.Parameter(torch.randn(3))
    for kw in (
        dict(lr=-1.0),
        dict(momentum=-0.5),
        dict(weight_decay=-1.0),
        dict(nesterov=True),
        dict(nesterov=True, momentum=0.9, dampening=0.1),
    ):
        with pytest.raises(ValueError) as expected:
            torch.optim.SGD([p], **kw)
        with pytest.raises(ValueError) as got:
            fusedopt.SGD([p], **kw)
        assert str(got.value) == str(expected.value), kw
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        fusedopt.SGD([p], fused=True, foreach=True)


@pytest.mark.parametrize(
    "backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_bad_step_changes_nothing(backend, require_backend):
    """A group whose hyperparameters went bad after construction, or a grad of the wrong shape,
    raises at step() with parameters, momentum buffers and update counts as they were."""
    require_backend(backend, "cpu")
    params = clone_params(make_params())
    opt = fusedopt.SGD(params, lr=1e-2, momentum=0.9, backend=backend)
    train(opt, params, 2)
    snap = snapshot(opt, params)
    counts = {p: float(t) for p, t in opt._steps.items()}
    set_grads(params, grads(5, params))
    opt.param_groups[0]["nesterov"], opt.param_groups[0]["dampening"] = True, 0.5
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        opt.step()
    opt.param_groups[0]["nesterov"], opt.param_groups[0]["dampening"] = False, 0.0
    params[3].grad.data = torch.randn(4)  # torch refuses it through .grad; hooks can do this
    with pytest.raises(ValueError, match="does not match its parameter"):
        opt.step()
    assert_unchanged(opt, params, snap)
    assert {p: float(t) for p, t in opt._steps.items()} == counts


def _optim_db_inputs():
    """torch's own SGD test inputs (torch.testing._internal.common_optimizers.optim_db): its
    constructor kwargs, and its error inputs. Empty when torch's testing helpers cannot be
    imported (they need expecttest, which scripts/setup_env.sh installs)."""
    try:
        from torch.testing._internal.common_optimizers import optim_db  # noqa: PLC0415
    except ImportError:
        return None
    (info,) = [i for i in optim_db if i.optim_cls is torch.optim.SGD]
    return info


@pytest.mark.parametrize(
    "backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_torch_optim_db_inputs(backend, require_backend):
    """Every optim_db input for SGD gives torch.optim.SGD's parameters and state after 4 steps
    (params in 2 groups when the input names none), and every error input torch's error."""
    require_backend(backend, "cpu")
    info = _optim_db_inputs()
    if info is None:
        pytest.skip("torch.testing._internal.common_optimizers needs expecttest (setup_env.sh)")
    inputs = info.optim_inputs_func(device="cpu")
    assert len(inputs) >= 9
    for oi in inputs:
        assert oi.params is None
        params = make_params()
        ref, ours = clone_params(params), clone_params(params)
        kw = dict(oi.kwargs)
        ropt = torch.optim.SGD([dict(params=ref[:3]), dict(params=ref[3:])], **kw)
        opt = fusedopt.SGD([dict(params=ours[:3]), dict(params=ours[3:])], backend=backend, **kw)
        train(ropt, ref, 4)
        train(opt, ours, 4)
        assert_same(ropt, ref, opt, ours, **FP32)
    for err in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        e = err.optimizer_error_input
        if err.error_type is UserWarning:
            with pytest.warns(UserWarning, match=err.error_regex):
                fusedopt.SGD(e.params, backend=backend, **e.kwargs)
            continue
        with pytest.raises(err.error_type, match=err.error_regex):
            opt = fusedopt.SGD(e.params, backend=backend, **e.kwargs)
            if str(err.error_on).endswith("STEP_ERROR"):
                opt.step()


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_deepcopy_and_pickle_resume_exactly(cls):
    """A deepcopy (or pickle round trip) mid-training steps on exactly as the original: the
    backend, clipping threshold and SGD's update counts travel with it (torch.optim's own
    __getstate__ keeps only defaults, state and param_groups: a copied SGD restarted every
    momentum buffer from the gradient, a copied fusedopt optimizer lost max_grad_norm)."""
    import copy  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    reason = fusedopt.backends.unavailable("cpu", "cpu")
    if reason:
        pytest.skip(reason)
    params = clone_params(make_params())
    kw = dict(momentum=0.9, dampening=0.5) if cls == "SGD" else {}
    opt = getattr(fusedopt, cls)(params, lr=1e-2, backend="cpu", max_grad_norm=5.0, **kw)
    train(opt, params, 2)
    copies = [copy.deepcopy((opt, params)), pickle.loads(pickle.dumps((opt, params)))]
    train(opt, params, 2, start=2)
    for o, ps in copies:
        assert o.backend == "cpu" and o.max_grad_norm == 5.0
        train(o, ps, 2, start=2)
        for a, b in zip(params, ps):
            assert torch.equal(a, b)
            for key, value in opt.state[a].items():
                assert torch.equal(o.state[b][key], value), key
