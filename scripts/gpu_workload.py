"""Steps every fused bucket and option of fusedopt on the given backends, small enough to run under
compute-sanitizer, and checks the results; ``--profile`` instead runs a mid-size step for ncu.

    python3 scripts/gpu_workload.py                  # GPU: the cuda and triton backends
    python3 scripts/gpu_workload.py --device cpu     # CPU: the cpu and torch backends
    TRITON_INTERPRET=1 python3 scripts/gpu_workload.py --device cpu   # ... and triton, interpreted
    python3 scripts/gpu_workload.py --profile        # 64M fp32 params, AdamW and RMSprop (ncu)

Each scenario (an optimizer and its options) runs one optimizer whose param groups cover every
bucket the native kernels have (fusedopt/backends/native.py's ``_native_buckets``): fp32, bf16 and
fp16 parameters, bf16/fp16/fp32 state, fp32 masters of bf16/fp16 parameters, stochastic rounding.
Each group holds a view at an odd element offset (with its grad one too: the unaligned path), a
2-D tensor, a 1-element tensor and a zero-element tensor last. Checks, after 3 steps: the fp32
parameters and the fp32 masters against torch.optim on the same grads (torch.optim's reference
clips by the norm of every grad, skips the step whose grads hold an inf, as the GradScaler does,
and takes the Noam lr from LambdaLR), every parameter and state tensor finite, the step
counters, and every backend against the first.
Prints one line per scenario and backend; exits 1 if any check failed.

``--profile`` steps 2^26 fp32 parameters (8 tensors) with AdamW, then RMSprop, on each backend:
one warm-up step of every (optimizer, backend) pair first (4 main-kernel launches with two
backends, which scripts/gpu_check.sh's ncu stage skips), then one timed step of each, in the same
order.
"""

import argparse
import math
import os
import sys
import time

import torch

import fusedopt
from fusedopt import backends
from fusedopt._layout import bucket_code
from fusedopt.backends.native import NATIVE_BUCKETS
from fusedopt.optimizer import _bucket_of

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# One param group per bucket of the native kernels; checked against NATIVE_BUCKETS below.
GROUPS = [
    ("fp32", F32, {}),
    ("bf16", BF16, {}),
    ("fp16", F16, {}),
    ("fp32 bf16-state", F32, {"state_dtype": BF16}),
    ("fp32 fp16-state", F32, {"state_dtype": F16}),
    ("bf16 master", BF16, {"master_weights": True}),
    ("fp16 master", F16, {"master_weights": True}),
    ("bf16 master bf16-state", BF16, {"master_weights": True, "state_dtype": BF16}),
    ("bf16 fp32-state", BF16, {"state_dtype": F32}),
    ("bf16 stochastic", BF16, {"stochastic_rounding": True}),
    ("bf16 stochastic fp32-state", BF16, {"stochastic_rounding": True, "state_dtype": F32}),
]
ODD_VIEW = 1030  # elements of the odd-offset view: more than one 1024-element Triton block
SHAPES = [(ODD_VIEW,), (33, 17), (1,), (0,)]  # the zero-element tensor last
STEPS = 3
INF_STEP = 1  # with a GradScaler: the step whose grads hold an inf (skipped)
SCALE = 2.0**10  # powers of two: scaling and unscaling are exact, so torch's reference matches

# name, optimizer, options; lr "tensor": a 0-d tensor on the device; "noam": fusedopt.Noam(64, 3)
SCENARIOS = [
    ("adamw weight-decay", "AdamW", dict(lr=1e-2, weight_decay=0.1), False),
    (
        "adam amsgrad maximize l2",
        "Adam",
        dict(lr=1e-2, amsgrad=True, maximize=True, weight_decay=0.1),
        False,
    ),
    ("adamw amsgrad gradscaler", "AdamW", dict(lr=1e-2, amsgrad=True), True),
    ("adamw noam clip", "AdamW", dict(lr="noam", max_grad_norm=1.0), False),
    ("adam tensor-lr clip gradscaler", "Adam", dict(lr="tensor", max_grad_norm=1.0), True),
    (
        "rmsprop centered momentum",
        "RMSprop",
        dict(lr=1e-2, centered=True, momentum=0.9, weight_decay=0.1),
        False,
    ),
    ("rmsprop tensor-lr maximize", "RMSprop", dict(lr="tensor", maximize=True), False),
    (
        "rmsprop momentum clip gradscaler",
        "RMSprop",
        dict(lr=1e-2, momentum=0.9, max_grad_norm=1.0),
        True,
    ),
    ("rmsprop noam centered", "RMSprop", dict(lr="noam", centered=True), False),
    (
        "sgd nesterov weight-decay",
        "SGD",
        dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.1),
        False,
    ),
    (
        "sgd dampening tensor-lr clip gradscaler",
        "SGD",
        dict(lr="tensor", momentum=0.9, dampening=0.2, maximize=True, max_grad_norm=1.0),
        True,
    ),
]
NOAM = fusedopt.Noam(64, 3)


def initial_values(scenario_index):
    gen = torch.Generator().manual_seed(1000 * scenario_index)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in GROUPS]


def grad_values(scenario_index, step):
    gen = torch.Generator().manual_seed(1000 * scenario_index + 1 + step)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in GROUPS]


def odd_view(n, dtype, device):
    """``n`` elements at element offset 1 of a fresh buffer: never 16-byte aligned."""
    return torch.zeros(n + 2, dtype=dtype, device=device)[1 : 1 + n]


def make_params(values, device):
    groups = []
    for (_, dtype, _), vals in zip(GROUPS, values):
        ps = []
        for shape, v in zip(SHAPES, vals):
            t = odd_view(v.numel(), dtype, device) if shape == (ODD_VIEW,) else None
            t = v.to(dtype).to(device) if t is None else t.copy_(v)
            ps.append(torch.nn.Parameter(t))
        groups.append(ps)
    return groups


def set_grads(groups, gvals, scale=1.0, inf=False):
    for ps, gs in zip(groups, gvals):
        for p, g in zip(ps, gs):
            g = (g.to(p.dtype) * scale).to(p.device)
            if p.numel() == ODD_VIEW:
                g = odd_view(p.numel(), p.dtype, p.device).copy_(g)
            p.grad = g
    if inf:
        groups[0][0].grad[0] = float("inf")


def lr_value(lr, device):
    return {"tensor": torch.tensor(1e-2, device=device), "noam": NOAM}.get(lr, lr)


def run_fusedopt(index, scenario, backend, device, steps):
    _, cls, options, scaled = scenario
    options = dict(options, lr=lr_value(options["lr"], device))
    groups = make_params(initial_values(index), device)
    opt = getattr(fusedopt, cls)(
        [dict(params=ps, **opts) for ps, (_, _, opts) in zip(groups, GROUPS)],
        backend=backend,
        **options,
    )
    codes = {bucket_code(_bucket_of(p, g)) for g in opt.param_groups for p in g["params"]}
    assert codes == NATIVE_BUCKETS, "the workload's groups no longer cover every native bucket"
    scaler = None
    if scaled:
        scaler = torch.amp.GradScaler(device.type, init_scale=SCALE, growth_interval=2)
        scaler.scale(torch.ones((), device=device))  # creates its scale tensor
    for k in range(steps):
        gvals = grad_values(index, k)
        if scaler is None:
            set_grads(groups, gvals)
            opt.step()
        else:
            set_grads(groups, gvals, float(scaler.get_scale()), inf=k == INF_STEP)
            scaler.step(opt)
            scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return opt, groups


def reference(index, scenario, steps):
    """torch.optim (fp32, on the CPU) on the fp32 group and on fp32 copies of the master groups,
    with the same grads: clipped by the norm of every grad, the inf step skipped."""
    _, cls, options, scaled = scenario
    options = dict(options)
    max_norm = options.pop("max_grad_norm", None)
    lr = options.pop("lr")
    picked = [i for i, (_, dtype, opts) in enumerate(GROUPS) if dtype == F32 and not opts]
    picked += [i for i, (_, _, opts) in enumerate(GROUPS) if opts == {"master_weights": True}]
    values = initial_values(index)
    params = {
        i: [torch.nn.Parameter(v.to(GROUPS[i][1]).float()) for v in values[i]] for i in picked
    }
    flat = [p for i in picked for p in params[i]]
    opt = getattr(torch.optim, cls)(
        flat, lr=1.0 if lr == "noam" else 1e-2, foreach=False, **options
    )
    sched = None
    if lr == "noam":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: NOAM.rate(e + 1))
    for k in range(steps):
        if scaled and k == INF_STEP:
            continue
        gvals = grad_values(index, k)
        coef = 1.0
        if max_norm is not None:  # the norm of every grad in the optimizer, as stored
            total = math.sqrt(
                sum(
                    float((g.to(dtype).double() ** 2).sum())
                    for (_, dtype, _), gs in zip(GROUPS, gvals)
                    for g in gs
                )
            )
            coef = min(1.0, max_norm / (total + 1e-6))
        for i in picked:
            for p, g in zip(params[i], gvals[i]):
                p.grad = g.to(GROUPS[i][1]).float() * coef
        opt.step()
        if sched is not None:
            sched.step()
    return params


def snapshot(opt, groups):
    """Every parameter and state tensor, on the CPU, in a fixed order."""
    out = []
    for gi, ps in enumerate(groups):
        for pi, p in enumerate(ps):
            out.append((f"{GROUPS[gi][0]} #{pi} param", p.detach().cpu()))
            for key in sorted(opt.state[p]):
                out.append((f"{GROUPS[gi][0]} #{pi} {key}", opt.state[p][key].detach().cpu()))
    return out


def assert_close(actual, expected, what):
    """float32 within a few ulps of 1e-5 (three steps, not bit for bit: backends sum clipping
    norms in their own order, and the torch backend rounds a few intermediates differently);
    bf16/fp16 within torch's default tolerance, about one ulp (stochastic rounding of a value
    that differs in its last float32 bits can land one bf16 ulp away)."""
    tol = dict(rtol=1e-5, atol=1e-5) if expected.dtype == F32 else {}
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def check(index, scenario, backend, opt, groups, steps, ref):
    _, _, _, scaled = scenario
    expected_step = steps - (1 if scaled and steps > INF_STEP else 0)
    for name, t in snapshot(opt, groups):
        if name.endswith(" step"):
            assert float(t) == expected_step, f"{name} = {float(t)}, expected {expected_step}"
        else:
            assert torch.isfinite(t.float()).all(), f"{name}: not finite"
    for i, ps in ref.items():
        for pi, (ours, theirs) in enumerate(zip(groups[i], ps)):
            mine = opt.state[ours]["master_param"] if "master_param" in opt.state[ours] else ours
            assert_close(
                mine.detach().cpu(), theirs.detach(), f"{GROUPS[i][0]} #{pi} vs torch.optim"
            )


def default_backends(device):
    if device.type == "cuda":
        return ["cuda", "triton"]
    names = ["cpu", "torch"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        names.append("triton")
    return names


def workload(device, names, steps, shard=(0, 1)):
    failures = 0
    for index, scenario in enumerate(SCENARIOS):
        if index % shard[1] != shard[0]:
            continue
        ref = reference(index, scenario, steps)
        first = None
        for backend in names:
            t0 = time.perf_counter()
            try:
                opt, groups = run_fusedopt(index, scenario, backend, device, steps)
                check(index, scenario, backend, opt, groups, steps, ref)
                snap = snapshot(opt, groups)
                if first is None:
                    first = (backend, snap)
                else:
                    for (name, a), (_, b) in zip(first[1], snap):
                        assert_close(b, a, f"{name}: {backend} vs {first[0]}")
                status = "ok"
            except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
                failures += 1
                status = f"FAIL {type(e).__name__}: {' '.join(str(e).split())}"
            dt = time.perf_counter() - t0
            print(f"{scenario[0]:34s} {backend:7s} {dt:6.2f}s {status}", flush=True)
    return failures


def profile(device, names, numel):
    """One warm-up step of each (optimizer, backend), then one timed step of each, same order."""
    shapes = [(numel // 8,)] * 8
    runs = []
    for cls in ("AdamW", "RMSprop"):
        for backend in names:
            gen = torch.Generator(device=device).manual_seed(0)
            params = [
                torch.nn.Parameter(torch.randn(s, generator=gen, device=device)) for s in shapes
            ]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, device=device)
            runs.append((cls, backend, getattr(fusedopt, cls)(params, lr=1e-3, backend=backend)))
    for _, _, opt in runs:  # state, tables, Triton compilation
        opt.step()
    torch.cuda.synchronize(device)
    bytes_per_param = {"AdamW": 28, "RMSprop": 20}  # fp32: read p, g, state; write p, state
    for cls, backend, opt in runs:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        gbs = numel * bytes_per_param[cls] / (ms * 1e-3) / 1e9
        print(f"profile {cls:8s} {backend:7s} {numel} fp32 params: {ms:.3f} ms, {gbs:.0f} GB/s")


def name_of(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", action="append", choices=sorted(backends.BACKENDS))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument(
        "--shard",
        default="0/1",
        help="K/N: only the scenarios whose index is K modulo N (to compile Triton's variants in "
        "N processes at once)",
    )
    ap.add_argument("--profile", action="store_true", help="a 2^26-parameter step for ncu")
    ap.add_argument("--profile-numel", type=int, default=2**26)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shard = tuple(int(x) for x in args.shard.split("/"))
    if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
        ap.error(f"--shard K/N with 0 <= K < N, not {args.shard!r}")
    names = args.backend or default_backends(device)
    for name in names:
        backends.require(name, device)
    print(
        f"fusedopt workload on {device} ({name_of(device)}), "
        f"backends {', '.join(names)}; torch {torch.__version__}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
        flush=True,
    )
    if args.profile:
        if device.type != "cuda":
            ap.error("--profile needs a CUDA device")
        profile(device, names, args.profile_numel)
        return 0
    failures = workload(device, names, args.steps, shard)
    print(f"{failures} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
