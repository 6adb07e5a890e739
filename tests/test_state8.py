"""8-bit optimizer states (``state_dtype=torch.uint8``, issue 24): each state of a parameter with at
least ``min_8bit_size`` elements is stored as uint8 codes plus a float32 absmax per block of 256
(fusedopt/quant8.py). Checked against torch.optim run in float64 and quantized the same way, against
bitsandbytes' 8-bit optimizers, and through the API: state_dict, torch.optim checkpoints,
GradScaler, clipping, schedules, bad input."""

import copy
import functools

import pytest
import torch
from conftest import backend_device_params, need_backend

import fusedopt
from fusedopt import quant8

MIN = 4096
# 8-bit: 32 whole blocks; 19 blocks and a partial one of 136; 91 blocks and one of 60; a
# channels_last tensor (blocks follow its memory order). fp32: below MIN.
SHAPES = [(64, 128), (5000,), (300, 77), (8, 16, 6, 6), (10, 10)]

CASES = {
    "adam": (fusedopt.Adam, torch.optim.Adam, dict(lr=1e-3, weight_decay=0.01)),
    "adamw": (fusedopt.AdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "adamw-amsgrad-maximize": (
        fusedopt.AdamW,
        torch.optim.AdamW,
        dict(lr=1e-3, amsgrad=True, maximize=True, betas=(0.8, 0.99)),
    ),
    "rmsprop": (fusedopt.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, weight_decay=0.01)),
    "rmsprop-centered-momentum": (
        fusedopt.RMSprop,
        torch.optim.RMSprop,
        dict(lr=1e-3, centered=True, momentum=0.9),
    ),
    "sgd-momentum": (fusedopt.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov": (
        fusedopt.SGD,
        torch.optim.SGD,
        dict(lr=1e-2, momentum=0.9, nesterov=True),
    ),
    "sgd-dampening": (fusedopt.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.5)),
}


def _params(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.randn(s, generator=g)
        if len(s) == 4:
            p = p.to(memory_format=torch.channels_last)
        out.append(p)
    return out


def _grads(params, steps, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p) * scale for p in params] for _ in range(steps)]


def _leaf(t, dtype=None, device="cpu"):
    out = torch.empty_like(t, dtype=dtype, device=device, memory_format=torch.preserve_format)
    return torch.nn.Parameter(out.copy_(t))


def _names(opt_cls):
    return [n for n in opt_cls._state_names if n]


def oracle(opt_cls, torch_cls, kw, params, grads):
    """The 8-bit algorithm with torch.optim in float64: per step, each 8-bit state is
    dequantized, torch.optim steps in float64, and the new state is quantized again
    (quant8.quantize_state, float32 normalization as the kernels do). Returns (params, states)."""
    ps = [_leaf(p, torch.float64) for p in params]
    states = [{} for _ in ps]
    for step, gs in enumerate(grads, start=1):
        for p, g, st in zip(ps, gs, states):
            t = torch_cls([p], **kw)
            if step > 1:
                t.state[p] = {"step": torch.tensor(float(step - 1), dtype=torch.float64)}
                for name in st:
                    codes, absmax = st[name]
                    value = (
                        codes if absmax is None else quant8.dequantize_state(codes, absmax, name)
                    )
                    t.state[p][name] = value.double()
            p.grad = g.double()
            t.step()
            big = p.numel() >= MIN
            for name, value in t.state[p].items():
                if name != "step" and name in _names(opt_cls):
                    st[name] = (
                        quant8.quantize_state(value, p, name) if big else (value.float(), None)
                    )
    return ps, states


def _run(opt_cls, kw, params, grads, backend, device="cpu", **extra):
    ps = [_leaf(p, device=device) for p in params]
    opt = opt_cls(ps, state_dtype=torch.uint8, min_8bit_size=MIN, backend=backend, **kw, **extra)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.to(device)
        opt.step()
    return opt, ps


@pytest.mark.parametrize(
    "backend,device", backend_device_params(("torch", "triton", "cpu", "cuda"))
)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_oracle(backend, device, case):
    """10 steps against torch.optim in float64 with the same quantization: the codes are the
    oracle's except where a value lies within float32 rounding of the midpoint between two codes
    (measured: at most a few in 10^5; asserted: 99.99% equal, all within one code), absmaxes to
    float32 rounding (2e-6 relative: the block maximum's own rounding), parameters as close as
    the fp32 parity tests ask of the update plus the quantization's share."""
    need_backend(backend, device)
    opt_cls, torch_cls, kw = CASES[case]
    params = _params()
    grads = _grads(params, 10)
    opt, ours = _run(opt_cls, kw, params, grads, backend, device)
    ref_ps, ref_states = oracle(opt_cls, torch_cls, kw, params, grads)
    equal = total = params_off = 0
    for p, ref_p, ref, p0 in zip(ours, ref_ps, ref_states, params):
        st = opt.state[p]
        for name, (value, absmax) in ref.items():
            if absmax is None:  # below min_8bit_size: float32 state
                assert st[name].dtype == torch.float32
                torch.testing.assert_close(st[name].cpu(), value, rtol=1e-5, atol=1e-7)
                continue
            assert st[name].dtype == torch.uint8 and st[name].stride() == p.stride()
            diff = (st[name].cpu().int() - value.int()).abs()
            assert int(diff.max()) <= 1, (name, int(diff.max()))
            equal += int((diff == 0).sum())
            total += diff.numel()
            torch.testing.assert_close(
                st[quant8.absmax_name(name)].cpu(), absmax, rtol=2e-6, atol=1e-30
            )
        # The update reads the float32 state before it is quantized, so the parameters differ
        # from float64's by float32 rounding of the update (1e-5 of the total change), except
        # where a state code differed at some step: there the update differed by a code gap's
        # share, bounded by lr per step (an Adam step moves a parameter at most about lr; SGD's
        # and RMSprop's here, with grads of 0.1, less than that).
        change = float((ref_p.detach() - p0.double()).abs().max())
        err = (p.detach().cpu().double() - ref_p.detach()).abs()
        loose = err > 1e-6 * ref_p.detach().abs() + 1e-5 * change
        params_off += int(loose.sum())
        assert float(err.max()) <= kw["lr"] * len(grads), float(err.max())
    print(f"{case}: {equal / total:.5%} of codes equal to float64's; {params_off} params off")
    assert equal / total >= 0.9999
    assert params_off <= 1e-4 * total


PRECISIONS = {
    "fp32": (torch.float32, {}),
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16": (torch.bfloat16, {}),
    "bf16-stochastic": (torch.bfloat16, dict(stochastic_rounding=True)),
}


@functools.lru_cache(maxsize=None)
def _run_precision(case, precision, backend, device, clip=None):
    """10 steps of ``case`` in ``precision`` with GradScaler's unscaling (scale 8: exact in every
    dtype) and clipping (``clip``: max_grad_norm). Kept: the Triton runs, interpreted, take
    seconds each, and two tests compare the same run."""
    opt_cls, _, kw = CASES[case]
    dtype, extra = PRECISIONS[precision]
    params = [p.to(dtype) for p in _params()]
    ps = [_leaf(p, device=device) for p in params]
    opt = opt_cls(
        ps, state_dtype=torch.uint8, min_8bit_size=MIN, backend=backend, max_grad_norm=clip,
        **kw, **extra,
    )  # fmt: skip
    opt.grad_scale = torch.tensor(8.0, device=device)
    for gs in _grads(params, 10):
        for p, g in zip(ps, gs):
            p.grad = (g * 8).to(device)
        opt.step()
    return opt, ps


def _compare(ref, ref_ps, opt, ps, lr):
    """(codes equal, codes in all, parameters off by more than float32 rounding) of ``opt``'s run
    against ``ref``'s; asserts each state's dtype, shape and strides, the parameters within
    ``lr`` per step, absmaxes within 0.9/64, and returns the largest difference of dequantized
    values in units of the signed map's widest gap, 0.9/64 of the block's absmax as float32
    values make it (0.0140626), a yardstick for unsigned states too."""
    equal = total = params_off = 0
    worst = 0.0
    widest = float(quant8.dynamic_map(True).diff().max())
    for p, q in zip(ref_ps, ps):
        err = (p.detach().double() - q.detach().double()).abs().cpu()
        params_off += int((err > 1e-5 * p.detach().double().abs().cpu() + 1e-7).sum())
        assert float(err.max()) <= lr * 10
        for k, v in ref.state[p].items():
            w = opt.state[q][k]
            assert v.dtype == w.dtype and v.shape == w.shape and v.stride() == w.stride(), k
            if v.dtype == torch.uint8:
                scale_v, scale_w = ref.state[p][k + quant8.ABSMAX], opt.state[q][k + quant8.ABSMAX]
                torch.testing.assert_close(scale_w, scale_v, rtol=0.9 / 64, atol=0)
                value_v = quant8.dequantize_state(v, scale_v, k).cpu()
                value_w = quant8.dequantize_state(w, scale_w, k).cpu()
                gap = widest * torch.maximum(scale_v, scale_w).cpu()
                gap = gap.repeat_interleave(quant8.BLOCK)[: v.numel()].view(v.shape)
                worst = max(worst, float(((value_v - value_w).abs() / gap).max()))
                equal += int((v == w).sum())
                total += v.numel()
    return equal, total, params_off, worst


@pytest.mark.parametrize("backend,device", backend_device_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_backends_match_torch_backend(backend, device, precision, case):
    """The fused backends against the torch backend, 10 steps with GradScaler, in every
    precision. Their float32 updates differ by an ulp here and there (torch's CPU sqrt is not
    correctly rounded: tests/parity.py), so a value on the midpoint between two codes may take
    the other one, and that one-code difference is then carried by the state: a step later it is
    a difference of up to one code gap of the block's absmax in value, which the fine codes near
    zero may count as many codes. Asserted, as measured 2026-12-05 on CPU: dequantized states
    within the signed map's widest gap (1.0001 of it: the absmaxes' own rounding), at least 99.8%
    of the codes equal (99.870% the least, RMSprop with bf16 parameters), absmaxes within that
    gap too, the parameters as in test_matches_float64_oracle. With clipping: below."""
    need_backend(backend, device)
    lr = CASES[case][2]["lr"]
    ref, ref_ps = _run_precision(case, precision, "torch", device)
    opt, ps = _run_precision(case, precision, backend, device)
    equal, total, params_off, worst = _compare(ref, ref_ps, opt, ps, lr)
    print(f"{case} {precision}: {equal / total:.5%} codes equal, {worst:.4f} gaps at most")
    assert worst <= 1 + 1e-4
    assert equal >= 0.998 * total
    assert params_off <= 1e-3 * total


@pytest.mark.parametrize("backend,device", backend_device_params(("cpu", "triton", "cuda")))
@pytest.mark.parametrize("precision", ["fp32", "bf16-master"])
@pytest.mark.parametrize("case", list(CASES))
def test_clipping(backend, device, precision, case):
    """With clipping (max_grad_norm 1.0: the gradients' norm is about 20) as well. The norm's
    sum of squares differs in its last bits between the backends (the kernels add float32
    squares per chunk, of 16384 elements on CPU and 4096 in Triton; the torch backend adds in
    float64), so every clipped gradient may differ by an ulp at every step: more values cross a
    midpoint, and a block whose largest element does takes a new absmax, moving the others'
    codes with it; two such crossings of one element in the same direction make two code gaps.
    Asserted: the norm to float32 rounding of a sum of 41,000 squares (1e-6), the parameters as
    above, dequantized states within two widest gaps, 99% of the codes equal (measured
    2026-12-06, interpreted Triton: 1.0091 gaps and 99.791% at worst, AdamW with AMSGrad and
    bf16 masters; the cpu backend 1.0000 and 99.983%; fp32 parameters all equal). Unclipped,
    the states would be 20 times larger: the absmaxes' 0.9/64 bound (_compare) alone tells
    that the clip was applied."""
    need_backend(backend, device)
    lr = CASES[case][2]["lr"]
    ref, ref_ps = _run_precision(case, precision, "torch", device, clip=1.0)
    opt, ps = _run_precision(case, precision, backend, device, clip=1.0)
    torch.testing.assert_close(
        opt._last_grad_norm.cpu(), ref._last_grad_norm.cpu(), rtol=1e-6, atol=0
    )
    equal, total, params_off, worst = _compare(ref, ref_ps, opt, ps, lr)
    print(f"{case} {precision} clipped: {equal / total:.5%} codes equal, {worst:.4f} gaps")
    assert worst <= 2 * (1 + 1e-4)
    assert equal >= 0.99 * total
    assert params_off <= 1e-3 * total


@pytest.mark.parametrize(
    "native,other,device",
    [
        pytest.param("cpu", "triton", "cpu", marks=pytest.mark.triton, id="cpu-vs-triton"),
        pytest.param(
            "cuda", "triton", "cuda", marks=[pytest.mark.cuda, pytest.mark.triton], id="cuda"
        ),
    ],
)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_families_agree_exactly(native, other, device, precision, case):
    """The native kernels and the Triton ones round identically (tests/test_backends_agree.py):
    with 8-bit state too, codes, absmaxes and parameters are equal bit for bit. Without clipping:
    the families sum the norm's squares over chunks of different sizes (the CPU's 16384 elements,
    Triton's 4096), which moves its last bit."""
    need_backend(native, device)
    need_backend(other, device)
    a, a_ps = _run_precision(case, precision, native, device)
    b, b_ps = _run_precision(case, precision, other, device)
    for p, q in zip(a_ps, b_ps):
        assert torch.equal(p, q)
        for k, v in a.state[p].items():
            assert torch.equal(v, b.state[q][k]), k


def test_auto_picks_verified_kernels(monkeypatch):
    """backend="auto" takes the CPU kernels for 8-bit state; on CUDA, Triton's (checked here
    against the CPU ones bit for bit): the CUDA ones run when asked for by name until a GPU run
    has checked them (the tests above, marked cuda). Compressed masters on CUDA: Triton's."""
    from fusedopt import backends  # noqa: PLC0415
    from fusedopt._layout import Bucket  # noqa: PLC0415
    from fusedopt.backends import native  # noqa: PLC0415

    bucket = Bucket(torch.float32, torch.float32, torch.uint8, False, False)
    assert bucket.eight_bit
    cpu, cuda = native.NativeBackend("cpu", "_C"), native.NativeBackend("cuda", "_cuda")
    assert cpu.supports(bucket) and cpu.auto_supports(bucket)
    assert cuda.supports(bucket) and not cuda.auto_supports(bucket)
    # as on a GPU machine where every backend loads
    monkeypatch.setattr(backends, "unavailable", lambda name, device: None)
    plain = Bucket(torch.float32, torch.float32, torch.float32, False, False)
    compressed = Bucket(torch.bfloat16, torch.bfloat16, torch.float32, False, False, 16)
    assert backends.select("auto", "cuda", [plain]) == "cuda"
    assert backends.select("auto", "cuda", [plain, bucket]) == "triton"
    assert backends.select("auto", "cuda", [compressed]) == "triton"
    assert backends.select("auto", "cpu", [bucket, compressed]) == "cpu"
    monkeypatch.undo()
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = fusedopt.AdamW([p], state_dtype=torch.uint8)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.uint8
    assert {backends_of for backends_of in opt._tables} == {("cpu", torch.device("cpu"))}


def test_state_layout_and_memory():
    """Codes have the parameter's shape and strides, absmaxes one float32 per 256 elements;
    state memory per parameter is at most 2.1 bytes from 4096 elements up (two states: 2 +
    8/256 = 2.03 B), and small tensors keep fp32 state (bitsandbytes' min_8bit_size)."""
    params = _params()
    opt, ps = _run(fusedopt.AdamW, dict(lr=1e-3), params, _grads(params, 1), "torch")
    for p in ps:
        st = opt.state[p]
        state = [v for k, v in st.items() if k != "step"]
        nbytes = sum(v.numel() * v.element_size() for v in state)
        if p.numel() >= MIN:
            assert {k: v.dtype for k, v in st.items()} == {
                "step": torch.float32,
                "exp_avg": torch.uint8,
                "exp_avg_absmax": torch.float32,
                "exp_avg_sq": torch.uint8,
                "exp_avg_sq_absmax": torch.float32,
            }
            assert st["exp_avg"].shape == p.shape and st["exp_avg"].stride() == p.stride()
            assert st["exp_avg_absmax"].shape == (quant8.n_blocks(p.numel()),)
            assert nbytes / p.numel() <= 2.1
        else:
            assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
            assert nbytes == 8 * p.numel()


# --------------------------------------------------------------------------- bitsandbytes


def _bnb():
    return pytest.importorskip("bitsandbytes")


BNB_CASES = {
    # bitsandbytes' Adam8bit decays weights decoupled (its Adam and AdamW share one kernel), so
    # L2 Adam is compared without weight decay
    "adam": ("Adam8bit", fusedopt.Adam, dict(lr=1e-3)),
    "adamw": ("AdamW8bit", fusedopt.AdamW, dict(lr=1e-3, weight_decay=0.01)),
    "rmsprop": ("RMSprop8bit", fusedopt.RMSprop, dict(lr=1e-3, alpha=0.99)),
    # bitsandbytes' momentum has no dampening, as torch's default
    "sgd": ("SGD8bit", fusedopt.SGD, dict(lr=1e-2, momentum=0.9)),
}


def _bnb_run(name, kw, params, grads):
    bnb = _bnb()
    ps = [_leaf(p.contiguous()) for p in params]
    opt = getattr(bnb.optim, name)(ps, min_8bit_size=MIN, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.contiguous()
        opt.step()
    return opt, ps


def _bnb_quantize(x, code):
    import bitsandbytes.functional as F  # noqa: PLC0415 - only where installed (_bnb first)

    codes, qstate = F.quantize_blockwise(x.contiguous(), code=code.clone(), blocksize=quant8.BLOCK)
    return codes.view(x.shape), qstate.absmax


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_bitsandbytes_same_step(case, monkeypatch):
    """The same 8-bit step as bitsandbytes' optimizer on CPU: with bitsandbytes' own quantizer and
    its map choice (its 1-state optimizers keep RMSprop's square_avg in the signed map),
    fusedopt's states are bitsandbytes' code for code after 10 steps and the parameters agree to
    float32 rounding."""
    _bnb()
    bnb_name, opt_cls, kw = BNB_CASES[case]
    params = _params(shapes=SHAPES[:3])
    grads = _grads(params, 10)
    theirs, tps = _bnb_run(bnb_name, kw, params, grads)
    monkeypatch.setattr(quant8, "quantize_blockwise", _bnb_quantize)
    if case == "rmsprop":
        monkeypatch.setattr(quant8, "map_for", lambda name, device="cpu": quant8.dynamic_map(True))
    opt, ours = _run(opt_cls, kw, params, grads, "torch")
    for p, tp in zip(ours, tps):
        st, tst = opt.state[p], theirs.state[tp]
        for k, name in enumerate(_names(opt_cls)):
            if name not in st:
                continue
            assert torch.equal(st[name], tst[f"state{k + 1}"]), name
            torch.testing.assert_close(st[quant8.absmax_name(name)], tst[f"absmax{k + 1}"])
        torch.testing.assert_close(p.detach(), tp.detach(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("case", list(BNB_CASES))
def test_bitsandbytes_within_one_code(case):
    """fusedopt's own states against bitsandbytes' after 10 steps, bitsandbytes' codes read in
    fusedopt's map (RMSprop's square_avg: bitsandbytes keeps it in the signed map, fusedopt in the
    unsigned one, as issue 24 asks: twice the resolution for a state that is never negative).

    Measured 2026-12-05: Adam 99.898%, AdamW 99.899%, SGD 99.862% within one code; RMSprop 66%.
    The rest is explained by the quantizer alone (test_bitsandbytes_same_step: with bitsandbytes'
    quantizer the states are equal): bitsandbytes' CPU search is not the nearest code for about
    half the elements and up to 7 codes off for values below 1e-5 of the block's absmax
    (tests/test_quant8.py), and those differences compound over the steps. For RMSprop the signed
    map's gap is twice the unsigned one, so its codes are up to a gap apart from the first step.
    Asserted: at least 99.8% within one code (RMSprop: every value within 1% of the block's
    absmax)."""
    bnb_name, opt_cls, kw = BNB_CASES[case]
    params = _params(shapes=SHAPES[:3])
    grads = _grads(params, 10)
    theirs, tps = _bnb_run(bnb_name, kw, params, grads)
    opt, ours = _run(opt_cls, kw, params, grads, "torch")
    within = total = worst = 0
    for p, tp in zip(ours, tps):
        st, tst = opt.state[p], theirs.state[tp]
        for k, name in enumerate(_names(opt_cls)):
            if name not in st:
                continue
            values = quant8.dequantize_blockwise(
                tst[f"state{k + 1}"], tst[f"absmax{k + 1}"], tst[f"qmap{k + 1}"]
            )
            if case == "rmsprop":
                mine = quant8.dequantize_state(st[name], st[quant8.absmax_name(name)], name)
                scale = st[quant8.absmax_name(name)].repeat_interleave(quant8.BLOCK)
                scale = scale[: p.numel()].view(p.shape)
                worst = max(worst, float(((mine - values).abs() / scale).max()))
                continue
            theirs_codes, _ = quant8.quantize_blockwise(values, quant8.map_for(name))
            diff = (st[name].int() - theirs_codes.int()).abs()
            within += int((diff <= 1).sum())
            total += diff.numel()
    if total:
        print(f"{case}: {within / total:.4%} within one code of bitsandbytes'")
        assert within / total >= 0.998
    else:
        print(f"{case}: states within {worst:.2%} of the block's absmax of bitsandbytes'")
        assert worst <= 0.05


# --------------------------------------------------------------------------- state_dict


def test_state_dict_round_trip_and_exact_resume():
    """state_dict() holds the codes and absmaxes under documented names; loading it into a new
    optimizer restores every tensor exactly and the run resumes bit for bit; torch.load with
    weights_only accepts it."""
    import io

    params = _params()
    grads = _grads(params, 6)
    kw = dict(lr=1e-3)
    opt, ps = _run(fusedopt.AdamW, kw, params, grads, "torch")

    opt_a, ps_a = _run(fusedopt.AdamW, kw, params, grads[:3], "torch")
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    ps_b = [_leaf(p.detach()) for p in ps_a]
    opt_b = fusedopt.AdamW(ps_b, state_dtype=torch.uint8, min_8bit_size=MIN, backend="torch", **kw)
    opt_b.load_state_dict(sd)
    for p_a, p_b in zip(ps_a, ps_b):
        a, b = opt_a.state[p_a], opt_b.state[p_b]
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
            assert a[k].stride() == b[k].stride()
    for gs in grads[3:]:
        for p, g in zip(ps_b, gs):
            p.grad = g
        opt_b.step()
    for p, q in zip(ps, ps_b):
        assert torch.equal(p, q)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt_b.state[q][k])


def test_torch_checkpoints_both_ways():
    """A torch.optim checkpoint loads into an 8-bit optimizer quantized (codes as
    quant8.quantize_state gives them); quant8.to_torch_state_dict turns an 8-bit one into one
    torch.optim loads, holding the dequantized states, and training goes on from it."""
    params = _params()
    grads = _grads(params, 3)
    ts = [_leaf(p) for p in params]
    t = torch.optim.AdamW(ts, lr=1e-3)
    for gs in grads:
        for p, g in zip(ts, gs):
            p.grad = g
        t.step()
    ps = [_leaf(p.detach()) for p in ts]
    opt = fusedopt.AdamW(ps, lr=1e-3, state_dtype=torch.uint8, min_8bit_size=MIN, backend="torch")
    opt.load_state_dict(t.state_dict())
    for p, tp in zip(ps, ts):
        for name in ("exp_avg", "exp_avg_sq"):
            if p.numel() >= MIN:
                codes, absmax = quant8.quantize_state(t.state[tp][name], p, name)
                assert torch.equal(opt.state[p][name], codes)
                assert torch.equal(opt.state[p][quant8.absmax_name(name)], absmax)
            else:
                assert torch.equal(opt.state[p][name], t.state[tp][name])

    sd = quant8.to_torch_state_dict(opt.state_dict())
    t2 = torch.optim.AdamW([_leaf(p.detach()) for p in ps], lr=1e-3)
    t2.load_state_dict(sd)
    for p, tp in zip(ps, t2.param_groups[0]["params"]):
        st = t2.state[tp]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        for name in ("exp_avg", "exp_avg_sq"):
            if p.numel() >= MIN:
                expected = quant8.dequantize_state(
                    opt.state[p][name], opt.state[p][quant8.absmax_name(name)], name
                )
            else:
                expected = opt.state[p][name]
            assert torch.equal(st[name], expected)
    tp = t2.param_groups[0]["params"]
    for p, g in zip(tp, grads[0]):
        p.grad = g
    t2.step()


def test_state_dtype_change_converts():
    """A group switched to or from 8-bit between steps has its state converted, not reset."""
    params = _params()
    grads = _grads(params, 2)
    ps = [_leaf(p) for p in params]
    opt = fusedopt.Adam(ps, lr=1e-3, backend="torch", min_8bit_size=MIN)
    for p, g in zip(ps, grads[0]):
        p.grad = g
    opt.step()
    fp32 = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in ps}
    opt.param_groups[0]["state_dtype"] = torch.uint8
    opt.step()
    for p in ps:
        if p.numel() < MIN:
            continue
        assert opt.state[p]["exp_avg"].dtype == torch.uint8
    opt.param_groups[0]["state_dtype"] = None
    for p, g in zip(ps, grads[1]):
        p.grad = g
    opt.step()
    for p in ps:
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert "exp_avg_absmax" not in opt.state[p]
        assert fp32[p]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda st: st.__setitem__("exp_avg_absmax", st["exp_avg_absmax"][:-1]), "absmaxes"),
        (lambda st: st.pop("exp_avg_absmax"), "without its absmax"),
        (lambda st: st.pop("exp_avg"), "missing"),
        (lambda st: st.__setitem__("exp_avg", st["exp_avg"].float()), "only 8-bit"),
    ],
)
def test_bad_checkpoint_changes_nothing(mutate, match):
    params = _params()
    opt, ps = _run(fusedopt.AdamW, dict(lr=1e-3), params, _grads(params, 2), "torch")
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd["state"][0])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for key, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][key][k], v)


def test_bad_options():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        fusedopt.AdamW([p], state_dtype=torch.int8)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="min_8bit_size"):
            fusedopt.AdamW([p], state_dtype=torch.uint8, min_8bit_size=bad)


# --------------------------------------------------------------------------- with the rest


def test_gradscaler_skip_keeps_codes():
    """A step GradScaler skips (an inf grad) leaves codes, absmaxes and parameters unchanged;
    a scaled step equals the unscaled one."""
    params = _params(shapes=[(64, 128)])
    grads = _grads(params, 2)
    opt, ps = _run(fusedopt.AdamW, dict(lr=1e-3), params, grads[:1], "torch")
    snap = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    p0 = ps[0].detach().clone()
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    ps[0].grad = grads[1][0] * 1024
    opt.step()
    assert torch.equal(ps[0], p0)
    for k, v in snap.items():
        if k != "step":
            assert torch.equal(opt.state[ps[0]][k], v), k
    opt.found_inf = torch.tensor(0.0)
    ps[0].grad = grads[1][0] * 1024
    opt.step()
    ref, rps = _run(fusedopt.AdamW, dict(lr=1e-3), params, grads, "torch")
    assert torch.equal(ps[0], rps[0])
    assert torch.equal(opt.state[ps[0]]["exp_avg"], ref.state[rps[0]]["exp_avg"])


def test_with_schedule_clipping_master_and_groups():
    """8-bit state with an in-kernel schedule, clipping, bf16 parameters with fp32 masters, a group
    added later with stochastic rounding: the same as a float32-state run whose states are
    quantized and dequantized after every step (the 8-bit algorithm, composed from the float32
    one), code for code and bit for bit."""
    params = _params(shapes=[(64, 128), (5000,), (10, 10)])
    grads = _grads(params, 4)

    def run(eight_bit):
        sched = fusedopt.schedules.cosine(1e-3, warmup=2, total=10)
        ps = [_leaf(p, torch.bfloat16) for p in params]
        state = torch.uint8 if eight_bit else torch.float32  # (bf16 params: bf16 by default)
        extra = dict(state_dtype=state, min_8bit_size=MIN)
        opt = fusedopt.AdamW(
            [ps[0], ps[2]],
            lr=sched,
            master_weights=True,
            max_grad_norm=1.0,
            backend="torch",
            **extra,
        )
        # (the stochastic rounding noise is seeded by a tensor's index in the step, which
        # follows its bucket: the 8-bit and float32 runs index this one alike)
        opt.add_param_group(
            {"params": ps[1:2], "stochastic_rounding": True, "master_weights": False}
        )
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.to(torch.bfloat16)
            opt.step()
            if not eight_bit and i + 1 < len(grads):
                for p in ps:
                    if p.numel() >= MIN:
                        st = opt.state[p]
                        for name in ("exp_avg", "exp_avg_sq"):
                            codes, absmax = quant8.quantize_state(st[name], p, name)
                            st[name] = quant8.dequantize_state(codes, absmax, name)
        return opt, ps

    (opt8, ps8), (opt32, ps32) = run(True), run(False)
    for p8, p32 in zip(ps8, ps32):
        assert torch.equal(p8, p32)
        st8, st32 = opt8.state[p8], opt32.state[p32]
        for name in ("exp_avg", "exp_avg_sq"):
            if p8.numel() >= MIN:
                assert st8[name].dtype == torch.uint8
                codes, absmax = quant8.quantize_state(st32[name], p32, name)
                assert torch.equal(st8[name], codes)
                assert torch.equal(st8[quant8.absmax_name(name)], absmax)
            else:
                assert torch.equal(st8[name], st32[name])
        if "master_param" in st8:
            assert torch.equal(st8["master_param"], st32["master_param"])
    assert torch.equal(opt8.last_grad_norm, opt32.last_grad_norm)


# --------------------------------------------------------------------------- training


def _train_transformer(make_opt, steps=300, seed=0, dtype=torch.float32):
    """A 2-layer causal transformer (d_model 64, 4 heads, 120k parameters: attention and
    feed-forward matrices of 4096-12288 elements take 8-bit state, embeddings, biases and norms
    fp32) learning to repeat the token 3 positions back; the mean loss of the last 20 steps."""
    torch.manual_seed(seed)
    vocab, dim, seq, batch, delay = 32, 64, 16, 32, 3
    layer = torch.nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
    emb = torch.nn.Embedding(vocab, dim)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    head = torch.nn.Linear(dim, vocab)
    for module in (emb, enc, head):
        module.to(dtype)
    data = torch.randint(0, vocab, (steps, batch, seq), generator=torch.Generator().manual_seed(1))
    opt = make_opt([*emb.parameters(), *enc.parameters(), *head.parameters()])
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)
    losses = []
    for x in data:
        y = torch.roll(x, delay, dims=1)
        logits = head(enc(emb(x), mask=mask.to(dtype), is_causal=True))[:, delay:].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y[:, delay:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_training_matches_fp32_adamw():
    """Issue 24's training check: 300 steps of a small transformer with 8-bit AdamW (the cpu
    backend) end within 2% of torch.optim.AdamW's loss, and no further from it than
    bitsandbytes' AdamW8bit. Measured 2026-12-05: fp32 2.05854, fusedopt 8-bit 2.05739
    (-0.056%), bitsandbytes 2.05974 (+0.058%). The comparison with bitsandbytes allows 0.2% of the
    loss on top: the runs are deterministic, but the same test runs under torch 2.11 and 2.13
    (the wheel checks), whose CPU kernels round differently."""
    lr = 3e-3
    fp32 = _train_transformer(lambda p: torch.optim.AdamW(p, lr=lr))
    ours = _train_transformer(lambda p: fusedopt.AdamW(p, lr=lr, state_dtype=torch.uint8))
    print(f"loss: fp32 {fp32:.5f}, fusedopt 8-bit {ours:.5f} ({ours / fp32 - 1:+.3%})")
    assert abs(ours - fp32) <= 0.02 * fp32
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional: setup_env.sh installs it
    except ImportError:
        return
    theirs = _train_transformer(lambda p: bnb.optim.AdamW8bit(p, lr=lr))
    print(f"loss: bitsandbytes 8-bit {theirs:.5f} ({theirs / fp32 - 1:+.3%})")
    assert abs(ours - fp32) <= abs(theirs - fp32) + 0.002 * fp32


@pytest.mark.parametrize("backend,device", backend_device_params(("triton", "cpu", "cuda")))
def test_non_finite_block_as_the_torch_backend(backend, device):
    """A NaN and an infinity in a grad: the blocks holding them take a NaN absmax (any NaN gives
    it: the cpu kernels' integer max over |x|'s bit patterns, where every NaN is above infinity,
    Triton's the same, torch's amax), every other block is untouched by them, and all codes and
    absmaxes are the torch backend's (a NaN absmax as a NaN)."""
    need_backend(backend, device)
    params = _params(shapes=[(5000,), (64, 128)])
    grads = _grads(params, 3)
    grads[1][0][5] = float("nan")  # block 0 of the first tensor
    grads[1][1][3, 7 * 16] = float("inf")  # 3 * 128 + 112 = 496: block 1 of the second
    ref, _ = _run(fusedopt.Adam, dict(lr=1e-3), params, grads, "torch")
    opt, _ = _run(fusedopt.Adam, dict(lr=1e-3), params, grads, backend, device)
    for k, (p, q) in enumerate(zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"])):
        for name in ("exp_avg", "exp_avg_sq"):
            mine = opt.state[p][quant8.absmax_name(name)].cpu()
            theirs = ref.state[q][quant8.absmax_name(name)]
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(opt.state[p][name].cpu(), ref.state[q][name]), (k, name)
            bad = {0} if k == 0 else {1}
            assert {int(b) for b in torch.nonzero(mine.isnan())} == bad, (k, name)


def test_cpu_fast_nearest_is_the_shared_one(tmp_path):
    """csrc/cpu/quant8_cpu.h's table-driven nearest code (the CPU kernels') equals
    csrc/include/fusedopt/quant8.h's binary search (the CUDA kernels') for every float32 in
    [-1, 1] and NaN: checked exhaustively on 2026-12-06 for the one-load table (4,294,967,296
    values over both maps, 0 differences); here every 7th bit pattern, to keep CI quick."""
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    repo = Path(__file__).resolve().parents[1]
    root = repo / "csrc"
    src = repo / "benchmarks" / "quant8_nearest.cpp"  # the exhaustive check, with a stride
    exe = tmp_path / "check"
    cmd = [cxx, "-O2", "-std=c++17", "-I", str(root / "include"), "-I", str(root), str(src)]
    subprocess.run([*cmd, "-o", str(exe)], check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [str(exe), "check", "7"], check=True, capture_output=True, text=True, timeout=600
    )
    words = out.stdout.split()  # "check: N values (both maps), B differences"
    n, bad = int(words[1]), int(words[5])
    assert n > 5e8 and bad == 0, (n, bad)
