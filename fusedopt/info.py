"""``python -m fusedopt.info``: what fusedopt can run here, and why the rest cannot.

Prints the torch / CUDA / Triton versions, the GPUs, which compiled libraries loaded (and for which
GPU architectures the CUDA one was built), and for every backend and device whether it is
available, with the reason when it is not.
"""

import importlib
import os
import platform
import struct

import torch

from . import __version__, _fatbin, backends
from .backends import native


def _triton_version():
    try:
        return importlib.import_module("triton").__version__
    except Exception as e:  # noqa: BLE001 - report whatever stops the import
        return f"not importable ({type(e).__name__}: {e})"


def _cuda_archs(path):
    """The GPU code embedded in a library, read from its ELF file (fusedopt/_fatbin.py): no CUDA
    toolkit needed."""
    try:
        return _fatbin.describe(path)
    except (OSError, ValueError, struct.error) as e:
        return f"unknown ({type(e).__name__}: {e})"


def report():
    lines = [
        f"fusedopt {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda or 'none (CPU build of torch)'}, triton {_triton_version()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        lines.append("GPU: none visible to torch")
    info = native.build_info()
    if info is not None:
        lines.append(
            f"built: fusedopt {info['version']} against torch {info['torch']}, CUDA "
            f"{info['cuda'] or 'none'}, archs {info['cuda_archs'] or 'none'}, commit "
            f"{info['commit']}, {info['built']}"
        )
    lines.append("compiled libraries:")
    for name, what in (("_C", "op schemas + CPU kernels"), ("_cuda", "CUDA kernels")):
        path = os.path.join(native._HERE, f"{name}.so")
        reason = native.load(name)
        state = "loaded" if reason is None else f"not loaded: {reason}"
        if name == "_cuda" and os.path.exists(path):
            state += f"; holds {_cuda_archs(path)}"
            if reason is None and not torch.cuda.is_available():
                state += " (no GPU visible here, so nothing runs it in this process)"
        lines.append(f"  fusedopt.{name} ({what}): {state}")
    lines.append("backends (auto picks the first available, in this order per device):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        order = backends.PREFERENCE.get(device, ())
        chosen = backends.select("auto", device)
        for name in backends.BACKENDS:
            reason = backends.unavailable(name, device)
            tag = " <- auto" if name == chosen else ""
            auto = "" if name in order else " (never picked by auto)"
            status = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {device:4} {name:7} {status}{auto}{tag}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
