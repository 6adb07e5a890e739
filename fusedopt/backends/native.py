"""The native backends: ``"cpu"`` (vectorized, multithreaded C++) and ``"cuda"`` (CUDA C++).

Both run the op ``torch.ops.fusedopt.step`` declared in csrc/binding.cpp (one for every optimizer:
``optimizer`` names it, fusedopt/_layout.py's OPTIMIZERS), over the same metadata tables as the
Triton kernels: one prologue, then one pass per dtype bucket.
The libraries are loaded on first use; a library that is missing or fails to load makes its backend
unavailable, with the reason, and the rest of fusedopt keeps working.
"""

import os

import torch

from .. import _layout as L
from .._layout import Bucket
from .._tables import tables_for

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOADED = {}  # library name -> None (loaded) or the reason it is not


def load(name):
    """Load ``fusedopt/<name>.so`` once; return None, or why it is unavailable."""
    if name not in _LOADED:
        path = os.path.join(_HERE, f"{name}.so")
        if not os.path.exists(path):
            why = (
                "torch is a CPU-only build, and the CUDA library is built only against a CUDA torch"
                if name == "_cuda" and not torch.version.cuda
                else "pip install --no-build-isolation . builds it"
            )
            _LOADED[name] = f"fusedopt/{name}.so was not built ({why})"
        elif (mismatch := _built_for_other_torch()) is not None:
            _LOADED[name] = mismatch
        elif name == "_cuda" and (mismatch := _built_for_other_cuda()) is not None:
            _LOADED[name] = mismatch
        else:
            try:
                if name != "_C":
                    reason = load("_C")  # the op schemas live there
                    if reason:
                        raise RuntimeError(reason)
                torch.ops.load_library(path)
                if name == "_C":
                    _register_fakes()
                _LOADED[name] = None
            except Exception as e:  # noqa: BLE001 - any failure means "unavailable", with why
                _LOADED[name] = f"fusedopt/{name}.so failed to load ({type(e).__name__}: {e})"
    return _LOADED[name]


def _native_buckets():
    """The buckets csrc/ has kernels for (the CPU dispatch in csrc/cpu/, and
    csrc/cuda/multi_tensor.cuh's SupportedBuckets): each dtype alone; fp32 parameters with bf16
    or fp16 state; an fp32 master for bf16/fp16 parameters (fp32 or bf16 state); bf16
    parameters with fp32 state; stochastic rounding of bf16 parameters (bf16 or fp32 state)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    buckets = [Bucket(d, d, d, False, False) for d in (f32, bf16, f16)] + [
        Bucket(f32, f32, bf16, False, False),
        Bucket(f32, f32, f16, False, False),
        Bucket(f32, bf16, f32, True, False),
        Bucket(f32, f16, f32, True, False),
        Bucket(f32, bf16, bf16, True, False),
        Bucket(bf16, bf16, f32, False, False),
        Bucket(bf16, bf16, bf16, False, True),
        Bucket(bf16, bf16, f32, False, True),
    ]
    return frozenset(L.bucket_code(b) for b in buckets)


NATIVE_BUCKETS = _native_buckets()


# The 8-bit state buckets (uint8 codes; csrc/cpu/multi_tensor.h's with_bucket), as (param, grad,
# shadow, stochastic): fp32 parameters, fp32 masters of bf16 parameters, bf16 parameters (rounded
# to nearest or stochastically), on CPU and CUDA (NativeBackend.auto_supports: not yet by "auto").
EIGHT_BIT_BUCKETS = frozenset(
    L.bucket_code(Bucket(param, grad, torch.uint8, shadow, stochastic))
    for param, grad, shadow, stochastic in (
        (torch.float32, torch.float32, False, False),
        (torch.float32, torch.bfloat16, True, False),
        (torch.bfloat16, torch.bfloat16, False, False),
        (torch.bfloat16, torch.bfloat16, False, True),
    )
)


def build_info():
    """What the libraries were built against (fusedopt/_build_info.py), or None if unknown."""
    try:
        from .._build_info import BUILD  # noqa: PLC0415 - written by setup.py
    except ImportError:
        return None
    return BUILD


def _built_for_other_torch():
    """Why the libraries must not be loaded into this torch (their C++ ABI is torch's own), or
    None. Loading one built for another torch could crash; this says so and falls back."""
    info = build_info()
    if info is None:
        return None
    built, running = (
        ".".join(v.split("+")[0].split(".")[:2]) for v in (info["torch"], torch.__version__)
    )
    if built != running:
        return (
            f"the compiled libraries were built for torch {info['torch']} (CUDA "
            f"{info['cuda'] or 'none'}), and this is torch {torch.__version__}: install the "
            "wheel built for this torch, or rebuild (pip install --no-build-isolation .)"
        )
    return None


def _built_for_other_cuda():
    """Why the CUDA library must not be loaded into this torch, or None: it links the CUDA
    runtime of the major version it was built with (libcudart.so.13 for CUDA 13.x), which is the
    one torch's CUDA build brings; under a torch of another CUDA major version, or a CPU-only
    torch, that runtime is not there, and the loader's own error would not say why."""
    info = build_info()
    if info is None or not info.get("cuda"):
        return None
    wheel = "a fusedopt built for this torch (pip install --no-build-isolation . builds one)"
    if not torch.version.cuda:
        return (
            f"fusedopt/_cuda.so was built for CUDA {info['cuda']} (torch {info['torch']}), and "
            f"this torch ({torch.__version__}) is a CPU-only build: install torch's CUDA build, "
            f"or {wheel}"
        )
    if info["cuda"].split(".")[0] != torch.version.cuda.split(".")[0]:
        return (
            f"fusedopt/_cuda.so was built for CUDA {info['cuda']}, and this torch "
            f"({torch.__version__}) uses CUDA {torch.version.cuda}: it needs the CUDA "
            f"{info['cuda'].split('.')[0]} runtime, which this torch does not load. Install {wheel}"
        )
    return None


def _register_fakes():
    """Meta/fake kernels, so torch.compile and torch.library.opcheck can trace the ops: they
    mutate their arguments in place and return nothing."""
    torch.library.register_fake("fusedopt::step")(lambda *args, **kwargs: None)


class NativeBackend:
    # elements per chunk (one unit of work): big enough to amortize the per-chunk setup, small
    # enough to spread a single large tensor over every thread / SM.
    CHUNK = {"cpu": 16384, "cuda": 65536}

    def __init__(self, name, library):
        self.name = name
        self.library = library

    def supports(self, bucket):
        """The (param, grad, state dtypes, shadow, stochastic, error term) combinations csrc/ has
        kernels for (csrc/cuda/multi_tensor.cuh's SupportedBuckets, the CPU dispatch likewise)."""
        if bucket.error:
            return L.bucket_code(bucket) in COMPRESSED_MASTER_BUCKETS
        if bucket.eight_bit:
            return L.bucket_code(bucket) in EIGHT_BIT_BUCKETS
        return L.bucket_code(bucket) in NATIVE_BUCKETS

    def auto_supports(self, bucket):
        """Whether ``backend="auto"`` may pick this backend for ``bucket``: the CUDA kernels for
        8-bit state and for compressed masters compile (tests/test_cuda_compile.py) but have not
        yet run on a GPU, so they run only when asked for by name (backend="cuda"); "auto" takes
        Triton's for them."""
        return self.supports(bucket) and not (
            self.name == "cuda" and (bucket.eight_bit or bucket.error)
        )

    def unavailable(self, device):
        if device.type != self.name:
            return f"the {self.name!r} backend runs {self.name} tensors only"
        if self.name == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return load(self.library)

    def run(self, opt, work):
        tables = tables_for(opt, self.name, work, opt._columns, self.CHUNK[self.name])
        dtypes = tables.bucket_codes
        stream = torch.cuda.current_stream(work.device).cuda_stream if self.name == "cuda" else 0
        tabs = (
            tables.tmeta,
            tables.grads,
            tables.chunks,
            tables.hyper,
            tables.gptr,
            tables.glr,
            tables.scal,
            tables.partials,
            tables.clip,
            dtypes,
            tables.bucket_offsets,
            tables.chunk,
            work.amp["grad_scale"],
            work.amp["found_inf"],
            work.amp["max_norm"],
        )
        optimizer, mask = L.OPTIMIZERS[opt._op], state_mask(work)
        if work.fast is not None:
            # the plan holds the tensor lists in C++ and calls the op through the dispatcher
            plan, index = work.fast
            plan.run(index, optimizer, *tabs, mask, stream)
        else:
            torch.ops.fusedopt.step(*op_lists(work), *tabs, optimizer, mask, stream)
        opt._set_last_lr(work, tables.glr)
        if work.amp["max_norm"] is not None:
            opt._last_grad_norm = tables.clip[L.CLIP_NORM]


def op_lists(work):
    """The tensor lists of the step ops' schema (csrc/binding.cpp): every tensor the op writes
    (the updated parameters, fp32 masters too, then the model's parameters a master is rounded
    into; the states; the steps; the Noam counters) and the grads."""
    slots = work.slots
    params = [s.param for s in slots] + [s.shadow for s in slots if s.shadow is not None]
    # 8-bit states: each slot's codes, then its absmaxes
    # (and a compressed master's error term), in the order the binding checks them
    states = [
        t
        for s in slots
        for t in (*_interleave(s.states, s.absmax or (None,) * 3), s.error)
        if t is not None
    ]
    steps = [s.step for s in slots]
    counters = [g.counter for g in work.lrs if g.counter is not None]
    grads = [s.grad for s in slots]
    return params, states, steps, counters, grads


# Compressed masters (an int8 or int16 error term beside bf16 parameters; csrc/cpu/
# multi_tensor.h's with_bucket, csrc/cuda/multi_tensor.cuh's SupportedBuckets), with fp32 or 8-bit
# state, on CPU and CUDA (NativeBackend.auto_supports: not yet by "auto" on CUDA).
COMPRESSED_MASTER_BUCKETS = frozenset(
    L.bucket_code(Bucket(torch.bfloat16, torch.bfloat16, state, False, False, bits))
    for state in (torch.float32, torch.uint8)
    for bits in (8, 16)
)


def _interleave(a, b):
    return [t for pair in zip(a, b) for t in pair]


def state_mask(work):
    """Which state slots some tensor of the step has (bit k: slot k): an option that uses a slot
    no tensor has (amsgrad, RMSprop's momentum and centered, SGD's momentum) is compiled out of
    the kernels. Computed once per work (the slots do not change under a plan)."""
    mask = getattr(work, "_state_mask", None)
    if mask is None:
        mask = 0
        for s in work.slots:
            for k, t in enumerate(s.states):
                if t is not None:
                    mask |= 1 << k
        work._state_mask = mask
    return mask
