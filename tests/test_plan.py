"""The cached step plan (fusedopt/_plan.py, csrc/plan.cpp): steps after the first skip the walk
over every parameter, and every change that the walk would see drops the plan, on every backend.

Each case trains fusedopt and torch.optim side by side, makes the same change to both between
steps, trains on, and compares everything (tests/parity.py). It also checks that the steps before
and after the change really ran from a plan (``_plan_stats["fast"]``) and that the change did (or,
for what the plan refreshes in place, did not) rebuild it (``_plan_stats["built"]``): a case
whose steps all walked would prove nothing about the plan.
"""

import gc
import weakref

import numpy
import pytest
import torch
from conftest import backend_device_params, need_backend
from parity import (
    assert_same,
    assert_unchanged,
    clone_params,
    grads,
    make_params,
    roundtrip,
    set_grads,
    snapshot,
)

import fusedopt
from fusedopt import _layout as L

SHAPES = [(1,), (7,), (3, 5)]


def _pair(backend, device, **kw):
    init = make_params(SHAPES)
    params = clone_params([t.to(device) for t in init])
    ref = clone_params(init)
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, **kw)
    ropt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    return opt, params, ropt, ref


def _step(opt, params, ropt, ref, k, none=None, before=None):
    gs = grads(k, ref, none=none)
    set_grads(params, gs)
    set_grads(ref, gs)
    if before is not None:
        before()
    opt.step()
    ropt.step()


def _new_param(device, seed):
    t = make_params([(4,)], seed=seed)[0]
    return clone_params([t.to(device)])[0], clone_params([t])[0]


def _change(name, opt, params, ropt, ref, device):
    """Make change ``name`` to both optimizers; return (whether it must rebuild the plan, the
    parameter lists to train on afterwards)."""
    if name == "add_param_group":
        p, r = _new_param(device, 5)
        opt.add_param_group({"params": [p], "lr": 3e-3})
        ropt.add_param_group({"params": [r], "lr": 3e-3})
        return True, (params + [p], ref + [r])
    if name == "params_list_appended":
        p, r = _new_param(device, 6)
        opt.param_groups[0]["params"].append(p)
        ropt.param_groups[0]["params"].append(r)
        return True, (params + [p], ref + [r])
    if name in ("lr_value", "weight_decay_and_betas"):
        for o in (opt, ropt):
            g = o.param_groups[0]
            g["lr"] = 4e-3
            if name == "weight_decay_and_betas":
                g["weight_decay"] = 0.3
                g["betas"] = (0.8, 0.95)
                g["eps"] = 1e-6
        return False, (params, ref)
    if name == "lr_numpy_float":  # what some schedulers write: a number all the same
        for o in (opt, ropt):
            o.param_groups[0]["lr"] = numpy.float64(4e-3)
        return False, (params, ref)
    if name == "lr_kind":  # a float lr becomes a tensor lr
        opt.param_groups[0]["lr"] = torch.tensor(4e-3, device=device)
        ropt.param_groups[0]["lr"] = torch.tensor(4e-3)
        return True, (params, ref)
    if name == "maximize":
        for o in (opt, ropt):
            o.param_groups[0]["maximize"] = True
        return True, (params, ref)
    if name == "load_state_dict":
        opt.load_state_dict(roundtrip(opt.state_dict()))
        ropt.load_state_dict(roundtrip(ropt.state_dict()))
        return True, (params, ref)
    if name == "state_tensor_replaced":
        for o, p in ((opt, params[1]), (ropt, ref[1])):
            o.state[p]["exp_avg"] = o.state[p]["exp_avg"].clone()
        return True, (params, ref)
    if name == "state_tensor_moved":  # same tensor object, new memory
        for o, p in ((opt, params[2]), (ropt, ref[2])):
            st = o.state[p]["exp_avg_sq"]
            st.data = st.data.clone()
        return True, (params, ref)
    if name == "state_dict_of_param_replaced":
        for o, p in ((opt, params[0]), (ropt, ref[0])):
            o.state[p] = dict(o.state[p])
        return True, (params, ref)
    if name == "param_data_replaced":
        for p in (params[2], ref[2]):
            p.data = p.data.clone()
        return True, (params, ref)
    if name == "max_grad_norm":
        opt.max_grad_norm = 0.5
        return True, (params, ref)
    raise AssertionError(name)


CHANGES = [
    "add_param_group",
    "params_list_appended",
    "lr_value",
    "lr_numpy_float",
    "weight_decay_and_betas",
    "lr_kind",
    "maximize",
    "load_state_dict",
    "state_tensor_replaced",
    "state_tensor_moved",
    "state_dict_of_param_replaced",
    "param_data_replaced",
    "max_grad_norm",
]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("change", CHANGES)
def test_change_between_steps(backend, device, change):
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(2):
        _step(opt, params, ropt, ref, k)
    stats = opt._plan_stats
    assert (stats["built"], stats["fast"]) == (1, 1), stats  # the second step ran from the plan
    rebuild, (params, ref) = _change(change, opt, params, ropt, ref, device)
    clip = (lambda: torch.nn.utils.clip_grad_norm_(ref, 0.5)) if change == "max_grad_norm" else None
    built, fast = stats["built"], stats["fast"]
    for k in range(2, 5):
        _step(opt, params, ropt, ref, k, before=clip)
    assert stats["built"] == built + (1 if rebuild else 0), (change, stats)
    # steps 3 and 4 ran from a plan; step 2 too when nothing needed a rebuild
    assert stats["fast"] == fast + (2 if rebuild else 3), (change, stats)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_state_tensor_replaced_old_one_untouched(backend, device):
    """A state tensor the user replaced is no longer written (the tables had its address)."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(2):
        _step(opt, params, ropt, ref, k)
    old = opt.state[params[1]]["exp_avg"]
    snapshot = old.clone()
    opt.state[params[1]]["exp_avg"] = old.clone()
    ropt.state[ref[1]]["exp_avg"] = ropt.state[ref[1]]["exp_avg"].clone()
    for k in range(2, 4):
        _step(opt, params, ropt, ref, k)
    assert torch.equal(old, snapshot)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("which", ["gained", "lost", "both"])
def test_grad_gained_or_lost(backend, device, which):
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    none = {
        "gained": lambda k, i: i == 1 and k < 3,
        "lost": lambda k, i: i == 1 and k >= 3,
        "both": lambda k, i: i == (k // 3) % 3,
    }[which]
    for k in range(6):
        _step(opt, params, ropt, ref, k, none=none)
    stats = opt._plan_stats
    # a rebuild at each change (steps 0 and 3), every other step from the plan
    assert (stats["built"], stats["fast"]) == (2, 4), stats
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_grad_in_another_layout(backend, device):
    """A grad whose strides differ from its parameter's needs a copy: those steps walk (no
    plan), and the plan comes back with the layout."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    stats = opt._plan_stats
    for k in range(6):
        gs = grads(k, ref)
        set_grads(ref, gs)
        set_grads(params, gs)
        if 2 <= k < 4:  # (3, 5) grads in column-major layout
            params[2].grad = params[2].grad.t().contiguous().t()
            assert params[2].grad.stride() != params[2].stride()
        opt.step()
        ropt.step()
    assert (stats["built"], stats["fast"]) == (2, 2), stats  # steps 1 and 5 from a plan
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_grads_in_new_memory_keep_the_plan(backend, device):
    """zero_grad(set_to_none=True) and backward() give new grad tensors every step: the plan
    refreshes their addresses and is not rebuilt; the same grad tensors again work too."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(4):
        _step(opt, params, ropt, ref, k)
    for k in range(4, 6):  # the same grad tensors, new values written into them in place
        for p, r, g in zip(params, ref, grads(k, ref)):
            p.grad.copy_(g)
            r.grad.copy_(g)
        opt.step()
        ropt.step()
    assert (opt._plan_stats["built"], opt._plan_stats["fast"]) == (1, 5)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_tensor_lr_changed_in_place_keeps_the_plan(backend, device):
    need_backend(backend, device)
    init = make_params(SHAPES)
    params = clone_params([t.to(device) for t in init])
    ref = clone_params(init)
    lr, rlr = torch.tensor(1e-2, device=device), torch.tensor(1e-2)
    opt = fusedopt.AdamW(params, lr=lr, backend=backend)
    ropt = torch.optim.AdamW(ref, lr=rlr, foreach=False)
    for k in range(5):
        _step(opt, params, ropt, ref, k)
        lr.mul_(0.5)
        rlr.mul_(0.5)
    assert (opt._plan_stats["built"], opt._plan_stats["fast"]) == (1, 4)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("bad", ["lr", "grad_shape", "grad_dtype", "sparse_grad"])
def test_bad_input_after_planned_steps_changes_nothing(backend, device, bad):
    """Bad input that arrives while a plan holds still raises the walk's error before anything
    changes; fixed, the steps go on exactly."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(3):
        _step(opt, params, ropt, ref, k)
    assert opt._plan_stats["fast"] == 2
    set_grads(params, grads(3, ref))
    snap = snapshot(opt, params)
    good = params[1].grad
    if bad == "lr":
        opt.param_groups[0]["lr"] = -1.0
        match = "Invalid learning rate"
    elif bad == "grad_shape":
        params[1].grad = good.clone()
        params[1].grad.data = torch.zeros(8, device=device)  # `.grad = ` would refuse it
        match = "does not match its parameter"
    elif bad == "grad_dtype":
        params[1].grad = good.clone()
        params[1].grad.data = torch.zeros(7, dtype=torch.float64, device=device)
        match = "does not match its parameter"
    else:
        params[1].grad = torch.zeros(7, device=device).to_sparse()
        match = "sparse"
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        opt.step()
    assert_unchanged(opt, params, snap)
    opt.param_groups[0]["lr"] = 1e-2
    params[1].grad = good
    set_grads(ref, grads(3, ref))
    opt.step()
    ropt.step()
    for k in range(4, 6):
        _step(opt, params, ropt, ref, k)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_plan_keeps_no_grad_alive(backend, device):
    """The plan reads each step's grads and lets go of them: a grad the model drops
    (zero_grad(set_to_none=True)) is freed, as with torch.optim."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(3):
        _step(opt, params, ropt, ref, k)
    assert opt._plan_stats["fast"] == 2
    refs = [weakref.ref(p.grad) for p in params]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def test_no_plan_for_tensor_subclasses():
    """A parameter of a tensor subclass (other than DTensor) may define .grad as it likes: its
    steps always walk."""

    class Sub(torch.Tensor):
        pass

    p = torch.nn.Parameter(torch.randn(3).as_subclass(Sub))
    assert type(p) is not torch.nn.Parameter
    opt = fusedopt.AdamW([p], backend="torch")
    for _ in range(3):
        p.grad = torch.randn(3).as_subclass(Sub)
        opt.step()
    assert opt._plan_stats == {"built": 0, "fast": 0, "why": None}


def _cpu_pair_after_planned_steps(steps=4, lr=1e-2):
    opt, params, ropt, ref = _pair("cpu", "cpu")
    opt.param_groups[0]["lr"] = lr
    ropt.param_groups[0]["lr"] = lr
    for k in range(steps):
        _step(opt, params, ropt, ref, k)
    return opt, params, ropt, ref


def test_cpu_plan_skips_the_ops_per_tensor_checks_only_when_nothing_changed():
    """On the CPU a plan runs the op once with all its checks, then the kernels directly while the
    tables hold what that checked call saw (and the tensors they name are where it saw them,
    which collect() checks): the steps are the same."""
    opt, params, ropt, ref = _cpu_pair_after_planned_steps()
    cpp = opt._plan.cpp
    assert cpp.trusted_runs() == 2  # step 1 from the plan, checked; steps 2 and 3 trusted
    for o in (opt, ropt):  # a new lr is no reason to check again: no check reads it
        o.param_groups[0]["lr"] = 2e-3
    for k in range(4, 6):
        _step(opt, params, ropt, ref, k)
    assert opt._plan.cpp is cpp and cpp.trusted_runs() == 4
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("table", ["tmeta", "chunks", "gptr", "grads", "lr_mode"])
def test_cpu_plan_tampered_tables_meet_the_ops_checks(table):
    """Tables that no longer hold what the checked call saw go through the op's checks again:
    garbage in them raises, having changed nothing, instead of being trusted."""
    # a tensor lr: gptr holds its address, which the op checks
    opt, params, ropt, ref = _cpu_pair_after_planned_steps(lr=torch.tensor(1e-2))
    tables = opt._tables[("cpu", torch.device("cpu"))]
    set_grads(params, grads(4, ref))
    if table == "grads":
        # what collect() writes is checked against the grads it collected: pretend the upload
        # of a changed address went missing (and stays missing) by writing the old one back
        cpp = opt._plan.cpp
        collect = cpp.collect

        class Stale:
            def __getattr__(self, name):
                return getattr(cpp, name)

            def collect(self, *args):
                why = collect(*args)
                tables.grads[0] = 8
                return why

            def grads_changed(self, index):
                return False

        opt._plan.cpp = Stale()
        for w in opt._plan.works:
            w.fast = (opt._plan.cpp, w.fast[1])
    elif table == "gptr":
        tables.gptr[0, 0] = 0  # the tensor lr's address
    elif table == "lr_mode":  # a Noam lr, whose counter address gptr does not have
        tables.hyper[0, L.H_MODE] = L.LR_NOAM
    else:
        getattr(tables, table).view(-1)[0] = 8  # an address or index out of anything
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="fusedopt"):
        opt.step()
    assert_unchanged(opt, params, snap)


MANY = 1500


def _many_pair(backend, device):
    init = make_params([(1,)] * (MANY - 2) + [(3,), (2, 2)], seed=3)
    params = clone_params([t.to(device) for t in init])
    ref = clone_params(init)
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend)
    ropt = torch.optim.AdamW(ref, lr=1e-2, foreach=True)
    return opt, params, ropt, ref


# collect() is the same C++ for every backend: the native ones (fastest to run) stand for all
@pytest.mark.parametrize("backend,device", backend_device_params(("cpu", "cuda")))
@pytest.mark.parametrize(
    "change,why",
    [
        # a change near the end of a long list, then one near the start with one near the end:
        # the first in the order of the checks (held tensors, then each parameter's state dict
        # and grad) is the reason given
        ("late_grad_lost", "a parameter lost its grad"),
        ("early_state_entry+late_grad_lost", "a parameter's state changed"),
        ("early_grad_lost+late_param_moved", "a parameter or state tensor moved"),
    ],
)
def test_many_tensors_change_anywhere(backend, device, change, why):
    """With many tensors, fresh grads keep the plan, and a change anywhere in the lists drops it,
    with the reason of the first check that fails; the steps match torch.optim throughout."""
    need_backend(backend, device)
    opt, params, ropt, ref = _many_pair(backend, device)
    stats = opt._plan_stats
    for k in range(3):
        _step(opt, params, ropt, ref, k)
    assert (stats["built"], stats["fast"]) == (1, 2), stats
    late, early = MANY - 3, 2
    none = None
    for part in change.split("+"):
        if part.endswith("grad_lost"):
            lost = late if part.startswith("late") else early
            none = (lambda i: lambda k, j: j == i)(lost)
        elif part.endswith("state_entry"):
            i = late if part.startswith("late") else early
            for o, ps in ((opt, params), (ropt, ref)):
                o.state[ps[i]]["exp_avg"] = o.state[ps[i]]["exp_avg"].clone()
        elif part == "late_param_moved":
            for ps in (params, ref):
                ps[late].data = ps[late].data.clone()
    _step(opt, params, ropt, ref, 3, none=none)
    assert stats["why"] == why
    assert (stats["built"], stats["fast"]) == (2, 2), stats
    for k in range(4, 6):
        _step(opt, params, ropt, ref, k, none=none)
    assert (stats["built"], stats["fast"]) == (2, 4), stats
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_grads_collected_by_a_step_that_never_ran(backend, device):
    """collect() of new grads whose step then never ran (a step may stop after collect(); today
    such a step also drops the plan, but the plan must not rely on that): the next collect() of
    the same grads still reports their addresses as new to the tables."""
    need_backend(backend, device)
    opt, params, ropt, ref = _pair(backend, device)
    for k in range(3):
        _step(opt, params, ropt, ref, k)
    gs = grads(3, ref)
    set_grads(params, gs)
    set_grads(ref, gs)
    cpp = opt._plan.cpp
    assert cpp.collect(opt.param_groups, opt.state) == ""
    cpp.release()
    opt.step()
    ropt.step()
    assert opt._plan.cpp is cpp and opt._plan_stats["fast"] == 3
    assert_same(ropt, ref, opt, params)
