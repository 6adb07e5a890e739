"""Checkpoints interchange with torch.optim in both directions, mid-training."""

import pytest
import torch
from conftest import backend_device_params
from parity import assert_same, clone_params, grads, make_params, roundtrip, set_grads, train

import fusedopt

BACKENDS = backend_device_params()

CASES = [
    pytest.param("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1), id="adam-amsgrad"),
    pytest.param("AdamW", dict(lr=1e-2, maximize=True), id="adamw"),
    pytest.param("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True), id="rmsprop"),
]


def _none(step, i):
    return (step + i) % 5 == 0


def _continue(ropt, ref, opt, ours, start, steps=3):
    train(ropt, ref, steps, start=start, none=_none)
    train(opt, ours, steps, start=start, none=_none)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cls,kw", CASES)
def test_torch_checkpoint_into_fusedopt(backend, device, cls, kw, require_backend):
    require_backend(backend, device)
    ref = clone_params(make_params(device=device))
    ropt = getattr(torch.optim, cls)(ref, **kw)
    train(ropt, ref, 4, none=_none)
    saved = roundtrip(ropt.state_dict())
    ours = clone_params(ref)
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)
    opt.load_state_dict(saved)
    for p in ours:
        st = opt.state[p]
        assert st["step"].device == p.device and st["step"].dtype == torch.float32
    _continue(ropt, ref, opt, ours, start=4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("cls,kw", CASES)
def test_fusedopt_checkpoint_into_torch(backend, device, cls, kw, require_backend):
    require_backend(backend, device)
    ours = clone_params(make_params(device=device))
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)
    train(opt, ours, 4, none=_none)
    saved = roundtrip(opt.state_dict())
    ref = clone_params(ours)
    ropt = getattr(torch.optim, cls)(ref, **kw)
    ropt.load_state_dict(saved)
    _continue(ropt, ref, opt, ours, start=4)


@pytest.mark.parametrize("cls,kw", CASES)
def test_same_keys_as_torch(cls, kw):
    params = make_params()
    a, b = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(a, **kw)
    opt = getattr(fusedopt, cls)(b, backend="torch", **kw)
    train(ropt, a, 2)
    train(opt, b, 2)
    rs, s = ropt.state_dict(), opt.state_dict()
    # torch's group keys, plus fusedopt's low-precision options (which torch.optim ignores)
    extra = {"master_weights", "min_8bit_size", "state_dtype", "stochastic_rounding"}
    assert [sorted(set(g) - extra) for g in s["param_groups"]] == [
        sorted(g) for g in rs["param_groups"]
    ]
    assert {k: sorted(v) for k, v in s["state"].items()} == {
        k: sorted(v) for k, v in rs["state"].items()
    }
    for st in s["state"].values():
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_noam_checkpoint_round_trips(backend, device, require_backend):
    """fusedopt (Noam) -> fusedopt resumes the schedule where it was; -> torch.optim it is the
    float lr of the next step, with LambdaLR continuing from the same epoch; torch.optim + LambdaLR
    -> fusedopt (Noam) resumes the counter from the parameters' step."""
    require_backend(backend, device)
    noam = fusedopt.Noam(d_model=64, warmup=3)
    kw = dict(betas=(0.9, 0.98), eps=1e-9)
    params = clone_params(make_params(device=device))
    opt = fusedopt.AdamW(params, lr=noam, backend=backend, **kw)
    train(opt, params, 4)
    saved = roundtrip(opt.state_dict())  # weights_only: the schedule is stored as plain data
    assert saved["param_groups"][0]["lr"] == pytest.approx(noam.rate(5), rel=1e-12)
    assert saved["param_groups"][0]["noam"] == noam.to_dict()

    # into a fresh fusedopt built with another schedule: the checkpoint's schedule wins
    again = clone_params(params)
    opt2 = fusedopt.AdamW(again, lr=fusedopt.Noam(1, 1), backend=backend, **kw)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["lr"] == noam
    _continue(opt, params, opt2, again, start=4)

    # into torch.optim with LambdaLR picked up at the same epoch
    ref = clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1.0, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(ropt, lambda e: noam.rate(e + 1))
    ropt.load_state_dict(roundtrip(opt.state_dict()))
    sched.last_epoch = 7  # where a torch run would be after the same 7 steps
    ours = clone_params(params)
    opt3 = fusedopt.AdamW(ours, lr=noam, backend=backend, **kw)
    opt3.load_state_dict(roundtrip(opt.state_dict()))
    for k in range(7, 10):
        for o, ps in ((ropt, ref), (opt3, ours)):
            set_grads(ps, grads(k, ps))
            o.step()
        sched.step()
    assert_same(ropt, ref, opt3, ours)

    # and back: torch's checkpoint (float lr) into a fusedopt built with the Noam schedule
    back = clone_params(ref)
    opt4 = fusedopt.AdamW(back, lr=noam, backend=backend, **kw)
    opt4.load_state_dict(roundtrip(ropt.state_dict()))
    assert float(opt4.param_groups[0]["noam_step"]) == 10  # torch carried a stale counter (7)
    for k in range(10, 13):
        for o, ps in ((ropt, ref), (opt4, back)):
            set_grads(ps, grads(k, ps))
            o.step()
        sched.step()
    assert_same(ropt, ref, opt4, back)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_across_backends(device, require_backend):
    """Saved while running on the Triton kernels, resumed on the torch backend, and vice versa."""
    require_backend("triton", device)
    params = clone_params(make_params(device=device))
    ref = clone_params(params)
    ropt = torch.optim.Adam(ref, lr=1e-2, amsgrad=True)
    opt = fusedopt.Adam(params, lr=1e-2, amsgrad=True, backend="triton")
    train(ropt, ref, 3)
    train(opt, params, 3)
    other = fusedopt.Adam(clone_params(params), lr=1e-2, amsgrad=True, backend="torch")
    moved = other.param_groups[0]["params"]
    other.load_state_dict(roundtrip(opt.state_dict()))
    _continue(ropt, ref, other, moved, start=3)
    back = fusedopt.Adam(clone_params(moved), lr=1e-2, amsgrad=True, backend="triton")
    back.load_state_dict(roundtrip(other.state_dict()))
    _continue(ropt, ref, back, back.param_groups[0]["params"], start=6)
