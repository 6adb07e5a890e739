"""``fusedopt.clip_grad_norm_``: torch.nn.utils.clip_grad_norm_ (L2), with no host sync.

For use on its own; the optimizers' ``max_grad_norm=`` does the same inside the step, without the
extra pass that scales the grads here.
"""

import torch

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(parameters, max_norm):
    """Scale the grads of ``parameters`` in place so that their global L2 norm is at most
    ``max_norm``; return that norm (before clipping) as a 0-d float32 tensor on the first grad's
    device. Norms are accumulated in float32 whatever the grad dtype; the coefficient is torch's,
    ``min(1, max_norm / (norm + 1e-6))``.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    if not 0.0 < float(max_norm) < float("inf"):
        raise ValueError(f"Invalid max_norm value: {max_norm}")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    first = grads[0].device
    by_device = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    norms = []
    for group in by_device.values():
        norms += [n.to(first) for n in torch._foreach_norm(group, 2, dtype=torch.float32)]
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for (device, _), group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))
    return total
