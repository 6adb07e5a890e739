"""The Noam schedule: host formula, in-kernel evaluation, per-group use, NoamLR, logging."""

import math

import pytest
import torch
from conftest import backend_device_params
from parity import assert_same, clone_params, grads, make_params, roundtrip, set_grads

import fusedopt

BACKENDS = backend_device_params()


def test_rate_formula():
    noam = fusedopt.Noam(d_model=512, warmup=4000, factor=2.0)
    for t in (1, 2, 100, 3999, 4000, 4001, 10**6):
        expected = 2.0 * 512**-0.5 * min(t**-0.5, t * 4000**-1.5)
        assert noam.rate(t) == pytest.approx(expected, rel=1e-15)
    rates = [noam.rate(t) for t in range(1, 10001)]
    assert max(range(len(rates)), key=rates.__getitem__) + 1 == 4000  # peak at t = warmup
    assert noam.rate(4000) == pytest.approx(2.0 / math.sqrt(512 * 4000))
    t = torch.arange(1, 50, dtype=torch.float32)
    torch.testing.assert_close(
        noam.rate(t), torch.tensor([noam.rate(float(x)) for x in t], dtype=torch.float64)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d_model=0, warmup=10),
        dict(d_model=512, warmup=0),
        dict(d_model=-1, warmup=10),
        dict(d_model=512, warmup=-5),
        dict(d_model=float("nan"), warmup=10),
        dict(d_model=512, warmup=10, factor=0.0),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="Invalid Noam"):
        fusedopt.Noam(**kwargs)


def _torch_noam(cls, params, noams, **kw):
    """torch.optim with lr=1.0 and LambdaLR(rate(e + 1)): the reference the issue names."""
    opt = getattr(torch.optim, cls)(params, lr=1.0, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e, n=n: n.rate(e + 1) for n in noams])
    return opt, sched


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", dict(betas=(0.9, 0.98), eps=1e-9)),
        ("AdamW", dict(betas=(0.9, 0.98), eps=1e-9, amsgrad=True)),
        ("RMSprop", dict(momentum=0.5, centered=True)),
        ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ],
)
def test_in_kernel_noam_equals_lambdalr(backend, device, cls, kw, require_backend):
    """Including steps where some or all parameters have no grad: the schedule advances once per
    step() call, as LambdaLR does, while each parameter's own step counts its updates."""
    require_backend(backend, device)
    noam = fusedopt.Noam(d_model=64, warmup=4, factor=2.0)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt, sched = _torch_noam(cls, ref, [noam], **kw)
    opt = getattr(fusedopt, cls)(ours, lr=noam, backend=backend, **kw)

    def none(step, i):
        return step == 3 or (step + i) % 4 == 0  # step 3: nobody has a grad

    for k in range(8):
        for o, ps in ((ropt, ref), (opt, ours)):
            set_grads(ps, grads(k, ps, none=none))
            o.step()
        sched.step()
        last = opt.get_last_lr()[0]
        assert isinstance(last, torch.Tensor) and last.device.type == device
        assert float(last) == pytest.approx(noam.rate(k + 1), rel=1e-12)
    assert float(opt.param_groups[0]["noam_step"]) == 8
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noam_per_group(backend, device, require_backend):
    """Two groups with their own Noam schedules and one with a float lr, in one optimizer."""
    require_backend(backend, device)
    n1 = fusedopt.Noam(d_model=32, warmup=3)
    n2 = fusedopt.Noam(d_model=128, warmup=5, factor=4.0)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.AdamW(
        [
            dict(params=ref[0::3], lr=1.0),
            dict(params=ref[1::3], lr=3e-3),
            dict(params=ref[2::3], lr=1.0),
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        ropt, [lambda e: n1.rate(e + 1), lambda e: 1.0, lambda e: n2.rate(e + 1)]
    )
    opt = fusedopt.AdamW(
        [
            dict(params=ours[0::3], lr=n1),
            dict(params=ours[1::3], lr=3e-3),
            dict(params=ours[2::3], lr=n2),
        ],
        backend=backend,
    )
    for k in range(7):
        for o, ps in ((ropt, ref), (opt, ours)):
            set_grads(ps, grads(k, ps))
            o.step()
        sched.step()
    assert_same(ropt, ref, opt, ours)
    lrs = opt.get_last_lr()
    assert float(lrs[0]) == pytest.approx(n1.rate(7), rel=1e-12)
    assert lrs[1] == 3e-3
    assert float(lrs[2]) == pytest.approx(n2.rate(7), rel=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_last_lr_is_a_snapshot(backend, device, require_backend):
    require_backend(backend, device)
    noam = fusedopt.Noam(d_model=16, warmup=10)
    p = torch.nn.Parameter(torch.randn(5, device=device))
    opt = fusedopt.Adam([p], lr=noam, backend=backend)
    assert opt.get_last_lr()[0] == noam.rate(1)
    seen = []
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
        seen.append(opt.get_last_lr()[0])
    assert [float(x) for x in seen] == pytest.approx([noam.rate(t) for t in (1, 2, 3)], rel=1e-12)


def test_noamlr_equals_lambdalr_on_torch_optim():
    params = make_params()
    a, b = clone_params(params), clone_params(params)
    oa = torch.optim.Adam(a, lr=1.0)
    ob = torch.optim.Adam(b, lr=1.0)
    noam = fusedopt.Noam(d_model=64, warmup=3)
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda e: noam.rate(e + 1))
    sb = fusedopt.NoamLR(ob, d_model=64, warmup=3)
    for k in range(6):
        for o, ps, s in ((oa, a, sa), (ob, b, sb)):
            set_grads(ps, grads(k, ps))
            o.step()
            s.step()
        assert oa.param_groups[0]["lr"] == pytest.approx(ob.param_groups[0]["lr"], rel=1e-15)
    assert_same(oa, a, ob, b)
    state = roundtrip(sb.state_dict())  # plain data: loads with weights_only=True
    fresh = fusedopt.NoamLR(torch.optim.Adam(clone_params(params), lr=1.0), d_model=1, warmup=1)
    fresh.load_state_dict(state)
    assert fresh.noam == sb.noam and fresh.last_epoch == sb.last_epoch


def test_schedulers_refuse_a_noam_group():
    p = torch.nn.Parameter(torch.randn(3))
    opt = fusedopt.AdamW([p], lr=fusedopt.Noam(64, 10))
    with pytest.raises(TypeError, match="evaluated inside the optimizer"):
        torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    with pytest.raises(TypeError, match="NoamLR would replace"):
        fusedopt.NoamLR(fusedopt.AdamW([p], lr=fusedopt.Noam(64, 10)), 64, 10)


def test_noam_group_on_two_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU to have two devices")
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(3, device="cuda"))
    with pytest.raises(ValueError, match="one device"):
        fusedopt.AdamW([a, b], lr=fusedopt.Noam(64, 10))
