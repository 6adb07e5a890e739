"""torch.amp.GradScaler with fusedopt: the inf check runs inside step() (issue 22).

GradScaler.step has two contracts for an optimizer with ``_step_supports_amp_scaling``:

- ``step()`` without a ``grad_scaler`` parameter: GradScaler first runs torch's inf check,
  ``torch._amp_foreach_non_finite_check_and_unscale_``, over every grad, then sets the tensors
  ``grad_scale`` and ``found_inf`` on the optimizer. That op has no bfloat16 CUDA kernel (torch
  2.11: NotImplementedError), so bf16 grads on CUDA fail before the optimizer is even called.
- ``step(..., grad_scaler=None)``: GradScaler passes itself and leaves the rest to the optimizer
  (with a FutureWarning about this contract, once per call site).

GradScaler picks between them by the signature of the class's ``step``, the same for every dtype,
so fusedopt takes the second for all: ``scaled`` below does what GradScaler's first contract does,
then sets the same two attributes for the step; the unscale stays in the step's kernels. The inf
check of fp32 and fp16 grads is torch's op, as before (the same flags and cost); bf16 grads, on
every device so that the CPU tests run the CUDA route, get fusedopt's ``nonfinite``. (On the
shared 2-core CPU, 200 fp32 grads of 4096 elements: torch's op 0.14 ms, ``nonfinite`` 1.0 ms, a
norm per tensor, as torch's foreach ops loop on the CPU; on CUDA it is one multi-tensor pass.)
"""

from contextlib import contextmanager

import torch
from torch.amp.grad_scaler import OptState

__all__ = ["scaled"]

_ATTRS = ("grad_scale", "found_inf")


def nonfinite(grads):
    """1.0 if some element of ``grads`` (tensors on one device) is inf or NaN, else 0.0: a
    float32 0-d tensor on that device, without a host sync.

    Each grad's L1 norm accumulated in float64 (torch's multi-tensor norm, which has bf16 and
    fp16 kernels on CUDA): any NaN or inf makes it non-finite, and no finite grad can, as
    |g| <= 3.4e38 summed over fewer than 2^63 elements stays below float64's 1.8e308. A sum of
    squares (the clipping pre-pass) would overflow for finite grads above about 1.8e19, which a
    bf16 GradScaler's ever-growing scale reaches: GradScaler flags non-finite grads only.
    """
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    norms = [n for gs in by_dtype.values() for n in torch._foreach_norm(gs, 1, dtype=torch.float64)]
    return torch.stack(norms).sum().isfinite().logical_not().to(torch.float32)


def _check(device, lists):
    """GradScaler's found_inf for one device's grads (``lists``: dtype -> grads)."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    for dtype, grads in lists.items():
        if dtype == torch.bfloat16:
            found.add_(nonfinite(grads))
        else:  # what GradScaler itself runs: an inv_scale of 1 checks without unscaling
            one = torch.ones((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    return found


@contextmanager
def scaled(opt, scaler, grads):
    """For one ``step()`` that ``GradScaler.step`` called with ``grad_scaler=scaler``: record the
    inf check of ``grads`` (the optimizer's local grads) in the scaler's state, where
    ``scaler.update()`` reads it, and set ``grad_scale`` and ``found_inf`` on ``opt`` as
    GradScaler's attribute contract does (restoring any the user had set, after the step)."""
    saved = {k: opt.__dict__[k] for k in _ATTRS if k in opt.__dict__}
    state = scaler._per_optimizer_states[id(opt)]
    scale = scaler._get_scale_async()
    user_scale = saved.get("grad_scale")
    if state["stage"] is OptState.READY:
        by_device = {}
        for g in grads:
            by_device.setdefault(g.device, {}).setdefault(g.dtype, []).append(g)
        per_device = {device: _check(device, lists) for device, lists in by_device.items()}
        # no grads (on this rank): a zero, as ShardedGradScaler records, so update() has a check
        state["found_inf_per_device"] = per_device or {
            scale.device: torch.zeros((), dtype=torch.float32, device=scale.device)
        }
        grad_scale = scale if user_scale is None else scale * user_scale
    else:  # scaler.unscale_(opt) ran: the grads are unscaled and its check is recorded
        grad_scale = user_scale
    found = [t.to(scale.device, non_blocking=True) for t in state["found_inf_per_device"].values()]
    opt.grad_scale = grad_scale
    opt.found_inf = found[0] if len(found) == 1 else torch.stack(found).sum()
    try:
        yield
    finally:
        for k in _ATTRS:
            opt.__dict__.pop(k, None)
        opt.__dict__.update(saved)
