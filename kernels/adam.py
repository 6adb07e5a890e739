"""Adam and AdamW: the step prologue, the fused multi-tensor pass, and their launcher.

Per element, in float32 (torch.optim's math, in its order of operations):
``g = -g`` (maximize); ``p *= 1 - lr*wd`` (decoupled) or ``g += wd*p`` (L2);
``m = lerp(m, g, 1-b1)``; ``v = b2*v + (1-b2)*g*g``; ``vmax = max(vmax, v)`` (amsgrad);
``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``.
Every per-group option (amsgrad, maximize, decoupled decay) is a runtime value, so groups with
different options still share one launch; a constexpr only compiles the AMSGrad code in or out.
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
    pow_int,
    run_step,
    side_addr,
    store_param,
    store_state,
    tile,
    whole_aligned_chunk,
)

H_BETA1 = tl.constexpr(L.ADAM_COLS["beta1"])
H_BETA2 = tl.constexpr(L.ADAM_COLS["beta2"])
H_EPS = tl.constexpr(L.ADAM_COLS["eps"])
H_WD = tl.constexpr(L.ADAM_COLS["weight_decay"])
H_AMSGRAD = tl.constexpr(L.ADAM_COLS["amsgrad"])
H_MAXIMIZE = tl.constexpr(L.ADAM_COLS["maximize"])
H_DECOUPLED = tl.constexpr(L.ADAM_COLS["decoupled"])

# per-tensor scalars, written by the prologue
S_STEP_SIZE, S_BC2_SQRT, S_P_MUL, S_G_WD, S_W1, S_BETA2, S_W2, S_EPS, S_SIGN, S_AMSGRAD, S_SEED = (
    tl.constexpr(L.ADAM_SCAL.index(name)) for name in L.ADAM_SCAL
)


@triton.jit
def _adam_prologue(
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
    beta1 = tl.load(h + H_BETA1, mask=live, other=0.0)
    beta2 = tl.load(h + H_BETA2, mask=live, other=0.0)
    eps = tl.load(h + H_EPS, mask=live, other=0.0)
    wd = tl.load(h + H_WD, mask=live, other=0.0)
    amsgrad = tl.load(h + H_AMSGRAD, mask=live, other=0.0)
    maximize = tl.load(h + H_MAXIMIZE, mask=live, other=0.0)
    decoupled = tl.load(h + H_DECOUPLED, mask=live, other=0.0) != 0.0
    step_size = lr / (1.0 - pow_int(beta1, step))
    bc2_sqrt = tl.sqrt(1.0 - pow_int(beta2, step))
    p_mul = tl.where(decoupled, 1.0 - lr * wd, 1.0)
    g_wd = tl.where(decoupled, 0.0, wd)
    s = scal + t * SCAL_WIDTH
    tl.store(s + S_STEP_SIZE, step_size.to(tl.float32), mask=live)
    tl.store(s + S_BC2_SQRT, bc2_sqrt.to(tl.float32), mask=live)
    tl.store(s + S_P_MUL, p_mul.to(tl.float32), mask=live)
    tl.store(s + S_G_WD, g_wd.to(tl.float32), mask=live)
    tl.store(s + S_W1, (1.0 - beta1).to(tl.float32), mask=live)
    tl.store(s + S_BETA2, beta2.to(tl.float32), mask=live)
    tl.store(s + S_W2, (1.0 - beta2).to(tl.float32), mask=live)
    tl.store(s + S_EPS, eps.to(tl.float32), mask=live)
    tl.store(s + S_SIGN, tl.where(maximize != 0.0, -1.0, 1.0).to(tl.float32), mask=live)
    tl.store(s + S_AMSGRAD, amsgrad.to(tl.float32), mask=live)
    tl.store(s + S_SEED, step.to(tl.float32), mask=live)


@triton.jit
def _adam_main(
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
    HAS_AMSGRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    EIGHT_BIT: tl.constexpr,
):
    """The update of one chunk. EIGHT_BIT: the states are uint8 codes (SDTYPE) with a float32
    absmax per QBLOCK elements (the tensor table's T_A0..2), quantized with the maps at ``qmaps``
    (multi_tensor.qmaps); otherwise ``qmaps`` is None."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = tmeta + t * TMETA_WIDTH
    p_addr, m_addr = tl.load(row + T_PARAM), tl.load(row + T_S0)
    v_addr, vmax_addr = tl.load(row + T_S1), tl.load(row + T_S2)
    g_addr = tl.load(grads + t)
    shadow_addr = side_addr(row, ERR)  # the shadow (SHADOW) or the error term (ERR)
    if ERR == 8:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int8))
    elif ERR == 16:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int16))
    else:
        shadow_ptr = shadow_addr.to(tl.pointer_type(GDTYPE))
    p_ptr = p_addr.to(tl.pointer_type(DTYPE))
    m_ptr = m_addr.to(tl.pointer_type(SDTYPE))
    v_ptr = v_addr.to(tl.pointer_type(SDTYPE))
    vmax_ptr = vmax_addr.to(tl.pointer_type(SDTYPE))
    m_scale = absmax_ptr(row, T_A0, EIGHT_BIT)
    v_scale = absmax_ptr(row, T_A1, EIGHT_BIT)
    vmax_scale = absmax_ptr(row, T_A2, EIGHT_BIT)
    numel = live_count(tl.load(row + T_NUMEL), found_inf, HAS_INF)
    g_ptr = g_addr.to(tl.pointer_type(GDTYPE))
    s = scal + t * SCAL_WIDTH
    seed = tl.load(s + S_SEED).to(tl.int64)  # the step, for stochastic rounding
    step_size = tl.load(s + S_STEP_SIZE)
    bc2_sqrt = tl.load(s + S_BC2_SQRT)
    p_mul = tl.load(s + S_P_MUL)
    g_wd = tl.load(s + S_G_WD)
    w1 = tl.load(s + S_W1)
    beta2 = tl.load(s + S_BETA2)
    w2 = tl.load(s + S_W2)
    eps = tl.load(s + S_EPS)
    sign = tl.load(s + S_SIGN)
    ams_on = tl.load(s + S_AMSGRAD) != 0.0
    start = tl.multiple_of(start, BLOCK * ITERS)  # chunks start at multiples of the chunk size
    if whole_aligned_chunk(
        start, numel, BLOCK * ITERS, p_addr, g_addr, m_addr, v_addr, vmax_addr, shadow_addr
    ):
        # every access of this chunk in bounds and 16-byte aligned: unmasked, 128-bit
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        shadow_ptr = tl.multiple_of(shadow_ptr, 16)
        for i in (tl.range if EIGHT_BIT else tl.static_range)(ITERS):
            _adam_block(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, shadow_ptr, m_scale, v_scale, vmax_scale,
                qmaps, start + i * BLOCK, numel, ams_on,
                t, seed, step_size, bc2_sqrt, p_mul, g_wd, w1, beta2, w2, eps, sign,
                grad_scale, clip, DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP,
                HAS_AMSGRAD, BLOCK, False, EIGHT_BIT,
            )  # fmt: skip
    else:
        # a tensor's tail, or a tensor not 16-byte aligned: masked scalar accesses, in a loop
        # (unrolled, as the whole path is, it would hold up to 155 registers: 4 warps, fp32), a
        # part of a block at a time (multi_tensor.TAIL_SPLIT)
        for i in range(ITERS * TAIL_SPLIT):
            _adam_block(
                p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, shadow_ptr, m_scale, v_scale, vmax_scale,
                qmaps, start + i * (BLOCK // TAIL_SPLIT), numel, ams_on,
                t, seed, step_size, bc2_sqrt, p_mul, g_wd, w1, beta2, w2, eps, sign,
                grad_scale, clip, DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP,
                HAS_AMSGRAD, BLOCK // TAIL_SPLIT, True, EIGHT_BIT,
            )  # fmt: skip


@triton.jit
def _adam_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    shadow_ptr,
    m_scale,
    v_scale,
    vmax_scale,
    qmaps,
    base,
    numel,
    ams_on,
    t,
    seed,
    step_size,
    bc2_sqrt,
    p_mul,
    g_wd,
    w1,
    beta2,
    w2,
    eps,
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
    HAS_AMSGRAD: tl.constexpr,
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
    m = load_state(m_ptr, m_scale, offs, mask, blocks, bmask, qmaps, QMAP_SIGNED, EIGHT_BIT)
    v = load_state(v_ptr, v_scale, offs, mask, blocks, bmask, qmaps, QMAP_UNSIGNED, EIGHT_BIT)
    g = g * sign
    p = p * p_mul
    g = tl.where(g_wd != 0.0, tl.fma(p, g_wd, g), g)
    m = lerp(m, g, w1)
    v = tl.fma(w2 * g, g, v * beta2)
    # 8-bit without AMSGrad: the states quantized first, as rmsprop.py's square average (sm_90,
    # Triton 3.9: 60-64 registers); with it or a compressed master, last (75-79; first, ptxas
    # held 64 and spilled 8 bytes)
    EARLY: tl.constexpr = EIGHT_BIT and not HAS_AMSGRAD and ERR == 0
    if EARLY:
        store_state(m_ptr, m_scale, offs, mask, qmaps, m, QMAP_SIGNED, SDTYPE, EIGHT_BIT)
        store_state(v_ptr, v_scale, offs, mask, qmaps, v, QMAP_UNSIGNED, SDTYPE, EIGHT_BIT)
    v_used = v
    if HAS_AMSGRAD:
        if ams_on:  # a per-group option: the same for the whole block
            vmax = load_state(
                vmax_ptr, vmax_scale, offs, mask, blocks, bmask, qmaps, QMAP_UNSIGNED, EIGHT_BIT
            )
            vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
            store_state(
                vmax_ptr, vmax_scale, offs, mask, qmaps, vmax, QMAP_UNSIGNED, SDTYPE, EIGHT_BIT
            )
            v_used = vmax
    denom = tl.div_rn(tl.sqrt_rn(v_used), bc2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    store_param(p_ptr, shadow_ptr, offs, mask, p, t, seed, DTYPE, GDTYPE, SHADOW, SR, ERR)
    if not EARLY:
        store_state(m_ptr, m_scale, offs, mask, qmaps, m, QMAP_SIGNED, SDTYPE, EIGHT_BIT)
        store_state(v_ptr, v_scale, offs, mask, qmaps, v, QMAP_UNSIGNED, SDTYPE, EIGHT_BIT)


def step(tables, amp, state_mask):
    """One Adam/AdamW step over ``tables``; ``amp`` as ``multi_tensor.run_step`` takes it;
    ``state_mask``: the state slots some tensor has (the AMSGrad maximum, slot 2, compiles its
    code in)."""
    run_step(tables, amp, _adam_prologue, _adam_main, HAS_AMSGRAD=bool(state_mask & 4))
