"""Run the same inputs through torch.optim and fusedopt and compare everything they keep."""

import io

import torch

# Shapes with awkward sizes: empty, one element, odd, multi-dimensional, and one that spans two
# 1024-element blocks (so chunk boundaries are exercised). Small: the Triton interpreter is slow.
SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 4), (1030,)]

# fp32 tolerance. fusedopt and torch.optim do the same float32 operations in the same order; they
# differ only where a scalar (step size, sqrt(1 - beta2^t), 1 - lr*wd) is rounded from float64 once
# rather than through torch's own path, and where the compiler contracts a*b+c into an FMA. Each
# costs at most an ulp or two per step; after a few steps that is a few float32 ulps (2^-23 ~ 1.2e-7
# each), so a relative 2e-6 (16 ulps) is "close to rounding" with room for FMAs on the GPU.
FP32 = {"rtol": 2e-6, "atol": 1e-7}


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device)
            for s in shapes]


def clone_params(tensors, dtype=None):
    return [torch.nn.Parameter(t.detach().clone().to(dtype or t.dtype)) for t in tensors]


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


def assert_same(ref_opt, ref_params, opt, params, **tol):
    tol = tol or FP32
    for i, (a, b) in enumerate(zip(ref_params, params)):
        torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), **tol,
                                   msg=lambda m, i=i: f"param {i}: {m}")
        sa, sb = ref_opt.state.get(a, {}), opt.state.get(b, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sb)} != torch's {sorted(sa)}"
        for key in sa:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(vb) == float(va), f"param {i}: step {float(vb)} != {float(va)}"
                assert vb.dtype == torch.float32 and vb.dim() == 0
                continue
            assert vb.dtype == b.dtype and vb.shape == b.shape
            torch.testing.assert_close(vb.cpu(), va.cpu(), **tol,
                                       msg=lambda m, i=i, key=key: f"param {i} {key}: {m}")


def roundtrip(state_dict):
    """What a checkpoint goes through: torch.save, then torch.load with weights_only=True."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def max_err(tensors, reference, norm="max"):
    """Error of ``tensors`` against ``reference`` over all their elements: max abs or RMS."""
    diff = torch.cat([(t.detach().double().cpu() - r.detach().double().cpu()).reshape(-1)
                      for t, r in zip(tensors, reference)])
    if norm == "max":
        return diff.abs().max().item()
    return diff.pow(2).mean().sqrt().item()
