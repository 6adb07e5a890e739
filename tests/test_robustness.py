"""Failure modes: bad input is rejected before anything changes; NaN grads behave as in torch;
random inputs match torch.optim (hypothesis); many tensors; exact resume from checkpoints."""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from parity import assert_same, clone_params, grads, make_params, roundtrip, set_grads, train

import fusedopt
from fusedopt import backends

NATIVE = ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]


def _need(backend):
    reason = backends.unavailable(backend, "cpu")
    if reason:
        pytest.skip(reason)


def _snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
        [dict(g) for g in opt.param_groups],
    )


def _unchanged(opt, params, snap):
    for p, q in zip(params, snap[0]):
        assert torch.equal(p.detach(), q)
    for p, saved in zip(params, snap[1]):
        assert set(opt.state[p]) == set(saved)
        for k, v in saved.items():
            assert torch.equal(opt.state[p][k], v), k
    assert [dict(g) for g in opt.param_groups] == snap[2]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=float("inf")), "Invalid learning rate"),
        (dict(lr=float("nan")), "Invalid learning rate"),
        (dict(eps=float("nan")), "Invalid epsilon value"),
        (dict(eps=float("inf")), "Invalid epsilon value"),
        (dict(weight_decay=float("inf")), "Invalid weight_decay value"),
        (dict(betas=(float("nan"), 0.9)), "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1"),
    ],
)
def test_non_finite_hyperparameters(kwargs, message):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=message):
        fusedopt.AdamW([p], **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(momentum=float("nan")), "Invalid momentum value"),
        (dict(alpha=float("inf")), "Invalid alpha value"),
        (dict(alpha=-0.5), "Invalid alpha value"),
    ],
)
def test_non_finite_rmsprop_hyperparameters(kwargs, message):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=message):
        fusedopt.RMSprop([p], **kwargs)


@pytest.mark.parametrize("backend", NATIVE)
def test_complex_parameters_rejected_unchanged(backend):
    _need(backend)
    real = torch.nn.Parameter(torch.randn(4))
    cplx = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = fusedopt.Adam([real, cplx], backend=backend)
    real.grad, cplx.grad = torch.ones_like(real), torch.ones_like(cplx)
    before = real.detach().clone()
    with pytest.raises(TypeError, match="complex64"):
        opt.step()
    assert torch.equal(real, before) and not opt.state


@pytest.mark.parametrize("backend", NATIVE)
def test_overlapping_parameters_rejected(backend):
    _need(backend)
    base = torch.zeros(10)
    a, b = torch.nn.Parameter(base[0:6]), torch.nn.Parameter(base[4:10])
    opt = fusedopt.AdamW([a, b], backend=backend)
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.step()
    assert torch.equal(base, torch.zeros(10)) and not opt.state


@pytest.mark.parametrize("backend", NATIVE)
def test_disjoint_views_of_one_storage_are_fine(backend):
    _need(backend)
    base, ref_base = torch.randn(10), None
    ref_base = base.clone()
    ps = [torch.nn.Parameter(base[0:5]), torch.nn.Parameter(base[5:10])]
    ref = [torch.nn.Parameter(ref_base[0:5]), torch.nn.Parameter(ref_base[5:10])]
    opt, ropt = fusedopt.AdamW(ps, backend=backend), torch.optim.AdamW(ref)
    train(opt, ps, 3)
    train(ropt, ref, 3)
    assert_same(ropt, ref, opt, ps)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_nan_and_inf_grads_behave_as_torch(backend, cls):
    """A NaN/inf gradient element poisons only what it touches in torch.optim; the same here,
    and no other parameter (or element) is corrupted."""
    _need(backend)
    params = make_params()
    ref, ours = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, lr=1e-2)
    opt = getattr(fusedopt, cls)(ours, lr=1e-2, backend=backend)
    for k in range(3):
        gs = grads(k, params)
        gs[5][7] = float("nan")
        gs[3][0, 1] = float("inf")
        set_grads(ref, gs)
        set_grads(ours, gs)
        ropt.step()
        opt.step()
    for a, b in zip(ref, ours):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(b.detach(), a.detach(), equal_nan=True, rtol=2e-6, atol=1e-6)
    assert torch.isnan(ours[5][7]) and torch.isfinite(ours[5][:7]).all()


def _checkpoint(cls):
    params = clone_params(make_params())
    opt = getattr(fusedopt, cls)(params, lr=1e-2)
    train(opt, params, 2)
    return opt.state_dict(), params


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing_key", "missing \\['exp_avg_sq'\\]"),
        ("wrong_shape", "has shape"),
        ("group_count", "different number of parameter groups"),
        ("group_size", "doesn't match the size"),
        ("other_optimizer", "another optimizer"),
        ("not_a_state_dict", "needs 'state' and 'param_groups'"),
    ],
)
def test_bad_state_dict_rejected_unchanged(breakage, message):
    sd, _ = _checkpoint("AdamW")
    params = clone_params(make_params())
    opt = fusedopt.AdamW(params, lr=1e-2)
    train(opt, params, 1)
    snap = _snapshot(opt, params)
    sd = roundtrip(sd)
    if breakage == "missing_key":
        del sd["state"][3]["exp_avg_sq"]
    elif breakage == "wrong_shape":
        sd["state"][3]["exp_avg"] = torch.zeros(2, 2)
    elif breakage == "group_count":
        sd["param_groups"].append(dict(sd["param_groups"][0], params=[]))
    elif breakage == "group_size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif breakage == "other_optimizer":
        sd = roundtrip(_checkpoint("RMSprop")[0])
    else:
        sd = {"state": {}}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    _unchanged(opt, params, snap)


@pytest.mark.parametrize(
    "saved_on,resumed_on",
    [
        ("cpu", "cpu"),
        ("torch", "torch"),
        pytest.param("triton", "cpu", marks=pytest.mark.triton),
        pytest.param("cpu", "triton", marks=pytest.mark.triton),
    ],
)
def test_resume_from_checkpoint_is_exact(saved_on, resumed_on):
    """Train 6 steps straight, or 3 steps, torch.save model and optimizer, load both into fresh
    objects (on another backend too: the cpu and triton kernels agree bit for bit), 3 more steps:
    the same bits."""
    _need(saved_on)
    _need(resumed_on)
    noam = fusedopt.Noam(32, 3)

    # Clipping only on one backend: each backend sums the grad norm over its own chunk size, so
    # the norm may differ in its last bit from one backend to another.
    clip = 30.0 if saved_on == resumed_on else None

    def make(ps, backend):
        return fusedopt.AdamW(ps, lr=noam, amsgrad=True, backend=backend, max_grad_norm=clip)

    straight = clone_params(make_params())
    opt = make(straight, saved_on)
    train(opt, straight, 6)

    first = clone_params(make_params())
    opt1 = make(first, saved_on)
    train(opt1, first, 3)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = clone_params(ckpt["params"])
    opt2 = make(resumed, resumed_on)
    opt2.load_state_dict(ckpt["opt"])
    train(opt2, resumed, 3, start=3)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_twenty_thousand_tensors(backend):
    """20,000 parameters in one optimizer (in two groups), one step after another."""
    _need(backend)
    params = make_params([(3,)] * 12000 + [(2, 5)] * 8000)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.Adam([{"params": ref[::2]}, {"params": ref[1::2], "lr": 3e-3}], lr=1e-2)
    opt = fusedopt.Adam(
        [{"params": ours[::2]}, {"params": ours[1::2], "lr": 3e-3}], lr=1e-2, backend=backend
    )
    train(ropt, ref, 2, none=lambda k, i: (k + i) % 7 == 0)
    train(opt, ours, 2, none=lambda k, i: (k + i) % 7 == 0)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend", NATIVE)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_inputs_match_torch(backend, data):
    """Random shapes, options and grad patterns (hypothesis) against torch.optim, fp32."""
    _need(backend)
    shapes = data.draw(
        st.lists(
            st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
        )
    )
    cls = data.draw(st.sampled_from(["Adam", "AdamW", "RMSprop"]))
    if cls == "RMSprop":
        kw = dict(
            centered=data.draw(st.booleans()),
            momentum=data.draw(st.sampled_from([0.0, 0.5])),
            alpha=data.draw(st.sampled_from([0.9, 0.99])),
        )
    else:
        kw = dict(
            amsgrad=data.draw(st.booleans()),
            betas=(data.draw(st.sampled_from([0.0, 0.4, 0.9])), 0.999),
        )
    kw.update(
        maximize=data.draw(st.booleans()),
        weight_decay=data.draw(st.sampled_from([0.0, 0.05])),
        lr=data.draw(st.sampled_from([1e-3, 1e-2])),
    )
    mask = data.draw(st.lists(st.booleans(), min_size=12, max_size=12))
    params = make_params(shapes, seed=data.draw(st.integers(0, 1000)))
    ref, ours = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, **kw)
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)

    def none(k, i):
        return mask[(k * 5 + i) % 12]

    train(ropt, ref, 3, none=none)
    train(opt, ours, 3, none=none)
    assert_same(ropt, ref, opt, ours)


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def test_tensor_beyond_2_31_elements_cpu():
    """64-bit offsets on the CPU path: every element of a 2^31 + 64-element bf16 tensor gets the
    same update (identical inputs everywhere), those past 2^31 included. Needs about 17 GiB."""
    _need("cpu")
    n = 2**31 + 64
    needed = 4 * n * 2 + 2**30  # p, g, m, v in bf16, and headroom
    if _available_bytes() < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free memory")
    p = torch.nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16))
    p.grad = torch.full_like(p, 0.25)
    opt = fusedopt.AdamW([p], lr=1e-2, backend="cpu")
    opt.step()
    opt.step()
    head = p[:64].detach().clone()
    assert not torch.equal(head, torch.full_like(head, 0.5))
    for start in (2**31 - 64, 2**31, n - 64):
        assert torch.equal(p[start : start + 64].detach(), head), start
        assert torch.equal(
            opt.state[p]["exp_avg_sq"][start : start + 64], opt.state[p]["exp_avg_sq"][:64]
        )


class _HostTransfers(TorchDispatchMode):
    """Records the ops that move data between host and device on a GPU: a tensor made from host
    data (``torch.tensor``: lift_fresh, then a copy to the device) and a read of a value back
    (``.item()``, ``float()``, ``bool()``: _local_scalar_dense). On the CPU neither syncs, but the
    same calls in step() would sync on a GPU."""

    OPS = ("aten::lift_fresh", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param(dict(stochastic_rounding=True), id="stochastic"),
        pytest.param(dict(master_weights=True), id="master"),
        pytest.param(dict(max_grad_norm=1.0), id="clip"),
        pytest.param(dict(lr=fusedopt.Noam(16, 4)), id="noam"),
    ],
)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_torch_backend_step_moves_nothing_between_host_and_device(cls, kw):
    """The torch backend's step() (the reference on devices with no kernels) neither makes
    tensors from host data nor reads device values: either would be a sync on a GPU. Stochastic
    rounding used to make a tensor from each parameter's index, every step."""
    params = clone_params(make_params(dtype=torch.bfloat16))
    opt = getattr(fusedopt, cls)(params, backend="torch", **kw)
    for k in range(2):  # the first step creates the state; both must be transfer-free
        set_grads(params, grads(k, params))
        opt.grad_scale, opt.found_inf = torch.full((), 4.0), torch.zeros(())  # GradScaler's
        with _HostTransfers() as mode:
            opt.step()
        assert mode.seen == [], f"step {k}: {mode.seen}"
