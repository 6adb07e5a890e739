"""The shared base of fusedopt's optimizers: validation, state, grouping, checkpoints.

No math lives here. ``step()`` validates every parameter with a grad (nothing is modified before all
checks pass), creates missing state, groups the work by device, and hands each device's work to one
backend, which runs one fused pass per (device, dtype) bucket.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from . import _amp, _master, _plan, backends, quant8
from ._layout import LR_FLOAT, LR_NOAM, LR_SCHEDULE, LR_TENSOR, Bucket
from .schedule import Noam, Schedule

__all__ = ["FusedOptimizer"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Slot:
    """One parameter that takes part in this step."""

    group: int
    param: torch.Tensor  # the tensor the update reads and writes: the fp32 master, if any
    grad: torch.Tensor
    step: torch.Tensor
    states: tuple  # three tensors (or None where the group's options do not use that slot)
    bucket: Bucket  # the fused pass it belongs to
    shadow: torch.Tensor = None  # with a master: the model's parameter, written rounded
    owner: torch.Tensor = None  # the parameter as param_groups holds it (a DTensor for FSDP2)
    # 8-bit states (bucket.state uint8): per slot, the float32 absmax per block of 256 (None
    # where the slot is unused); ``states`` then holds the uint8 codes
    absmax: tuple = None
    # a compressed master (bucket.error): the int8/int16 error term beside the bf16 ``param``
    error: torch.Tensor = None

    @property
    def stochastic(self):
        return self.bucket.stochastic


@dataclass
class GroupLR:
    """How a group's lr is obtained this step, on one device."""

    mode: int
    value: float = 0.0  # LR_FLOAT
    tensor: torch.Tensor = None  # LR_TENSOR: the user's 0-d tensor, read on the device each step
    noam: Noam = None  # LR_NOAM
    counter: torch.Tensor = None  # LR_NOAM, LR_SCHEDULE: the group's on-device update counter
    schedule: Schedule = None  # LR_SCHEDULE (value: its base lr)
    params: torch.Tensor = None  # LR_SCHEDULE: its float64 vector on the device (layout's SP_*)


@dataclass
class DeviceWork:
    """Everything one backend needs for one device in one step."""

    device: torch.device
    slots: list = field(default_factory=list)
    backend: str = "torch"  # the backend that runs this device's buckets
    buckets: list = field(default_factory=list)  # (Bucket, first slot, end slot)
    lrs: list = field(default_factory=list)  # GroupLR per param group (every group, in order)
    hyper: list = field(default_factory=list)  # per param group: the optimizer's hyperparameters
    # GradScaler's tensors on this device (or None) and the clipping threshold (or None)
    amp: dict = field(
        default_factory=lambda: {"grad_scale": None, "found_inf": None, "max_norm": None}
    )
    grad_copies: list = field(default_factory=list)  # (grad, its copy in the param's layout)
    fast: tuple = None  # (plan, index of this work in it) when a cached plan runs the step
    hyper_changed: bool = True  # a group's row of the tables may have changed since last step


def _is_dense(t):
    """True when ``t`` covers exactly ``numel`` consecutive elements from ``data_ptr``."""
    if t.numel() <= 1 or t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda x: x[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _state_dtype(group, p):
    """The dtype of ``p``'s optimizer state: the group's state_dtype, else fp32 with a master,
    else the parameter's own (as torch.optim keeps it). 8-bit (uint8) only for parameters of at
    least ``min_8bit_size`` elements; smaller ones keep fp32 state, as bitsandbytes does."""
    if group["state_dtype"] == torch.uint8:
        return torch.uint8 if p.numel() >= group["min_8bit_size"] else torch.float32
    if group["state_dtype"] is not None:
        return group["state_dtype"]
    return torch.float32 if group["master_weights"] and p.dtype != torch.float32 else p.dtype


# master_weights: True keeps an fp32 copy; "int8" / "int16" keep the bf16 parameter's rounding
# error instead (fusedopt/quant8.py's master error term), in that many bits
COMPRESSED_MASTERS = {"int8": 8, "int16": 16}


def _bucket_of(p, group):
    """The Bucket parameter ``p`` of ``group`` falls in."""
    error = COMPRESSED_MASTERS.get(group["master_weights"], 0) if p.dtype == torch.bfloat16 else 0
    master = bool(group["master_weights"]) and p.dtype != torch.float32 and not error
    param = torch.float32 if master else p.dtype
    stochastic = bool(group["stochastic_rounding"]) and param == torch.bfloat16
    return Bucket(param, p.dtype, _state_dtype(group, p), master, stochastic, error)


def _local(t):
    """The local shard of a DTensor (FSDP2's parameters, grads and state), the tensor otherwise:
    the kernels update each rank's shard in place."""
    return t.to_local() if isinstance(t, DTensor) else t


def _check_disjoint(tensors, name):
    """Parameters that share a storage must not overlap: one update would clobber another's."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), tuple(t.shape)) for t in tensors
    )
    for (_, end, shape), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(
                f"fusedopt.{name}: parameters of shapes {shape} and {other} overlap in memory; "
                "the fused update of one would overwrite the other"
            )


def _scalar_on(t, device):
    """A GradScaler tensor as a contiguous float32 0-d tensor on ``device`` (no host sync)."""
    if t is None:
        return None
    return t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True).contiguous()


def _to_param_layout(value, p, dtype=None):
    """A fresh tensor with ``p``'s device and strides (and ``dtype``, default ``p``'s) holding
    ``value`` (never an alias)."""
    out = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
    out.copy_(value)
    return out


def _ensure_state(st, name, p, dtype):
    """Create ``p``'s state ``name`` in ``dtype`` where it is missing, or convert it where
    ``state_dtype`` changed since it was made: 8-bit states are (de)quantized."""
    scale = quant8.absmax_name(name)
    value = st.get(name)
    if value is None:
        if dtype == torch.uint8:
            st[name], st[scale] = quant8.empty_state(p, name)
        else:
            st[name] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return
    if value.dtype == dtype:
        return
    if value.dtype == torch.uint8:
        value = quant8.dequantize_state(value, st.pop(scale), name)
    if dtype == torch.uint8:
        st[name], st[scale] = quant8.quantize_state(value, p, name)
    else:
        st[name] = _to_param_layout(value, p, dtype)


def _ensure_master_error(st, p, bits):
    """``p``'s compressed-master error term of ``bits`` bits: created (0: the master is the bf16
    parameter) or converted from an fp32 master or an error term of the other width."""
    error = st.get(_master.STATE_KEY)
    dtype = _master.ERROR_DTYPES[bits]
    if error is not None and error.dtype == dtype:
        return error
    if error is not None:
        value = _master.reconstruct(p.detach(), error)
    elif "master_param" in st:
        value = st.pop("master_param")
    else:
        value = None
    if value is None:
        error = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    else:
        b, e = _master.split(_to_param_layout(value, p, torch.float32), bits)
        p.detach().copy_(b)  # the parameter is the master rounded to bf16, as it was
        error = _to_param_layout(e, p, dtype)
    st[_master.STATE_KEY] = error
    return error


def _loaded_state(st, name, p, dtype):
    """``st[name]`` (as the checkpoint held it, before torch.optim's cast to ``p``'s dtype) made
    into ``p``'s state in ``dtype``, always a copy: 8-bit codes keep their blocks when their
    layout is ``p``'s, and are dequantized and quantized again in ``p``'s memory order when not."""
    scale = quant8.absmax_name(name)
    value = st[name]
    if value.dtype == torch.uint8 and scale in st:
        absmax = st.pop(scale).to(device=p.device, dtype=torch.float32, copy=True)
        codes = value.to(p.device)
        if dtype == torch.uint8 and _local(codes).stride() == _local(p).stride():
            st[name], st[scale] = codes.clone(memory_format=torch.preserve_format), absmax
            return
        value = quant8.dequantize_state(codes, absmax, name)
    if dtype == torch.uint8:
        st[name], st[scale] = quant8.quantize_state(value.to(p.device), p, name)
    else:
        st[name] = _to_param_layout(value, p, dtype)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses define ``_op``, ``_state_names``, ``_validate`` and ``_hyper``."""

    _op = None  # "adam", "rmsprop" or "sgd": the optimizer the backends run (_layout.OPTIMIZERS)
    _columns = None  # _layout's <OP>_COLS: where _hyper's values go in the hyper table
    _state_names = ()  # the three state slots, in kernel order (None: unused)
    # torch.optim keeps a "step" in the state of Adam and RMSprop, not of SGD: there the kernels'
    # per-parameter update count lives in self._steps instead, outside the state_dict
    _step_in_state = True

    # torch.amp.GradScaler's contract for fused optimizers: it leaves the unscaling to step().
    # With step()'s grad_scaler parameter it also leaves the inf check (fusedopt/_amp.py); set
    # by hand, the attributes grad_scale and found_inf still work as GradScaler's other contract.
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, backend="auto", max_grad_norm=None, **precision):
        """``defaults``: the torch.optim namesake's, checked here with its messages."""
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._validate(defaults)
        defaults = {**defaults, **PRECISION_DEFAULTS, **precision}
        if max_grad_norm is not None and not 0.0 < max_grad_norm < math.inf:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self._last_grad_norm = None
        if defaults.get("differentiable"):
            raise RuntimeError(
                f"fusedopt.{type(self).__name__} does not support differentiable=True: its fused "
                f"kernels are not differentiable. Use torch.optim.{type(self).__name__} for that."
            )
        if backend == "auto":
            backend = os.environ.get("FUSEDOPT_BACKEND", "auto") or "auto"
        backends.check_name(backend)
        self.backend = backend
        self._tables = {}  # per-backend cached metadata, keyed by (backend name, device)
        self._plan = None  # the cached step plan (see _fast_step), or None
        self._plan_stats = {"built": 0, "fast": 0, "why": None}  # for tests and benchmarks
        self._last_lr = {}  # group index -> 0-d device tensor of the lr the last step used
        self._steps = {}  # parameter -> its update count, when not in the state (_step_in_state)
        super().__init__(params, defaults)
        if backend != "auto":
            for device in {p.device for g in self.param_groups for p in g["params"]}:
                backends.require(backend, device)

    # ----------------------------------------------------------------- hooks for the subclasses
    def _validate(self, group, in_step=False):
        """Raise torch.optim's error for a bad hyperparameter in ``group``.

        ``in_step``: called from ``step()``, where a device tensor lr must not be read (no sync).
        """
        raise NotImplementedError

    def _needed(self, group):
        """Which of the three state slots ``group``'s options use."""
        raise NotImplementedError

    def _hyper(self, group):
        """The group's hyperparameters, as the backends read them (see fusedopt/_layout.py)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- torch.optim API
    def add_param_group(self, param_group):
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(merged)
        _check_precision(merged)
        if isinstance(merged["lr"], torch.Tensor) and merged["lr"].numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        super().add_param_group(param_group)
        self._plan = None
        group = self.param_groups[-1]
        if isinstance(group["lr"], Schedule):
            self._noam_device(group)

    def get_last_lr(self):
        """The lr each group used in its last step, for logging, without a device sync.

        A float for groups with a float lr; a 0-d device tensor for scheduled (``fusedopt.Noam``,
        ``fusedopt.schedules``) and tensor lrs (read it
        with ``.item()`` when you log: that is the only sync). Before the first step, the lr the
        first step will use.
        """
        out = []
        for i, group in enumerate(self.param_groups):
            lr = group["lr"]
            last = self._last_lr.get(i)
            if isinstance(lr, (Schedule, torch.Tensor)) and last is not None:
                out.append(last.clone())  # a snapshot: the buffer is rewritten by the next step
            elif isinstance(lr, Schedule):
                out.append(lr.rate(1))
            elif isinstance(lr, torch.Tensor):
                out.append(lr.clone())
            else:
                out.append(lr)
        return out

    # torch.compile runs step() eagerly: its inputs are cached device tables and pointer
    # addresses, which Dynamo cannot trace, and guarding on hyperparameters would recompile the
    # caller's graph at every lr change. The step itself is already one fused pass.
    @torch._disable_dynamo(recursive=True)
    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        """One fused step. ``grad_scaler``: torch.amp.GradScaler.step passes itself there, and
        fusedopt checks the grads for infs itself (fusedopt/_amp.py), bf16 grads on CUDA
        included, where torch's check has no kernel."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scaler is None or not grad_scaler.is_enabled():
            self._step()
            return loss
        params = (p for group in self.param_groups for p in group["params"])
        grads = [_local(p.grad) for p in params if p.grad is not None and not p.grad.is_sparse]
        with _amp.scaled(self, grad_scaler, grads):  # sparse grads: _gather's error
            self._step()
        return loss

    def _step(self):
        if self._plan is not None and self._fast_step():
            return
        self._plan = None
        work = self._gather()  # validates everything; changes nothing
        for w in work.values():
            self._prepare(w)
        self._run(work)
        self._plan = _plan.build(self, work)

    def _run(self, work):
        for w in work.values():
            # on the parameters' device, whichever is current: Triton and the CUDA kernels
            # launch on the current one
            with torch.cuda.device(w.device) if w.device.type == "cuda" else nullcontext():
                backends.get(w.backend).run(self, w)
                if w.amp["grad_scale"] is not None:
                    for home, copy in w.grad_copies:
                        home.copy_(copy)

    def _fast_step(self):
        """One step from the cached plan (fusedopt/_plan.py): True when it ran, False when the
        plan no longer holds and everything must be walked again. Raises, having changed
        nothing, on bad input (and drops the plan)."""
        try:
            return _plan.fast_step(self, self._plan)
        except BaseException:
            self._plan = None
            raise

    def state_dict(self):
        sd = super().state_dict()
        for group in sd["param_groups"]:
            lr = group["lr"]
            if isinstance(lr, Schedule):
                # Plain data only, so torch.optim can load it and torch.load(weights_only=True)
                # accepts it. torch.optim sees the rate of the next step as an ordinary float lr,
                # as a torch checkpoint taken after `opt.step(); LambdaLR.step()` holds it.
                group[lr.STATE_KEY] = lr.to_dict()
                counter = group.get(lr.COUNTER_KEY)
                t = float(counter) if counter is not None else 0.0  # a checkpoint may sync
                group["lr"] = lr.rate(t + 1.0)
        return sd

    def _check_loadable(self, state_dict):
        """Reject a state_dict this optimizer cannot resume from, before anything changes: another
        group layout (torch's messages), per-parameter state with missing or foreign keys (a
        checkpoint of another optimizer) or with tensors of the wrong shape."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"fusedopt.{name}: a state_dict needs 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        owners = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
            merged = {**self.defaults, **{k: v for k, v in saved.items() if k != "params"}}
            for key, p in zip(saved["params"], group["params"]):
                owners[key] = (p, merged)
        step_key = {"step"} if self._step_in_state else set()
        names = [n for n in self._state_names if n]
        allowed = {
            *step_key,
            "master_param",
            _master.STATE_KEY,
            *names,
            *map(quant8.absmax_name, names),
        }
        for key, st in state_dict["state"].items():
            if key not in owners:
                continue
            p, merged = owners[key]
            if not isinstance(st, dict):
                raise ValueError(f"fusedopt.{name}: the state of parameter {key} is not a dict")
            required = step_key | {
                n for n, needed in zip(self._state_names, self._needed(merged)) if needed
            }
            missing, foreign = required - set(st), set(st) - allowed
            if missing or foreign:
                raise ValueError(
                    f"fusedopt.{name}: the state of parameter {key} has keys {sorted(st)}, "
                    f"missing {sorted(missing)}"
                    + (f", unknown {sorted(foreign)}" if foreign else "")
                    + f"; is it a checkpoint of another optimizer? {name} keeps "
                    f"{sorted(required)}"
                )
            for n in allowed - step_key:
                if n not in st:
                    continue
                scale = n.endswith(quant8.ABSMAX)
                shape = quant8.absmax_shape(p) if scale else tuple(p.shape)
                if not isinstance(st[n], torch.Tensor) or tuple(st[n].shape) != shape:
                    got = tuple(st[n].shape) if isinstance(st[n], torch.Tensor) else type(st[n])
                    raise ValueError(
                        f"fusedopt.{name}: state '{n}' of parameter {key} has shape {got}; "
                        + (
                            f"8-bit absmaxes of a parameter of {p.numel()} elements are {shape}"
                            + (f" (sharded as {p.placements})" if isinstance(p, DTensor) else "")
                            if scale
                            else f"the parameter {tuple(p.shape)}"
                        )
                    )
                if (
                    n != _master.STATE_KEY
                    and n != "master_param"
                    and (st[n].dtype == torch.uint8 or scale)
                ):
                    why = quant8.sharding_of(n, st[n], p)
                    if why:
                        raise ValueError(
                            f"fusedopt.{name}: 8-bit state '{n}' of parameter {key} is {why}"
                        )
            error = st.get(_master.STATE_KEY)
            if error is not None and error.dtype not in _master.ERROR_DTYPES.values():
                raise ValueError(
                    f"fusedopt.{name}: state '{_master.STATE_KEY}' of parameter {key} is "
                    f"{error.dtype}; a compressed master's error term is int8 or int16"
                )
            for n in names:
                codes, scale = st.get(n), st.get(quant8.absmax_name(n))
                if scale is not None and codes is None:
                    raise ValueError(
                        f"fusedopt.{name}: state '{quant8.absmax_name(n)}' of parameter {key} "
                        f"has no '{n}' (the 8-bit codes it scales)"
                    )
                if codes is not None and (codes.dtype == torch.uint8) != (scale is not None):
                    raise ValueError(
                        f"fusedopt.{name}: state '{n}' of parameter {key} is {codes.dtype} "
                        + (
                            "without its absmax: 8-bit states are stored as uint8 codes and "
                            f"'{quant8.absmax_name(n)}'"
                            if scale is None
                            else f"with '{quant8.absmax_name(n)}', which only 8-bit (uint8) "
                            "codes have"
                        )
                    )

    def load_state_dict(self, state_dict):
        self._check_loadable(state_dict)
        previous = [g["lr"] for g in self.param_groups]
        # torch.optim's checkpoints have no precision options: keep the ones this optimizer
        # was built with (a fusedopt checkpoint's own win, as for any hyperparameter)
        precision = [{k: g[k] for k in PRECISION_DEFAULTS} for g in self.param_groups]
        saved_keys = [set(g) for g in state_dict["param_groups"]]
        # torch.optim casts every floating state tensor to its parameter's dtype: the fp32 state
        # and masters of bf16 parameters, and 8-bit absmaxes, are taken from the checkpoint as
        # they are instead (and 8-bit codes are never cast)
        index = {
            key: p
            for group, saved in zip(self.param_groups, state_dict["param_groups"])
            for key, p in zip(saved["params"], group["params"])
        }
        originals = {
            index[key]: {n: v for n, v in st.items() if n != "step" and torch.is_tensor(v)}
            for key, st in state_dict["state"].items()
            if key in index
        }
        super().load_state_dict(state_dict)
        for p, values in originals.items():
            if p in self.state:
                self.state[p].update(values)
        self._plan = None
        if not self._step_in_state:
            # The update counts are not in a state_dict: a parameter with state has had its
            # first update (its momentum buffer is no longer the first gradient); one without
            # starts from 0. Stochastic rounding's noise, seeded by the count, restarts.
            self._steps = {
                p: torch.ones((), dtype=torch.float32, device=p.device)
                for g in self.param_groups
                for p in g["params"]
                if self.state.get(p)
            }
        # The tables stay: they are refilled in place (a CUDA graph captured before may read them)
        self._last_lr.clear()
        for group, kept, saved in zip(self.param_groups, precision, saved_keys):
            group.update({k: v for k, v in kept.items() if k not in saved})
        keys = {Noam.STATE_KEY: Noam.COUNTER_KEY, Schedule.STATE_KEY: Schedule.COUNTER_KEY}
        for group, old_lr in zip(self.param_groups, previous):
            saved = [(k, group.pop(k)) for k in keys if group.get(k) is not None]
            if saved:
                group["lr"] = Schedule.from_state(*saved[0])
            elif isinstance(old_lr, Schedule):
                # A checkpoint from torch.optim (LambdaLR kept the schedule outside the optimizer):
                # keep the schedule this optimizer was built with, and resume its counter from
                # the number of updates the group's parameters have seen.
                group["lr"] = old_lr
                for counter_key in keys.values():
                    group.pop(counter_key, None)
            lr = group["lr"]
            for counter_key in keys.values():  # a counter of another kind of schedule
                if not (isinstance(lr, Schedule) and counter_key == lr.COUNTER_KEY):
                    group.pop(counter_key, None)
            if isinstance(lr, Schedule):
                # The counter is at least the largest step of the group's parameters (each
                # advances at most once per step() call). A checkpoint that went through
                # torch.optim has no counter, or a stale one that torch carried along unchanged:
                # the parameters' steps then say how far the schedule has gone.
                device = self._noam_device(group)
                counts = [
                    torch.as_tensor(self.state[p]["step"]).to(device, torch.float32)
                    for p in group["params"]
                    if "step" in self.state.get(p, {})
                ]
                if group.get(lr.COUNTER_KEY) is not None:
                    counts.append(torch.as_tensor(group[lr.COUNTER_KEY]).to(device, torch.float32))
                group[lr.COUNTER_KEY] = (
                    torch.stack(counts).max().reshape(())
                    if counts
                    else torch.zeros((), dtype=torch.float32, device=device)
                )
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st:
                    st["step"] = (
                        torch.as_tensor(st["step"], dtype=torch.float32)
                        .to(p.device)
                        .clone()
                        .reshape(())
                    )
                for name in self._state_names:
                    if name and name in st:
                        _loaded_state(st, name, p, _state_dtype(group, p))
                if "master_param" in st:
                    st["master_param"] = _to_param_layout(st["master_param"], p, torch.float32)
                if _master.STATE_KEY in st:
                    error = st[_master.STATE_KEY]
                    st[_master.STATE_KEY] = _to_param_layout(error, p, error.dtype)

    def __getstate__(self):
        # torch.optim pickles (and deepcopies) defaults, state and param_groups only: fusedopt's
        # own settings and SGD's update counts go too (without the counts, a copied SGD would
        # restart every momentum buffer from the gradient). The tables, the plan and the lr and
        # norm snapshots are caches: the next step rebuilds them.
        state = super().__getstate__()
        state.update(backend=self.backend, max_grad_norm=self.max_grad_norm, _steps=self._steps)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for key, value in {
            "backend": "auto",
            "max_grad_norm": None,
            "_steps": {},
            "_tables": {},
            "_last_lr": {},
            "_last_grad_norm": None,
            "_plan_stats": {"built": 0, "fast": 0, "why": None},
        }.items():
            self.__dict__.setdefault(key, value)
        self._plan = None
        for group in self.param_groups:
            for key, value in {**PRECISION_DEFAULTS, **self._group_key_defaults()}.items():
                group.setdefault(key, value)

    def _group_key_defaults(self):
        return {}

    # ----------------------------------------------------------------- internals
    def _step_of(self, p):
        """``p``'s update count (a float32 0-d tensor on its device), or None before its first
        step."""
        if self._step_in_state:
            return self.state.get(p, {}).get("step")
        return self._steps.get(p)

    def _noam_device(self, group):
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(
                "fusedopt: a param group with a scheduled lr (fusedopt.Noam, fusedopt.schedules) "
                "must keep all its parameters on one device "
                f"(its on-device step counter lives there); found {sorted(map(str, devices))}"
            )
        return devices.pop() if devices else torch.device("cpu")

    def _gather(self):
        """Validate this step's inputs and collect them by device. Raises before any change."""
        name = type(self).__name__
        by_device, storages, buckets, memo = {}, {}, {}, {}
        for gi, group in enumerate(self.param_groups):
            self._validate(group, in_step=True)
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"fusedopt.{name} does not support sparse gradients")
                if p.dtype not in _SUPPORTED_DTYPES:
                    raise TypeError(
                        f"fusedopt.{name} supports float32, float16 and bfloat16 parameters; "
                        f"got {p.dtype} (parameter of shape {tuple(p.shape)})"
                    )
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(
                        f"fusedopt.{name}: gradient ({tuple(g.shape)}, {g.dtype}, {g.device}) does "
                        f"not match its parameter ({tuple(p.shape)}, {p.dtype}, {p.device})"
                    )
                lp, lg = _local(p), _local(g)
                if not _is_dense(lp):
                    raise ValueError(
                        f"fusedopt.{name}: a parameter of shape {tuple(p.shape)} with strides "
                        f"{lp.stride()} is not dense in memory; the fused kernels update "
                        "parameters in place and cannot update it without a copy. Make the "
                        "parameter contiguous before building the optimizer."
                    )
                if lp.numel():
                    storages.setdefault(lp.untyped_storage().data_ptr(), []).append(lp)
                if group["master_weights"] in COMPRESSED_MASTERS and p.dtype != torch.bfloat16:
                    raise ValueError(
                        f"fusedopt.{name}: master_weights={group['master_weights']!r} keeps the "
                        "error of bf16 parameters; this one is "
                        f"{p.dtype} (shape {tuple(p.shape)}). Use master_weights=True for it."
                    )
                # a bucket depends on nothing else: one per group, dtype and (8-bit) size class
                key = (gi, p.dtype, _state_dtype(group, p) == torch.uint8)
                bucket = memo.get(key) or memo.setdefault(key, _bucket_of(p, group))
                by_device.setdefault(lp.device, []).append((gi, p, lg, bucket))
                buckets.setdefault(lp.device, set()).add(bucket)

            if isinstance(group["lr"], Schedule):
                # The counter advances every step, as LambdaLR does, even with no grads.
                by_device.setdefault(self._noam_device(group), [])
        for shared in storages.values():
            if len(shared) > 1:
                _check_disjoint(shared, name)
        chosen = {}
        for device in by_device:
            wanted = buckets.get(device, set())
            chosen[device] = backends.select(self.backend, device, wanted)
            backends.require(chosen[device], device, wanted)
        if self.max_grad_norm is not None and len(by_device) > 1:
            raise ValueError(
                "fusedopt: max_grad_norm clips by the norm over all gradients, computed on one "
                f"device; these parameters are on {sorted(map(str, by_device))}. Call "
                "torch.nn.utils.clip_grad_norm_ before step() instead."
            )
        for device, items in by_device.items():
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                if any(self._step_of(p) is None for _, p, _, _ in items):
                    raise RuntimeError(
                        f"fusedopt.{name}: a parameter's first step creates its state and cannot "
                        "be captured in a CUDA graph. Run one eager step before capturing (as "
                        "torch.cuda.graphs' warm-up does)."
                    )
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        work = {}
        for device, items in by_device.items():
            w = work[device] = DeviceWork(device, slots=items, backend=chosen[device])
            w.amp = {
                "grad_scale": _scalar_on(grad_scale, device),
                "found_inf": _scalar_on(found_inf, device),
                "max_norm": self.max_grad_norm,
            }
        return work

    def _prepare(self, work):
        """Create missing state, then fill ``work`` in the form the backends read."""
        device = work.device
        slots = []
        work.grad_copies = []
        for gi, p, g, bucket in work.slots:
            group = self.param_groups[gi]
            needs = self._needed(group)
            # no entry for a parameter without state (fusedopt.SGD, no momentum: as torch's)
            keeps = bucket.shadow or bucket.error
            st = self.state[p] if self._step_in_state or any(needs) or keeps else {}
            step = self._step_of(p)
            if step is None:
                step = torch.zeros((), dtype=torch.float32, device=p.device)
                if self._step_in_state:
                    st["step"] = step
                else:
                    self._steps[p] = step
            states, absmax = [], []
            for name, needed in zip(self._state_names, needs):
                if needed:
                    _ensure_state(st, name, p, bucket.state)
                states.append(st[name] if needed else None)
            lp = _local(p)
            for name, needed in zip(self._state_names, needs):
                scale = st[quant8.absmax_name(name)] if needed and bucket.eight_bit else None
                absmax.append(None if scale is None else quant8.local_absmax(scale, lp.numel()))
            target, shadow = lp, None
            if bucket.shadow:
                if "master_param" not in st:
                    if _master.STATE_KEY in st:  # was compressed: the same master, uncompressed
                        value = _master.reconstruct(p.detach(), st.pop(_master.STATE_KEY))
                    else:
                        value = p
                    st["master_param"] = _to_param_layout(value, p, torch.float32)
                target, shadow = _local(st["master_param"]), lp
            error = None
            if bucket.error:
                error = _ensure_master_error(st, p, bucket.error)
            if g.stride() != lp.stride() and lp.numel() > 1:
                copy = _to_param_layout(g, lp)  # a read-only input, except for GradScaler's
                work.grad_copies.append((g, copy))  # unscaled write-back: copied back after
                g = copy
            states = tuple(None if t is None else _local(t) for t in states)
            error = None if error is None else _local(error)
            slot = Slot(gi, target, g, step, states, bucket, shadow, p, error=error)
            if bucket.eight_bit:
                slot.absmax = tuple(absmax)
            slots.append(slot)
        order = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.uint8: 3}
        slots.sort(key=lambda s: tuple(order.get(x, x) for x in s.bucket))
        work.slots = slots
        work.buckets = []
        for i, s in enumerate(slots):
            if not work.buckets or work.buckets[-1][0] != s.bucket:
                work.buckets.append([s.bucket, i, i])
            work.buckets[-1][2] = i + 1
        work.buckets = [tuple(b) for b in work.buckets]
        work.lrs = [self._group_lr(gi, group, device) for gi, group in enumerate(self.param_groups)]
        work.hyper = [self._hyper(group) for group in self.param_groups]

    def _group_lr(self, gi, group, device):
        lr = group["lr"]
        if isinstance(lr, Schedule):
            if self._noam_device(group) != device:
                return GroupLR(LR_FLOAT)  # the group has no tensor here; its counter is elsewhere
            counter = group.get(lr.COUNTER_KEY)
            if counter is None or counter.device != device:
                counter = (
                    torch.zeros((), dtype=torch.float32, device=device)
                    if counter is None
                    else counter.to(device=device, dtype=torch.float32)
                )
                group[lr.COUNTER_KEY] = counter
            if isinstance(lr, Noam):
                return GroupLR(LR_NOAM, noam=lr, counter=counter)
            params = lr.device_params(device)
            return GroupLR(LR_SCHEDULE, lr.lr, schedule=lr, counter=counter, params=params)
        if isinstance(lr, torch.Tensor):
            if lr.device == device and lr.dtype == torch.float32:
                return GroupLR(LR_TENSOR, tensor=lr.reshape(()))
            if lr.device.type == "cpu":
                return GroupLR(LR_FLOAT, value=float(lr))  # a host read, not a device sync
            return GroupLR(LR_TENSOR, tensor=lr.reshape(()).to(device=device, dtype=torch.float32))
        return GroupLR(LR_FLOAT, value=float(lr))

    @property
    def last_grad_norm(self):
        """The global grad norm of the last step with ``max_grad_norm`` (a 0-d device tensor
        snapshot, read without a sync; None before). A step GradScaler skipped keeps the last."""
        return None if self._last_grad_norm is None else self._last_grad_norm.clone()

    def _set_last_lr(self, work, last):
        """Backends call this with a [n_groups] device tensor of the lrs ``work`` used."""
        for gi, glr in enumerate(work.lrs):
            if glr.mode != LR_FLOAT:
                self._last_lr[gi] = last[gi]


PRECISION_DEFAULTS = {
    "master_weights": False,
    "state_dtype": None,
    "stochastic_rounding": False,
    # state_dtype=torch.uint8: tensors with fewer elements keep fp32 state (bitsandbytes' default)
    "min_8bit_size": 4096,
}


def _check_precision(group):
    """The low-precision options a group may set (see FusedOptimizer's docstring)."""
    if group["state_dtype"] not in (None, *_SUPPORTED_DTYPES, torch.uint8):
        raise ValueError(
            f"Invalid state_dtype: {group['state_dtype']} (float32, bfloat16, float16, "
            "uint8 (8-bit) or None)"
        )
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"Invalid min_8bit_size: {size!r} (an int >= 0)")
    master = group["master_weights"]
    if not (isinstance(master, bool) or master in COMPRESSED_MASTERS):
        raise ValueError(
            f"Invalid master_weights: {master!r} (True: an fp32 copy; 'int16' or 'int8': the bf16 "
            "parameter plus a 16- or 8-bit error term; False)"
        )
    if group["stochastic_rounding"] and group["master_weights"]:
        raise ValueError(
            "stochastic_rounding rounds bf16 parameters that have no fp32 master copy; with "
            "master_weights=True the master already keeps every bit. Choose one."
        )


def nonnegative(value):
    """torch.optim's ``0.0 <= value`` test, which also rejects NaN; fusedopt rejects inf too."""
    return 0.0 <= value < math.inf


def check_common(lr, eps, weight_decay, in_step=False):
    """The checks torch.optim's Adam/AdamW/RMSprop share, with torch's messages."""
    check_lr(lr, in_step)
    if not nonnegative(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not nonnegative(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_lr(lr, in_step=False):
    """torch.optim's lr check: a 1-element tensor or a float >= 0 (or a fusedopt schedule)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not (in_step and lr.device.type != "cpu"):  # reading a device lr in step() would sync
            if not nonnegative(float(lr)):
                raise ValueError(f"Invalid learning rate: {lr}")
    elif not isinstance(lr, Schedule) and not nonnegative(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
