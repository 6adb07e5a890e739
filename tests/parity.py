"""Run the same inputs through torch.optim and fusedopt and compare everything they keep."""

import io

import torch

# Shapes with awkward sizes: empty, one element, odd, multi-dimensional, and one that spans two
# 1024-element blocks (so chunk boundaries are exercised). Small: the Triton interpreter is slow.
SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 4), (1030,)]

# fp32 tolerance. fusedopt and torch.optim do the same float32 operations in the same order with
# the same fused multiply-adds; they differ where a scalar (step size, sqrt(1 - beta2^t),
# 1 - lr*wd) is rounded from float64 once rather than through torch's own path, and where torch's
# CPU sqrt is off by an ulp (torch 2.13's vectorized float32 sqrt is not correctly rounded; the
# kernels' sqrt_rn is, as CUDA's is). Each costs an ulp or two of the quantities involved per step:
# - every element: 16 float32 ulps (2^-23 ~ 1.2e-7 each) of itself, rtol 2e-6;
# - state tensors: plus 16 ulps of the tensor's largest element, since a value can be a sum that
#   cancelled to near zero (a momentum buffer adding terms of size 10 to get 0.01), whose error is
#   set by the size of the terms, not of the result;
# - parameters: plus 1e-5 of the largest total update (final - initial) of the reference run: the
#   update is a chain of divisions and square roots that an ulp in a near-cancelled centered
#   variance (RMSprop) can move by many ulps. test_fp32_tolerance_is_tight shows that an lr off by
#   1e-4 still fails.
FP32 = {"rtol": 2e-6, "atol": 0.0}
STATE_SCALE_RTOL = 2e-6
UPDATE_SCALE_RTOL = 1e-5


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in shapes]


def clone_params(tensors, dtype=None):
    out = []
    for t in tensors:
        p = torch.nn.Parameter(t.detach().clone().to(dtype or t.dtype))
        p.parity_start = p.detach().cpu().clone()  # the update-size scale of assert_same
        out.append(p)
    return out


def grads(step, params, seed=1, none=None):
    """Deterministic grads for ``step``; ``none(step, i)`` True leaves parameter i without one."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        out.append(None if none is not None and none(step, i) else g)
    return out


def set_grads(params, gs):
    for p, g in zip(params, gs):
        p.grad = None if g is None else g.to(dtype=p.dtype, device=p.device)


def train(opt, params, steps, start=0, none=None, sched=None, seed=1):
    for k in range(start, start + steps):
        set_grads(params, grads(k, params, seed=seed, none=none))
        opt.step()
        if sched is not None:
            sched.step()


def _close(actual, expected, msg, rtol, atol, scale=0.0):
    expected = expected.detach().cpu()
    torch.testing.assert_close(
        actual.detach().cpu(), expected, rtol=rtol, atol=atol + scale, msg=msg
    )


def _max_abs(t):
    return t.detach().abs().max().item() if t.numel() else 0.0


def assert_same(ref_opt, ref_params, opt, params, skip=(), **tol):
    """``skip``: state keys left to the caller (they must still be present on both sides)."""
    tol = tol or FP32
    for i, (a, b) in enumerate(zip(ref_params, params)):
        start = getattr(a, "parity_start", None)
        update = _max_abs(a.detach().cpu() - start) if start is not None else 0.0
        _close(b, a, lambda m, i=i: f"param {i}: {m}", scale=UPDATE_SCALE_RTOL * update, **tol)
        sa, sb = ref_opt.state.get(a, {}), opt.state.get(b, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sb)} != torch's {sorted(sa)}"
        for key in sa:
            if key in skip:
                continue
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(vb) == float(va), f"param {i}: step {float(vb)} != {float(va)}"
                assert vb.dtype == torch.float32 and vb.dim() == 0
                continue
            assert vb.dtype == b.dtype and vb.shape == b.shape
            _close(
                vb,
                va,
                lambda m, i=i, key=key: f"param {i} {key}: {m}",
                scale=STATE_SCALE_RTOL * _max_abs(va),
                **tol,
            )


def roundtrip(state_dict):
    """What a checkpoint goes through: torch.save, then torch.load with weights_only=True."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def max_err(tensors, reference, norm="max"):
    """Error of ``tensors`` against ``reference`` over all their elements: max abs or RMS."""
    diff = torch.cat(
        [
            (t.detach().double().cpu() - r.detach().double().cpu()).reshape(-1)
            for t, r in zip(tensors, reference)
        ]
    )
    if norm == "max":
        return diff.abs().max().item()
    return diff.pow(2).mean().sqrt().item()


def snapshot(opt, params):
    """Parameters and every state tensor, copied: what a rejected step must leave as it was."""
    return (
        [p.detach().clone() for p in params],
        {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)},
    )


def assert_unchanged(opt, params, snap):
    for p, q in zip(params, snap[0]):
        assert torch.equal(p.detach(), q)
    for i, p in enumerate(params):
        assert set(opt.state[p]) == set(snap[1][i])
        for k, v in snap[1][i].items():
            assert torch.equal(opt.state[p][k], v), k
