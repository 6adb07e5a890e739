"""The cached step plan: ``step()`` without a Python walk over every parameter (issue 12).

A step that walks everything (``FusedOptimizer._gather`` and ``_prepare``: validation, new state,
buckets, the metadata tables) leaves behind a plan. The next steps run from it while it holds:

- ``fusedopt._C.StepPlan.collect`` (csrc/plan.cpp) checks in one C++ pass that every object the
  walk read is still the one it read (param_groups, each group's params list, each parameter, the
  optimizer's state dict and each parameter's state dict and entries, and the address, size and
  dtype of every tensor the tables name), and reads every grad, which must still be there (or
  still be absent) with the layout the walk accepted. It collects the grads' addresses for the
  tables.
- Each group's hyperparameters are compared with the plan's copy, in Python (a group is one small
  dict): numbers that changed (a scheduler's lr, a weight decay) are validated and rewrite the
  group's row of the tables; anything else (an lr kind, a tensor lr replaced, a flag, a precision
  option, a Noam schedule) drops the plan.
- The optimizer's own options (``backend``, ``max_grad_norm``) must be unchanged.

Whatever does not hold drops the plan and the step walks everything again, so a plan is never
more permissive than the walk: bad input still meets the walk's checks and its messages.
``add_param_group``, ``load_state_dict`` and unpickling drop it too. Parameters of a tensor
subclass other than DTensor, and grads that need a copy into their parameter's layout, are never
planned: those steps always walk.
"""

import numbers
import operator

import torch
from torch.distributed.tensor import DTensor

from . import backends
from .backends import native
from .schedule import Noam


def _scalar_on(t, device):
    from .optimizer import _scalar_on  # noqa: PLC0415 - optimizer.py imports this module

    return _scalar_on(t, device)


_NUMBERS = (float, int)


class Plan:
    """What a walk leaves for the steps after it: the C++ plan, the device works, per-group
    keys, and the options it was built with."""

    def __init__(self, opt, work, cpp):
        self.cpp = cpp
        self.works = list(work.values())
        self.keys = [group_key(g) for g in opt.param_groups]
        # each group's values as objects, and whether all of them are immutable: then the same
        # objects mean the same hyperparameters, and the key need not be computed
        self.values = [tuple(g.values()) for g in opt.param_groups]
        self.immutable = [_all_immutable(g) for g in opt.param_groups]
        self.needed = [opt._needed(g) for g in opt.param_groups]
        self.backend = opt.backend
        self.max_norm = opt.max_grad_norm
        # groups whose lr tensor is copied to the device every step (on another device, or not
        # float32): its value may change in place, so their rows are rebuilt every step
        self.volatile = {
            gi
            for gi, g in enumerate(opt.param_groups)
            if isinstance(g["lr"], torch.Tensor)
            and any(
                g["lr"].device != w.device or g["lr"].dtype != torch.float32 for w in self.works
            )
        }
        for i, w in enumerate(self.works):
            w.fast = (cpp, i)


_IMMUTABLE = (float, int, bool, str, type(None), torch.dtype)


def _immutable(value):
    t = type(value)
    if t in _IMMUTABLE:
        return True
    if t is tuple:
        return all(map(_immutable, value))
    return isinstance(value, numbers.Number) and not isinstance(value, torch.Tensor)


def _all_immutable(group):
    return all(_immutable(v) for k, v in group.items() if k != "params")


def group_key(group):
    """A group's hyperparameters as the plan compares them: (everything but plain numbers, by
    value or identity; the plain numbers). Only the second part may change under a plan."""
    fixed, numbers_ = [], []
    for name, value in group.items():
        if name == "params":
            continue
        _flatten(name, value, fixed, numbers_)
    return tuple(fixed), tuple(numbers_)


def _flatten(name, value, fixed, numbers_):
    t = type(value)
    if t in _NUMBERS:
        fixed.append(name)
        numbers_.append(value)
    elif t is tuple or t is list:
        fixed.append((name, t, len(value)))
        for v in value:
            _flatten(name, v, fixed, numbers_)
    elif isinstance(value, torch.Tensor):
        # by identity and address; a CPU lr tensor is also read on the host (a float lr for
        # another device), so its value is a number here
        fixed.append((name, id(value), value.data_ptr(), value.device, value.dtype, value.shape))
        if name == "lr" and value.device.type == "cpu" and value.numel() == 1:
            numbers_.append(float(value))
    elif isinstance(value, Noam):
        fixed.append((name, id(value), value.scale, value.warmup_coeff))
    elif value is None or t in (bool, str, torch.dtype):
        fixed.append((name, value))
    elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        fixed.append(name)  # a numpy float, say: a number like any other
        numbers_.append(float(value))
    else:
        fixed.append((name, t, id(value)))


def build(opt, work):
    """The plan for the steps after this walk, or None where steps must keep walking."""
    if native.load("_C") is not None:
        return None  # the C++ half is not available: every step walks
    from . import _C  # noqa: PLC0415 - loaded by native.load

    works = list(work.values())
    if any(w.grad_copies for w in works):
        return None
    where = {}
    specs = []
    for wi, w in enumerate(works):
        for si, s in enumerate(w.slots):
            where[id(s.owner)] = (wi, si)
        specs.append(native.op_lists(w))
    watched = []
    for group in opt.param_groups:
        for p in group["params"]:
            if isinstance(p, DTensor):
                local = p._local_tensor
            elif type(p) in (torch.nn.Parameter, torch.Tensor):
                local = None
            else:
                return None  # a tensor subclass: its .grad may be anything
            wi, si = where.get(id(p), (-1, -1))
            watched.append((p, local, wi, si))
    cpp = _C.StepPlan(opt.param_groups, opt.state, watched, specs)
    for w in works:
        for s in w.slots:
            s.grad = None  # the plan must not keep this step's grads alive (see StepPlan.release)
        w.grad_copies = []
    opt._plan_stats["built"] += 1
    return Plan(opt, work, cpp)


def fast_step(opt, plan):
    """Run one step from ``plan``; False (having changed nothing) when it no longer holds."""
    stats = opt._plan_stats
    if plan.backend != opt.backend or plan.max_norm != opt.max_grad_norm:
        stats["why"] = "the optimizer's backend or max_grad_norm changed"
        return False
    why = plan.cpp.collect(opt.param_groups, opt.state)
    if why:
        stats["why"] = why
        return False
    changed = []
    for gi, group in enumerate(opt.param_groups):
        values = tuple(group.values())
        old_values = plan.values[gi]
        if (
            plan.immutable[gi]
            and len(values) == len(old_values)
            and all(map(operator.is_, values, old_values))
            and gi not in plan.volatile
        ):
            continue  # the very same immutable values: nothing to compare
        key = group_key(group)
        old = plan.keys[gi]
        plan.values[gi], plan.immutable[gi] = values, _all_immutable(group)
        if key == old and gi not in plan.volatile:
            continue
        if key[0] != old[0]:
            stats["why"] = "a param group's options changed"
            return False
        opt._validate(group, in_step=True)
        if opt._needed(group) != plan.needed[gi]:
            stats["why"] = "a param group's options changed"
            return False
        changed.append((gi, key))
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    for w in plan.works:
        w.amp = {
            "grad_scale": None if grad_scale is None else _scalar_on(grad_scale, w.device),
            "found_inf": None if found_inf is None else _scalar_on(found_inf, w.device),
            "max_norm": opt.max_grad_norm,
        }
        w.hyper_changed = bool(changed)
        for gi, _ in changed:
            group = opt.param_groups[gi]
            w.lrs[gi] = opt._group_lr(gi, group, w.device)
            w.hyper[gi] = opt._hyper(group)
    for gi, key in changed:
        plan.keys[gi] = key
    stats["fast"] += 1
    try:
        for w in plan.works:
            with torch.cuda.device(w.device) if w.device.type == "cuda" else _nothing:
                backends.get(w.backend).run(opt, w)
    finally:
        plan.cpp.release()
    return True


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_nothing = _Nothing()
