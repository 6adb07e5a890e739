"""The one place that lists fusedopt's backends, what each supports, and why one is unavailable.

Each backend implements every optimizer op (``adam``, ``rmsprop``) for the devices it supports and
exposes ``unavailable(device) -> str | None``. ``"auto"`` takes, for the parameters' device, the
first available backend of ``PREFERENCE``.
"""

import torch

from .native import NativeBackend
from .reference import TorchBackend
from .triton import TritonBackend

BACKENDS = {
    b.name: b
    for b in (
        NativeBackend("cuda", "_cuda"),
        TritonBackend(),
        NativeBackend("cpu", "_C"),
        TorchBackend(),
    )
}

# Fastest first. On CPU, Triton runs only in its interpreter (a test tool), never by "auto".
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_DEFAULT_PREFERENCE = ("torch",)

NAMES = ("auto",) + tuple(BACKENDS)


def check_name(name):
    if name not in NAMES:
        raise ValueError(f"fusedopt: unknown backend {name!r}; choose one of {', '.join(NAMES)}")


def get(name):
    return BACKENDS[name]


def unavailable(name, device):
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    return BACKENDS[name].unavailable(torch.device(device))


def require(name, device, buckets=()):
    reason = unavailable(name, device)
    if reason is None:
        unsupported = [b for b in buckets if not BACKENDS[name].supports(b)]
        if unsupported:
            reason = f"it has no kernel for {unsupported[0]} (the triton and torch backends do)"
    if reason is not None:
        raise RuntimeError(f"fusedopt: backend {name!r} cannot run on {device}: {reason}")


def select(request, device, buckets=()):
    """The backend that runs parameters on ``device`` for a ``backend=request`` optimizer: the
    request itself, or for "auto" the first available one with kernels for all ``buckets``."""
    if request != "auto":
        return request
    for name in PREFERENCE.get(torch.device(device).type, _DEFAULT_PREFERENCE):
        backend = BACKENDS[name]
        supports = getattr(backend, "auto_supports", backend.supports)
        if unavailable(name, device) is None and all(supports(b) for b in buckets):
            return name
    return "torch"


def report(devices=None):
    """``{backend: {device: reason or None}}``: which backend can run where, and why not."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {name: {str(d): unavailable(name, d) for d in devices} for name in BACKENDS}
