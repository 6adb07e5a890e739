"""``fusedopt.RMSprop``: a drop-in replacement for ``torch.optim.RMSprop``, fused."""

from ._layout import RMSPROP_COLS
from .optimizer import FusedOptimizer, check_common, nonnegative

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer):
    """RMSprop with torch.optim's arguments, defaults, state and state_dict, plus ``backend``.

    ``lr`` may be a float, a 1-element tensor or an in-kernel schedule (:class:`fusedopt.Noam`,
    ``fusedopt.schedules``). ``foreach`` and ``capturable`` are accepted for compatibility: every
    step is fused. ``max_grad_norm`` and GradScaler work as for :class:`fusedopt.AdamW`.
    """

    _op = "rmsprop"
    _columns = RMSPROP_COLS
    _state_names = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        capturable=False,
        foreach=None,
        maximize=False,
        differentiable=False,
        *,
        backend="auto",
        max_grad_norm=None,
        master_weights=False,
        state_dtype=None,
        min_8bit_size=4096,
        stochastic_rounding=False,
    ):
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            backend,
            max_grad_norm,
            master_weights=master_weights,
            state_dtype=state_dtype,
            min_8bit_size=min_8bit_size,
            stochastic_rounding=stochastic_rounding,
        )

    def _validate(self, group, in_step=False):
        check_common(group["lr"], group["eps"], group["weight_decay"], in_step)
        if not nonnegative(group["momentum"]):
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if not nonnegative(group["alpha"]):
            raise ValueError(f"Invalid alpha value: {group['alpha']}")

    def _group_key_defaults(self):
        return {
            "momentum": 0,
            "centered": False,
            "foreach": None,
            "maximize": False,
            "differentiable": False,
            "capturable": False,
        }

    def _needed(self, group):
        return (True, group["momentum"] > 0, bool(group["centered"]))

    def _hyper(self, group):
        return {
            "alpha": group["alpha"],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "momentum": group["momentum"],
            "centered": group["centered"],
            "maximize": group["maximize"],
        }
