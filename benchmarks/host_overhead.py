"""Per-step host overhead: fusedopt.AdamW(backend="cpu") against torch's fused AdamW on N
one-element fp32 tensors, where the kernels move almost nothing and the time is the Python and
launch cost of a step. Median of 30 steps after 5 warm-up steps.

    python3 benchmarks/host_overhead.py
"""

import statistics
import time

import torch

import fusedopt


def main():
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; ms per step, median of 30"
    )
    for n in (8, 1000, 10000):
        params = [torch.nn.Parameter(torch.randn(1)) for _ in range(n)]
        for p in params:
            p.grad = torch.randn(1)
        for name, opt in (
            ("fusedopt cpu", fusedopt.AdamW(params, backend="cpu")),
            ("torch fused", torch.optim.AdamW(params, fused=True)),
        ):
            for _ in range(5):
                opt.step()
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            print(f"N={n:6d} {name:13s} {statistics.median(times) * 1e3:9.3f} ms/step")


if __name__ == "__main__":
    main()
