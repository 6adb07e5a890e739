"""The Triton backend: ``fusedopt.kernels``, one prologue plus one launch per dtype bucket."""

import importlib

import torch

from .. import _layout as L
from .._tables import tables_for
from .native import state_flags


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
        if self._kernels is None:
            from ..kernels import adam, multi_tensor, rmsprop

            self._kernels = (adam, rmsprop, multi_tensor)
        return self._kernels

    def supports(self, bucket):
        return True

    def unavailable(self, device):
        err = _import_error()
        if err:
            return err
        interpreted = self._load()[2].INTERPRETED
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

    def _tables(self, opt, work, columns):
        return tables_for(opt, self.name, work, columns, self._load()[2].CHUNK)

    def run(self, opt, work):
        adam, rmsprop, _ = self._load()
        if opt._op == "adam":
            tables = self._tables(opt, work, L.ADAM_COLS)
            (has_amsgrad,) = state_flags(work, True)
            adam.adam_step(tables, work.amp, has_amsgrad=has_amsgrad)
        else:
            tables = self._tables(opt, work, L.RMSPROP_COLS)
            has_centered, has_momentum = state_flags(work, False)
            rmsprop.rmsprop_step(
                tables, work.amp, has_centered=has_centered, has_momentum=has_momentum
            )
        opt._set_last_lr(work, tables.glr)
        if work.amp["max_norm"] is not None:
            opt._last_grad_norm = tables.clip[L.CLIP_NORM]
