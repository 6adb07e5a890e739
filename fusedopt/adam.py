"""``fusedopt.Adam`` and ``fusedopt.AdamW``: drop-ins for their torch.optim namesakes."""

import torch

from ._layout import ADAM_COLS
from .optimizer import FusedOptimizer, check_common

__all__ = ["Adam", "AdamW"]


def _beta(value, index):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")
        value = float(value)  # construction time only: a host read here is not in step()
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid beta parameter at index {index}: {value}")
    return value


class Adam(FusedOptimizer):
    """Adam (``decoupled_weight_decay=False``: L2 decay added to the gradient), fused.

    Same arguments, defaults, state and state_dict as ``torch.optim.Adam``, plus ``backend``
    (``"auto"``, ``"triton"``, ``"torch"``). ``lr`` may be a float, a 1-element tensor (read on the
    device every step) or a schedule evaluated in the kernel (:class:`fusedopt.Noam`, or one of
    ``fusedopt.schedules``: cosine, linear, wsd, ...).
    ``foreach``, ``fused`` and ``capturable`` are accepted for compatibility: every step is fused.
    ``max_grad_norm`` clips the gradients by their global L2 norm inside the step, as
    ``torch.nn.utils.clip_grad_norm_`` would before it (``.grad`` itself is left unclipped).
    GradScaler's scale and inf checks are applied in the kernel, as torch's ``fused=True`` does.
    """

    _op = "adam"
    _columns = ADAM_COLS
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        *,
        foreach=None,
        maximize=False,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=False,
        backend="auto",
        max_grad_norm=None,
        master_weights=False,
        state_dtype=None,
        min_8bit_size=4096,
        stochastic_rounding=False,
    ):
        defaults = {
            "lr": lr,
            "betas": tuple(_beta(b, i) for i, b in enumerate(betas)),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
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
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")

    def _group_key_defaults(self):
        return {
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": False,
        }

    def _needed(self, group):
        return (True, True, bool(group["amsgrad"]))

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "amsgrad": group["amsgrad"],
            "maximize": group["maximize"],
            "decoupled": group["decoupled_weight_decay"],
        }

    def add_param_group(self, param_group):
        if "betas" in param_group:
            param_group["betas"] = tuple(_beta(b, i) for i, b in enumerate(param_group["betas"]))
        super().add_param_group(param_group)


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2), fused. See :class:`Adam`."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        backend="auto",
        max_grad_norm=None,
        master_weights=False,
        state_dtype=None,
        min_8bit_size=4096,
        stochastic_rounding=False,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
            state_dtype=state_dtype,
            min_8bit_size=min_8bit_size,
            stochastic_rounding=stochastic_rounding,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch.optim.AdamW: always decoupled
            group["decoupled_weight_decay"] = True
