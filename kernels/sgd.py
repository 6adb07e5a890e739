"""SGD: the step prologue, the fused multi-tensor pass, and their launcher.

Per element, in float32 (torch.optim.SGD's math, in its order of operations):
``g = -g`` (maximize); ``g += wd*p``; with momentum: ``buf = g`` on the tensor's first update,
else ``buf = momentum*buf + (1-dampening)*g``; ``g = g + momentum*buf`` (nesterov) or ``buf``;
``p -= lr*g``. The step the prologue advances is fusedopt's own (torch's SGD keeps none): it says
which update is the first, and seeds stochastic rounding.
``momentum``, ``nesterov``, weight decay and ``maximize`` are runtime values per tensor; a
constexpr only compiles the momentum code in or out.
8-bit state (EIGHT_BIT): the same update on dequantized states (multi_tensor.py).
"""

import triton
import triton.language as tl

from .. import _layout as L
from .multi_tensor import (
    HYPER_WIDTH,
    QMAP_SIGNED,
    SCAL_WIDTH,
    T_A0,
    T_GROUP,
    T_NUMEL,
    T_PARAM,
    T_S0,
    TAIL_SPLIT,
    TMETA_WIDTH,
    absmax_ptr,
    advance_steps,
    grad_in,
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

H_MOMENTUM = tl.constexpr(L.SGD_COLS["momentum"])
H_DAMPENING = tl.constexpr(L.SGD_COLS["dampening"])
H_WD = tl.constexpr(L.SGD_COLS["weight_decay"])
H_NESTEROV = tl.constexpr(L.SGD_COLS["nesterov"])
H_MAXIMIZE = tl.constexpr(L.SGD_COLS["maximize"])

S_LR, S_MOMENTUM, S_W, S_WD, S_SIGN, S_NESTEROV, S_FIRST, S_SEED = (
    tl.constexpr(L.SGD_SCAL.index(name)) for name in L.SGD_SCAL
)


@triton.jit
def _sgd_prologue(
    tmeta,
    n_tensors,
    hyper,
    glr,
    scal,
    found_inf,
    HAS_INF: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """The per-tensor half of the prologue (see adam.py's), BLOCK_T tensors per program."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < n_tensors * live_count(1, found_inf, HAS_INF)
    step = advance_steps(tmeta, t, live)
    grp = tl.load(tmeta + t * TMETA_WIDTH + T_GROUP, mask=live, other=0)
    h = hyper + grp * HYPER_WIDTH
    s = scal + t * SCAL_WIDTH
    maximize = tl.load(h + H_MAXIMIZE, mask=live, other=0.0)
    dampening = tl.load(h + H_DAMPENING, mask=live, other=0.0)
    tl.store(s + S_LR, tl.load(glr + grp, mask=live, other=0.0).to(tl.float32), mask=live)
    tl.store(
        s + S_MOMENTUM, tl.load(h + H_MOMENTUM, mask=live, other=0.0).to(tl.float32), mask=live
    )
    tl.store(s + S_W, (1.0 - dampening).to(tl.float32), mask=live)
    tl.store(s + S_WD, tl.load(h + H_WD, mask=live, other=0.0).to(tl.float32), mask=live)
    tl.store(s + S_SIGN, tl.where(maximize != 0.0, -1.0, 1.0).to(tl.float32), mask=live)
    tl.store(
        s + S_NESTEROV, tl.load(h + H_NESTEROV, mask=live, other=0.0).to(tl.float32), mask=live
    )
    tl.store(s + S_FIRST, tl.where(step == 1, 1.0, 0.0).to(tl.float32), mask=live)
    tl.store(s + S_SEED, step.to(tl.float32), mask=live)


@triton.jit
def _sgd_main(
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
    p_addr, buf_addr = tl.load(row + T_PARAM), tl.load(row + T_S0)
    g_addr = tl.load(grads + t)
    shadow_addr = side_addr(row, ERR)  # the shadow (SHADOW) or the error term (ERR)
    if ERR == 8:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int8))
    elif ERR == 16:
        shadow_ptr = shadow_addr.to(tl.pointer_type(tl.int16))
    else:
        shadow_ptr = shadow_addr.to(tl.pointer_type(GDTYPE))
    p_ptr = p_addr.to(tl.pointer_type(DTYPE))
    buf_ptr = buf_addr.to(tl.pointer_type(SDTYPE))
    buf_scale = absmax_ptr(row, T_A0, EIGHT_BIT)
    numel = live_count(tl.load(row + T_NUMEL), found_inf, HAS_INF)
    g_ptr = g_addr.to(tl.pointer_type(GDTYPE))
    s = scal + t * SCAL_WIDTH
    seed = tl.load(s + S_SEED).to(tl.int64)  # the step, for stochastic rounding
    lr = tl.load(s + S_LR)
    momentum = tl.load(s + S_MOMENTUM)
    w = tl.load(s + S_W)
    wd = tl.load(s + S_WD)
    sign = tl.load(s + S_SIGN)
    nesterov = tl.load(s + S_NESTEROV) != 0.0
    first = tl.load(s + S_FIRST) != 0.0
    momentum_on = momentum != 0.0
    start = tl.multiple_of(start, BLOCK * ITERS)  # chunks start at multiples of the chunk size
    if whole_aligned_chunk(
        start, numel, BLOCK * ITERS, p_addr, g_addr, buf_addr, shadow_addr, 0, 0
    ):
        # every access of this chunk in bounds and 16-byte aligned: unmasked, 128-bit
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        buf_ptr = tl.multiple_of(buf_ptr, 16)
        shadow_ptr = tl.multiple_of(shadow_ptr, 16)
        for i in (tl.range if EIGHT_BIT else tl.static_range)(ITERS):
            _sgd_block(
                p_ptr, g_ptr, buf_ptr, shadow_ptr, buf_scale,
                qmaps, start + i * BLOCK, numel, momentum_on, nesterov, first,
                t, seed, lr, momentum, w, wd, sign, grad_scale, clip,
                DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP, HAS_MOMENTUM,
                BLOCK, False, EIGHT_BIT,
            )  # fmt: skip
    else:
        # a tensor's tail, or a tensor not 16-byte aligned: masked scalar accesses, a part of a
        # block at a time (multi_tensor.TAIL_SPLIT)
        for i in (tl.range if EIGHT_BIT else tl.static_range)(ITERS * TAIL_SPLIT):
            _sgd_block(
                p_ptr, g_ptr, buf_ptr, shadow_ptr, buf_scale,
                qmaps, start + i * (BLOCK // TAIL_SPLIT), numel, momentum_on, nesterov, first,
                t, seed, lr, momentum, w, wd, sign, grad_scale, clip,
                DTYPE, GDTYPE, SDTYPE, SHADOW, SR, ERR, HAS_SCALE, CLIP, HAS_MOMENTUM,
                BLOCK // TAIL_SPLIT, True, EIGHT_BIT,
            )  # fmt: skip


@triton.jit
def _sgd_block(
    p_ptr,
    g_ptr,
    buf_ptr,
    shadow_ptr,
    buf_scale,
    qmaps,
    base,
    numel,
    momentum_on,
    nesterov,
    first,
    t,
    seed,
    lr,
    momentum,
    w,
    wd,
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
    g = g * sign
    g = tl.where(wd != 0.0, tl.fma(p, wd, g), g)
    if HAS_MOMENTUM:
        if momentum_on:  # per-group options: the same for the whole block
            if first:  # the tensor's first update: the buffer starts as the gradient
                buf = g
            else:
                buf = load_state(
                    buf_ptr, buf_scale, offs, mask, blocks, bmask, qmaps, QMAP_SIGNED, EIGHT_BIT
                )
                buf = tl.fma(g, w, buf * momentum)
            store_state(buf_ptr, buf_scale, offs, mask, qmaps, buf, QMAP_SIGNED, SDTYPE, EIGHT_BIT)
            g = tl.where(nesterov, tl.fma(buf, momentum, g), buf)
    p = tl.fma(g, -lr, p)
    store_param(p_ptr, shadow_ptr, offs, mask, p, t, seed, DTYPE, GDTYPE, SHADOW, SR, ERR)


def step(tables, amp, state_mask):
    """One SGD step over ``tables``; ``amp`` as ``multi_tensor.run_step`` takes it;
    ``state_mask``: the state slots some tensor has (the momentum buffer, slot 0, compiles its
    code in)."""
    run_step(tables, amp, _sgd_prologue, _sgd_main, HAS_MOMENTUM=bool(state_mask & 1))
