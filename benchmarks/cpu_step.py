"""CPU optimizer-step benchmark: fusedopt's native CPU kernels against torch.optim, same run.

    python3 benchmarks/cpu_step.py [--params 16] [--tensors 8] [--repeats 15] [--threads N]

For each optimizer, times one ``step()`` (median of ``--repeats`` after warm-up) for fusedopt's
``"cpu"`` backend and for torch.optim's variants (``fused=True`` where torch has it, foreach, and
the for-loop), and reports ms, GB/s from the bytes-per-parameter model (each input read once, each
output written once: Adam/AdamW 28 B, RMSprop 20 B), the percentage of the copy bandwidth measured
in the same run, and the speedup over torch's fastest variant.
"""

import argparse
import statistics
import time

import torch

import fusedopt

# bytes per fp32 parameter of one fused pass (see ../shared/FACTS.md): read p, g, states; write
# p, states
BYTES_PER_PARAM = {"adam": 28, "adamw": 28, "rmsprop": 20}


def timed(fns, repeats):
    """Median seconds per call of each function. The functions take turns, round after round,
    so that a slow spell of the (shared) machine hits every provider alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_step(numel):
    """A copy of ``numel`` fp32 elements, timed in the same rounds: the bandwidth yardstick."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def make_params(total, n_tensors, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = total // n_tensors
    params = [torch.nn.Parameter(torch.randn(size, generator=gen)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=gen) * 1e-3
    return params


def providers(name):
    lr = 1e-4
    if name in ("adam", "adamw"):
        fcls = fusedopt.Adam if name == "adam" else fusedopt.AdamW
        tcls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return {
            "fusedopt cpu": lambda ps: fcls(ps, lr=lr, backend="cpu"),
            "torch fused": lambda ps: tcls(ps, lr=lr, fused=True),
            "torch foreach": lambda ps: tcls(ps, lr=lr, foreach=True),
            "torch for-loop": lambda ps: tcls(ps, lr=lr, foreach=False),
        }
    return {
        "fusedopt cpu": lambda ps: fusedopt.RMSprop(ps, lr=lr, backend="cpu"),
        "torch foreach": lambda ps: torch.optim.RMSprop(ps, lr=lr, foreach=True),
        "torch for-loop": lambda ps: torch.optim.RMSprop(ps, lr=lr, foreach=False),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--params", type=float, default=16, help="millions of fp32 parameters")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--optimizers", default="adam,adamw,rmsprop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    total = int(args.params * 1e6)
    reason = fusedopt.backends.unavailable("cpu", "cpu")
    if reason:
        raise SystemExit(f"fusedopt's cpu backend is unavailable: {reason}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{total / 1e6:.1f}M fp32 params in {args.tensors} tensors"
    )
    print(
        f"{'optimizer':9} {'provider':15} {'ms/step':>9} {'GB/s':>7} {'% copy':>7} "
        f"{'vs torch best':>14}"
    )
    for name in args.optimizers.split(","):
        steps = {
            p: make(make_params(total, args.tensors)).step for p, make in providers(name).items()
        }
        rows = timed({"(copy)": copy_step(total), **steps}, args.repeats)
        copy_seconds = rows.pop("(copy)")
        bw = 2 * total * 4 / copy_seconds  # bytes read + written
        del steps
        print(f"{name:9} {'(copy)':15} {copy_seconds * 1e3:9.2f} {bw / 1e9:7.1f} {100:6.0f}%")
        best_torch = min(v for k, v in rows.items() if k.startswith("torch"))
        for provider, seconds in rows.items():
            gbs = BYTES_PER_PARAM[name] * total / seconds / 1e9
            print(
                f"{name:9} {provider:15} {seconds * 1e3:9.2f} {gbs:7.1f} "
                f"{100 * gbs * 1e9 / bw:6.0f}% {best_torch / seconds:13.2f}x"
            )


if __name__ == "__main__":
    main()
