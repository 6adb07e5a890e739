"""8-bit state quantization (fusedopt/quant8.py, issue 24): bitsandbytes' dynamic maps bit for bit,
blockwise quantization to the nearest code, and the comparison with bitsandbytes 0.50's own CPU
quantization (scripts/setup_env.sh installs bitsandbytes==0.50.2)."""

import math

import pytest
import torch

from fusedopt import quant8

# Values over eight decades with both signs, as optimizer states hold (second moments are squares).
N = 40_000 + 37  # whole blocks and a short last one


def _states(seed, n=N):
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.logspace(-8, 0, n)[torch.randperm(n, generator=g)]
    return torch.randn(n, generator=g) * magnitude


def _true_nearest(x, absmax, code):
    """The index of the nearest map value to each normalized element, in float64."""
    normed = x.double().reshape(-1) / absmax.double().repeat_interleave(quant8.BLOCK)[: x.numel()]
    return (normed.unsqueeze(1) - code.double().unsqueeze(0)).abs().argmin(dim=1), normed


@pytest.fixture(scope="module")
def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_maps_are_bitsandbytes(bnb_functional, signed):
    ours = quant8.dynamic_map(signed)
    theirs = bnb_functional.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("signed", [True, False])
def test_maps_shape(signed):
    code = quant8.dynamic_map(signed)
    assert torch.all(code[1:] >= code[:-1])  # sorted, as the nearest-code search needs
    assert code[-1] == 1.0 and (code == 0).any()
    if signed:
        assert code[0] == pytest.approx(-0.99296875) and (code < 0).sum() == 127
    else:
        assert code[0] == 0 and (code > 0).sum() == 255
    assert code[code > 0].min() < 1e-6  # the densest values: 1e-6 times (0.1, 1)


def test_state_maps():
    for name in ("exp_avg", "momentum_buffer", "grad_avg"):
        assert torch.equal(quant8.map_for(name), quant8.dynamic_map(True))
    for name in ("exp_avg_sq", "max_exp_avg_sq", "square_avg"):
        assert torch.equal(quant8.map_for(name), quant8.dynamic_map(False))
    with pytest.raises(KeyError, match="no 8-bit map"):
        quant8.map_for("step")


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_takes_the_nearest_code(signed):
    x = _states(0) if signed else _states(0).abs()
    code = quant8.dynamic_map(signed)
    codes, absmax = quant8.quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (quant8.n_blocks(N),)
    blocks = torch.cat([x, x.new_zeros(-N % quant8.BLOCK)]).view(-1, quant8.BLOCK)
    assert torch.equal(absmax, blocks.abs().amax(dim=1))
    nearest, normed = _true_nearest(x, absmax, code)
    # float32 division and distances against float64 ones: a tie within rounding may go either way
    differ = nearest != codes.long()
    d_ours = (normed - code.double()[codes.long()]).abs()
    d_true = (normed - code.double()[nearest]).abs()
    assert torch.all(d_ours[differ] - d_true[differ] <= 1e-7 * normed[differ].abs())
    assert differ.float().mean() < 1e-4
    # dequantized: within half the gap to the neighbouring code, times absmax
    back = quant8.dequantize_blockwise(codes, absmax, code)
    gap = torch.cat([code[1:] - code[:-1], code.new_zeros(1)]).double()
    half_gap = torch.maximum(gap[codes.long()], gap[(codes.long() - 1).clamp(min=0)]) / 2
    # below the signed map's lowest value (-0.993): up to 1 + code[0] from it (a block's minimum
    # when it is its absmax loses 0.7% to the map's asymmetry, as in bitsandbytes)
    half_gap = torch.where(
        codes.long() == 0, torch.clamp(1 + code[0].double(), min=half_gap), half_gap
    )
    am = absmax.double().repeat_interleave(quant8.BLOCK)[:N]
    bound = (half_gap + 2**-23) * am  # and float32's rounding of the product code * absmax
    assert torch.all((back.double() - x.double()).abs() <= bound)


def test_zero_block_and_shapes():
    x = torch.zeros(3, 300)
    x[2, 100:] = torch.linspace(-1, 2, 200)
    code = quant8.dynamic_map(True)
    codes, absmax = quant8.quantize_blockwise(x, code)
    assert codes.shape == (3, 300) and absmax.shape == (4,)
    zero = int((code == 0).nonzero()[0])
    assert torch.all(codes.reshape(-1)[:512] == zero)  # all-zero blocks: absmax 0, the code of 0
    assert absmax[0] == 0 and absmax[1] == 0
    back = quant8.dequantize_blockwise(codes, absmax, code)
    assert torch.all(back.reshape(-1)[:512] == 0)
    assert back[2, -1] == 2.0  # the block's maximum is exact


@pytest.mark.parametrize("signed", [True, False])
def test_against_bitsandbytes_quantize(bnb_functional, signed):
    """bitsandbytes 0.50.2's CPU quantization gives the same absmax and, where its code differs
    from ours, a code no nearer: its search does not always find the nearest (measured here:
    about half its codes on these values are not, off by up to 7 codes below 1e-5 of absmax);
    ours is checked against float64 above. Its dequantization of our codes is ours, bit for bit."""
    x = _states(1) if signed else _states(1).abs()
    code = quant8.dynamic_map(signed)
    codes, absmax = quant8.quantize_blockwise(x, code)
    theirs, qstate = bnb_functional.quantize_blockwise(x, code=code.clone(), blocksize=quant8.BLOCK)
    assert torch.equal(qstate.absmax, absmax)
    _, normed = _true_nearest(x, absmax, code)
    d_ours = (normed - code.double()[codes.long()]).abs()
    d_theirs = (normed - code.double()[theirs.long()]).abs()
    assert torch.all(d_ours <= d_theirs + 1e-7 * normed.abs())
    mismatch = (codes != theirs).float().mean().item()
    kind = "signed" if signed else "unsigned"
    print(f"bitsandbytes codes differing from the nearest ({kind}): {mismatch:.1%}")
    qstate.absmax = absmax
    assert torch.equal(
        bnb_functional.dequantize_blockwise(codes, qstate),
        quant8.dequantize_blockwise(codes, absmax, code),
    )


def test_state_memory():
    """Two 8-bit states (Adam's) per parameter of a tensor of at least 4096 elements: at most
    2.1 bytes (issue 24's bound): 2 codes and 2 absmaxes per 256."""
    for numel in (4096, 4097, 10**6 + 1):
        assert 2 * quant8.state_bytes(numel) / numel <= 2.1
    assert quant8.state_bytes(256) == 256 + 4 and quant8.state_bytes(257) == 257 + 8


def _adamw8bit_steps(params, grads, quantize, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, wd=0.01):
    """AdamW with 8-bit states, written out: per step, dequantize both states, update them and
    the parameter in float32 as torch.optim.AdamW orders it, requantize both with the new
    absmax. ``quantize(x, code) -> (codes, absmax)``. Returns [(param, (m codes, m absmax),
    (v codes, v absmax))] per parameter."""
    signed, unsigned = quant8.dynamic_map(True), quant8.dynamic_map(False)
    out = []
    for p0, gs in zip(params, grads):
        p = p0.clone()
        m, v = quantize(torch.zeros_like(p), signed), quantize(torch.zeros_like(p), unsigned)
        for step, g in enumerate(gs, start=1):
            m32 = quant8.dequantize_blockwise(*m, signed)
            v32 = quant8.dequantize_blockwise(*v, unsigned)
            p.mul_(1 - lr * wd)
            m32.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v32.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            denom = (v32.sqrt() / math.sqrt(1 - betas[1] ** step)).add_(eps)
            p.addcdiv_(m32, denom, value=-lr / (1 - betas[0] ** step))
            m, v = quantize(m32, signed), quantize(v32, unsigned)
        out.append((p, m, v))
    return out


def test_adamw8bit_step_is_bitsandbytes(bnb_functional):
    """bitsandbytes' AdamW8bit on CPU, 10 steps: with bitsandbytes' own quantization the step
    above gives its states code for code, so the 8-bit step (which map per state, requantizing
    with the new absmax, the update's order) is bitsandbytes'. With fusedopt's nearest-code
    quantization, the codes differ only through bitsandbytes' approximate search (above): 99.95%
    of them within one code here (measured 2026-12-05; issue 24 asks 99.9%)."""
    import bitsandbytes as bnb  # noqa: PLC0415 - the fixture skips without it

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 128), (5000,), (300, 77)]  # all >= 4096 elements: 8-bit in bitsandbytes
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) * 0.01 for _ in range(10)] for s in shapes]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = bnb.optim.AdamW8bit(theirs, lr=1e-3, weight_decay=0.01, min_8bit_size=4096)
    for i in range(10):
        for p, gs in zip(theirs, grads):
            p.grad = gs[i].clone()
        opt.step()

    def bnb_quantize(x, code):
        codes, qstate = bnb_functional.quantize_blockwise(
            x.contiguous(), code=code.clone(), blocksize=quant8.BLOCK
        )
        return codes, qstate.absmax

    within = total = 0
    for quantize in (bnb_quantize, quant8.quantize_blockwise):
        for p, (ours, m, v) in zip(theirs, _adamw8bit_steps(params, grads, quantize)):
            st = opt.state[p]
            for (codes, _), key in ((m, "state1"), (v, "state2")):
                if quantize is bnb_quantize:
                    assert torch.equal(codes, st[key])
                else:
                    diff = (codes.int() - st[key].int()).abs()
                    within += int((diff <= 1).sum())
                    total += diff.numel()
            if quantize is bnb_quantize:
                torch.testing.assert_close(ours, p.detach(), rtol=0, atol=1e-6)
    print(f"within one code of bitsandbytes' AdamW8bit: {within / total:.4%}")
    assert within / total >= 0.999
