"""What the multi-tensor kernels share: table columns as constexprs, the dtype map, the launch
configuration, and the step prologue's pieces (group lr resolution, integer powers).

Rounding follows torch's kernels, which is what makes fp32 parity "close to rounding": where torch
fuses a multiply-add (``add(alpha=)``, ``addcmul``, ``lerp``: an FMA on CPU and CUDA alike) the
kernels call ``tl.fma``; where torch rounds in between (``addcdiv`` computes ``(value*t1)/t2``, then
adds) they do too; division and square root are the correctly rounded ``div_rn``/``sqrt_rn``.

Every step runs one tiny *prologue* program per device (advance each tensor's step, advance Noam
counters, resolve each group's lr, write per-tensor scalars such as the bias-corrected step size)
and
then one *main* launch per (device, dtype) bucket over chunks of every tensor. The prologue works in
float64 so that ``1 - beta2**t`` keeps its digits for small ``t``, as torch.optim's host-side
Python arithmetic does; the main pass reads the resulting float32 scalars.

8-bit state (a bucket's state uint8, fusedopt/quant8.py): the main passes read each state as uint8
codes and a float32 absmax per QBLOCK elements, dequantize, run the same float32 update, and
quantize the new values with their new absmax (``tile``, ``load_state``, ``store_state``), bit for
bit as the torch backend does; an EIGHT_BIT constexpr compiles that in, leaving the other passes'
code as it was.
"""

import math
import os

import torch
import triton
import triton.language as tl

from .. import _layout as L
from .. import quant8

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this is fixed at import time.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

TMETA_WIDTH = tl.constexpr(L.TMETA_WIDTH)
T_PARAM = tl.constexpr(L.T_PARAM)
T_S0 = tl.constexpr(L.T_S0)
T_S1 = tl.constexpr(L.T_S1)
T_S2 = tl.constexpr(L.T_S2)
T_STEP = tl.constexpr(L.T_STEP)
T_NUMEL = tl.constexpr(L.T_NUMEL)
T_GROUP = tl.constexpr(L.T_GROUP)
T_SHADOW = tl.constexpr(L.T_SHADOW)
T_ERR = tl.constexpr(L.T_ERR)
T_A0 = tl.constexpr(L.T_A0)
T_A1 = tl.constexpr(L.T_A1)
T_A2 = tl.constexpr(L.T_A2)
QBLOCK = tl.constexpr(L.QBLOCK)
GPTR_WIDTH = tl.constexpr(L.GPTR_WIDTH)
G_LR_PTR = tl.constexpr(L.G_LR_PTR)
G_COUNTER_PTR = tl.constexpr(L.G_COUNTER_PTR)
HYPER_WIDTH = tl.constexpr(L.HYPER_WIDTH)
H_LR = tl.constexpr(L.H_LR)
H_MODE = tl.constexpr(L.H_MODE)
H_NOAM_SCALE = tl.constexpr(L.H_NOAM_SCALE)
H_NOAM_WARMUP = tl.constexpr(L.H_NOAM_WARMUP)
SCAL_WIDTH = tl.constexpr(L.SCAL_WIDTH)
LR_TENSOR = tl.constexpr(L.LR_TENSOR)
CLIP_COEF = tl.constexpr(L.CLIP_COEF)
CLIP_NORM = tl.constexpr(L.CLIP_NORM)
LR_NOAM = tl.constexpr(L.LR_NOAM)
LR_SCHEDULE = tl.constexpr(L.LR_SCHEDULE)
G_SCHED_PTR = tl.constexpr(L.G_SCHED_PTR)
SP_KIND, SP_WARMUP, SP_A, SP_B, SP_C, SP_D, SP_E, SP_F, SP_N, SP_MILESTONES = (
    tl.constexpr(getattr(L, f"SP_{n}"))
    for n in ("KIND", "WARMUP", "A", "B", "C", "D", "E", "F", "N", "MILESTONES")
)
SK_LINEAR = tl.constexpr(L.SK_LINEAR)
SK_COSINE = tl.constexpr(L.SK_COSINE)
SK_COSINE_RESTARTS = tl.constexpr(L.SK_COSINE_RESTARTS)
SK_POLYNOMIAL = tl.constexpr(L.SK_POLYNOMIAL)
SK_INVERSE_SQRT = tl.constexpr(L.SK_INVERSE_SQRT)
SK_WSD = tl.constexpr(L.SK_WSD)
SK_EXPONENTIAL = tl.constexpr(L.SK_EXPONENTIAL)
SK_MULTISTEP = tl.constexpr(L.SK_MULTISTEP)
SHAPE_COSINE = tl.constexpr(L.SHAPE_COSINE)
SHAPE_1_SQRT = tl.constexpr(L.SHAPE_1_SQRT)
# pi as a float64 constant: a Python float literal in a Triton kernel becomes a float32 constant
PI = tl.constexpr(math.pi)

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# 8-bit state (a bucket's state uint8; fusedopt/quant8.py): the main passes read both code maps
# from one float32 tensor of 512 on the parameters' device, the signed map, then the unsigned one;
# a state slot names its map by its offset in it
QMAP_SIZE = 256
QMAP_SIGNED = tl.constexpr(0)
QMAP_UNSIGNED = tl.constexpr(QMAP_SIZE)
QMAP_TOP = tl.constexpr(QMAP_SIZE - 2)  # the highest lower neighbour a value can have
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # (above it: inf)
_QMAPS = {}


def qmaps(device):
    """The code maps of 8-bit state on ``device`` (QMAP_SIGNED, QMAP_UNSIGNED), made once per
    device and kept: a CUDA graph that captured a step reads them at their address."""
    maps = _QMAPS.get(device)
    if maps is None:
        signed, unsigned = quant8.dynamic_map(True, device), quant8.dynamic_map(False, device)
        maps = _QMAPS[device] = torch.cat([signed, unsigned]).contiguous()
        assert maps.numel() == 2 * QMAP_SIZE
    return maps


# Main pass: BLOCK elements per vector op, ITERS of them per program (one chunk). The interpreter
# runs programs one by one in Python, each op at a cost of ~0.1 ms whatever its size, so there the
# chunk is one block of the same 4096 elements (the 8-bit passes took 3x longer at 1024).
BLOCK = 4096 if INTERPRETED else 1024
ITERS = 1 if INTERPRETED else 4
CHUNK = BLOCK * ITERS
# No implicit contraction of a*b + c into an FMA: the kernels place every FMA themselves, where
# torch's own kernels have one, so that the GPU rounds as torch does (with contraction on, Triton
# 3.9 fuses 32 more multiply-adds into the fp32 AdamW pass on sm_90, e.g. ``buf*momentum + g/avg``,
# which torch computes in two rounded steps).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
# The main passes' masked path (a tensor's tail, a view not 16-byte aligned) goes 1/TAIL_SPLIT of
# a block at a time. Its scalar accesses hold every element in a register of its own, 16-bit ones
# too, so at a whole block that path set the kernel's register count (sm_90: bf16 AdamW 87, bf16
# RMSprop up to 104, fp32 masters up to 128; at half a block 48, 65 and 89, no spills).
TAIL_SPLIT = tl.constexpr(2)
# Prologues: the group half is one program looping over groups this many at a time; the tensor
# half a grid of programs of this many tensors each.
PROLOGUE_BLOCK = 128
# Clipping: the first stage of the norm's reduction adds this many chunk sums per program (the
# CUDA kernels' too: layout.h), this many at a time.
CLIP_PER_PROGRAM = L.CLIP_PER_BLOCK
CLIP_BLOCK = 1024


@triton.jit
def pow_int(base, n):
    """``base ** n`` for float64 ``base`` and integer-valued ``n`` in [0, 2**32), by squaring."""
    result = base * 0.0 + 1.0
    for _ in tl.static_range(32):
        result = tl.where((n & 1) != 0, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def _f64(x):
    """The float64 constant ``x`` (a Python float would be rounded to float32)."""
    return tl.full((), x, tl.float64)


@triton.jit
def schedule_factor(sp, u, live):
    """f(u) of each LR_SCHEDULE group (``sp``: the addresses of their SP_* vectors; ``u``: the
    updates before this one, float64): every kind's formula, then the group's. step_math.h's
    schedule_factor, operation for operation, except polynomial decay with a power other than 1,
    which is exp(power * log(x)) here (the interpreter has no pow), within a few float64 ulps of
    libm's pow. Each group needs at most one cosine and one square root at a time, so each is
    taken once, of the argument its kind and phase select (the float64 cos is long code). Inputs
    the selected formula never sees are kept in range (no NaN or division by zero)."""
    kind = tl.load(sp + SP_KIND, mask=live, other=0.0)
    w = tl.load(sp + SP_WARMUP, mask=live, other=0.0)
    a = tl.load(sp + SP_A, mask=live, other=0.0)
    b = tl.load(sp + SP_B, mask=live, other=0.0)
    c = tl.load(sp + SP_C, mask=live, other=0.0)
    d = tl.load(sp + SP_D, mask=live, other=0.0)
    e = tl.load(sp + SP_E, mask=live, other=0.0)
    f = tl.load(sp + SP_F, mask=live, other=0.0)
    n = tl.load(sp + SP_N, mask=live, other=0.0)
    pi = _f64(PI)
    is_wsd = kind == SK_WSD
    warming = u < w
    progress = (u - w) / tl.maximum(a - w, 1.0)  # after the warm-up (a: total)
    x = b * progress  # hard restarts (b: cycles)
    up = u / tl.maximum(w, 1.0)  # wsd's warm-up, then decay (a: stable, b: decay steps)
    down = (u - w - a) / tl.maximum(b, 1.0)
    arg = tl.where(kind == SK_COSINE, pi * b * 2.0 * progress, pi * (x - tl.floor(x)))
    arg = tl.where(is_wsd, tl.where(warming, pi * up, pi * f * 2.0 * down), arg)
    cos = tl.cos(arg)
    root = tl.where(warming, 1.0 - up, down)  # wsd's 1-sqrt shapes
    root = tl.where(kind == SK_INVERSE_SQRT, (u + (a - w)) / tl.maximum(a, 1.0), root)
    root = tl.sqrt(tl.maximum(root, 0.0))
    # linear (a: total); cosine (b: cycles, c: min_lr / lr); hard restarts
    out = tl.where(kind == SK_LINEAR, tl.maximum((a - u) / tl.maximum(a - w, 1.0), 0.0), 1.0)
    out = tl.where(kind == SK_COSINE, tl.maximum(0.5 * (1.0 + cos) * (1.0 - c) + c, 0.0), out)
    wave = tl.where(progress >= 1.0, 0.0, tl.maximum(0.5 * (1.0 + cos), 0.0))
    out = tl.where(kind == SK_COSINE_RESTARTS, wave, out)
    # polynomial (b: end lr, c: power, d: initial lr)
    rem = 1.0 - progress
    powered = tl.exp(tl.log(tl.where(rem > 0.0, rem, 1.0)) * c)
    powered = tl.where(rem > 0.0, powered, tl.where(c == 0.0, 1.0, 0.0))
    powered = tl.where(c == 1.0, rem, powered)
    d_ok = tl.where(d > 0.0, d, 1.0)
    poly = tl.where(u > a, b / d_ok, ((d - b) * powered + b) / d_ok)
    out = tl.where(kind == SK_POLYNOMIAL, poly, out)
    # inverse square root (a: timescale)
    out = tl.where(kind == SK_INVERSE_SQRT, 1.0 / root, out)
    # every kind above (and constant) warms up linearly from 0
    out = tl.where(warming, up, out)
    # wsd (c / d: warm-up / decay shapes, e: min ratio, f: cycles)
    rising = tl.where(
        c == SHAPE_COSINE, 0.5 * (1.0 - cos), tl.where(c == SHAPE_1_SQRT, 1.0 - root, up)
    )
    falling = tl.where(
        d == SHAPE_COSINE, 0.5 * (1.0 + cos), tl.where(d == SHAPE_1_SQRT, 1.0 - root, 1.0 - down)
    )
    wsd = tl.where(u < w + a + b, tl.maximum(falling * (1.0 - e) + e, 0.0), e)
    wsd = tl.where(u < w + a, 1.0, wsd)
    wsd = tl.where(warming, tl.maximum(rising * (1.0 - e) + e, 0.0), wsd)
    out = tl.where(is_wsd, wsd, out)
    # exponential and multistep (a: gamma; n milestones): gamma ** (u, or the milestones <= u)
    k = tl.zeros_like(u)
    for j in range(0, tl.max(n.to(tl.int32), axis=0)):
        has = live & (j < n)
        m = tl.load(sp + SP_MILESTONES + j, mask=has, other=0.0)
        k += tl.where(has & (m <= u), 1.0, 0.0)
    k = tl.where(kind == SK_EXPONENTIAL, u, k)
    g = pow_int(a, k.to(tl.int64))
    out = tl.where((kind == SK_EXPONENTIAL) | (kind == SK_MULTISTEP), g, out)
    return out


@triton.jit
def resolve_group_lrs(hyper, gptr, glr, n_groups, BLOCK_G: tl.constexpr, SCHED: tl.constexpr):
    """Write each group's lr for this step (float64) to ``glr``; advance the Noam and schedule
    counters. SCHED: some group's lr is an LR_SCHEDULE (compiled in only then: it is most of
    this function's code and, interpreted, of its time)."""
    for g0 in range(0, n_groups, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        live = g < n_groups
        h = hyper + g * HYPER_WIDTH
        mode = tl.load(h + H_MODE, mask=live, other=0.0)
        lr = tl.load(h + H_LR, mask=live, other=0.0)
        is_tensor = live & (mode == LR_TENSOR)
        lr_addr = tl.load(gptr + g * GPTR_WIDTH + G_LR_PTR, mask=is_tensor, other=0)
        lr_t = tl.load(lr_addr.to(tl.pointer_type(tl.float32)), mask=is_tensor, other=0.0)
        lr = tl.where(is_tensor, lr_t.to(tl.float64), lr)
        is_noam = live & (mode == LR_NOAM)
        is_sched = live & (mode == LR_SCHEDULE)
        counted = is_noam | is_sched
        c_ptr = tl.load(gptr + g * GPTR_WIDTH + G_COUNTER_PTR, mask=counted, other=0).to(
            tl.pointer_type(tl.float32)
        )
        count = tl.load(c_ptr, mask=counted, other=0.0) + 1.0
        tl.store(c_ptr, count, mask=counted)
        if SCHED:
            sp = tl.load(gptr + g * GPTR_WIDTH + G_SCHED_PTR, mask=is_sched, other=0).to(
                tl.pointer_type(tl.float64)
            )
            f = schedule_factor(sp, count.to(tl.float64) - 1.0, is_sched)
            lr = tl.where(is_sched, lr * f, lr)
        t = tl.maximum(count.to(tl.float64), 1.0)
        scale = tl.load(h + H_NOAM_SCALE, mask=is_noam, other=0.0)
        warm = tl.load(h + H_NOAM_WARMUP, mask=is_noam, other=0.0)
        rate = scale * tl.minimum(1.0 / tl.sqrt(t), t * warm)
        lr = tl.where(is_noam, rate, lr)
        tl.store(glr + g, lr, mask=live)


@triton.jit
def advance_steps(tmeta, t, live):
    """Add one to the step of each live tensor ``t``; return the new steps as int64."""
    step_ptr = tl.load(tmeta + t * TMETA_WIDTH + T_STEP, mask=live, other=0).to(
        tl.pointer_type(tl.float32)
    )
    step = tl.load(step_ptr, mask=live, other=0.0) + 1.0
    tl.store(step_ptr, step, mask=live)
    return step.to(tl.int64)


@triton.jit
def lerp(a, b, w):
    """torch.lerp as torch computes it on CPU (vectorized) and CUDA: one FMA from the nearer end."""
    d = b - a
    return tl.where(w < 0.5, tl.fma(w, d, a), tl.fma(w - 1.0, d, b))


@triton.jit
def _bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def _mix32(x):
    """murmur3's 32-bit finalizer (uint32 in, uint32 out): the stochastic-rounding noise."""
    x = x ^ (x >> 16)
    x = (x.to(tl.uint64) * 0x85EBCA6B).to(tl.uint32)
    x = x ^ (x >> 13)
    x = (x.to(tl.uint64) * 0xC2B2AE35).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def stochastic_bf16(x, offs, t, step):
    """float32 -> bf16, rounded up with probability equal to the dropped fraction. The 16 noise
    bits are a hash of (element offset, tensor index, step): every backend draws the same ones,
    and a step replayed gives the same result."""
    seed = _mix32(_mix32(t.to(tl.uint32)) ^ step.to(tl.uint32))
    noise = _mix32((offs & 0xFFFFFFFF).to(tl.uint32) ^ seed) & 0xFFFF
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + noise) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


@triton.jit
def store_param(
    p_ptr,
    shadow_ptr,
    offs,
    mask,
    p,
    t,
    step,
    DTYPE: tl.constexpr,
    GDTYPE: tl.constexpr,
    SHADOW: tl.constexpr,
    SR: tl.constexpr,
    ERR: tl.constexpr,
):
    """Store the updated parameter: stochastically rounded (SR), or rounded to nearest even; with
    a master (SHADOW), the master in fp32 and the model's parameter rounded to its dtype; with a
    compressed master (ERR bits), the bf16 parameter and the error term of its rounding at
    ``shadow_ptr`` (master_error)."""
    if SR:
        tl.store(p_ptr + offs, stochastic_bf16(p, offs, t, step), mask=mask)
    else:
        b = cast_out(p, DTYPE)
        tl.store(p_ptr + offs, b, mask=mask)
        if ERR != 0:
            e = master_error(p, b.to(tl.float32), ERR)
            tl.store(shadow_ptr + offs, e.to(shadow_ptr.dtype.element_ty), mask=mask)
    if SHADOW:
        tl.store(shadow_ptr + offs, cast_out(p, GDTYPE), mask=mask)


@triton.jit
def side_addr(row, ERR: tl.constexpr):
    """The address of what a parameter keeps beside it: its compressed master's error term (ERR
    bits: the table's T_ERR), or the model's copy of an fp32 master (T_SHADOW; null without a
    master). The kernels cast it to a pointer themselves: one a function returned lost its
    alignment to Triton 3.6 (the bf16 shadow's 128-bit stores became 16-bit ones)."""
    if ERR != 0:
        return tl.load(row + T_ERR)
    else:
        return tl.load(row + T_SHADOW)


@triton.jit
def load_param(p_ptr, err_ptr, offs, mask, ERR: tl.constexpr):
    """The float32 parameter an update starts from: with a compressed master (ERR bits), the
    master ``b + e * s(b)`` its bf16 value ``b`` and error term ``e`` stand for (fusedopt/
    _master.py, csrc/include/fusedopt/master.h: one rounding, ``e * s`` is exact)."""
    b = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    if ERR != 0:
        e = tl.load(err_ptr + offs, mask=mask).to(tl.float32)
        b = b + e * master_scale(b, ERR)
    return b


@triton.jit
def master_scale(b, ERR: tl.constexpr):
    """s(b): half a bf16 ulp of ``b`` (a float32 holding a bf16 value) over 2**(ERR-1), the
    power of two 2**(E - 135 - (ERR - 1)), E = max(b's biased exponent, 1): built from its bits,
    subnormal below 2**-126 (as master.h's ``scale``)."""
    k: tl.constexpr = ERR - 1
    e = tl.maximum((b.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    biased = e - (8 + k)
    # the subnormal's bit, 1 << (e + 14 - k): at most bit 22 where it is taken (biased < 1)
    sub = 1 << tl.minimum(e + (14 - k), 22)
    bits = tl.where(biased >= 1, biased << 23, sub)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def master_error(x, b, ERR: tl.constexpr):
    """The error term of the float32 ``x`` whose bf16 rounding is ``b`` (as float32):
    (x - b) / s(b), both exact, rounded half to even and clamped to ERR bits; 0 where x is not
    finite (master.h's ``error``). s(b) = 2**(E - 135 - k) (master_scale), so the quotient is
    (x - b) * 2**(135 + k - E), taken as two multiplies by powers of two in float32's normal
    range (2**n, n up to 149, is not one): exact, as the division is, and without div.rn's
    slow-path subroutine, whose registers made the 8-bit passes spill. The rounding adds and
    takes away 1.5 * 2**23, each rounded to nearest even: exact for the |q| <= 2**(ERR-1) a
    finite x gives."""
    k: tl.constexpr = ERR - 1
    e = tl.maximum((b.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    n = (135 + k) - e
    n1 = tl.maximum(n - 127, 0)
    up = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    down = ((n - n1 + 127) << 23).to(tl.float32, bitcast=True)
    q = ((x - b) * up) * down
    r = (q + 12582912.0) - 12582912.0
    lo: tl.constexpr = -(1 << (ERR - 1))
    hi: tl.constexpr = (1 << (ERR - 1)) - 1
    r = tl.minimum(tl.maximum(r, lo), hi)
    return tl.where(q - q == 0.0, r, 0.0)


@triton.jit
def cast_out(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even, as torch rounds. bf16 is rounded by hand:
    the Triton interpreter truncates (triton 3.9, even with fp_downcast_rounding="rtne"), and on
    the GPU these few integer ops hide under the memory traffic; the result is bit-identical to
    torch's ``.to(torch.bfloat16)``, NaN and inf included."""
    if DTYPE == tl.bfloat16:
        return _bf16_rne(x)
    else:
        return x.to(DTYPE)


@triton.jit
def whole_aligned_chunk(start, numel, CHUNK: tl.constexpr, a0, a1, a2, a3, a4, a5):
    """True when the chunk from ``start`` lies wholly inside the tensor (``numel`` elements) and
    every address (int64) is 16-byte aligned (a null one, an unused state, counts as aligned): its
    blocks need no mask and compile to 128-bit accesses (the compiler cannot know either from
    addresses it reads from the tables; ``tl.multiple_of`` tells it, on this branch only). A
    tensor's last chunk and views at odd offsets take the masked, scalar path."""
    addrs = a0 | a1 | a2 | a3 | a4 | a5
    return ((addrs & 15) == 0) & (start + CHUNK <= numel)


@triton.jit
def block_mask(offs, numel, MASKED: tl.constexpr):
    """The mask of a block's accesses: ``offs < numel``, or a constant all-true mask (all in
    bounds), which Triton's canonicalizer removes, so the accesses compile unmasked (and to 128
    bits) as with no mask at all. Not None: Triton 3.6 cannot return None from a function."""
    if MASKED:
        return offs < numel
    else:
        return tl.full(offs.shape, True, tl.int1)


@triton.jit
def tile(base, numel, SIZE: tl.constexpr, MASKED: tl.constexpr, EIGHT_BIT: tl.constexpr):
    """The SIZE elements from ``base`` that a main pass's block function updates: (offsets, their
    mask (block_mask), the indices of their 8-bit quantization blocks, those blocks' mask).
    EIGHT_BIT: the offsets are a [SIZE // QBLOCK, QBLOCK] tile, one quantization block a row (a
    block's absmax is then a reduction along axis 1, and broadcasts back along it; ``base`` is a
    multiple of QBLOCK, as every chunk start is); otherwise a vector, and the block indices a
    scalar nothing reads (the compiler drops it: the code is that of a plain vector)."""
    if EIGHT_BIT:
        rows = tl.arange(0, SIZE // QBLOCK)
        offs = base + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        blocks = base // QBLOCK + rows
    else:
        offs = base + tl.arange(0, SIZE)
        blocks = base // QBLOCK
    mask = block_mask(offs, numel, MASKED)
    return offs, mask, blocks, block_mask(blocks * QBLOCK, numel, MASKED)


@triton.jit
def absmax_ptr(row, col, EIGHT_BIT: tl.constexpr):
    """The float32 absmaxes of an 8-bit state slot (the tensor table's column ``col``: T_A0..2);
    without 8-bit state a stand-in nothing reads (``row`` itself: no load)."""
    if EIGHT_BIT:
        return tl.load(row + col).to(tl.pointer_type(tl.float32))
    else:
        return row


@triton.jit
def load_state(
    s_ptr,
    a_ptr,
    offs,
    mask,
    blocks,
    bmask,
    qmaps,
    QMAP: tl.constexpr,
    EIGHT_BIT: tl.constexpr,
):
    """A state slot's float32 values at ``offs``. 8-bit: its codes' map values (the map at
    ``qmaps + QMAP``) times their block's absmax, one float32 multiply, as
    quant8.dequantize_blockwise computes them."""
    if EIGHT_BIT:
        codes = tl.load(s_ptr + offs, mask=mask, other=0)
        absmax = tl.load(a_ptr + blocks, mask=bmask, other=0.0)
        return tl.load(qmaps + QMAP + codes.to(tl.int32)) * absmax[:, None]
    else:
        return tl.load(s_ptr + offs, mask=mask).to(tl.float32)


@triton.jit
def store_state(
    s_ptr,
    a_ptr,
    offs,
    mask,
    qmaps,
    x,
    QMAP: tl.constexpr,
    SDTYPE: tl.constexpr,
    EIGHT_BIT: tl.constexpr,
):
    """Store a state slot's new values ``x``: rounded to SDTYPE, or 8-bit: quantized per block
    with the absmax of its new values (quantize)."""
    if EIGHT_BIT:
        codes, absmax = quantize(x, mask, qmaps + QMAP)
        tl.store(s_ptr + offs, codes, mask=mask)
        # each block's absmax by the thread holding its first element: a store of the [blocks]
        # vector had Triton move it through shared memory first (more registers)
        first = offs % QBLOCK == 0
        absmax = tl.broadcast_to(absmax[:, None], offs.shape)
        tl.store(a_ptr + offs // QBLOCK, absmax, mask=mask & first)
    else:
        tl.store(s_ptr + offs, cast_out(x, SDTYPE), mask=mask)


@triton.jit
def div_rn_bounded(x, d):
    """``x / d`` correctly rounded (tl.div_rn's result) for finite d > 0 and |x| <= d, without
    div.rn.f32's slow-path subroutine: its calls, one per element, held registers enough for
    ptxas to spill in the 8-bit passes. Quotients below 2**-30 in magnitude may be off by an
    ulp (x subnormal and d >= 2**-40): quantization gives them all the code of 0 either way
    (the nearest nonzero map values are above 3e-7).

    Both operands are first scaled by a power of two (exact: |x| <= d) into d in [2**-49,
    2**78], where 1/d and the remainders below stay normal. Then q = x * r from r ~ 1/d
    (div.full.f32: within 2 ulps), one Newton correction with the remainder x - q*d (an FMA)
    makes q faithful (within an ulp of x/d); that remainder, of a faithful q, is exact, and so is
    the neighbour's on the side it points to: the nearer of the two is x/d rounded, a tie taking
    the even one. (Checked against float64 division, 3.5e8 random and exact-midpoint pairs with r
    off by up to 3 ulps: no difference.)"""
    tiny = d < 2.0**-40
    huge = d > 2.0**100
    scale = tl.where(tiny, 2.0**100, tl.where(huge, 2.0**-50, 1.0))
    x = x * scale
    d = d * scale
    r = tl.fdiv(1.0, d)
    q = x * r
    q = tl.fma(tl.fma(-q, d, x), r, q)
    rem = tl.fma(-q, d, x)
    bits = q.to(tl.int32, bitcast=True)
    # the neighbour of q towards x/d: away from 0 when the remainder has q's sign
    other_bits = bits + tl.where((rem > 0.0) == (q > 0.0), 1, -1)
    other = other_bits.to(tl.float32, bitcast=True)
    other_rem = tl.abs(tl.fma(-other, d, x))
    rem = tl.abs(rem)
    nearer = (other_rem < rem) | ((other_rem == rem) & ((other_bits & 1) == 0))
    return tl.where((rem != 0.0) & (q != 0.0) & nearer, other, q)


@triton.jit
def quantize(x, mask, qmap):
    """(uint8 codes, float32 absmax per row) of the [blocks, QBLOCK] tile ``x``, as
    quant8.quantize_blockwise computes them: a row's absmax is the largest |x| of its elements in
    ``mask`` (NaN if any is NaN; the others count as 0); each element takes the value of the
    sorted 256-value map ``qmap`` nearest to x / absmax (absmax 0: x / 1; a true division, as
    torch's), a tie taking the lower. n, the number of map values <= x/absmax, is found by binary
    lifting (torch.bucketize(right=True)'s count); a NaN is <= no value and takes code 0, as
    quant8.nearest_code gives it (and csrc's q8::nearest)."""
    # the largest |x| as the largest of their bit patterns (non-negative floats order as their
    # int32 bits do, and a NaN's lie above inf's): one integer reduction that keeps a NaN, where
    # a float max drops it; tl.reduce with a NaN-keeping combine ran 40x slower interpreted
    bits = tl.where(mask, tl.abs(x), 0.0).to(tl.int32, bitcast=True)
    absmax = tl.max(bits, 1).to(tl.float32, bitcast=True)
    d = tl.broadcast_to(tl.where(absmax > 0.0, absmax, 1.0)[:, None], x.shape)
    # x / d: exact for d 1 (absmax 0 or NaN: x unchanged) and inf (finite x: +-0, inf: NaN)
    x = tl.where(d == 1.0, x, tl.where(d > FLT_MAX, x * 0.0, div_rn_bounded(x, d)))
    # n's bits from the highest: an OR sets one (the bits below it are still 0), as an add
    # would; the interpreter checks each int32 add for overflow, 40% of an 8-bit pass's time
    n = tl.zeros(x.shape, tl.int32)
    for k in tl.static_range(8):
        step = 128 >> k
        n = tl.where(tl.load(qmap + (n | (step - 1))) <= x, n | step, n)
    low = tl.minimum(tl.maximum(n - 1, 0), QMAP_TOP)
    left = tl.abs(x - tl.load(qmap + low))
    right = tl.abs(x - tl.load((qmap + 1) + low))
    return tl.where(right < left, low + 1, low).to(tl.uint8), absmax


@triton.jit
def live_count(n, found_inf, HAS_INF: tl.constexpr):
    """``n``, or 0 when GradScaler found an inf/NaN: a skipped step touches nothing."""
    if HAS_INF:
        return tl.where(tl.load(found_inf) != 0.0, 0, n)
    else:
        return n


@triton.jit
def grad_in(
    g,
    g_ptr,
    offs,
    mask,
    grad_scale,
    clip,
    HAS_SCALE: tl.constexpr,
    CLIP: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The gradient the update uses: unscaled (and written back unscaled, as torch's fused
    optimizers do for GradScaler), then multiplied by the clip coefficient."""
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale))
        tl.store(g_ptr + offs, cast_out(g, DTYPE), mask=mask)
    if CLIP:
        g = g * tl.load(clip + CLIP_COEF)
    return g


@triton.jit
def _clip_partials(partials, n_partials, sums, PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    """The clipping reduction's first stage, a grid: program k adds the chunks' sums of squares
    k*PER_PROGRAM to (k+1)*PER_PROGRAM in float64, always in the same order, into sums[k]. The
    group prologue adds those (resolve_clip). One program over every partial took about 250 us
    at 30,000 chunks (predicted; benchmarks/NOTES-gpu-performance.md)."""
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), tl.float64)
    for i in tl.static_range(PER_PROGRAM // BLOCK):
        c = pid * PER_PROGRAM + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(partials + c, mask=c < n_partials, other=0.0).to(tl.float64)
    tl.store(sums + pid, tl.sum(acc, axis=0))


@triton.jit
def resolve_clip(partials, n_partials, clip, max_norm, live, BLOCK: tl.constexpr):
    """Global grad norm from ``partials``, the float64 sums of _clip_partials (one per
    CLIP_PER_PROGRAM chunks), added in a fixed order: the result does not depend on scheduling;
    and torch's clip coefficient min(1, max_norm / (norm + 1e-6)). Nothing is written when
    ``live`` is 0 (a skipped step keeps the last norm)."""
    acc = tl.zeros((BLOCK,), tl.float64)
    for c0 in range(0, n_partials, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        acc += tl.load(partials + c, mask=c < n_partials, other=0.0).to(tl.float64)
    norm = tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32)
    coef = tl.minimum(tl.div_rn(max_norm, norm + 1e-6), 1.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(clip + CLIP_COEF, coef, mask=live != 0)
    tl.store(clip + CLIP_NORM, norm, mask=live != 0)


@triton.jit
def _groups_prologue(
    hyper,
    gptr,
    glr,
    n_groups,
    partials,
    n_partials,
    clip,
    max_norm,
    found_inf,
    HAS_INF: tl.constexpr,
    CLIP: tl.constexpr,
    SCHED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The optimizer-independent half of a step's prologue, one program: each group's lr (Noam
    and schedule counters advanced), the clip coefficient; nothing when GradScaler found an
    inf/NaN. The per-tensor half (adam.py, rmsprop.py) runs next, as a grid over tensors."""
    live = live_count(1, found_inf, HAS_INF)
    resolve_group_lrs(hyper, gptr, glr, n_groups * live, BLOCK, SCHED)
    if CLIP:
        resolve_clip(partials, n_partials, clip, max_norm, live, BLOCK)


@triton.jit
def _sumsq_main(
    tmeta,
    grads,
    chunks,
    partials,
    grad_scale,
    found_inf,
    DTYPE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """The clipping pre-pass: each chunk's sum of squares of the (unscaled) gradient."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    numel = live_count(tl.load(tmeta + t * TMETA_WIDTH + T_NUMEL), found_inf, HAS_INF)
    g_addr = tl.load(grads + t)
    g_ptr = g_addr.to(tl.pointer_type(DTYPE))
    acc = tl.zeros((BLOCK,), tl.float32)
    start = tl.multiple_of(start, BLOCK * ITERS)
    # the same sums in the same order on both paths: only the accesses differ (see adam.py)
    if whole_aligned_chunk(start, numel, BLOCK * ITERS, g_addr, 0, 0, 0, 0, 0):
        g_ptr = tl.multiple_of(g_ptr, 16)
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            acc = _sumsq_block(g_ptr, offs, numel, grad_scale, acc, HAS_SCALE, False)
    else:
        for i in tl.static_range(ITERS):
            offs = start + i * BLOCK + tl.arange(0, BLOCK)
            acc = _sumsq_block(g_ptr, offs, numel, grad_scale, acc, HAS_SCALE, True)
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def _sumsq_block(
    g_ptr, offs, numel, grad_scale, acc, HAS_SCALE: tl.constexpr, MASKED: tl.constexpr
):
    if MASKED:
        g = tl.load(g_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale))
    return tl.fma(g, g, acc)


def run_step(tables, amp, prologue, main, **flags):
    """One step of an optimizer over ``tables`` (a ``fusedopt._tables.DeviceTables``): with
    clipping, a sum-of-squares pre-pass per bucket; then the prologue; then the update per bucket.

    ``amp``: ``grad_scale``, ``found_inf`` (GradScaler's tensors, or None) and ``max_norm`` (or
    None). ``flags``: the optimizer's constexpr flags for its main kernel.
    """
    grad_scale, found_inf, max_norm = amp["grad_scale"], amp["found_inf"], amp["max_norm"]
    stand_in = tables.clip  # any float32 tensor: never read when its flag is off
    scale = stand_in if grad_scale is None else grad_scale
    inf = stand_in if found_inf is None else found_inf
    opts = dict(
        HAS_SCALE=grad_scale is not None,
        HAS_INF=found_inf is not None,
        BLOCK=BLOCK,
        ITERS=ITERS,
        **LAUNCH_OPTIONS,
    )
    clip = max_norm is not None
    if clip:
        for bucket, chunks, first in tables.bucket_ranges():
            _sumsq_main[chunk_grid(chunks)](
                tables.tmeta,
                tables.grads,
                chunks,
                tables.partials[first:],
                scale,
                inf,
                DTYPE=TL_DTYPE[bucket.grad],
                **opts,
            )
    sums = tables.clip_stage  # the tail of partials (layout.h's partials_numel)
    n_sums = sums.numel()
    if clip:
        _clip_partials[(n_sums,)](
            tables.partials,
            tables.n_chunks,
            sums,
            PER_PROGRAM=CLIP_PER_PROGRAM,
            BLOCK=CLIP_BLOCK,
            **LAUNCH_OPTIONS,
        )
    _groups_prologue[(1,)](
        tables.hyper,
        tables.gptr,
        tables.glr,
        tables.hyper.shape[0],
        sums,
        n_sums,
        tables.clip,
        float(max_norm or 0.0),
        inf,
        HAS_INF=found_inf is not None,
        CLIP=clip,
        SCHED=tables.has_schedule,
        BLOCK=PROLOGUE_BLOCK,
        **LAUNCH_OPTIONS,
    )
    prologue[(max(1, triton.cdiv(tables.n_tensors, PROLOGUE_BLOCK)),)](
        tables.tmeta,
        tables.n_tensors,
        tables.hyper,
        tables.glr,
        tables.scal,
        inf,
        HAS_INF=found_inf is not None,
        BLOCK_T=PROLOGUE_BLOCK,
        **LAUNCH_OPTIONS,
    )
    for bucket, chunks, _ in tables.bucket_ranges():
        eight_bit = bucket.eight_bit
        state = tl.uint8 if eight_bit else TL_DTYPE[bucket.state]
        dtypes = TL_DTYPE[bucket.param], TL_DTYPE[bucket.grad], state
        main[chunk_grid(chunks)](
            tables.tmeta,
            tables.grads,
            tables.scal,
            chunks,
            scale,
            inf,
            tables.clip,
            # None: a constexpr, so that the passes without 8-bit state have no such argument
            qmaps(tables.device) if eight_bit else None,
            DTYPE=dtypes[0],
            GDTYPE=dtypes[1],
            SDTYPE=dtypes[2],
            SHADOW=bucket.shadow,
            SR=bucket.stochastic,
            ERR=bucket.error,
            CLIP=clip,
            EIGHT_BIT=eight_bit,
            **{**opts, **main_options(dtypes, bucket.error)},
            **flags,
        )


# The register cap of the 8-bit and compressed-master passes. Left to itself, ptxas held some of
# them at 48, 64 or 80 registers and spilled 8 bytes (sm_90: 3 variants with Triton 3.9, 1 with
# 3.6); told a cap of 128, it spills none and takes 24-114 (3.9) or 26-128 (3.6) registers
# (2026-12-06). 128 still fits two 256-thread programs per SM; not yet timed on a GPU.
MAXNREG_QUANTIZED = 128


def main_options(dtypes, error=0):
    """The launch options of a main pass over arrays of ``dtypes`` (Triton types; uint8 state:
    8-bit) with an ``error``-bit compressed master (0: none): main_warps, and for the 8-bit and
    compressed-master passes a register cap (MAXNREG_QUANTIZED)."""
    options = {"num_warps": main_warps(*dtypes)}
    if tl.uint8 in dtypes or error:
        options["maxnreg"] = MAXNREG_QUANTIZED
    return options


def main_warps(*dtypes):
    """Warps per program of a main pass over arrays of ``dtypes`` (Triton types): each thread
    then holds 16 bytes of the narrowest array per block, one 128-bit access (a 1,024-element
    block: 8 warps when all are 4 bytes wide, 4 fp32 per thread; 4 warps with any 2-byte one, 8
    elements per thread). More elements per thread cost registers (fp32 AdamW at sm_90, both
    paths unrolled: 95 on 4 warps, 60 on 8); fewer lose the 128-bit access (benchmarks/NOTES-gpu-
    performance.md). 8-bit state (uint8 codes): 4 elements per thread (8 warps), whatever the
    other dtypes: 32-bit accesses to the codes, 128-bit to fp32 arrays, 64-bit to 16-bit ones.
    Its quantization's search holds several registers per element and slot."""
    if tl.uint8 in dtypes:
        return BLOCK // (4 * 32)
    narrowest = min(d.primitive_bitwidth for d in dtypes) // 8
    return max(1, BLOCK * narrowest // (16 * 32))


def chunk_grid(chunks):
    return (chunks.shape[0],)
