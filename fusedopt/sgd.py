"""``fusedopt.SGD``: a drop-in replacement for ``torch.optim.SGD``, fused."""

from ._layout import SGD_COLS
from .optimizer import FusedOptimizer, check_lr, nonnegative

__all__ = ["SGD"]


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay: torch.optim.SGD's arguments,
    defaults, validation, state and state_dict, plus ``backend``, ``max_grad_norm``,
    ``master_weights``, ``state_dtype`` and ``stochastic_rounding`` (see :class:`fusedopt.AdamW`).

    ``lr`` may be a float, a 1-element tensor or an in-kernel schedule (:class:`fusedopt.Noam`,
    ``fusedopt.schedules``: warmup then cosine, linear, wsd, ...). ``foreach`` and ``fused`` are
    accepted for compatibility: every step is fused. GradScaler's scale and inf checks are applied
    in the kernel, as torch's ``fused=True`` does.

    The state holds ``momentum_buffer`` only, and only with ``momentum != 0``, as torch's: the
    first update of a parameter sets it to the gradient. fusedopt counts each parameter's updates
    outside the state (which update is the first; stochastic rounding's seed); after
    ``load_state_dict`` a parameter with a momentum buffer counts as updated.
    """

    _op = "sgd"
    _columns = SGD_COLS
    _state_names = ("momentum_buffer", None, None)
    _step_in_state = False

    def __init__(
        self,
        params,
        lr=1e-3,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        *,
        maximize=False,
        foreach=None,
        differentiable=False,
        fused=None,
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
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
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
        check_lr(group["lr"], in_step)
        momentum, dampening = group["momentum"], group["dampening"]
        if not nonnegative(momentum):
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not nonnegative(group["weight_decay"]):
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _group_key_defaults(self):
        return {
            "nesterov": False,
            "maximize": False,
            "foreach": None,
            "differentiable": False,
            "fused": None,
        }

    def _needed(self, group):
        return (group["momentum"] != 0, False, False)

    def _hyper(self, group):
        return {
            "momentum": group["momentum"],
            "dampening": group["dampening"],
            "weight_decay": group["weight_decay"],
            "nesterov": group["nesterov"],
            "maximize": group["maximize"],
        }
