"""``python -m fusedopt.bench``: optimizer-step microbenchmarks against torch.optim.

On the default device (CUDA when present, else CPU), for real parameter shapes (presets), it times
one optimizer step of every available fusedopt backend and of torch.optim's variants (for-loop,
foreach, fused where torch has it, a ``torch.compile``d step with ``--compile``, apex's FusedAdam
when installed), all in the same run. Providers take turns step by step, so a slow spell of the
machine hits all alike. Each row reports the median time per step (CUDA events on a GPU), the
bandwidth it implies under the bytes-per-parameter model (each input read once, each output written
once), that as a percentage of a device copy measured in the same rounds, and the speedup over
torch's fastest variant. Results go to CSV, JSON and a markdown table (and a PNG with ``--plot``).

    python -m fusedopt.bench --quick     # the main job: about 1.5 minutes on 2 CPU cores
    python -m fusedopt.bench --preset gpt2-small --optimizer adamw --dtype bfloat16
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from . import __version__, backends, schedules
from .schedule import Noam

# ------------------------------------------------------------------------------------- presets


def _transformer_base():
    """ "Attention is All You Need", base: d_model 512, d_ff 2048, 6 + 6 layers, a 37000-token
    vocabulary shared by both embeddings and the pre-softmax projection (one matrix)."""
    d, ff = 512, 2048
    attention = [(d, d), (d,)] * 4  # q, k, v, out projections with biases
    ffn = [(d, ff), (ff,), (ff, d), (d,)]
    norm = [(d,), (d,)]
    encoder = (attention + ffn + norm * 2) * 6
    decoder = (attention * 2 + ffn + norm * 3) * 6
    return [(37000, d)] + encoder + decoder + norm * 2


def _gpt2_small():
    """GPT-2 small (124M): 50257-token vocabulary, 1024 positions, 12 layers of width 768."""
    d = 768
    layer = [
        (d,),
        (d,),
        (d, 3 * d),
        (3 * d,),
        (d, d),
        (d,),
        (d,),
        (d,),
        (d, 4 * d),
        (4 * d,),
        (4 * d, d),
        (d,),
    ]
    return [(50257, d), (1024, d)] + layer * 12 + [(d,), (d,)]


def _llama_1b():
    """A Llama-style 1B model (Llama 3.2 1B's shapes): 128256-token tied embedding, 16 layers of
    width 2048, grouped-query attention with 512-wide k/v, SwiGLU MLP of width 8192."""
    d, kv, ff = 2048, 512, 8192
    layer = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(128256, d)] + layer * 16 + [(d,)]


PRESETS = {
    "transformer-base": ("AIAYN Transformer base (63M)", _transformer_base),
    "gpt2-small": ("GPT-2 small (124M)", _gpt2_small),
    "llama-1b": ("Llama-style 1B", _llama_1b),
    "many-small": ("10,000 tensors of 4,096 elements", lambda: [(4096,)] * 10000),
    "huge": ("one tensor of 2^28 elements", lambda: [(2**28,)]),
    "uniform-16m": ("8 tensors of 2M elements", lambda: [(2_000_000,)] * 8),
    "tiny": ("a few small tensors (for tests)", lambda: [(64, 32), (32,), (1000,), (1,)]),
}
QUICK_PRESETS = ("transformer-base", "many-small")
# "train-step": the optimizer's share of a Transformer training step, Noam lr + clipping + AdamW:
# fusedopt's AdamW(lr=Noam, max_grad_norm) against torch's LambdaLR + clip_grad_norm_ + AdamW.
# "-cosine": the lr of transformers' get_cosine_schedule_with_warmup instead (fusedopt.schedules.
# cosine in the kernel, against torch's AdamW stepping that scheduler on the host, its time
# included).
OPTIMIZERS = (
    "adam",
    "adamw",
    "rmsprop",
    "sgd",
    "sgd-momentum",
    "adamw-noam",
    "adamw-cosine",
    "train-step",
    "train-step-cosine",
)
# the in-kernel schedule of each scheduled optimizer
SCHEDULED = {
    "adamw-noam": "noam",
    "train-step": "noam",
    "adamw-cosine": "cosine",
    "train-step-cosine": "cosine",
}
# the optimizer's own arguments in a case (the same for fusedopt and torch)
OPTION_KWARGS = {"sgd-momentum": {"momentum": 0.9}}
CLIP_NORM = 1.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ------------------------------------------------------------------------- bytes and roofline


def bytes_per_param(
    optimizer,
    dtype,
    amsgrad=False,
    momentum=False,
    centered=False,
    state_dtype=None,
    master=False,
    error_bits=0,
):
    """Bytes one fused pass moves per parameter: every input read once, every output written once.

    Adam/AdamW read p, g, m, v and write p, m, v; AMSGrad adds a read and a write of v_max.
    RMSprop reads p, g, v and writes p, v; momentum and centered add a read and a write each.
    SGD reads p, g and writes p; momentum adds a read and a write of the buffer.
    fp32 AdamW: 28 B, with AMSGrad 36 B; RMSprop: 20 B; SGD: 12 B, with momentum 20 B;
    all-bf16 AdamW: 14 B. The training step
    (clipping + AdamW) adds one read of the grads for the norm: 32 B. State in ``state_dtype``
    (fp32 params, bf16 moments: 20 B); with an fp32 ``master``, p is read and written in fp32 and
    the parameter written once more in its own dtype (bf16 params, fp32 master and moments: 28 B).
    8-bit state (``state_dtype=torch.uint8``, fusedopt/quant8.py): a byte per element plus a
    float32 absmax per 256 (fp32 params, 8-bit moments: 16 + 4 * 4/256 = 16.0625 B). A compressed
    master (``error_bits`` 8 or 16, fusedopt/_master.py) reads and writes its error term beside
    the parameter (bf16 params, int16 error, fp32 moments: 26 B; int8 error, 8-bit moments:
    12.06 B).
    """
    size = torch.empty((), dtype=dtype).element_size()
    if state_dtype == torch.uint8:
        state = 1 + 4 / 256  # the codes, and each block's absmax read and written once
    else:
        state = torch.empty((), dtype=state_dtype or dtype).element_size()
    p_read, p_write = (4, 4 + size) if master else (size, size)
    p_read, p_write = p_read + error_bits // 8, p_write + error_bits // 8
    train_step = optimizer.startswith("train-step")
    if optimizer.startswith("adam") or train_step:
        states = 2 + (1 if amsgrad else 0)
        extra = size if train_step else 0  # the norm pass reads every grad
    elif optimizer == "rmsprop":
        states = 1 + (1 if momentum else 0) + (1 if centered else 0)
        extra = 0
    elif optimizer.startswith("sgd"):  # "sgd-momentum" keeps a momentum buffer
        states = 1 if momentum or optimizer == "sgd-momentum" else 0
        extra = 0
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    return p_read + size + p_write + 2 * states * state + extra


def roofline_seconds(n_params, bytes_each, bandwidth):
    """The least time a step can take: all its bytes at the device's copy bandwidth (B/s)."""
    return n_params * bytes_each / bandwidth


def achieved(n_params, bytes_each, seconds):
    """Bandwidth (B/s) a step of ``seconds`` implies under the bytes model."""
    return n_params * bytes_each / seconds


# ------------------------------------------------------------------------------- providers


def _make_params(shapes, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype) * 1e-3
        params.append(p)
    return params


def _torch_variants(optimizer, device):
    variants = {"torch for-loop": {"foreach": False}, "torch foreach": {"foreach": True}}
    if optimizer != "rmsprop":  # torch has no fused RMSprop
        variants["torch fused"] = {"fused": True}
    return variants


NOAM = Noam(d_model=512, warmup=4000)
LR = 1e-4
COSINE_WARMUP, COSINE_TOTAL = 2000, 100_000
COSINE = schedules.cosine(LR, COSINE_WARMUP, COSINE_TOTAL)


def _host_scheduler(kind, opt):
    """The host-side scheduler torch.optim needs for ``kind`` (SCHEDULED's values)."""
    if kind == "noam":  # opt built with lr=1.0
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: NOAM.rate(e + 1))
    try:
        from transformers import get_cosine_schedule_with_warmup  # noqa: PLC0415
    except ImportError:  # the same lambda, as LambdaLR steps it
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: COSINE.rate(e + 1) / LR)
    return get_cosine_schedule_with_warmup(opt, COSINE_WARMUP, COSINE_TOTAL)


# --precision: the fusedopt options of each mode, and the parameter dtype it implies
PRECISIONS = {
    "plain": ({}, None),
    "bf16-state": ({"state_dtype": torch.bfloat16}, torch.float32),
    "master": ({"master_weights": True}, torch.bfloat16),
    "stochastic": ({"stochastic_rounding": True}, torch.bfloat16),
    # fp32 params, 8-bit moments; bitsandbytes' and torchao's 8-bit optimizers run beside it
    # where installed (_eight_bit_providers)
    "8bit-state": ({"state_dtype": torch.uint8}, torch.float32),
    # compressed masters (fusedopt/_master.py): bf16 params and an int16 error term, fp32
    # moments; FlashOptim's set-up, an int8 error term and 8-bit moments
    "master-int16": ({"master_weights": "int16"}, torch.bfloat16),
    "master-int8-8bit": ({"master_weights": "int8", "state_dtype": torch.uint8}, torch.bfloat16),
}


def _eight_bit_providers(base, device):
    """bitsandbytes' (0.50: CPU and CUDA) and torchao's (Adam and AdamW) 8-bit optimizers for
    ``base``, where installed: blockwise 8-bit moments (256 elements a block) for tensors of
    4096 elements or more, as fusedopt's 8-bit state (issue 24)."""
    out = {}
    bnb_names = {
        "adam": ("Adam8bit", {}),
        "adamw": ("AdamW8bit", {}),
        "rmsprop": ("RMSprop8bit", {}),
        "sgd-momentum": ("SGD8bit", OPTION_KWARGS.get("sgd-momentum", {})),
    }
    if base in bnb_names:
        try:
            import bitsandbytes  # noqa: PLC0415 - an optional provider
        except Exception:  # noqa: BLE001 - not installed or broken: skip the provider
            bitsandbytes = None
        if bitsandbytes is not None:
            cls_name, kwargs = bnb_names[base]
            cls = getattr(bitsandbytes.optim, cls_name)
            out[f"bitsandbytes {cls_name}"] = lambda params, cls=cls: (
                cls(params, lr=LR, min_8bit_size=4096, **kwargs).step
            )
    if base in ("adam", "adamw"):
        try:
            from torchao import optim as ao_optim  # noqa: PLC0415 - an optional provider
        except Exception:  # noqa: BLE001
            ao_optim = None
        if ao_optim is not None:
            cls = ao_optim.AdamW8bit if base == "adamw" else ao_optim.Adam8bit
            out[f"torchao {cls.__name__}"] = lambda params, cls=cls: (
                cls(params, lr=LR, block_size=256).step
            )
    return out


def _leaves(t):
    """A tensor's plain tensors: a subclass (torchao's 8-bit state, a DTensor) by its inner tensors
    (``__tensor_flatten__``), so that what it stores is counted, not the dtype it shows."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [leaf for n in names for leaf in _leaves(getattr(t, n))]
    return [t]


def state_bytes(opt):
    """Bytes held by the tensors in ``opt.state`` (moments, codes, absmaxes, quantization maps,
    master copies and error terms, step counters), each storage once (a map shared by every
    tensor's state, as bitsandbytes' and torchao's are, counts once): the optimizer's memory as
    measured, beside the bytes model."""
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if not isinstance(v, torch.Tensor):
                continue
            for leaf in _leaves(v):
                storage = leaf.untyped_storage()
                seen[(leaf.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_of(step):
    """The optimizer behind a provider's step function (a bound ``step``, or one that names it in
    an ``optimizer`` attribute), or None."""
    opt = getattr(step, "optimizer", None) or getattr(step, "__self__", None)
    return opt if hasattr(opt, "state") else None


def _factories(optimizer, device, dtype, names, compile_torch, precision="plain"):
    """provider name -> function(params) -> step function. ``names``: fusedopt backends."""
    scheduled = SCHEDULED.get(optimizer)
    base = "adamw" if scheduled else optimizer
    clip = CLIP_NORM if optimizer.startswith("train-step") else None
    fcls = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "sgd": "SGD"}[
        base.removesuffix("-momentum")
    ]
    hyper = OPTION_KWARGS.get(base, {})
    out = {}
    for name in names:
        lr = {"noam": NOAM, "cosine": COSINE}.get(scheduled, LR)

        def make(params, name=name, lr=lr):
            return getattr(__import__("fusedopt"), fcls)(
                params,
                lr=lr,
                backend=name,
                max_grad_norm=clip,
                **hyper,
                **PRECISIONS[precision][0],
            ).step

        out[f"fusedopt {name}"] = make

    def torch_step(kwargs):
        def make(params):
            if scheduled:
                lr = 1.0 if scheduled == "noam" else LR
                opt = getattr(torch.optim, fcls)(params, lr=lr, **kwargs)
                sched = _host_scheduler(scheduled, opt)

                def step():
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()
                    sched.step()

                step.optimizer = opt
                return step
            return getattr(torch.optim, fcls)(params, lr=LR, **hyper, **kwargs).step

        return make

    for label, kwargs in _torch_variants(base, device).items():
        out[label] = torch_step(kwargs)
    if compile_torch:

        def make_compiled(params):
            opt = getattr(torch.optim, fcls)(
                params, lr=torch.tensor(LR, device=device), foreach=True, **hyper
            )
            step = torch.compile(opt.step, fullgraph=False)
            step.optimizer = opt
            return step

        out["torch compile"] = make_compiled
    if precision == "8bit-state" and not scheduled:
        out.update(_eight_bit_providers(base, device))
    try:  # apex's FusedAdam, when installed (CUDA only)
        from apex.optimizers import FusedAdam  # noqa: PLC0415
    except Exception:  # noqa: BLE001 - not installed or broken: skip the provider
        FusedAdam = None
    if FusedAdam is not None and device.type == "cuda" and base in ("adam", "adamw"):
        out["apex FusedAdam"] = lambda params: (
            FusedAdam(params, lr=LR, adam_w_mode=base != "adam").step
        )
    return out


def fusedopt_backends(device, include_interpreter=False):
    """The fusedopt backends available on ``device`` (the Triton interpreter only on request)."""
    names = []
    for name in backends.BACKENDS:
        if backends.unavailable(name, device) is not None:
            continue
        if name == "triton" and device.type == "cpu" and not include_interpreter:
            continue
        names.append(name)
    return names


# --------------------------------------------------------------------------------- timing


class Timer:
    """Times calls on one device: CUDA events on a GPU, the host clock on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = {}

    def time(self, name, fn):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.pending.setdefault(name, []).append(time.perf_counter() - t0)

    def results(self):
        if self.cuda:
            torch.cuda.synchronize()
            return {n: [s.elapsed_time(e) / 1e3 for s, e in v] for n, v in self.pending.items()}
        return dict(self.pending)


def interleaved(fns, device, repeats, warmup, progress=None):
    """Median seconds per call of each function, the functions taking turns round after round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    timer = Timer(device)
    for r in range(repeats):
        for name, fn in fns.items():
            timer.time(name, fn)
        if progress:
            progress(r + 1, repeats)
    return {name: statistics.median(ts) for name, ts in timer.results().items()}


def _copy_fn(n_bytes, device):
    n = max(1, n_bytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * n * 4  # bytes read + written


def _cache_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text.rstrip("KM")) * (1024 if text.endswith("K") else 1024 * 1024)
    except (OSError, ValueError):
        return 32 * 2**20


class Progress:
    """A one-line progress bar on stderr, for runs that take a while."""

    def __init__(self, label, enabled):
        self.label, self.enabled, self.t0 = label, enabled, time.perf_counter()

    def __call__(self, done, total):
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{time.perf_counter() - self.t0:5.1f}s"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------------- running


def run_case(
    preset,
    optimizer,
    dtype,
    device,
    names,
    repeats,
    warmup,
    compile_torch=False,
    show_progress=False,
    precision="plain",
):
    """Rows for one (preset, optimizer, dtype) on ``device``; ``precision``: a PRECISIONS mode of
    the fusedopt providers (the torch ones keep every tensor in the parameters' dtype)."""
    shapes = PRESETS[preset][1]()
    n_params = sum(math.prod(s) for s in shapes)
    options = PRECISIONS[precision][0]
    bytes_each = bytes_per_param(
        optimizer,
        dtype,
        state_dtype=options.get("state_dtype"),
        master=options.get("master_weights") is True,
        error_bits={"int8": 8, "int16": 16}.get(options.get("master_weights"), 0),
    )
    # Inputs rotate among enough parameter sets that the working set exceeds twice the last-level
    # cache: a small preset does not get to run from cache.
    copies = min(8, max(1, math.ceil(2 * _cache_bytes(device) / (n_params * bytes_each))))
    param_sets = [_make_params(shapes, dtype, device, seed) for seed in range(copies)]
    fns = {}
    stored = {}  # provider -> optimizer state bytes per parameter, measured after a step
    factories = _factories(optimizer, device, dtype, names, compile_torch, precision)
    for label, make in factories.items():
        try:
            steps = [make(ps) for ps in param_sets]
            steps[0]()  # fail here, not in the timed rounds
        except Exception as e:  # noqa: BLE001 - a provider that cannot run this case is skipped
            print(f"  skipped {label}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        opt = optimizer_of(steps[0])
        stored[label] = state_bytes(opt) / n_params if opt is not None else None
        state = {"i": 0}

        def rotating(steps=steps, state=state):
            steps[state["i"] % len(steps)]()
            state["i"] += 1

        fns[label] = rotating
    copy, copy_bytes = _copy_fn(int(n_params * bytes_each) // 2, device)
    fns = {"(copy)": copy, **fns}
    label = f"{preset} {optimizer} {str(dtype).removeprefix('torch.')}"
    times = interleaved(fns, device, repeats, warmup, Progress(label, show_progress))
    bandwidth = copy_bytes / times.pop("(copy)")
    torch_best = min((t for k, t in times.items() if k.startswith("torch")), default=None)
    rows = []
    for provider, seconds in times.items():
        bw = achieved(n_params, bytes_each, seconds)
        rows.append(
            {
                "preset": preset,
                "optimizer": optimizer,
                "precision": precision,
                "dtype": str(dtype).removeprefix("torch."),
                "provider": provider,
                "params": n_params,
                "tensors": len(shapes),
                "bytes_per_param": bytes_each,
                "state_bytes_per_param": stored.get(provider),
                "ms": seconds * 1e3,
                "gb_s": bw / 1e9,
                "copy_gb_s": bandwidth / 1e9,
                "pct_copy": 100 * bw / bandwidth,
                "roofline_ms": roofline_seconds(n_params, bytes_each, bandwidth) * 1e3,
                "speedup_vs_torch_best": torch_best / seconds if torch_best else None,
            }
        )
    del param_sets, fns
    return rows


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fusedopt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu": platform.processor() or None,
        "threads": torch.get_num_threads(),
    }
    try:
        env["triton"] = __import__("triton").__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), env["cpu"]
            )
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                .stdout.split("\n")[0]
                .strip()
            )
        except (OSError, subprocess.TimeoutExpired):
            env["driver"] = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


COLUMNS = (
    "preset",
    "optimizer",
    "precision",
    "dtype",
    "provider",
    "params",
    "tensors",
    "bytes_per_param",
    "state_bytes_per_param",
    "ms",
    "gb_s",
    "copy_gb_s",
    "pct_copy",
    "roofline_ms",
    "speedup_vs_torch_best",
)


def markdown(rows, env):
    head = (
        f"device {env.get('gpu') or env.get('cpu') or env['device']}, torch {env['torch']}, "
        f"CUDA {env['cuda']}, triton {env['triton']}, fusedopt {env['fusedopt']} "
        f"({env.get('git_commit')}), {env['date']}"
    )
    lines = [
        head,
        "",
        "| preset | optimizer | dtype | provider | ms/step | GB/s | % of copy | vs torch best "
        "| B/param moved | state B/param |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        speedup = f"{r['speedup_vs_torch_best']:.2f}x" if r["speedup_vs_torch_best"] else "-"
        mode = "" if r.get("precision", "plain") == "plain" else f" ({r['precision']})"
        stored = r.get("state_bytes_per_param")
        stored = "-" if stored is None else f"{stored:.2f}"
        lines.append(
            f"| {r['preset']} | {r['optimizer']}{mode} | {r['dtype']} | {r['provider']} | "
            f"{r['ms']:.3f} | {r['gb_s']:.1f} | {r['pct_copy']:.0f}% | {speedup} | "
            f"{r['bytes_per_param']:.2f} | {stored} |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows, env, out_dir, stem):
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("csv", "json", "md")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS) + sorted(env))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    with open(paths["json"], "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(markdown(rows, env))
    return paths


def plot(rows, path):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}); pip install matplotlib") from e
    cases = list(dict.fromkeys((r["preset"], r["optimizer"], r["dtype"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(6 + 2.5 * len(cases), 4.5))
    width = 0.8 / max(1, len(providers))
    for k, provider in enumerate(providers):
        for ax, key in zip(axes, ("ms", "pct_copy")):
            xs, ys = [], []
            for i, case in enumerate(cases):
                match = [
                    r
                    for r in rows
                    if (r["preset"], r["optimizer"], r["dtype"]) == case
                    and r["provider"] == provider
                ]
                if match:
                    xs.append(i + k * width)
                    ys.append(match[0][key])
            ax.bar(xs, ys, width, label=provider)
    for ax, title in zip(
        axes, ("time per step (ms, lower is better)", "% of copy bandwidth (higher is better)")
    ):
        ax.set_title(title)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(["\n".join(c) for c in cases], fontsize=8)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="python -m fusedopt.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESETS),
        help="repeatable; default: all but 'tiny' (with --quick: " + ", ".join(QUICK_PRESETS) + ")",
    )
    ap.add_argument(
        "--optimizer",
        action="append",
        choices=OPTIMIZERS,
        help="repeatable; default: adamw (with --quick: adamw, rmsprop)",
    )
    ap.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: float32")
    ap.add_argument(
        "--precision",
        action="append",
        choices=list(PRECISIONS),
        help="fusedopt's low-precision modes (repeatable): bf16-state (fp32 params, bf16 moments),"
        " master (bf16 params, fp32 master and moments), stochastic (bf16 params, stochastic "
        "rounding), 8bit-state (fp32 params, 8-bit moments, beside bitsandbytes' and torchao's "
        "8-bit optimizers where installed), master-int16 (bf16 params, int16 error term, fp32 "
        "moments), master-int8-8bit (bf16 params, int8 error term, 8-bit moments); torch's "
        "providers run the same parameters in their "
        "own dtype. Default: plain",
    )
    ap.add_argument(
        "--backend",
        action="append",
        choices=sorted(backends.BACKENDS),
        help="fusedopt backends to time (default: every available one)",
    )
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; quick 5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--quick", action="store_true", help="a short run (about 1.5 minutes on 2 CPU cores)"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time a torch.compile'd torch step (slow to compile)",
    )
    ap.add_argument(
        "--out",
        default=os.path.join("benchmarks", "results"),
        help="directory for the CSV/JSON/markdown (and PNG) files",
    )
    ap.add_argument("--plot", action="store_true", help="also draw a PNG (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    presets = args.preset or (
        list(QUICK_PRESETS) if args.quick else [p for p in PRESETS if p != "tiny"]
    )
    optimizers = args.optimizer or (
        ["adamw", "rmsprop", "train-step"] if args.quick else ["adamw", "train-step"]
    )
    dtypes = [DTYPES[d] for d in (args.dtype or ["float32"])]
    repeats = args.repeats or (5 if args.quick else 20)
    names = args.backend or fusedopt_backends(device)
    for name in names:
        backends.require(name, device)
    env = environment(device)
    print(
        f"fusedopt {env['fusedopt']} on {env.get('gpu') or env.get('cpu') or device}; "
        f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}; "
        f"fusedopt backends: {', '.join(names)}"
    )
    rows = []
    show = not args.no_progress and sys.stderr.isatty()
    for preset in presets:
        for optimizer in optimizers:
            for precision in args.precision or ["plain"]:
                implied = PRECISIONS[precision][1]
                for dtype in [implied] if implied is not None else dtypes:
                    rows += run_case(
                        preset,
                        optimizer,
                        dtype,
                        device,
                        names,
                        repeats,
                        args.warmup,
                        args.compile,
                        show,
                        precision,
                    )
    print(markdown(rows, env))
    stem = f"bench_{device.type}_{env['date'][:10]}" + ("_quick" if args.quick else "")
    paths = write_results(rows, env, args.out, stem)
    if args.plot:
        paths["png"] = plot(rows, os.path.join(args.out, f"{stem}.png"))
    print("wrote " + ", ".join(paths.values()))
    return rows


if __name__ == "__main__":
    main()
