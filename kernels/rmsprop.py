"""RMSprop: the step prologue, the fused multi-tensor pass, and their launcher.

Per element, in float32 (torch.optim's math, in its order of operations):
``g = -g`` (maximize); ``g += wd*p``; ``sq = alpha*sq + (1-alpha)*g*g``;
centered: ``ga = lerp(ga, g, 1-alpha)``, ``avg = sqrt(sq - ga*ga) + eps``, else ``sqrt(sq) + eps``;
momentum: ``buf = momentum*buf + g/avg``, ``p -= lr*buf``; else ``p -= lr*g/avg``.
No bias correction; the step still advances (torch.optim keeps it in the state).
``centered``, ``momentum`` and ``maximize`` are runtime values per tensor; constexprs only compile
the centered and momentum code in or out.
8-bit state (EIGHT_BIT): the same update on dequantized states (multi_tensor.py).
"""

import triton
import triton.language as tl

from .. import _layout as L
from .multi_tensor import (
    HYPER_WIDTH,
    QMAP_SIGNED,
    QMAP_UNSIGNED,
    SCAL_WIDTH,
    T_A0,
    T_A1,
    T_A2,
    T_GROUP,
    T_NUMEL,
    T_PARAM,
    T_S0,
    T_S1,
    T_S2,
    TAIL_SPLIT,
    TMETA_WIDTH,
    absmax_ptr,
    advance_steps,
    grad_in,
    lerp,
    live_count,
    load_param,
    load_state,
    run_step,
    side_addr,
    store_param,
    store_state,
    tile,
    whole_aligned_chunk,
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
    glr,
    scal,
    found_inf,
    HAS_INF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The per-tensor half of the prologue, BLOCK_T tensors per program, after the group half
    (multi_tensor._groups_prologue) has written each group's lr: the step counts and the scalars
    the main pass reads. A grid over tensors: 10,000 tensors are 79 programs, not 79 rounds of
    one."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < n_tensors * live_count(1, found_inf, HAS_INF)
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
    qmaps,
    DTYPE: tl.constexpr,
    GDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    SHADOW: tl.constexpr,
    SR: tl.constexpr,
    ERR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    EIGHT_BIT: tl.constexpr,
):
    """The update of one chunk; EIGHT_BIT and ``qmaps`` as in adam.py's."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tmeta + t * TMETA_WIDTH
    p_addr, sq_addr = tl.load(row + T_PARAM), tl.load(row + T_S0)
    buf_addr, ga_addr = tl.load(row + T_S1), tl.load(row + T_S2)
    g_addr = tl.load(grads + t)
    shadow_addr = side_addr(row, ERR)  # the shadow (SHADOW) or the error term (ERR)
    if ERR == 8:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int8))
    elif ERR == 16:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int16))
    else:
        shadow_ptr = shadow_addr.to(tl.pointer_type(GDTYPE))
    p_ptr = p_addr.to(tl.pointer_type(DTYPE))
    sq_ptr = sq_addr.to(tl.pointer_type(SDTYPE))
    buf_ptr = buf_addr.to(tl.pointer_type(SDTYPE))
    ga_ptr = ga_addr.to(tl.pointer_type(SDTYPE))
    sq_scale = absmax_ptr(row, T_A0, EIGHT_BIT)
    buf_scale = absmax_ptr(row, T_A1, EIGHT_BIT)
    ga_scale = absmax_ptr(row, T_A2, EIGHT_BIT)
    numel = live_count(tl.load(row + T_NUMEL), found_inf, HAS_INF)
    g_ptr = g_addr.to(tl.pointer_type(GDTYPE))
    s = scal + t * SCAL_WIDTH
    seed = tl.load(s + S_SEED).to(tl.int64)  # the step, for stochastic rounding
    lr = tl.load(s + S_LR)
    alpha = tl.load(s + S_ALPHA)
    w = tl.load(s + S_W)
    eps = tl.load(s + S_EPS)
    wd = tl.load(s + S_WD)
    momentum = tl.load(s + S_MOMENTUM)
    sign = tl.load(s + S_SIGN)
    centered_on = tl.load(s + S_CENTERED) != 0.0
    momentum_on = momentum > 0.0
    start = tl.multiple_of(start, BLOCK * ITERS)  # chunks start at multiples of the chunk size
    if whole_aligned_chunk(
        start, numel, BLOCK * ITERS, p_addr, g_addr, sq_addr, buf_addr, ga_addr, shadow_addr
    ):
        # every access of this chunk in bounds and 16-byte aligned: unmasked, 128-bit
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        sq_ptr = tl.multiple_of(sq_ptr, 16)
        buf_ptr = tl.multiple_of(buf_ptr, 16)
        ga_ptr = tl.multiple_of(ga_ptr, 16)
        shadow_ptr = tl.multiple_of(shadow_ptr, 16)
        for i in (tl.range if EIGHT_BIT else tl.static_range)(ITERS):
            _rmsprop_block(
                p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, shadow_ptr, sq_scale, buf_scale, ga_scale,
                qmaps, start + i * BLOCK, numel, centered_on, momentum_on,
                t, seed, lr, alpha, w, eps, wd, momentum, sign, grad_scale, clip,
                DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP, HAS_CENTERED, HAS_MOMENTUM,
                BLOCK, False, EIGHT_BIT,
            )  # fmt: skip
    else:
        # a tensor's tail, or a tensor not 16-byte aligned: masked scalar accesses, a part of a
        # block at a time (multi_tensor.TAIL_SPLIT), unrolled (as a loop it spilled)
        for i in (tl.range if EIGHT_BIT else tl.static_range)(ITERS * TAIL_SPLIT):
            _rmsprop_block(
                p_ptr, g_ptr, sq_ptr, buf_ptr, ga_ptr, shadow_ptr, sq_scale, buf_scale, ga_scale,
                qmaps, start + i * (BLOCK // TAIL_SPLIT), numel, centered_on, momentum_on,
                t, seed, lr, alpha, w, eps, wd, momentum, sign, grad_scale, clip,
                DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP, HAS_CENTERED, HAS_MOMENTUM,
                BLOCK // TAIL_SPLIT, True, EIGHT_BIT,
            )  # fmt: skip


@triton.jit
def _rmsprop_block(
    p_ptr,
    g_ptr,
    sq_ptr,
    buf_ptr,
    ga_ptr,
    shadow_ptr,
    sq_scale,
    buf_scale,
    ga_scale,
    qmaps,
    base,
    numel,
    centered_on,
    momentum_on,
    t,
    seed,
    lr,
    alpha,
    w,
    eps,
    wd,
    momentum,
    sign,
    grad_scale,
    clip,
    DTYPE: tl.constexpr,
    GDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    SHADOW: tl.constexpr,
    SR: tl.constexpr,
    ERR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_CENTERED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    EIGHT_BIT: tl.constexpr,
):
    """SIZE elements from ``base``: masked by ``numel`` (MASKED), or all in bounds; 8-bit
    state (EIGHT_BIT) dequantized and quantized again per block (multi_tensor.tile)."""
    offs, mask, blocks, bmask = tile(base, numel, SIZE, MASKED, EIGHT_BIT)
    p = load_param(p_ptr, shadow_ptr, offs, mask, ERR)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    g = grad_in(g, g_ptr, offs, mask, grad_scale, clip, HAS_SCALE, CLIP, GDTYPE)
    sq = load_state(sq_ptr, sq_scale, offs, mask, blocks, bmask, qmaps, QMAP_UNSIGNED, EIGHT_BIT)
    g = g * sign
    g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)
    sq = tl.fma(w * g, g, sq * alpha)
    # 8-bit: quantized and stored first, so that its search is done before the next state's:
    # stored last, every 8-bit RMSprop variant held more registers (sm_90, Triton 3.9: 64-98, the
    # centered one without momentum spilling; 40-64 so). With a compressed master and no
    # momentum, last (first, ptxas held the centered one at 64 registers and spilled; 57-70 so;
    # with momentum, last took 76-100)
    EARLY: tl.constexpr = EIGHT_BIT and (ERR == 0 or HAS_MOMENTUM)
    if EARLY:
        store_state(sq_ptr, sq_scale, offs, mask, qmaps, sq, QMAP_UNSIGNED, SDTYPE, EIGHT_BIT)
    var = sq
    if HAS_CENTERED:
        if centered_on:  # per-group options: the same for the whole block
            ga = load_state(
                ga_ptr, ga_scale, offs, mask, blocks, bmask, qmaps, QMAP_SIGNED, EIGHT_BIT
            )
            ga = lerp(ga, g, w)
            store_state(ga_ptr, ga_scale, offs, mask, qmaps, ga, QMAP_SIGNED, SDTYPE, EIGHT_BIT)
            var = tl.fma(-ga, ga, sq)
    avg = tl.sqrt_rn(var) + eps
    new_p = p + tl.div_rn(-lr * g, avg)
    if HAS_MOMENTUM:
        if momentum_on:
            buf = load_state(
                buf_ptr, buf_scale, offs, mask, blocks, bmask, qmaps, QMAP_SIGNED, EIGHT_BIT
            )
            buf = buf * momentum + tl.div_rn(g, avg)
            store_state(buf_ptr, buf_scale, offs, mask, qmaps, buf, QMAP_SIGNED, SDTYPE, EIGHT_BIT)
            new_p = tl.fma(buf, -lr, p)
    store_param(p_ptr, shadow_ptr, offs, mask, new_p, t, seed, DTYPE, GDTYPE, SHADOW, SR, ERR)
    if not EARLY:
        store_state(sq_ptr, sq_scale, offs, mask, qmaps, sq, QMAP_UNSIGNED, SDTYPE, EIGHT_BIT)


def step(tables, amp, state_mask):
    """One RMSprop step over ``tables``; ``amp`` as ``multi_tensor.run_step`` takes it;
    ``state_mask``: the state slots some tensor has (the momentum buffer, slot 1, and the grad
    average, slot 2, compile their code in)."""
    run_step(
        tables,
        amp,
        _rmsprop_prologue,
        _rmsprop_main,
        HAS_CENTERED=bool(state_mask & 4),
        HAS_MOMENTUM=bool(state_mask & 2),
    )
