"""The "torch" backend: the same math as the fused kernels, written with plain torch ops.

It runs anywhere torch runs and is the readable reference for the kernels: float32 math whatever the
parameter dtype (one rounding when the result is stored), torch.optim's order of operations, bias
correction and Noam rates computed in float64 from the on-device step, and no host sync (every
scalar that depends on the step stays a device tensor). It is not fused: several passes per tensor.
"""

import dataclasses

import torch

from .. import _master, quant8
from .._layout import LR_FLOAT, LR_NOAM, LR_SCHEDULE, LR_TENSOR


def _group_lrs(work, keep):
    """Each group's lr for this step: a float, or a float64 0-d tensor on the device. ``keep``:
    1, or a 0-d tensor that is 0 when GradScaler found an inf (the counters then stay)."""
    lrs = []
    for glr in work.lrs:
        if glr.mode == LR_NOAM:
            glr.counter.add_(keep)
            lrs.append(glr.noam.rate(glr.counter))
        elif glr.mode == LR_SCHEDULE:
            glr.counter.add_(keep)
            lrs.append(glr.schedule.rate(glr.counter))
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


def _lr_buffers(opt, lrs, glrs):
    """The lrs this step used, for ``get_last_lr``, written in place into tensors kept from step
    to step (as the fused backends' lr table is): a CUDA graph that captured a step rewrites them
    at every replay, so they must stay the ones reported after an eager step in between."""
    bufs = opt.__dict__.setdefault("_reference_lrs", {})
    out = []
    for gi, (lr, glr) in enumerate(zip(lrs, glrs)):
        if glr.mode == LR_FLOAT:
            out.append(None)
            continue
        buf = bufs.get(gi)
        if buf is None or buf.device != lr.device:
            buf = bufs[gi] = torch.empty((), dtype=torch.float64, device=lr.device)
        out.append(buf.copy_(lr))
    return out


_U32 = 0xFFFFFFFF


def _mix32(x):
    """murmur3's finalizer on int64 tensors (or Python ints) holding uint32 values (as
    kernels/multi_tensor.py)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _U32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _U32
    return x ^ (x >> 16)


def _stochastic_bf16(x, index, step):
    """float32 ``x`` -> bf16 with the kernels' stochastic rounding: the same noise bits, a hash
    of (element offset in storage order, tensor index, step)."""
    flat = torch.as_strided(x, (x.numel(),), (1,), x.storage_offset())
    offs = torch.arange(flat.numel(), device=x.device, dtype=torch.int64)
    # the tensor index is hashed on the host: a tensor made from it would be a copy to the device
    seed = _mix32(_mix32(index) ^ step.to(torch.int64))
    noise = _mix32((offs & _U32) ^ seed) & 0xFFFF
    bits = flat.view(torch.int32).to(torch.int64) & _U32
    top = ((bits + noise) >> 16) & 0xFFFF
    rounded = torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)
    rounded = torch.where(flat != flat, flat.to(torch.bfloat16), rounded)
    out = torch.empty_like(x, dtype=torch.bfloat16)
    torch.as_strided(out, (out.numel(),), (1,), out.storage_offset()).copy_(rounded)
    return out


def _store_param(slot, index, p, skip):
    """The parameter's store: stochastically rounded, or rounded to nearest; with a master, the
    fp32 master and the model's parameter rounded to its dtype."""
    value = _stochastic_bf16(p, index, slot.step) if slot.stochastic else p
    _store(slot.param, value, skip)
    _store(slot.shadow, p, skip)


def _adam(slot, index, h, lr, g, skip):
    copy = skip is not None or slot.stochastic
    p, m, v, vmax = (_upcast(t, copy) for t in (slot.param, *slot.states))
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
    _store_param(slot, index, p, skip)
    for dst, value in zip(slot.states, (m, v, vmax)):
        _store(dst, value, skip)


def _rmsprop(slot, index, h, lr, g, skip):
    copy = skip is not None or slot.stochastic
    p, sq, buf, ga = (_upcast(t, copy) for t in (slot.param, *slot.states))
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
    _store_param(slot, index, p, skip)
    for dst, value in zip(slot.states, (sq, buf, ga)):
        _store(dst, value, skip)


def _sgd(slot, index, h, lr, g, skip):
    copy = skip is not None or slot.stochastic
    p, buf = _upcast(slot.param, copy), _upcast(slot.states[0], copy)
    momentum, wd = h["momentum"], h["weight_decay"]
    if h["maximize"]:
        g = -g
    if wd != 0:
        g = g.add(p, alpha=wd)
    if momentum != 0:
        # the first update sets the buffer to the gradient (torch.optim.SGD clones it); the step
        # just advanced says which update is the first, on the device (no sync)
        buf = torch.where(slot.step == 1, g, buf.mul_(momentum).add_(g, alpha=1.0 - h["dampening"]))
        g = g.add(buf, alpha=momentum) if h["nesterov"] else buf
    neg_lr = _f32(-lr)
    # add(g, alpha=-lr) is one FMA in torch; addcmul rounds the same way and takes a tensor
    p.addcmul_(g, neg_lr) if isinstance(neg_lr, torch.Tensor) else p.add_(g, alpha=neg_lr)
    _store_param(slot, index, p, skip)
    _store(slot.states[0], buf, skip)


_UPDATES = {"adam": _adam, "rmsprop": _rmsprop, "sgd": _sgd}


def _update_compressed(update, names, slot, index, h, lr, g, skip):
    """``update`` on a tensor with 8-bit state (fusedopt/quant8.py) or a compressed master
    (fusedopt/_master.py), or both: each 8-bit state is dequantized to float32 and the master
    rebuilt from the bf16 parameter and its error term; the update runs on those as on float32
    ones; then the states are quantized with the absmax of their new values and the master split
    into the bf16 parameter and its error term again (a step GradScaler skips keeps everything
    as it was)."""
    values, param = slot.states, slot.param
    if slot.absmax is not None:
        values = tuple(
            None if codes is None else quant8.dequantize_state(codes, scale, name)
            for codes, scale, name in zip(slot.states, slot.absmax, names)
        )
    if slot.error is not None:
        param = _master.reconstruct(slot.param, slot.error)
    update(dataclasses.replace(slot, states=values, param=param), index, h, lr, g, skip)
    if slot.absmax is not None:
        for codes, scale, value, name in zip(slot.states, slot.absmax, values, names):
            if codes is not None:
                new_codes, new_scale = quant8.quantize_state(value, codes, name)
                _store(codes, new_codes, skip)
                _store(scale, new_scale, skip)
    if slot.error is not None:
        b, e = _master.split(param, slot.bucket.error)
        _store(slot.param, b, skip)
        _store(slot.error, e, skip)


class TorchBackend:
    name = "torch"

    def supports(self, bucket):
        return True

    def unavailable(self, device):
        return None

    def run(self, opt, work):
        if work.fast is None:
            self._run(opt, work)
            return
        # a cached plan: this step's grads are the ones it collected, and are let go after it
        plan, index = work.fast
        for slot, g in zip(work.slots, plan.grads(index)):
            slot.grad = g
        try:
            self._run(opt, work)
        finally:
            for slot in work.slots:
                slot.grad = None

    def _run(self, opt, work):
        found_inf = work.amp["found_inf"]
        # A step GradScaler skips computes nothing it keeps: no host sync to find out.
        skip = None if found_inf is None else found_inf != 0
        keep = 1.0 if skip is None else (~skip).to(torch.float32)
        lrs = _group_lrs(work, keep)
        steps = [s.step for s in work.slots]
        if steps:
            # a list: given one 0-d tensor, Python picks the Scalar overload and reads it (a sync)
            torch._foreach_add_(steps, [keep] * len(steps))
        grads, norm = _grads(work, skip)
        update = _UPDATES[opt._op]
        for index, (slot, g) in enumerate(zip(work.slots, grads)):
            h, lr = work.hyper[slot.group], lrs[slot.group]
            if slot.absmax is None and slot.error is None:
                update(slot, index, h, lr, g, skip)
            else:
                _update_compressed(update, opt._state_names, slot, index, h, lr, g, skip)
        opt._set_last_lr(work, _lr_buffers(opt, lrs, work.lrs))
        if norm is not None:
            last = opt._last_grad_norm
            if last is None or last.device != norm.device:
                opt._last_grad_norm = norm
            else:
                # in place, as the fused backends write theirs: a CUDA graph that captured a step
                # keeps writing this tensor at every replay, so it must stay the one reported
                # (a new tensor per eager step would hide the replays' norms after it)
                last.copy_(norm if skip is None else torch.where(skip, last, norm))
