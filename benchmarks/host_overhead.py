"""Host time of one optimizer ``step()`` (issue 12): fusedopt.AdamW against torch's AdamW
(``fused=True`` and ``foreach=True``) where the kernels move almost nothing, so the time is the
Python and dispatch cost of a step.

Cases: N one-element fp32 parameters (N = 8, 100, 1,000, 10,000) with the same grad tensors every
step ("same") or new grad tensors before every step ("fresh", what ``zero_grad(set_to_none=True)``
and ``backward()`` give; assigned outside the timed region); 465 param groups of one tensor each
(fresh grads); and a 2-rank FSDP2 model (``fully_shard``, gloo, 2 CPU processes of one thread
each) whose parameters are DTensors: one real forward/backward, then new grad DTensors (clones)
before each step.

The providers of a case take turns, one step each per round (the order rotates every round), each
with its own copy of the parameters; the median of the timed steps after the warm-up is reported,
per step and per parameter tensor, with the ratio to torch fused. The development machines have
2 cores shared with other builds and tests: timings are noisy (the header records the load
average), compare rows of one run rather than runs.

    python3 benchmarks/host_overhead.py                       # all cases, about a minute on 2 cores
    python3 benchmarks/host_overhead.py --quick               # N <= 1,000 and groups, no FSDP2
    python3 benchmarks/host_overhead.py --cases n8-fresh,fsdp2 --torch-backend --steps 50
    python3 benchmarks/host_overhead.py --device cuda --quick # fusedopt cuda and triton on a GPU

With ``--device cuda`` the parameters and grads live on the GPU, the GPU is synchronized before
each timed step (outside the timing), and the time is still that of the host: ``step()``
returning, not the kernels finishing.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

import fusedopt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROVIDERS = {
    "fusedopt cpu": lambda ps: fusedopt.AdamW(ps, backend="cpu"),
    "fusedopt cuda": lambda ps: fusedopt.AdamW(ps, backend="cuda"),
    "fusedopt triton": lambda ps: fusedopt.AdamW(ps, backend="triton"),
    "fusedopt torch": lambda ps: fusedopt.AdamW(ps, backend="torch"),
    "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True),
    "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
}
BASELINE = "torch fused"


def providers_for(device, torch_backend):
    """The providers of a run on ``device``: fusedopt's native backend there (and Triton on a
    GPU), fusedopt's torch backend if asked, torch fused and foreach."""
    if device == "cuda":
        names = ["fusedopt cuda", "fusedopt triton"]
    else:
        names = ["fusedopt cpu"]
    if torch_backend:
        names.append("fusedopt torch")
    return names + ["torch fused", "torch foreach"]


# name -> (number of one-element tensors, fresh grads, one param group per tensor)
FLAT_CASES = {
    "n8-same": (8, False, False),
    "n8-fresh": (8, True, False),
    "n100-same": (100, False, False),
    "n100-fresh": (100, True, False),
    "n1000-same": (1000, False, False),
    "n1000-fresh": (1000, True, False),
    "n10000-same": (10000, False, False),
    "n10000-fresh": (10000, True, False),
    "groups465-fresh": (465, True, True),
}
ALL_CASES = [*FLAT_CASES, "fsdp2"]
QUICK_CASES = [c for c in FLAT_CASES if not c.startswith("n10000")]


def _label(case):
    n, fresh, groups = FLAT_CASES[case]
    grads = "fresh" if fresh else "same"
    return f"{n} groups, {grads}" if groups else f"N={n:,} {grads}"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_in_turns(runners, steps, warmup, device="cpu"):
    """runners: name -> (prepare, step). Each round runs every provider's untimed ``prepare`` then
    its timed ``step``; returns name -> median seconds of the last ``steps`` rounds."""
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(warmup + steps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            prepare, step = runners[name]
            prepare()
            _sync(device)  # each step starts with an idle GPU: its host time alone is timed
            t0 = time.perf_counter()
            step()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(v) for name, v in times.items()}


def flat_case(case, providers, steps, warmup, device="cpu"):
    n, fresh, groups = FLAT_CASES[case]
    runners = {}
    for name in providers:
        params = [torch.nn.Parameter(torch.randn(1, device=device)) for _ in range(n)]
        opt = PROVIDERS[name]([{"params": [p]} for p in params] if groups else params)
        if fresh:

            def prepare(params=params):
                for p in params:
                    p.grad = torch.randn(1, device=device)

        else:
            for p in params:
                p.grad = torch.randn(1, device=device)
            prepare = lambda: None
        runners[name] = (prepare, opt.step)
    return {"tensors": n, "medians": time_in_turns(runners, steps, warmup, device)}


def _fsdp_worker(rank, init_file, out_dir, providers, steps, warmup, layers, width):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
        runners = {}
        for name in providers:
            torch.manual_seed(0)
            block = lambda: torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh())
            model = torch.nn.Sequential(*(block() for _ in range(layers)))
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            model(x).square().mean().backward()
            params = list(model.parameters())
            opt = PROVIDERS[name](params)

            def prepare(params=params):
                # new grad DTensors each step, as backward's reduce-scatter gives, without
                # paying for a backward of the whole stack per step (about 1 s here)
                for p in params:
                    p.grad = p.grad.clone()

            runners[name] = (prepare, opt.step)
        tensors = sum(1 for _ in model.parameters())
        medians = time_in_turns(runners, steps, warmup)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"tensors": tensors, "medians": medians}, f)
    finally:
        dist.destroy_process_group()
    # torch 2.13's gloo teardown at interpreter exit sometimes aborts after all the work is done
    # (see tests/test_distributed.py): leave without it.
    sys.stdout.flush()
    os._exit(0)


def fsdp_case(providers, steps, warmup, layers, width):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _fsdp_worker,
            args=(os.path.join(tmp, "init"), tmp, providers, steps, warmup, layers, width),
            nprocs=2,
            join=True,
        )
        out = []
        for rank in range(2):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                out.append(json.load(f))
    return out


def _git(*args):
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(argv, args, providers):
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    changed = _git("status", "--porcelain", "--", "fusedopt", "csrc", "kernels").splitlines()
    if changed:  # the measured code is not the commit's
        # (_git strips the output, and with it the first line's leading status column)
        commit += f" + uncommitted changes to {', '.join(c.split(maxsplit=1)[1] for c in changed)}"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        f"# python3 benchmarks/host_overhead.py {' '.join(argv)}".rstrip(),
        f"# commit {commit}, {now}",
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(FSDP2: 2 ranks x 1 thread), {_cpu_name()}, {os.cpu_count()} cores, "
        f"load average {load} (shared machine: noisy)"
        + (f"; parameters on {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
        f"# host time of one step(), median of {args.steps} timed steps after {args.warmup} "
        f"warm-up; providers {', '.join(providers)} take turns; ratio = provider / {BASELINE}",
        f"{'case':22s} {'tensors':>7s}  {'provider':14s} {'ms/step':>9s} {'us/tensor':>9s} "
        f"{'ratio':>7s}",
    ]
    return "\n".join(lines)


def rows(label, result, providers):
    base = result["medians"].get(BASELINE)
    for name in providers:
        t = result["medians"][name]
        ratio = f"{t / base:6.2f}x" if base else "      -"
        yield (
            f"{label:22s} {result['tensors']:7d}  {name:14s} {t * 1e3:9.3f} "
            f"{t * 1e6 / result['tensors']:9.2f} {ratio}"
        )


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        default=",".join(ALL_CASES),
        help=f"comma-separated, from: {', '.join(ALL_CASES)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}")
    p.add_argument("--steps", type=int, default=30, help="timed steps per provider (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument(
        "--torch-backend", action="store_true", help='also fusedopt.AdamW(backend="torch")'
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the parameters live (default cpu; FSDP2 always runs on the CPU, with gloo)",
    )
    p.add_argument("--fsdp-layers", type=int, default=150, help="Linear layers (2 tensors each)")
    p.add_argument("--fsdp-width", type=int, default=32, help="Linear layers' in/out features")
    args = p.parse_args(argv)
    args.cases = QUICK_CASES if args.quick else [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in ALL_CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(ALL_CASES)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    providers = providers_for(args.device, args.torch_backend)
    start = time.perf_counter()
    print(header(argv, args, providers), flush=True)
    for case in args.cases:
        if case == "fsdp2":
            cpu = providers_for("cpu", args.torch_backend)
            results = fsdp_case(cpu, args.steps, args.warmup, args.fsdp_layers, args.fsdp_width)
            labelled = [(f"FSDP2 fresh, rank {rank}", r) for rank, r in enumerate(results)]
            for label, result in labelled:
                for line in rows(label, result, cpu):
                    print(line, flush=True)
            continue
        result = flat_case(case, providers, args.steps, args.warmup, args.device)
        for line in rows(_label(case), result, providers):
            print(line, flush=True)
    print(f"# total {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
