"""The Noam learning-rate schedule of "Attention is All You Need" (Vaswani et al., 2017).

``rate(t) = factor * d_model**-0.5 * min(t**-0.5, t * warmup**-1.5)``, with ``t = 1`` at the first
update. ``Noam`` passed as an optimizer's ``lr`` is evaluated on the device inside the step, from an
on-device counter; ``NoamLR`` is an ordinary ``LRScheduler`` for optimizers that keep torch.optim.
"""

import math
import numbers

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["Noam", "NoamLR", "Schedule"]


class Schedule:
    """A learning-rate schedule evaluated inside the optimizer step (``lr=`` of an optimizer or a
    param group): the kernel computes the lr of every ``step()`` in float64 from the group's
    on-device update counter, so nothing syncs with the host and a captured CUDA graph follows
    the schedule on every replay. ``Noam`` and the family in ``fusedopt.schedules``.

    ``rate(t)`` is the lr of the t-th update (t >= 1), on the host or elementwise on a tensor.
    A state_dict keeps the schedule as plain data under ``STATE_KEY`` (``to_dict``) and the
    counter under ``COUNTER_KEY``."""

    STATE_KEY = "lr_schedule"
    COUNTER_KEY = "lr_step"

    def rate(self, t):
        raise NotImplementedError

    def to_dict(self):
        raise NotImplementedError

    @staticmethod
    def from_state(key, d):
        """The schedule a state_dict's group stored under ``key`` (a STATE_KEY)."""
        if key == Noam.STATE_KEY:
            return Noam.from_dict(d)
        from .schedules import from_dict  # noqa: PLC0415 - schedules imports this module

        return from_dict(d)

    def _not_a_number(self, *_):
        raise TypeError(
            f"fusedopt.{type(self).__name__} is a schedule evaluated inside the optimizer step, "
            "not a number: a torch LR scheduler cannot scale it. Use either lr=<schedule> with no "
            "scheduler, or a float lr with a torch LR scheduler."
        )

    __mul__ = __rmul__ = __truediv__ = __add__ = __radd__ = __float__ = _not_a_number

    def __eq__(self, other):
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(repr(sorted(self.to_dict().items())))


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Noam {name} must be a real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Invalid Noam {name}: {value} (must be finite and > 0)")


class Noam(Schedule):
    """The schedule itself: ``Noam(d_model, warmup, factor=1.0)``.

    ``rate(t)`` evaluates it on the host (``t`` a number >= 1) or elementwise on a tensor of steps.
    Passed as ``lr=Noam(...)`` to a fusedopt optimizer (or in one param group), the kernel computes
    the rate of each ``step()`` from the group's on-device counter, so nothing syncs with the host;
    the results equal torch.optim with ``lr=1.0`` and ``LambdaLR(opt, lambda e: noam.rate(e + 1))``.
    """

    STATE_KEY = "noam"
    COUNTER_KEY = "noam_step"

    def __init__(self, d_model, warmup, factor=1.0):
        _check_positive("d_model", d_model)
        _check_positive("warmup", warmup)
        _check_positive("factor", factor)
        self.d_model = d_model
        self.warmup = warmup
        self.factor = factor

    @property
    def scale(self):
        """``factor * d_model**-0.5``, the constant in front of the schedule."""
        return self.factor * self.d_model**-0.5

    @property
    def warmup_coeff(self):
        """``warmup**-1.5``, the slope of the linear warm-up."""
        return self.warmup**-1.5

    def rate(self, t):
        if isinstance(t, torch.Tensor):
            t = t.to(torch.float64)
            return self.scale * torch.minimum(t.rsqrt(), t * self.warmup_coeff)
        if not t >= 1:
            raise ValueError(f"Noam.rate is defined for t >= 1, got {t}")
        return self.scale * min(t**-0.5, t * self.warmup_coeff)

    def to_dict(self):
        """Plain data, as stored in a state_dict (``torch.load(weights_only=True)`` accepts it)."""
        return {"d_model": self.d_model, "warmup": self.warmup, "factor": self.factor}

    @classmethod
    def from_dict(cls, d):
        return cls(d["d_model"], d["warmup"], d["factor"])

    def __repr__(self):
        return f"Noam(d_model={self.d_model}, warmup={self.warmup}, factor={self.factor})"


class NoamLR(LRScheduler):
    """``NoamLR(optimizer, d_model, warmup, factor=1.0)``: sets every group's lr to ``rate(t)``.

    For any optimizer (torch.optim's included). ``t`` is the number of ``scheduler.step()`` calls
    plus one, so the first optimizer step runs with ``rate(1)``: the same rates as
    ``LambdaLR(opt, lambda e: rate(e + 1))`` on an optimizer built with ``lr=1.0``. The group's
    initial lr is not used: ``factor`` sets the scale.
    """

    def __init__(self, optimizer, d_model, warmup, factor=1.0, last_epoch=-1):
        self.noam = Noam(d_model, warmup, factor)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Noam):
                raise TypeError(
                    "NoamLR would replace a group's in-kernel fusedopt.Noam lr with a "
                    "float; use one or the other"
                )
        return [self.noam.rate(self.last_epoch + 1) for _ in self.optimizer.param_groups]

    def state_dict(self):
        state = super().state_dict()
        state["noam"] = self.noam.to_dict()  # plain data, so weights_only loading accepts it
        return state

    def load_state_dict(self, state_dict):
        state = dict(state_dict)
        noam = state.pop("noam", None)
        super().load_state_dict(state)
        if noam is not None:
            self.noam = Noam.from_dict(noam)
