"""GradScaler (in-kernel unscale, skipped inf steps) and fused gradient clipping, every backend."""

import pytest
import torch
from conftest import backend_device_params
from parity import FP32, assert_same, clone_params, grads, make_params

import fusedopt
from fusedopt import _layout as L
from fusedopt import backends

BACKENDS = backend_device_params()


def _scaled_grads(step, params, scale, inf_at=None):
    """The grads a scaled loss would give: scale * g; an inf in one element at step ``inf_at``."""
    gs = []
    for i, g in enumerate(grads(step, params, none=lambda k, i: (k + i) % 5 == 0)):
        if g is not None:
            g = g * scale
            if step == inf_at and i == 5:
                g[3] = float("inf")
        gs.append(g)
    return gs


def _scaler(device):
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
    scaler.scale(torch.ones((), device=device))  # creates its scale tensor
    return scaler


def _amp_steps(opt, params, scaler, device, steps, inf_at, clip=None):
    for k in range(steps):
        scale = float(scaler.get_scale())  # the test may sync; the optimizer may not
        for p, g in zip(params, _scaled_grads(k, params, scale, inf_at)):
            p.grad = None if g is None else g.to(p.dtype).to(device)
        if clip is not None:  # the torch.optim recipe: unscale, clip, step
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("AdamW", dict(lr=1e-2, amsgrad=True)),
        ("Adam", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ],
)
def test_gradscaler_matches_torch_fused(backend, device, cls, kw, require_backend):
    """Same as torch.optim's fused=True under the same GradScaler: the grads are unscaled in the
    kernel and written back unscaled, and the step with an inf changes nothing (step counters
    included) while the scaler backs off."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, fused=True, **kw)
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)
    rs, s = _scaler(device), _scaler(device)
    _amp_steps(ropt, ref, rs, device, 6, inf_at=3)
    _amp_steps(opt, ours, s, device, 6, inf_at=3)
    assert float(rs.get_scale()) == float(s.get_scale())
    assert_same(ropt, ref, opt, ours)
    for a, b in zip(ref, ours):
        if a.grad is not None:
            torch.testing.assert_close(b.grad.cpu(), a.grad.cpu(), **FP32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_skipped_step_keeps_noam_and_steps(backend, device, require_backend):
    require_backend(backend, device)
    noam = fusedopt.Noam(64, 3)
    params = clone_params(make_params(device=device))
    opt = fusedopt.AdamW(params, lr=noam, backend=backend)
    scaler = _scaler(device)
    _amp_steps(opt, params, scaler, device, 5, inf_at=2)
    assert float(opt.param_groups[0]["noam_step"]) == 4  # 5 steps, one skipped
    assert float(opt.get_last_lr()[0]) == pytest.approx(noam.rate(4), rel=1e-12)
    assert max(float(opt.state[p]["step"]) for p in params) == 4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [
        ("AdamW", dict(lr=1e-2, amsgrad=True)),
        ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
        ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ],
)
def test_clipping_matches_clip_grad_norm(backend, device, cls, kw, require_backend):
    """max_grad_norm equals torch.nn.utils.clip_grad_norm_ followed by the torch.optim step, on
    steps where the norm is above the threshold and steps where it is below."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, **kw)
    opt = getattr(fusedopt, cls)(ours, backend=backend, max_grad_norm=20.0, **kw)
    for k in range(6):
        gs = grads(k, params, none=lambda step, i: (step + i) % 5 == 0)
        factor = 1.0 if k % 2 else 0.3  # norms about 33 (clipped) and 10 (not clipped)
        for a, b, g in zip(ref, ours, gs):
            a.grad = b.grad = None
            if g is not None:
                a.grad = (g * factor).float().to(device)
                b.grad = a.grad.clone()
        before = [b.grad.clone() if b.grad is not None else None for b in ours]
        norm = torch.nn.utils.clip_grad_norm_(ref, 20.0)
        ropt.step()
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), norm.cpu(), rtol=2e-6, atol=0)
        for b, g in zip(ours, before):  # .grad itself is left as it was: the clip is in the step
            assert g is None or torch.equal(b.grad, g)
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradscaler_with_clipping(backend, device, require_backend):
    """torch's recipe (scaler.unscale_, clip_grad_norm_, scaler.step with fused AdamW) against
    fusedopt with max_grad_norm under the same scaler: no separate unscale or clip pass."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params(params), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1e-2, fused=True)
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend, max_grad_norm=20.0)
    _amp_steps(ropt, ref, _scaler(device), device, 6, inf_at=2, clip=20.0)
    _amp_steps(opt, ours, _scaler(device), device, 6, inf_at=2)
    assert_same(ropt, ref, opt, ours)


# Triton on the CPU is left out: 4,200 interpreted programs per pass take minutes; its first stage
# over several programs is test_triton_clip_reduction_stage_one_over_many_programs
MANY_CHUNKS = [p for p in backend_device_params(("cpu", "cuda", "triton")) if p.id != "triton-cpu"]


@pytest.mark.parametrize("backend,device", MANY_CHUNKS)
def test_clipping_over_more_chunks_than_one_stage_block(backend, device, require_backend):
    """More chunks than one block of the clipping reduction's first stage adds (layout.h's
    CLIP_PER_BLOCK, 4,096; one chunk per tensor here), and more tensors than one prologue block:
    the norm and the step match clip_grad_norm_ and torch.optim, in two groups."""
    require_backend(backend, device)
    n = L.CLIP_PER_BLOCK + 104
    init = make_params([(3,)] * n, device=device)
    ref, ours = clone_params(init), clone_params(init)
    split = n // 3
    groups = lambda ps: [dict(params=ps[:split]), dict(params=ps[split:], lr=3e-3)]
    ropt = torch.optim.AdamW(groups(ref), lr=1e-2, foreach=False)
    opt = fusedopt.AdamW(groups(ours), lr=1e-2, backend=backend, max_grad_norm=1.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for a, b in zip(ref, ours):
            a.grad = torch.randn(3, generator=gen).to(device)
            b.grad = a.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)  # about 112: clipped
        ropt.step()
        opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), norm.cpu(), rtol=2e-6, atol=0)
    assert_same(ropt, ref, opt, ours)


def test_clip_grad_norm_standalone():
    params = make_params()
    a, b = clone_params(params), clone_params(params)
    for x, y, g in zip(a, b, grads(0, params)):
        x.grad, y.grad = g.float(), g.float().clone()
    norm = fusedopt.clip_grad_norm_(a, 5.0)
    expected = torch.nn.utils.clip_grad_norm_(b, 5.0)
    torch.testing.assert_close(norm, expected, rtol=2e-6, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-6, atol=1e-9)


def test_max_grad_norm_validation():
    p = torch.nn.Parameter(torch.randn(3))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="Invalid max_grad_norm"):
            fusedopt.AdamW([p], max_grad_norm=bad)
    assert fusedopt.AdamW([p], max_grad_norm=1.0).last_grad_norm is None


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rebuild", ["grad-set", "param-group", "load-state-dict"])
def test_skipped_step_after_rebuild_keeps_last_norm(backend, device, rebuild, require_backend):
    """A step GradScaler skips writes no norm: ``last_grad_norm`` keeps the last one, also when
    the metadata tables were rebuilt just before (another set of grads, a new param group, a loaded
    checkpoint), where new clip buffers used to start from 0."""
    require_backend(backend, device)
    params = clone_params(make_params(device=device))
    opt = fusedopt.AdamW(params, lr=1e-2, backend=backend, max_grad_norm=0.5)
    for p, g in zip(params, grads(0, params)):
        p.grad = g.to(device=device, dtype=p.dtype)
    opt.step()
    norm = opt.last_grad_norm
    assert float(norm) > 0
    if rebuild == "grad-set":
        params[1].grad = None
    elif rebuild == "param-group":
        extra = torch.nn.Parameter(torch.ones(3, device=device))
        extra.grad = torch.ones_like(extra)
        opt.add_param_group({"params": [extra]})
    else:
        opt.load_state_dict(opt.state_dict())
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.ones((), device=device)  # GradScaler found an inf: the step is skipped
    steps = [float(opt.state[p]["step"]) for p in params if p in opt.state]
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params if p in opt.state] == steps
    assert float(opt.last_grad_norm) == float(norm)


@pytest.mark.triton
def test_triton_clip_reduction_stage_one_over_many_programs():
    """The first stage of the Triton clipping reduction (multi_tensor._clip_partials), over more
    chunk sums than one program takes: every program adds its own fixed range, in float64, and
    the stage-two sum of its results equals the float64 sum of all chunk sums; the same bits on
    every run (a fixed order, whatever the scheduling)."""
    if backends.unavailable("triton", "cpu"):
        pytest.skip(backends.unavailable("triton", "cpu"))
    import triton  # noqa: PLC0415

    from fusedopt.kernels import multi_tensor as mt  # noqa: PLC0415

    n = 2 * mt.CLIP_PER_PROGRAM + 123  # three programs, the last one partly masked
    partials = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 100
    runs = []
    for _ in range(2):
        sums = torch.full((triton.cdiv(n, mt.CLIP_PER_PROGRAM),), float("nan"), dtype=torch.float64)
        mt._clip_partials[(sums.numel(),)](
            partials, n, sums, PER_PROGRAM=mt.CLIP_PER_PROGRAM, BLOCK=mt.CLIP_BLOCK
        )
        runs.append(sums)
    assert torch.equal(runs[0], runs[1])
    per_program = partials.double().split(mt.CLIP_PER_PROGRAM)
    expected = torch.stack([p.sum() for p in per_program])
    # float64 sums of float32 values: exact to about 1e-16 relative, whatever the order
    torch.testing.assert_close(runs[0], expected, rtol=1e-14, atol=0)
