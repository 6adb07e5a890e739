"""The public API: torch.optim's arguments and errors, backends, launches, metadata reuse."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import backend_device_params
from parity import (
    assert_same,
    assert_unchanged,
    clone_params,
    grads,
    make_params,
    roundtrip,
    set_grads,
    snapshot,
    train,
)

import fusedopt
from fusedopt import _layout as L
from fusedopt import _tables, backends

BAD = {
    "Adam": [
        dict(lr=-1.0),
        dict(lr=float("nan")),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.1)),
        dict(weight_decay=-0.1),
    ],
    "AdamW": [
        dict(lr=-1e-3),
        dict(betas=(-0.1, 0.9)),
        dict(betas=(0.9, 1.0)),
        dict(weight_decay=float("nan")),
    ],
    "RMSprop": [
        dict(lr=-1.0),
        dict(eps=-1.0),
        dict(momentum=-0.5),
        dict(weight_decay=-1.0),
        dict(alpha=-0.9),
    ],
}


@pytest.mark.parametrize(
    "cls,kw",
    [(c, k) for c, ks in BAD.items() for k in ks],
    ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x)),
)
def test_bad_hyperparameters_give_torchs_message(cls, kw):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError) as expected:
        getattr(torch.optim, cls)([p], **kw)
    with pytest.raises(ValueError) as got:
        getattr(fusedopt, cls)([p], **kw)
    assert str(got.value) == str(expected.value)


def test_bad_param_group_rejected_before_any_change():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = fusedopt.AdamW([a])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        opt.add_param_group({"params": [b], "betas": (0.9, 2.0)})
    assert opt.param_groups == before


@pytest.mark.parametrize(
    "backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
)
@pytest.mark.parametrize(
    "breakage", ["group_lr", "grad_shape", "grad_dtype", "sparse", "float64_param"]
)
def test_bad_step_input_changes_nothing(backend, breakage):
    if backends.unavailable(backend, "cpu"):
        pytest.skip(backends.unavailable(backend, "cpu"))
    params = clone_params(make_params([(4,), (3, 2), (5,)]))
    opt = fusedopt.Adam(params, lr=1e-2, amsgrad=True, backend=backend)
    train(opt, params, 2)
    set_grads(params, grads(9, params))
    snap = snapshot(opt, params)
    if breakage == "group_lr":
        opt.param_groups[0]["lr"] = -1.0
        error = ValueError
    elif breakage == "grad_shape":
        params[2].grad.data = torch.randn(6)  # torch refuses it through .grad; hooks can do this
        error = ValueError
    elif breakage == "grad_dtype":
        params[2].grad.data = params[2].grad.data.double()
        error = ValueError
    elif breakage == "sparse":
        params[2].grad = params[2].grad.to_sparse()
        error = RuntimeError
    else:
        extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        opt.add_param_group({"params": [extra]})
        extra.grad = torch.ones_like(extra)
        error = TypeError
    with pytest.raises(error):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_differentiable_and_fused_foreach_rejected():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="differentiable"):
        fusedopt.Adam([p], differentiable=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        fusedopt.RMSprop([p], differentiable=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        fusedopt.AdamW([p], fused=True, foreach=True)
    for kw in (dict(foreach=True), dict(fused=True), dict(capturable=True)):
        fusedopt.AdamW([p], **kw)  # accepted for compatibility


def test_backend_names_and_auto_selection(monkeypatch):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        fusedopt.Adam([p], backend="nope")
    # the native CPU kernels when built; never the Triton interpreter (a test tool, not fast)
    expected = "cpu" if backends.unavailable("cpu", "cpu") is None else "torch"
    assert backends.select("auto", "cpu") == expected
    monkeypatch.setenv("FUSEDOPT_BACKEND", "triton")
    if backends.unavailable("triton", "cpu") is None:
        assert fusedopt.Adam([p]).backend == "triton"
    else:
        with pytest.raises(RuntimeError, match="triton"):
            fusedopt.Adam([p])
    monkeypatch.setenv("FUSEDOPT_BACKEND", "torch")
    assert fusedopt.Adam([p]).backend == "torch"
    assert fusedopt.Adam([p], backend="auto").backend == "torch"


def test_triton_on_cpu_without_interpreter_says_why():
    code = (
        "import torch, fusedopt\n"
        "p = torch.nn.Parameter(torch.randn(3))\n"
        "try:\n"
        "    fusedopt.Adam([p], backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    if "not importable" not in out.stdout:
        assert "TRITON_INTERPRET=1" in out.stdout, out.stdout


@pytest.mark.parametrize(
    "backend", ["torch", "cpu", pytest.param("triton", marks=pytest.mark.triton)]
)
def test_closure_zero_grad_and_late_param_group(backend):
    if backends.unavailable(backend, "cpu"):
        pytest.skip(backends.unavailable(backend, "cpu"))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref = torch.nn.Linear(4, 3)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-2, backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            assert torch.is_grad_enabled()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return closure

    with torch.no_grad():
        for _ in range(3):
            loss = opt.step(closure_for(model, opt))
            rloss = ropt.step(closure_for(ref, ropt))
            assert torch.equal(loss, rloss) or abs(loss.item() - rloss.item()) < 1e-6
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # a group added after training started
    extra, rextra = clone_params(make_params([(6,)]) * 2)
    opt.add_param_group({"params": [extra], "lr": 3e-2, "amsgrad": True})
    ropt.add_param_group({"params": [rextra], "lr": 3e-2, "amsgrad": True})
    train(opt, [*model.parameters(), extra], 3)
    train(ropt, [*ref.parameters(), rextra], 3)
    assert_same(ropt, [*ref.parameters(), rextra], opt, [*model.parameters(), extra])


class _LaunchCounter:
    def __init__(self, monkeypatch):
        from fusedopt.kernels import adam, rmsprop, sgd

        self.launches = []
        kernels = (adam._adam_main, adam._adam_prologue, rmsprop._rmsprop_main, sgd._sgd_main)
        kinds = {type(k) for k in kernels}
        for kind in kinds:
            original = kind.run

            def run(fn, *args, _original=original, **kwargs):
                self.launches.append(getattr(fn, "__name__", None) or fn.fn.__name__)
                return _original(fn, *args, **kwargs)

            monkeypatch.setattr(kind, "run", run)


@pytest.mark.triton
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop", "SGD"])
def test_one_launch_per_dtype_bucket(cls, monkeypatch):
    """Many tensors in several groups with different options: the two prologue launches (the
    groups' one program, then a grid over the tensors) plus one main launch per dtype, counted at
    Triton's own launch entry point."""
    if backends.unavailable("triton", "cpu"):
        pytest.skip(backends.unavailable("triton", "cpu"))
    f32 = clone_params(make_params([(3,)] * 40 + [(1030,), (0,)]))
    b16 = clone_params(make_params([(5,)] * 30, dtype=torch.bfloat16))
    options = {
        "AdamW": dict(amsgrad=True, weight_decay=0.3),
        "RMSprop": dict(centered=True, momentum=0.9),
        "SGD": dict(momentum=0.9, nesterov=True),
    }[cls]
    opt = getattr(fusedopt, cls)(
        [dict(params=f32[:20] + b16[:10]), dict(params=f32[20:] + b16[10:], lr=1e-4, **options)],
        backend="triton",
    )
    counter = _LaunchCounter(monkeypatch)
    for k in range(3):
        set_grads(f32 + b16, grads(k, f32 + b16))
        counter.launches.clear()
        opt.step()
        assert len(counter.launches) == 4, counter.launches  # 2 prologues + fp32 + bf16
    only_empty = clone_params(make_params([(0,)]))
    opt = getattr(fusedopt, cls)(only_empty, backend="triton")
    set_grads(only_empty, grads(0, only_empty))
    counter.launches.clear()
    opt.step()
    assert len(counter.launches) == 2  # the step still advances; nothing to stream
    assert float(opt._step_of(only_empty[0])) == 1


@pytest.mark.parametrize("backend,device", backend_device_params(("triton", "cuda")))
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop"])
def test_tensor_prologue_grid_covers_every_tensor(backend, device, cls, require_backend):
    """More tensors than one program of the per-tensor prologue takes (Triton's PROLOGUE_BLOCK,
    128; CUDA's kPrologueBlock, 256, beyond which a grid follows the groups' block), in two
    groups: every tensor's step and scalars come from the right program and group, as
    torch.optim computes them."""
    require_backend(backend, device)
    if backend == "triton":
        from fusedopt.kernels.multi_tensor import PROLOGUE_BLOCK as block
    else:
        block = 256  # csrc/cuda/multi_tensor.cuh's kPrologueBlock
    init = make_params([(2,)] * (2 * block + 44), device=device)
    params, ref = clone_params(init), clone_params(init)
    split = block + 7  # the second group starts inside the second program (block)
    groups = lambda ps: [dict(params=ps[:split]), dict(params=ps[split:], lr=3e-3)]
    opt = getattr(fusedopt, cls)(groups(params), lr=1e-2, backend=backend)
    ropt = getattr(torch.optim, cls)(groups(ref), lr=1e-2, foreach=False)
    train(opt, params, 3)
    train(ropt, ref, 3)  # the same grads: they depend on the step and the shapes only
    assert all(float(opt.state[p]["step"]) == 3 for p in params)
    assert_same(ropt, ref, opt, params)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_metadata_built_once_and_reused(backend, monkeypatch):
    if backends.unavailable(backend, "cpu"):
        pytest.skip(backends.unavailable(backend, "cpu"))
    builds = []
    original = _tables.DeviceTables._tensor_rows
    monkeypatch.setattr(
        _tables.DeviceTables,
        "_tensor_rows",
        staticmethod(lambda slots: builds.append(1) or original(slots)),
    )
    params = clone_params(make_params())
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend)
    for k in range(4):
        for p, g in zip(params, grads(k, params)):
            if p.grad is None:
                p.grad = g.float()
            else:
                p.grad.copy_(g)  # same grad storage every step
        opt.step()
    tables = opt._tables[(backend, torch.device("cpu"))]
    assert len(builds) == 1
    hyper = tables.hyper
    opt.step()
    assert tables.hyper is hyper, "nothing changed: the group table is reused too"
    opt.param_groups[0]["lr"] = 5e-3  # a scheduler's write: only the group table is rebuilt
    opt.step()
    assert len(builds) == 1 and tables.hyper[0, 0].item() == 5e-3
    params[0].grad = None  # the parameter set changes: the tensor table is rebuilt
    opt.step()
    assert len(builds) == 2


TABLE_BUFFERS = ("tmeta", "grads", "chunks", "hyper", "gptr", "glr", "scal", "partials", "clip")


def _addresses(tables):
    return {name: getattr(tables, name).data_ptr() for name in TABLE_BUFFERS}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_tables_refilled_in_place(backend, monkeypatch):
    """A CUDA graph replays the addresses it captured: a new lr or weight decay, grads in new
    memory and a loaded checkpoint refill the tables where they are (the new values do reach
    the kernels); only a new parameter layout takes new buffers."""
    if backends.unavailable(backend, "cpu"):
        pytest.skip(backends.unavailable(backend, "cpu"))
    params = clone_params(make_params())
    ref = clone_params(make_params())
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, max_grad_norm=1.0)
    ropt = fusedopt.AdamW(ref, lr=1e-2, backend="torch", max_grad_norm=1.0)
    train(opt, params, 2)
    train(ropt, ref, 2)
    tables = opt._tables[(backend, torch.device("cpu"))]
    before = _addresses(tables)
    for o in (opt, ropt):
        o.param_groups[0]["lr"] = 3e-3
        o.param_groups[0]["weight_decay"] = 0.2
    train(opt, params, 1, start=2)  # train() sets grads in new memory each step
    train(ropt, ref, 1, start=2)
    assert _addresses(tables) == before
    assert tables.hyper[0, 0].item() == 3e-3
    saved = roundtrip(opt.state_dict())
    opt.load_state_dict(saved)  # new state tensors: the tensor table gets their addresses
    ropt.load_state_dict(roundtrip(ropt.state_dict()))
    train(opt, params, 2, start=3)
    train(ropt, ref, 2, start=3)
    assert opt._tables[(backend, torch.device("cpu"))] is tables
    assert _addresses(tables) == before
    assert_same(ropt, ref, opt, params)
    params[0].grad = None  # another layout: new buffers, as they must be
    opt.step()
    assert _addresses(tables)["tmeta"] != before["tmeta"]


def test_captured_tables_outlive_layout_changes():
    """Once a graph has captured the tables: buffers it may read are kept when a layout change
    replaces them, and eager steps upload every table, since a replay rewrites them."""
    params = clone_params(make_params())
    opt = fusedopt.AdamW(params, lr=1e-2, backend="torch")
    train(opt, params, 1)
    work = opt._gather()[torch.device("cpu")]
    opt._prepare(work)
    tables = _tables.DeviceTables(torch.device("cpu"), L.ADAM_COLS, 64).update(work)
    tables.captured = True  # as a capture on a CUDA device marks them
    hyper = tables.hyper.clone()
    tables.hyper.zero_()  # as a replay of a graph captured with other values would
    tables.update(work)
    assert torch.equal(tables.hyper, hyper)
    old = {name: getattr(tables, name) for name in TABLE_BUFFERS}
    work.slots = work.slots[1:]  # one parameter fewer
    work.buckets = [(b, max(s - 1, 0), e - 1) for b, s, e in work.buckets]
    tables.update(work)
    kept = {t.data_ptr() for t in tables._kept}
    replaced = [n for n in TABLE_BUFFERS if getattr(tables, n).data_ptr() != old[n].data_ptr()]
    assert {"tmeta", "grads", "scal"} <= set(replaced)
    assert all(old[n].data_ptr() in kept for n in replaced)


def test_step_hooks_inherited():
    p = torch.nn.Parameter(torch.randn(3))
    opt = fusedopt.RMSprop([p])
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["pre", "post"]
