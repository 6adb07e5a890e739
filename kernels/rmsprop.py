"""RMSprop: the step prologue, the fused multi-tensor pass, and their launcher.

Per element, in float32 (torch.optim's math, in its order of operations):
``g = -g`` (maximize); ``g += wd*p``; ``sq = alpha*sq + (1-alpha)*g*g``;
centered: ``ga = lerp(ga, g, 1-alpha)``, ``avg = sqrt(sq - ga*ga) + eps``, else ``sqrt(sq) + eps``;
momentum: ``buf = momentum*buf + g/avg``, ``p -= lr*buf``; else ``p -= lr*g/avg``.
No bias correction; the step still advances (torch.optim keeps it in the state).
``centered``, ``momentum`` and ``maximize`` are runtime values per tensor; constexprs only compile
the centered and momentum code in or out.
"""

import triton
import triton.language as tl

from .. import _layout as L
from .multi_tensor import (
    HYPER_WIDTH,
    SCAL_WIDTH,
    T_GROUP,
    T_NUMEL,
    T_PARAM,
    T_S0,
    T_S1,
    T_S2,
    T_SHADOW,
    TMETA_WIDTH,
    advance_steps,
    cast_out,
    grad_in,
    lerp,
    live_count,
    prologue_common,
    run_step,
    store_param,
)

H_ALPHA = tl.constexpr(L.RMSPROP_COLS["alpha"])
H_EPS = tl.constexpr(L.RMSPROP_COLS["eps"])
H_WD = tl.constexpr(L.RMSPROP_COLS["weight_decay"])
H_MOMENTUM = tl.constexpr(L.RMSPROP_COLS["momentum"])
H_CENTERED = tl.constexpr(L.RMSPROP_COLS["centered"])
H_MAXIMIZE = tl.constexpr(L.RMSPROP_COLS["maximize"])

S_LR, S_ALPHA, S_W, S_EPS, S_WD, S_MOMENTUM, S_SIGN, S_CENTERED, S_SEED = (
    tl.constexpr(L.RMSPROP_SCAL.index(name)) for name in L.RMSPROP_SCAL
)


@triton.jit
def _rmsprop_prologue(
    tmeta,
    n_tensors,
    hyper,
    gptr,
    glr,
    n_groups,
    scal,
    partials,
    n_partials,
    clip,
    max_norm,
    found_inf,
    HAS_INF: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    active = prologue_common(
        hyper,
        gptr,
        glr,
        n_groups,
        partials,
        n_partials,
        clip,
        max_norm,
        found_inf,
        HAS_INF,
        CLIP,
        BLOCK_T,
    )
    n_tensors = n_tensors * active
    for t0 in range(0, n_tensors, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < n_tensors
        step = advance_steps(tmeta, t, live)
        grp = tl.load(tmeta + t * TMETA_WIDTH + T_GROUP, mask=live, other=0)
        h = hyper + grp * HYPER_WIDTH
        lr = tl.load(glr + grp, mask=live, other=0.0)
        alpha = tl.load(h + H_ALPHA, mask=live, other=0.0)
        maximize = tl.load(h + H_MAXIMIZE, mask=live, other=0.0)
        s = scal + t * SCAL_WIDTH
        tl.store(s + S_LR, lr.to(tl.float32), mask=live)
        tl.store(s + S_ALPHA, alpha.to(tl.float32), mask=live)
        tl.store(s + S_W, (1.0 - alpha).to(tl.float32), mask=live)
        tl.store(s + S_EPS, tl.load(h + H_EPS, mask=live, other=0.0).to(tl.float32), mask=live)
        tl.store(s + S_WD, tl.load(h + H_WD, mask=live, other=0.0).to(tl.float32), mask=live)
        tl.store(
            s + S_MOMENTUM, tl.load(h + H_MOMENTUM, mask=live, other=0.0).to(tl.float32), mask=live
        )
        tl.store(s + S_SIGN, tl.where(maximize != 0.0, -1.0, 1.0).to(tl.float32), mask=live)
        tl.store(
            s + S_CENTERED, tl.load(h + H_CENTERED, mask=live, other=0.0).to(tl.float32), mask=live
        )
        tl.store(s + S_SEED, step.to(tl.float32), mask=live)


@triton.jit
def _rmsprop_main(
    tmeta,
    grads,
    scal,
    chunks,
    grad_scale,
    found_inf,
    clip,
    DTYPE: tl.constexpr,
    GDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    SHADOW: tl.constexpr,
    SR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tmeta + t * TMETA_WIDTH
    p_ptr = tl.load(row + T_PARAM).to(tl.pointer_type(DTYPE))
    sq_ptr = tl.load(row + T_S0).to(tl.pointer_type(SDTYPE))
    buf_ptr = tl.load(row + T_S1).to(tl.pointer_type(SDTYPE))
    ga_ptr = tl.load(row + T_S2).to(tl.pointer_type(SDTYPE))
    numel = live_count(tl.load(row + T_NUMEL), found_inf, HAS_INF)
    g_ptr = tl.load(grads + t).to(tl.pointer_type(GDTYPE))
    shadow_ptr = tl.load(row + T_SHADOW).to(tl.pointer_type(GDTYPE))
    s = scal + t * SCAL_WIDTH
    seed = tl.load(s + S_SEED).to(tl.int64)  # the step, for stochastic rounding
    lr = tl.load(s + S_LR)
    alpha = tl.load(s + S_ALPHA)
    w = tl.load(s + S_W)
    eps = tl.load(s + S_EPS)
    wd = tl.load(s + S_WD)
    momentum = tl.load(s + S_MOMENTUM)
    sign = tl.load(s + S_SIGN)
    # Runtime flags become element limits (0 when off): the masks then do the branching.
    centered_numel = tl.where(tl.load(s + S_CENTERED) != 0.0, numel, 0)
    momentum_numel = tl.where(momentum > 0.0, numel, 0)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        g = grad_in(g, g_ptr, offs, mask, grad_scale, clip, HAS_SCALE, CLIP, GDTYPE)
        sq = tl.load(sq_ptr + offs, mask=mask).to(tl.float32)
        g = g * sign
        g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)
        sq = tl.fma(w * g, g, sq * alpha)
        var = sq
        if HAS_CENTERED:
            c_mask = offs < centered_numel
            ga = tl.load(ga_ptr + offs, mask=c_mask, other=0.0).to(tl.float32)
            ga = lerp(ga, g, w)
            tl.store(ga_ptr + offs, cast_out(ga, SDTYPE), mask=c_mask)
            var = tl.where(c_mask, tl.fma(-ga, ga, sq), sq)
        avg = tl.sqrt_rn(var) + eps
        new_p = p + tl.div_rn(-lr * g, avg)
        if HAS_MOMENTUM:
            b_mask = offs < momentum_numel
            buf = tl.load(buf_ptr + offs, mask=b_mask, other=0.0).to(tl.float32)
            buf = buf * momentum + tl.div_rn(g, avg)
            tl.store(buf_ptr + offs, cast_out(buf, SDTYPE), mask=b_mask)
            new_p = tl.where(b_mask, tl.fma(buf, -lr, p), new_p)
        p = new_p
        store_param(p_ptr, shadow_ptr, offs, mask, p, t, seed, DTYPE, GDTYPE, SHADOW, SR)
        tl.store(sq_ptr + offs, cast_out(sq, SDTYPE), mask=mask)


def rmsprop_step(tables, amp, has_centered, has_momentum):
    """One RMSprop step over ``tables``; ``amp`` as ``multi_tensor.run_step`` takes it."""
    run_step(
        tables,
        amp,
        _rmsprop_prologue,
        _rmsprop_main,
        HAS_CENTERED=has_centered,
        HAS_MOMENTUM=has_momentum,
    )
