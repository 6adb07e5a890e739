"""GradScaler (in-kernel unscale, skipped inf steps) and fused gradient clipping, every backend."""

import pytest
import torch
from conftest import backend_device_params
from parity import (
    FP32,
    STATE_SCALE_RTOL,
    _close,
    _max_abs,
    assert_same,
    clone_params,
    grads,
    make_params,
)

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


# The reference of the GradScaler tests is torch's fused kernel on the CPU, whatever the device;
# torch's fused CUDA kernel is compared too, but its second moments against float64 (issue 22, the
# H200 run with torch 2.11.0+cu130: exp_avg_sq off by 1.29e-5 relative, every backend).
#
# v = b2*v + (1-b2)*g*g unrolls to v_t = sum_k (1-b2) * b2**(t-k) * g_k**2: every term carries the
# factor (1-b2), so a relative error d in that factor is a relative error d in v (and d/2 in
# sqrt(v), so in each update). How the float32 kernels round it, for b2 = 0.999:
# - fusedopt (adam.h, kernels/adam.py, the torch backend), torch's fused CPU kernel, and torch's
#   foreach and for-loop paths on either device: float32(1 - b2), 1 - b2 rounded once from
#   float64 (0.0010000000475): d = +4.7e-8, under one float32 ulp;
# - torch's fused CUDA kernel since its betas became float32 (pytorch PR 173224, "Use fma for fused
#   Adam(W) on CUDA", in torch 2.11): v = fma(b2, v, fma(-b2, g*g, g*g)) with b2 = float32(0.999),
#   so the factor is 1 - float32(0.999) = 0.00099998713: d = -1.2875e-5, about 108 ulps.
# Judged against a float64 run of torch.optim on the same grads (_float64_run), fusedopt's
# exp_avg_sq is within 1.3e-7 (an ulp or two; 6% of the FP32 tolerance below) and torch's fused
# CUDA one is off by 1.29e-5, which is d. So fusedopt keeps float32(1 - b2), as every other
# torch.optim path does; its FP32-tolerance reference is the fused kernel that rounds the same way
# (torch's CPU one); torch's fused CUDA run must match fusedopt in all the rest at FP32 tolerance
# (params, where d/2 per update uses under 15% of the tolerance, exp_avg, the unscaled grads,
# steps, the scale), and its exp_avg_sq/max_exp_avg_sq must be the float64 ones times
# (1 - float32(b2))/(1 - b2), or times 1 (older torch computed this line in float64).
SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def _float64_run(cls, kw, params, steps, inf_at, clip=None):
    """torch.optim's for-loop in float64 on the CPU, fed the float32 grads of the GradScaler runs
    unscaled (the scales are powers of two: exact) and skipping the step with the inf."""
    ps = clone_params([p.detach().cpu() for p in params], torch.float64)
    opt = getattr(torch.optim, cls)(ps, foreach=False, **kw)
    for k in range(steps):
        if k == inf_at:
            continue
        for p, g in zip(ps, _scaled_grads(k, ps, 1.0)):
            p.grad = None if g is None else g.float().double()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ps, clip)
        opt.step()
    return opt, ps


def _assert_second_moments(opt, params, opt64, params64, factor=1.0, who="fusedopt"):
    """exp_avg_sq (and max_exp_avg_sq) within FP32 tolerance of ``factor`` times float64's."""
    for i, (a, b) in enumerate(zip(params64, params)):
        sa, sb = opt64.state.get(a, {}), opt.state.get(b, {})
        for key in SECOND_MOMENTS:
            if key not in sa:
                continue
            expected = sa[key] * factor
            _close(
                sb[key].double(),
                expected,
                lambda m, i=i, key=key: f"{who} param {i} {key} against float64 x {factor}: {m}",
                scale=STATE_SCALE_RTOL * _max_abs(expected),
                **FP32,
            )


def _check_torch_fused_cuda(copt, cparams, opt, params, opt64, params64):
    """torch's fused CUDA run against fusedopt's (all but the second moments) and its second moments
    against float64, with its rounding of 1 - b2 divided out (see above)."""
    assert_same(copt, cparams, opt, params, skip=SECOND_MOMENTS)
    b2 = copt.param_groups[0]["betas"][1]
    float32_betas = (1.0 - float(torch.tensor(b2, dtype=torch.float32))) / (1.0 - b2)
    errors = []
    for factor in (float32_betas, 1.0):
        try:
            _assert_second_moments(copt, cparams, opt64, params64, factor, "torch fused CUDA")
            return
        except AssertionError as e:
            errors.append(e)
    raise errors[0]


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
    ref, ours = clone_params([p.cpu() for p in params]), clone_params(params)
    ropt = getattr(torch.optim, cls)(ref, fused=True, **kw)  # on the CPU: see SECOND_MOMENTS
    opt = getattr(fusedopt, cls)(ours, backend=backend, **kw)
    rs, s = _scaler("cpu"), _scaler(device)
    _amp_steps(ropt, ref, rs, "cpu", 6, inf_at=3)
    _amp_steps(opt, ours, s, device, 6, inf_at=3)
    assert float(rs.get_scale()) == float(s.get_scale())
    assert_same(ropt, ref, opt, ours)
    for a, b in zip(ref, ours):
        if a.grad is not None:
            torch.testing.assert_close(b.grad.cpu(), a.grad.cpu(), **FP32)
    opt64, params64 = _float64_run(cls, kw, params, 6, inf_at=3)
    _assert_second_moments(opt, ours, opt64, params64)
    if torch.device(device).type == "cuda":
        cref = clone_params(params)
        copt = getattr(torch.optim, cls)(cref, fused=True, **kw)
        cs = _scaler(device)
        _amp_steps(copt, cref, cs, device, 6, inf_at=3)
        assert float(cs.get_scale()) == float(s.get_scale())
        _check_torch_fused_cuda(copt, cref, opt, ours, opt64, params64)
        for a, b in zip(cref, ours):
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
    ref, ours = clone_params([p.cpu() for p in params]), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1e-2, fused=True)  # on the CPU: see SECOND_MOMENTS
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend, max_grad_norm=20.0)
    _amp_steps(ropt, ref, _scaler("cpu"), "cpu", 6, inf_at=2, clip=20.0)
    _amp_steps(opt, ours, _scaler(device), device, 6, inf_at=2)
    assert_same(ropt, ref, opt, ours)
    opt64, params64 = _float64_run("AdamW", dict(lr=1e-2), params, 6, inf_at=2, clip=20.0)
    _assert_second_moments(opt, ours, opt64, params64)
    if torch.device(device).type == "cuda":
        cref = clone_params(params)
        copt = torch.optim.AdamW(cref, lr=1e-2, fused=True)
        _amp_steps(copt, cref, _scaler(device), device, 6, inf_at=2, clip=20.0)
        _check_torch_fused_cuda(copt, cref, opt, ours, opt64, params64)


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


def _expected_scales(infs, scale=2.0**10, growth_interval=2):
    """GradScaler's scale after each update, for steps whose grads hold an inf where ``infs``."""
    out, tracker = [], 0
    for inf in infs:
        if inf:
            scale, tracker = scale * 0.5, 0
        else:
            tracker += 1
            if tracker == growth_interval:
                scale, tracker = scale * 2.0, 0
        out.append(scale)
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradscaler_bf16_grads_own_inf_check(backend, device, require_backend, monkeypatch):
    """The plain recipe (scaler.scale(loss).backward(); scaler.step(opt); scaler.update()) with
    bf16 grads, where torch's inf check has no CUDA kernel: GradScaler hands itself to step()
    (its grad_scaler contract), and fusedopt checks the bf16 grads itself, never with torch's op
    (patched here to fail on bf16, as on CUDA). Against torch.optim's fused AdamW on the unscaled
    grads (the scale is a power of two: exact) with the inf and NaN steps not taken: the same
    params and state, the skipped steps change nothing (step counters included), the grads are
    written back unscaled, the scale backs off and grows as GradScaler's, and step() leaves no
    grad_scale/found_inf behind. On CUDA, no host sync in scaler.step."""
    require_backend(backend, device)
    real = torch._amp_foreach_non_finite_check_and_unscale_

    def no_bf16(grads, found_inf, inv_scale):
        if any(g.dtype == torch.bfloat16 for g in grads):
            raise NotImplementedError("no BFloat16 kernel (as torch's on CUDA)")
        return real(grads, found_inf, inv_scale)

    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", no_bf16)
    params = make_params(device=device, dtype=torch.bfloat16)
    ref, ours = clone_params([p.cpu() for p in params]), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)  # CPU: see SECOND_MOMENTS
    opt = fusedopt.AdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    scaler = _scaler(device)
    bad = {2: float("inf"), 4: float("nan")}
    for k in range(7):
        scale = float(scaler.get_scale())
        gs = grads(k, params, none=lambda step, i: (step + i) % 5 == 0)
        for a, b, g in zip(ref, ours, gs):
            a.grad = None if g is None else g.to(torch.bfloat16)
            b.grad = None if g is None else (a.grad * scale).to(device)
        if k in bad:
            ours[5].grad[3] = bad[k]
        steps = [float(s["step"]) for s in opt.state.values()]
        sync_check = device == "cuda" and k > 0
        if sync_check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt)
        finally:
            if sync_check:
                torch.cuda.set_sync_debug_mode(0)
        scaler.update()
        assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
        if k in bad:
            assert [float(s["step"]) for s in opt.state.values()] == steps
        else:
            ropt.step()
        assert float(scaler.get_scale()) == _expected_scales([i in bad for i in range(k + 1)])[-1]
    assert_same(ropt, ref, opt, ours)
    for a, b in zip(ref, ours):
        if a.grad is not None:
            assert torch.equal(b.grad.cpu(), a.grad)  # unscaled in the kernel: exact (2**k)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradscaler_unscale_then_step(backend, device, require_backend):
    """scaler.unscale_(opt) first (torch's recipe for clipping): step() takes the grads as
    unscaled and the inf check unscale_ recorded, and matches torch.optim's fused AdamW under
    the same recipe, an inf step included."""
    require_backend(backend, device)
    params = make_params(device=device)
    ref, ours = clone_params([p.cpu() for p in params]), clone_params(params)
    ropt = torch.optim.AdamW(ref, lr=1e-2, fused=True)  # on the CPU: see SECOND_MOMENTS
    opt = fusedopt.AdamW(ours, lr=1e-2, backend=backend)
    rs, s = _scaler("cpu"), _scaler(device)
    _amp_steps(ropt, ref, rs, "cpu", 6, inf_at=2, clip=20.0)
    _amp_steps(opt, ours, s, device, 6, inf_at=2, clip=20.0)
    assert float(rs.get_scale()) == float(s.get_scale())
    assert_same(ropt, ref, opt, ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inf_check_flags_non_finite_grads_only(dtype):
    """fusedopt's inf check flags what GradScaler's does: inf, -inf and NaN, not finite grads
    whose squares (or sums) overflow float32, in any tensor of a list with empty tensors."""
    from fusedopt import _amp  # noqa: PLC0415

    big = torch.finfo(dtype).max
    finite = [torch.zeros(0, dtype=dtype), torch.full((300,), big, dtype=dtype), -torch.ones(3)]
    finite[2] = finite[2].to(dtype)
    assert float(_amp.nonfinite(finite)) == 0.0
    for bad in (float("inf"), float("-inf"), float("nan")):
        gs = [t.clone() for t in finite]
        gs[2][1] = bad
        flag = _amp.nonfinite(gs + [torch.ones(2)])  # a float32 grad beside them
        assert flag.dtype == torch.float32 and flag.shape == () and float(flag) == 1.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradscaler_huge_finite_grads_are_not_skipped(backend, device, require_backend):
    """A scaled grad of 1e30 (its square overflows float32) is finite: the step is taken and the
    scale grows, as GradScaler's own check decides."""
    require_backend(backend, device)
    p = torch.nn.Parameter(torch.ones(4, device=device))
    opt = fusedopt.SGD([p], lr=1e-40, backend=backend)
    scaler = _scaler(device)
    for _ in range(2):
        p.grad = torch.full((4,), 1e30, device=device)
        scaler.step(opt)
        scaler.update()
    assert float(opt._steps[p]) == 2
    assert float(scaler.get_scale()) == 2.0**11
