"""Compressed master weights (issue 24, after FlashOptim): a bf16 parameter ``b`` plus an integer
error term ``e`` of ``bits`` = 8 or 16 stand for the float32 master ``b + e * s(b)``.

``s(b)`` is half a bf16 ulp of ``b`` divided by 2**(bits - 1): a power of two (subnormal for
tiny ``b``), so ``e * s`` is exact and the rounding error of ``b`` (at most half an ulp) is kept to
a 1/128 (int8: 8 more bits, a 16-bit significand, "24-bit" precision) or 1/32768 (int16: 15 more,
an fp32 significand) of it. After an update to the float32 value ``x``: ``b = bf16(x)`` (to
nearest even), ``e = clamp(round_half_even((x - b) / s(b)), -2**(bits-1), 2**(bits-1) - 1)``;
``x - b`` and the division are exact; a non-finite ``x`` gets ``e = 0``. Every backend computes
exactly this (the kernels in csrc/include/fusedopt/master.h and kernels/).
"""

import torch

ERROR_DTYPES = {8: torch.int8, 16: torch.int16}
STATE_KEY = "master_error"


def scale(b, bits):
    """s(b) for the bf16 tensor ``b``, float32, built from its exponent bits."""
    k = bits - 1
    exponent = ((b.view(torch.int16).to(torch.int32) >> 7) & 0xFF).clamp(min=1)
    biased = exponent - 8 - k  # s = 2**(exponent - 135 - k)
    normal = biased.clamp(min=1) << 23
    subnormal = torch.ones_like(exponent) << (exponent + 14 - k).clamp(0, 22)
    return torch.where(biased >= 1, normal, subnormal).view(torch.float32)


def reconstruct(b, e):
    """The float32 master of the bf16 ``b`` and its error term ``e`` (int8 or int16)."""
    bits = 8 * e.element_size()
    return b.float() + e.float() * scale(b, bits)


def split(x, bits):
    """(bf16 b, error term e) of the float32 tensor ``x``."""
    b = x.to(torch.bfloat16)
    q = (x - b.float()) / scale(b, bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    e = torch.where(q.isfinite(), q.round().clamp(lo, hi), 0.0)
    return b, e.to(ERROR_DTYPES[bits])
