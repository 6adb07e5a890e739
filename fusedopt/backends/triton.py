"""The Triton backend: ``fusedopt.kernels``, one prologue plus one launch per dtype bucket."""

import importlib

import torch

from .. import _layout as L
from .._tables import tables_for
from .native import state_mask


def _import_error():
    try:
        importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001 - any failure to import means "not available"
        return f"triton is not importable ({type(e).__name__}: {e})"
    try:
        importlib.import_module("fusedopt.kernels")
    except Exception as e:  # noqa: BLE001
        # kernels/ becomes fusedopt.kernels only when fusedopt is installed (pip install -e .)
        return f"fusedopt.kernels is not importable ({type(e).__name__}: {e}); install fusedopt"
    return None


class TritonBackend:
    name = "triton"

    def __init__(self):
        self._kernels = None

    def _load(self):
        """fusedopt.kernels.multi_tensor, and each optimizer's kernel module by name."""
        if self._kernels is None:
            multi_tensor = importlib.import_module("fusedopt.kernels.multi_tensor")
            ops = {op: importlib.import_module(f"fusedopt.kernels.{op}") for op in L.OPTIMIZERS}
            self._kernels = (multi_tensor, ops)
        return self._kernels

    def supports(self, bucket):
        return True

    def unavailable(self, device):
        err = _import_error()
        if err:
            return err
        interpreted = self._load()[0].INTERPRETED
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if interpreted:
                return "TRITON_INTERPRET=1 is set: Triton would run its CPU interpreter"
            return None
        if device.type == "cpu":
            if interpreted:
                return None
            return (
                "Triton runs on CPU tensors only through its interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported"
            )
        return f"no Triton support for {device.type} tensors in fusedopt"

    def run(self, opt, work):
        multi_tensor, ops = self._load()
        tables = tables_for(opt, self.name, work, opt._columns, multi_tensor.CHUNK)
        ops[opt._op].step(tables, work.amp, state_mask(work))
        opt._set_last_lr(work, tables.glr)
        if work.amp["max_norm"] is not None:
            opt._last_grad_norm = tables.clip[L.CLIP_NORM]
