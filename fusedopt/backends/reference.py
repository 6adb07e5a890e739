"""The "torch" backend: the same math as the fused kernels, written with plain torch ops.

It runs anywhere torch runs and is the readable reference for the kernels: float32 math whatever the
parameter dtype (one rounding when the result is stored), torch.optim's order of operations, bias
correction and Noam rates computed in float64 from the on-device step, and no host sync (every
scalar that depends on the step stays a device tensor). It is not fused: several passes per tensor.
"""

import torch

from .._layout import LR_FLOAT, LR_NOAM, LR_TENSOR


def _group_lrs(work, keep):
    """Each group's lr for this step: a float, or a float64 0-d tensor on the device. ``keep``:
    1, or a 0-d tensor that is 0 when GradScaler found an inf (the Noam counter then stays)."""
    lrs = []
    for glr in work.lrs:
        if glr.mode == LR_NOAM:
            glr.counter.add_(keep)
            lrs.append(glr.noam.rate(glr.counter))
        elif glr.mode == LR_TENSOR:
            lrs.append(glr.tensor.to(torch.float64))
        else:
            lrs.append(glr.value)
    return lrs


def _grads(work, skip):
    """The float32 gradients the updates use: unscaled (and written back unscaled) under
    GradScaler, then clipped by the global norm; and that norm (or None)."""
    scale = work.amp["grad_scale"]
    grads = []
    for slot in work.slots:
        g = slot.grad.float()
        if scale is not None:
            g = g / scale
            _store(slot.grad, g, skip)
        grads.append(g)
    max_norm = work.amp["max_norm"]
    if max_norm is None or not grads:
        return grads, None
    norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return [g * coef for g in grads], norm


def _f32(x):
    """A float32 0-d device tensor from a float64 one; floats stay Python floats."""
    return x.to(torch.float32) if isinstance(x, torch.Tensor) else x


def _upcast(t, copy):
    """float32 working copy of ``t`` (``t`` itself when it is float32 and ``copy`` is False)."""
    return None if t is None else t.to(torch.float32, copy=copy)


def _store(dst, value, skip):
    """Write ``value`` to ``dst``, or keep ``dst`` where ``skip`` (GradScaler found an inf)."""
    if dst is None or value is dst:
        return
    dst.copy_(value if skip is None else torch.where(skip, dst, value.to(dst.dtype)))


def _adam(slot, h, lr, g, skip):
    p, m, v, vmax = (_upcast(t, skip is not None) for t in (slot.param, *slot.states))
    t = slot.step.to(torch.float64)
    beta1, beta2, wd = h["beta1"], h["beta2"], h["weight_decay"]
    step_size = _f32(lr / (1.0 - beta1**t))
    bc2_sqrt = _f32((1.0 - beta2**t).sqrt())
    if h["maximize"]:
        g = -g
    if wd != 0:
        if h["decoupled"]:
            p.mul_(_f32(1.0 - lr * wd))
        else:
            g = g.add(p, alpha=wd)
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    v_used = v
    if h["amsgrad"]:
        torch.maximum(vmax, v, out=vmax)
        v_used = vmax
    denom = (v_used.sqrt() / bc2_sqrt).add_(h["eps"])
    p.add_(m.mul(-step_size).div_(denom))  # addcdiv(value=-step_size), with a tensor value
    for dst, value in zip((slot.param, *slot.states), (p, m, v, vmax)):
        _store(dst, value, skip)


def _rmsprop(slot, h, lr, g, skip):
    p, sq, buf, ga = (_upcast(t, skip is not None) for t in (slot.param, *slot.states))
    alpha, wd, momentum = h["alpha"], h["weight_decay"], h["momentum"]
    if h["maximize"]:
        g = -g
    if wd != 0:
        g = g.add(p, alpha=wd)
    sq.mul_(alpha).addcmul_(g, g, value=1.0 - alpha)
    if h["centered"]:
        ga.lerp_(g, 1.0 - alpha)
        avg = sq.addcmul(ga, ga, value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(h["eps"])
    neg_lr = _f32(-lr)
    if momentum > 0:
        buf.mul_(momentum).addcdiv_(g, avg)
        # add(buf, alpha=-lr) is one FMA in torch; addcmul rounds the same way and takes a tensor
        p.addcmul_(buf, neg_lr) if isinstance(neg_lr, torch.Tensor) else p.add_(buf, alpha=neg_lr)
    else:
        p.add_(g.mul(neg_lr).div_(avg))  # addcdiv(value=-lr), with a tensor value
    for dst, value in zip((slot.param, *slot.states), (p, sq, buf, ga)):
        _store(dst, value, skip)


class TorchBackend:
    name = "torch"

    def unavailable(self, device):
        return None

    def run(self, opt, work):
        found_inf = work.amp["found_inf"]
        # A step GradScaler skips computes nothing it keeps: no host sync to find out.
        skip = None if found_inf is None else found_inf != 0
        keep = 1.0 if skip is None else (~skip).to(torch.float32)
        lrs = _group_lrs(work, keep)
        steps = [s.step for s in work.slots]
        if steps:
            torch._foreach_add_(steps, keep)
        grads, norm = _grads(work, skip)
        update = _adam if opt._op == "adam" else _rmsprop
        for slot, g in zip(work.slots, grads):
            update(slot, work.hyper[slot.group], lrs[slot.group], g, skip)
        opt._set_last_lr(
            work, [lr if glr.mode != LR_FLOAT else None for lr, glr in zip(lrs, work.lrs)]
        )
        if norm is not None:
            last = opt._last_grad_norm
            opt._last_grad_norm = (
                norm if skip is None or last is None else torch.where(skip, last, norm)
            )
