"""The Triton kernels' 8-bit quantization (kernels/multi_tensor.py: ``store_state`` of a tile of
256-element blocks, ``quantize``, ``div_rn_bounded``) against fusedopt/quant8.py's, code for code
and absmax for absmax, on values optimizer states rarely hold: the exact midpoints between two
codes (ties), values a rounding away from them, blocks with a NaN or an inf, all-zero and -0.0
blocks, absmaxes from subnormal to near the float32 maximum, a short last block. The optimizer
tests (test_state8.py) cover ordinary states. Runs in the interpreter (TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import need_backend

from fusedopt import quant8

pytestmark = pytest.mark.triton

ROWS = 4  # blocks per program: a 1,024-element tile, as the main passes take them


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
mt = pytest.importorskip("fusedopt.kernels.multi_tensor")


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, absmax_ptr, qmaps, numel, QMAP: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (ROWS * mt.QBLOCK)
    offs, mask, _, _ = mt.tile(base, numel, ROWS * mt.QBLOCK, True, True)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    mt.store_state(codes_ptr, absmax_ptr, offs, mask, qmaps, x, QMAP, tl.uint8, True)


@triton.jit
def _divide_kernel(x_ptr, d_ptr, q_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    d = tl.load(d_ptr + offs, mask=live, other=1.0)
    tl.store(q_ptr + offs, mt.div_rn_bounded(x, d), mask=live)


def _quantize(x, signed):
    need_backend("triton", "cpu")
    n = x.numel()
    codes = torch.full((n,), 77, dtype=torch.uint8)
    absmax = torch.full((quant8.n_blocks(n),), -1.0)
    qmap = mt.QMAP_SIGNED if signed else mt.QMAP_UNSIGNED
    grid = (-(-n // (ROWS * quant8.BLOCK)),)
    _quantize_kernel[grid](x, codes, absmax, mt.qmaps(x.device), n, QMAP=qmap)
    return codes, absmax


def _blocks(seed):
    """Blocks of 256 (and a short last one) of the kinds the docstring lists."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for signed in (True, False):
        code = quant8.dynamic_map(signed)
        mids = ((code[:-1].double() + code[1:].double()) / 2).float()  # float32 midpoints
        for scale in (1.0, 2.0, 3.7, 1e-3, 6.1e-5, 1e-30, 1e-39, 3e-45, 1e30, 3e38):
            scale = torch.tensor(scale, dtype=torch.float32)
            picks = mids[torch.randint(0, 255, (255,), generator=g)]
            block = torch.cat([picks, torch.ones(1)]) * scale  # absmax: the scale itself
            # a rounding above and below the midpoints too
            out += [block, torch.nextafter(block, block * 2), torch.nextafter(block, block * 0)]
            rnd = torch.randn(256, generator=g) * torch.logspace(-9, 0, 256)[torch.randperm(256)]
            out.append(rnd * scale)
    nan = torch.randn(256, generator=g)
    nan[17] = float("nan")
    inf = torch.randn(256, generator=g) * 4
    inf[3] = float("inf")
    ninf = torch.randn(256, generator=g)
    ninf[200] = -float("inf")
    out += [nan, inf, ninf, torch.zeros(256), -torch.zeros(256)]
    out += [torch.randn(256, generator=g) * 1e-42]  # subnormal values and absmax
    return torch.cat(out + [torch.randn(100, generator=g)])  # a short last block


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_matches_quant8(signed):
    x = _blocks(0 if signed else 1)
    codes, absmax = _quantize(x, signed)
    ref_codes, ref_absmax = quant8.quantize_blockwise(x, quant8.dynamic_map(signed))
    assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32))
    diff = (codes != ref_codes).nonzero().flatten().tolist()
    assert not diff, [(i, float(x[i]), int(codes[i]), int(ref_codes[i])) for i in diff]


def test_division_is_correctly_rounded():
    """div_rn_bounded against torch's division (float32, correctly rounded) for |x| <= d, d from
    subnormal to near the float32 maximum. Quotients below 2**-30 may be an ulp off (a
    subnormal x): they must stay below 2**-24, where every one takes the code of 0."""
    need_backend("triton", "cpu")
    g = torch.Generator().manual_seed(2)
    n = 200_000
    exponent = torch.randint(-149, 128, (n,), generator=g).double()
    d = ((torch.rand(n, generator=g, dtype=torch.float64) + 1) * torch.exp2(exponent)).float()
    d = torch.where(d > 0, d, 1e-45).clamp(max=3e38)
    frac = torch.rand(n, generator=g) * 2 - 1
    frac = torch.where(torch.arange(n) % 3 == 0, frac**9, frac)  # small quotients too
    x = (d * frac).clamp(-d, d)
    q = torch.empty_like(x)
    _divide_kernel[(-(-n // 1024),)](x, d, q, n, BLOCK=1024)
    exact = x / d
    wrong = q.view(torch.int32) != exact.view(torch.int32)
    wrong &= ~((exact.abs() < 2.0**-30) & (q.abs() < 2.0**-24))
    assert not wrong.any(), (x[wrong][:5], d[wrong][:5], q[wrong][:5], exact[wrong][:5])
