"""Learning-rate schedules evaluated inside the optimizer step, as ``fusedopt.Noam`` is.

Pass one as ``lr=`` of any fusedopt optimizer or param group::

    opt = fusedopt.AdamW(model.parameters(), lr=fusedopt.schedules.cosine(3e-4, 2000, 100_000))

and drop the scheduler: no ``scheduler.step()``, no host work per step, no sync. The kernel
computes the lr of every ``step()`` in float64 from the group's on-device update counter, so a
captured CUDA graph follows the schedule on every replay too.

The lr of the t-th update (t = 1 first) is ``lr * f(t - 1)``, with ``f`` the lambda of the
Hugging Face ``transformers`` function named in each docstring, stepped once after each optimizer
step (``LambdaLR`` multiplies it by the group's initial lr), or torch's ``ExponentialLR`` /
``MultiStepLR`` in closed form. One difference: the counter advances once per ``step()`` (even
when no parameter has a grad) but not on a step that ``torch.amp.GradScaler`` skips for an
inf/NaN gradient, whereas ``scaler.step(opt); scheduler.step()`` advances the scheduler on skipped
steps too.

Every schedule checks its arguments when built (a ``ValueError`` or ``TypeError`` before any
optimizer sees it). ``rate(t)`` evaluates the schedule on the host (``t`` a number >= 1) or on a
tensor of update numbers.
"""

import math
import numbers

import torch

from . import _layout as L
from .schedule import Noam, Schedule

__all__ = [
    "constant",
    "linear",
    "cosine",
    "cosine_restarts",
    "polynomial",
    "inverse_sqrt",
    "wsd",
    "exponential",
    "multistep",
    "noam",
    "from_dict",
    "Schedule",
]

SHAPES = {"linear": L.SHAPE_LINEAR, "cosine": L.SHAPE_COSINE, "1-sqrt": L.SHAPE_1_SQRT}


def _real(where, name, value, low=0.0, low_open=False, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        if high < math.inf:
            bound += f" and <= {high}"
        raise ValueError(f"{where}: invalid {name} {value} (must be finite and {bound})")
    return value


def _steps(where, name, value, low=0):
    """A whole number of steps >= low (an int, or a float with an integer value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a whole number of steps, got {value!r}")
    if not (math.isfinite(value) and float(value) == int(value) and value >= low):
        raise ValueError(f"{where}: invalid {name} {value} (a whole number of steps >= {low})")
    return int(value)


class _InKernel(Schedule):
    """A member of the family: ``NAME``, ``KIND`` (layout's SK_*), its base ``lr`` and
    ``_args`` (the constructor's arguments, for ``to_dict`` and ``repr``)."""

    NAME = KIND = None
    _args = ()

    def rate(self, t):
        """The lr of update ``t`` (>= 1): a float, or a float64 tensor for a tensor ``t``."""
        if isinstance(t, torch.Tensor):
            u = t.to(torch.float64) - 1.0
            return self.lr * self._factor(u)
        if not t >= 1:
            raise ValueError(f"{type(self).__name__}.rate is defined for t >= 1, got {t}")
        return self.lr * float(self._factor(torch.tensor(float(t) - 1.0, dtype=torch.float64)))

    def _factor(self, u):
        """f(u) as torch ops on a float64 tensor of steps u (the torch backend's reference)."""
        raise NotImplementedError

    def _warm(self, u):
        return u / max(1.0, self.warmup)

    def params(self):
        """The float64 vector the kernels read (layout's SP_*)."""
        p = [0.0] * L.SP_MILESTONES
        p[L.SP_KIND] = float(self.KIND)
        p[L.SP_WARMUP] = float(getattr(self, "warmup", 0))
        for slot, value in zip((L.SP_A, L.SP_B, L.SP_C, L.SP_D, L.SP_E, L.SP_F), self._slots()):
            p[slot] = float(value)
        return p

    def _slots(self):
        return ()

    def device_params(self, device):
        """``params()`` as a float64 tensor on ``device``, made once per device (the kernels read
        it by address, so a captured CUDA graph keeps reading the same one)."""
        cache = self.__dict__.setdefault("_on_device", {})
        device = torch.device(device)
        t = cache.get(device)
        if t is None:
            host = torch.tensor(self.params(), dtype=torch.float64)
            if device.type == "cuda":
                # torch.tensor(..., device="cuda") copies from pageable memory: a host sync, and
                # this runs inside the first step(). A pinned copy is asynchronous; torch's host
                # allocator keeps the pinned block until the copy has run.
                host = host.pin_memory()
            t = cache[device] = host.to(device, non_blocking=True)
        return t

    def __getstate__(self):  # pickling / deepcopy: the device copies are a cache
        return {k: v for k, v in self.__dict__.items() if k != "_on_device"}

    def to_dict(self):
        """Plain data, as stored in a state_dict (``torch.load(weights_only=True)`` accepts it)."""
        return {"name": self.NAME, **{k: getattr(self, k) for k in self._args}}

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._args)
        return f"fusedopt.schedules.{self.NAME}({args})"


class _Constant(_InKernel):
    NAME, KIND, _args = "constant", L.SK_CONSTANT, ("lr", "warmup")

    def __init__(self, lr, warmup=0):
        self.lr = _real("constant", "lr", lr)
        self.warmup = _steps("constant", "warmup", warmup)

    def _factor(self, u):
        return torch.where(u < self.warmup, self._warm(u), torch.ones_like(u))


class _Linear(_InKernel):
    NAME, KIND, _args = "linear", L.SK_LINEAR, ("lr", "warmup", "total")

    def __init__(self, lr, warmup, total):
        self.lr = _real("linear", "lr", lr)
        self.warmup = _steps("linear", "warmup", warmup)
        self.total = _steps("linear", "total", total, low=self.warmup)

    def _slots(self):
        return (self.total,)

    def _factor(self, u):
        decay = ((self.total - u) / max(1, self.total - self.warmup)).clamp(min=0.0)
        return torch.where(u < self.warmup, self._warm(u), decay)


class _Cosine(_InKernel):
    NAME, KIND, _args = "cosine", L.SK_COSINE, ("lr", "warmup", "total", "cycles", "min_lr")

    def __init__(self, lr, warmup, total, cycles=0.5, min_lr=0.0):
        self.lr = _real("cosine", "lr", lr)
        self.warmup = _steps("cosine", "warmup", warmup)
        self.total = _steps("cosine", "total", total, low=self.warmup)
        self.cycles = _real("cosine", "cycles", cycles)
        self.min_lr = _real("cosine", "min_lr", min_lr, high=self.lr)
        if self.min_lr > 0 and self.lr == 0:
            raise ValueError("cosine: min_lr > 0 needs lr > 0 (min_lr is a fraction of lr)")

    @property
    def min_lr_rate(self):
        """transformers' min_lr_rate: ``min_lr / lr``."""
        return self.min_lr / self.lr if self.min_lr else 0.0

    def _slots(self):
        return (self.total, self.cycles, self.min_lr_rate)

    def _factor(self, u):
        progress = (u - self.warmup) / max(1, self.total - self.warmup)
        factor = 0.5 * (1.0 + torch.cos(math.pi * self.cycles * 2.0 * progress))
        factor = (factor * (1 - self.min_lr_rate) + self.min_lr_rate).clamp(min=0.0)
        return torch.where(u < self.warmup, self._warm(u), factor)


class _CosineRestarts(_InKernel):
    NAME, KIND = "cosine_restarts", L.SK_COSINE_RESTARTS
    _args = ("lr", "warmup", "total", "cycles")

    def __init__(self, lr, warmup, total, cycles=1):
        self.lr = _real("cosine_restarts", "lr", lr)
        self.warmup = _steps("cosine_restarts", "warmup", warmup)
        self.total = _steps("cosine_restarts", "total", total, low=self.warmup)
        self.cycles = _real("cosine_restarts", "cycles", cycles, low_open=True)

    def _slots(self):
        return (self.total, self.cycles)

    def _factor(self, u):
        progress = (u - self.warmup) / max(1, self.total - self.warmup)
        x = self.cycles * progress
        wave = (0.5 * (1.0 + torch.cos(math.pi * (x - x.floor())))).clamp(min=0.0)
        decay = torch.where(progress >= 1.0, torch.zeros_like(u), wave)
        return torch.where(u < self.warmup, self._warm(u), decay)


class _Polynomial(_InKernel):
    NAME, KIND = "polynomial", L.SK_POLYNOMIAL
    _args = ("lr", "warmup", "total", "end_lr", "power")

    def __init__(self, lr, warmup, total, end_lr=1e-7, power=1.0):
        self.lr = _real("polynomial", "lr", lr)
        self.warmup = _steps("polynomial", "warmup", warmup)
        self.total = _steps("polynomial", "total", total, low=self.warmup + 1)
        self.end_lr = _real("polynomial", "end_lr", end_lr)
        self.power = _real("polynomial", "power", power)
        if not self.lr > self.end_lr:
            raise ValueError(f"polynomial: end_lr ({self.end_lr}) must be smaller than lr ({lr})")

    def _slots(self):
        return (self.total, self.end_lr, self.power, self.lr)

    def _factor(self, u):
        lr_init, lr_end = self.lr, self.end_lr
        pct = 1 - (u - self.warmup) / (self.total - self.warmup)
        decay = ((lr_init - lr_end) * pct.clamp(min=0.0) ** self.power + lr_end) / lr_init
        after = torch.full_like(u, lr_end / lr_init)
        return torch.where(
            u < self.warmup, self._warm(u), torch.where(u > self.total, after, decay)
        )


class _InverseSqrt(_InKernel):
    NAME, KIND, _args = "inverse_sqrt", L.SK_INVERSE_SQRT, ("lr", "warmup", "timescale")

    def __init__(self, lr, warmup, timescale=None):
        self.lr = _real("inverse_sqrt", "lr", lr)
        self.warmup = _steps("inverse_sqrt", "warmup", warmup)
        if timescale is None:  # transformers' default
            timescale = self.warmup or 10_000
        self.timescale = _steps("inverse_sqrt", "timescale", timescale, low=1)

    def _slots(self):
        return (self.timescale,)

    def _factor(self, u):
        shift = self.timescale - self.warmup
        decay = 1.0 / torch.sqrt((u + shift) / self.timescale)
        return torch.where(u < self.warmup, self._warm(u), decay)


class _Wsd(_InKernel):
    NAME, KIND = "wsd", L.SK_WSD
    _args = ("lr", "warmup", "decay", "stable", "warmup_type", "decay_type", "min_lr_ratio")
    _args += ("cycles",)

    def __init__(
        self,
        lr,
        warmup,
        decay,
        total=None,
        stable=None,
        warmup_type="linear",
        decay_type="cosine",
        min_lr_ratio=0.0,
        cycles=0.5,
    ):
        self.lr = _real("wsd", "lr", lr)
        self.warmup = _steps("wsd", "warmup", warmup)
        self.decay = _steps("wsd", "decay", decay)
        if stable is None:
            if total is None:
                raise ValueError("wsd: give total or stable (the number of steps at lr)")
            total = _steps("wsd", "total", total, low=self.warmup + self.decay)
            stable = total - self.warmup - self.decay
        elif total is not None and total != self.warmup + _steps("wsd", "stable", stable) + decay:
            raise ValueError(
                f"wsd: total ({total}) is not warmup + stable + decay "
                f"({self.warmup} + {stable} + {self.decay}); give one of total and stable"
            )
        self.stable = _steps("wsd", "stable", stable)
        for name, shape in (("warmup_type", warmup_type), ("decay_type", decay_type)):
            if shape not in SHAPES:
                raise ValueError(f"wsd: unknown {name} {shape!r} (one of {sorted(SHAPES)})")
        self.warmup_type, self.decay_type = warmup_type, decay_type
        self.min_lr_ratio = _real("wsd", "min_lr_ratio", min_lr_ratio, high=1.0)
        self.cycles = _real("wsd", "cycles", cycles)

    def _slots(self):
        shapes = SHAPES[self.warmup_type], SHAPES[self.decay_type]
        return (self.stable, self.decay, *shapes, self.min_lr_ratio, self.cycles)

    def _factor(self, u):
        r = self.min_lr_ratio
        w = u / max(1, self.warmup)
        warm = {
            "linear": w,
            "cosine": 0.5 * (1.0 - torch.cos(math.pi * w)),
            "1-sqrt": 1.0 - torch.sqrt(1.0 - w),
        }[self.warmup_type]
        warm = (warm * (1.0 - r) + r).clamp(min=0.0)
        d = (u - self.warmup - self.stable) / max(1, self.decay)
        dec = {
            "linear": 1.0 - d,
            "cosine": 0.5 * (1.0 + torch.cos(math.pi * self.cycles * 2.0 * d)),
            "1-sqrt": 1.0 - torch.sqrt(d),
        }[self.decay_type]
        dec = (dec * (1.0 - r) + r).clamp(min=0.0)
        out = torch.where(u < self.warmup + self.stable + self.decay, dec, torch.full_like(u, r))
        out = torch.where(u < self.warmup + self.stable, torch.ones_like(u), out)
        return torch.where(u < self.warmup, warm, out)


class _Exponential(_InKernel):
    NAME, KIND, _args = "exponential", L.SK_EXPONENTIAL, ("lr", "gamma")

    def __init__(self, lr, gamma):
        self.lr = _real("exponential", "lr", lr)
        self.gamma = _real("exponential", "gamma", gamma, low_open=True)

    def _slots(self):
        return (self.gamma,)

    def _factor(self, u):
        return torch.full_like(u, self.gamma) ** u


class _MultiStep(_InKernel):
    NAME, KIND, _args = "multistep", L.SK_MULTISTEP, ("lr", "milestones", "gamma")

    def __init__(self, lr, milestones, gamma=0.1):
        self.lr = _real("multistep", "lr", lr)
        try:
            ms = list(milestones)
        except TypeError:
            msg = f"multistep: milestones must be a list of steps, got {milestones!r}"
            raise TypeError(msg) from None
        if not ms:
            raise ValueError("multistep: milestones is empty")
        ms = [_steps("multistep", "milestone", m) for m in ms]
        if ms != sorted(ms):
            raise ValueError(f"multistep: milestones must be sorted, got {ms}")
        self.milestones = ms
        self.gamma = _real("multistep", "gamma", gamma, low_open=True)

    def params(self):
        p = super().params()
        p[L.SP_N] = float(len(self.milestones))
        return p + [float(m) for m in self.milestones]

    def _slots(self):
        return (self.gamma,)

    def _factor(self, u):
        ms = self.device_params(u.device)[L.SP_MILESTONES :]  # cached: no copy, no sync
        k = (ms <= u.unsqueeze(-1)).sum(-1).to(torch.float64)  # bisect_right
        return torch.full_like(u, self.gamma) ** k


def constant(lr, warmup=0):
    """``lr`` after a linear warm-up of ``warmup`` steps from 0: transformers'
    ``get_constant_schedule_with_warmup`` (``get_constant_schedule`` with ``warmup=0``)."""
    return _Constant(lr, warmup)


def linear(lr, warmup, total):
    """Linear warm-up, then linear decay to 0 at step ``total``: transformers'
    ``get_linear_schedule_with_warmup``."""
    return _Linear(lr, warmup, total)


def cosine(lr, warmup, total, cycles=0.5, min_lr=0.0):
    """Linear warm-up, then a cosine from ``lr`` down to ``min_lr`` (``cycles`` waves; 0.5 is a
    half cosine reaching ``min_lr`` at ``total``): transformers'
    ``get_cosine_with_min_lr_schedule_with_warmup(min_lr=...)``, or
    ``get_cosine_schedule_with_warmup`` with ``min_lr=0``."""
    return _Cosine(lr, warmup, total, cycles, min_lr)


def cosine_restarts(lr, warmup, total, cycles=1):
    """Linear warm-up, then ``cycles`` cosine decays to 0, each restarting at ``lr``; 0 from
    ``total`` on: transformers' ``get_cosine_with_hard_restarts_schedule_with_warmup``."""
    return _CosineRestarts(lr, warmup, total, cycles)


def polynomial(lr, warmup, total, end_lr=1e-7, power=1.0):
    """Linear warm-up, then a polynomial decay of degree ``power`` to ``end_lr`` at ``total``
    (``end_lr`` after): transformers' ``get_polynomial_decay_schedule_with_warmup`` (its
    ``lr_end``) on an optimizer built with ``lr``."""
    return _Polynomial(lr, warmup, total, end_lr, power)


def inverse_sqrt(lr, warmup, timescale=None):
    """Linear warm-up, then ``lr / sqrt((step + timescale - warmup) / timescale)``;
    ``timescale`` defaults to ``warmup`` (or 10,000 without warm-up): transformers'
    ``get_inverse_sqrt_schedule``."""
    return _InverseSqrt(lr, warmup, timescale)


def wsd(
    lr,
    warmup,
    decay,
    total=None,
    stable=None,
    warmup_type="linear",
    decay_type="cosine",
    min_lr_ratio=0.0,
    cycles=0.5,
):
    """Warmup-stable-decay: a warm-up of ``warmup`` steps (shape ``warmup_type``: "linear",
    "cosine" or "1-sqrt") from ``min_lr_ratio * lr``, ``stable`` steps at ``lr`` (``total - warmup
    - decay`` when only ``total`` is given), a decay of ``decay`` steps (``decay_type``, the same
    shapes) to ``min_lr_ratio * lr``, which stays: transformers' ``get_wsd_schedule``."""
    return _Wsd(lr, warmup, decay, total, stable, warmup_type, decay_type, min_lr_ratio, cycles)


def exponential(lr, gamma):
    """``lr * gamma ** (t - 1)``: torch's ``ExponentialLR`` (closed form; the scheduler itself
    multiplies by ``gamma`` once per step, which rounds differently in the last bits)."""
    return _Exponential(lr, gamma)


def multistep(lr, milestones, gamma=0.1):
    """``lr * gamma ** (number of milestones <= t - 1)``: torch's ``MultiStepLR`` (closed form; a
    milestone given twice counts twice, as torch's does)."""
    return _MultiStep(lr, milestones, gamma)


def noam(d_model, warmup, factor=1.0):
    """``fusedopt.Noam``: the schedule of "Attention is All You Need"."""
    return Noam(d_model, warmup, factor)


_BY_NAME = {
    c.NAME: c
    for c in (
        _Constant,
        _Linear,
        _Cosine,
        _CosineRestarts,
        _Polynomial,
        _InverseSqrt,
        _Wsd,
        _Exponential,
        _MultiStep,
    )
}


def from_dict(d):
    """The schedule ``to_dict`` described."""
    d = dict(d)
    name = d.pop("name", None)
    if name not in _BY_NAME:
        raise ValueError(f"fusedopt.schedules: unknown schedule {name!r} in a state_dict")
    return _BY_NAME[name](**d)
