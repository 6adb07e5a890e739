"""fusedopt demo: train a small Transformer twice from the same weights and compare the optimizers.

Run 1: fusedopt.AdamW with the Noam schedule as its lr (evaluated inside the step, on the device).
Run 2: torch.optim.AdamW with lr=1.0 and LambdaLR(lambda e: noam.rate(e + 1)), the torch equivalent.

The task is synthetic: reverse a random sequence of tokens. Both runs see the same batches, so their
loss curves should match closely (not bit for bit: the kernels round differently from torch's ops).

    python3 benchmarks/demo.py [--steps 200] [--device cpu|cuda] [--backend auto|triton|torch]
"""

import argparse
import copy
import time

import torch

import fusedopt
from fusedopt import backends

D_MODEL = 64
WARMUP = 60  # Noam warm-up steps
VOCAB = 16
SEQ_LEN = 12
BATCH = 32
SEED = 0
TIMING_WARMUP = 3  # first steps left out of the timing (they compile kernels, allocate state)


class Reverser(torch.nn.Module):
    """Token + position embeddings, a 2-layer TransformerEncoder, a linear head over the vocab."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(VOCAB, D_MODEL)
        # learned positions, initialised large enough to matter: reversal is a positional task
        self.pos = torch.nn.Parameter(torch.randn(SEQ_LEN, D_MODEL) * 0.3)
        layer = torch.nn.TransformerEncoderLayer(
            D_MODEL, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(D_MODEL, VOCAB)

    def forward(self, x):
        return self.head(self.encoder(self.tok(x) + self.pos))


def make_batches(steps, device):
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randint(0, VOCAB, (steps, BATCH, SEQ_LEN), generator=gen)
    return x.to(device), x.flip(-1).to(device)  # inputs, targets (the reversed inputs)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=fusedopt.BACKENDS,
        help="fusedopt backend (default: auto)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(SEED)
    model_f = Reverser().to(device)
    model_t = copy.deepcopy(model_f)  # identical initial weights

    noam = fusedopt.Noam(d_model=D_MODEL, warmup=WARMUP)
    opt_f = fusedopt.AdamW(
        model_f.parameters(),
        lr=noam,
        betas=(0.9, 0.98),
        eps=1e-9,
        weight_decay=0.01,
        backend=args.backend,
    )
    opt_t = torch.optim.AdamW(
        model_t.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01
    )
    sched_t = torch.optim.lr_scheduler.LambdaLR(opt_t, lambda e: noam.rate(e + 1))

    print(
        f"device: {device}   fusedopt backend: {args.backend} -> "
        f"{backends.select(opt_f.backend, device)}   torch {torch.__version__}"
    )
    print(
        f"model: 2-layer TransformerEncoder, d_model {D_MODEL}, "
        f"{sum(p.numel() for p in model_f.parameters())} parameters; "
        f"task: reverse {SEQ_LEN} tokens over a vocab of {VOCAB}, batch {BATCH}; {noam}"
    )

    inputs, targets = make_batches(args.steps, device)
    loss_fn = torch.nn.CrossEntropyLoss()
    every = max(1, args.steps // 20)
    times = {"fusedopt": [], "torch": []}

    print(
        f"{'step':>5} {'fusedopt loss':>14} {'torch loss':>11} {'|diff|':>9} "
        f"{'lr fusedopt':>12} {'lr torch':>10}"
    )
    for step in range(1, args.steps + 1):
        x, y = inputs[step - 1], targets[step - 1]
        losses = {}
        for name, model, opt in (("fusedopt", model_f, opt_f), ("torch", model_t, opt_t)):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            losses[name] = loss.detach()
        lr_t = sched_t.get_last_lr()[0]  # the lr torch's step just used
        sched_t.step()
        if step % every == 0 or step == 1 or step == args.steps:
            lf, lt = losses["fusedopt"].item(), losses["torch"].item()
            lr_f = float(opt_f.get_last_lr()[0])  # a 0-d device tensor: read it only to print
            print(
                f"{step:>5} {lf:>14.5f} {lt:>11.5f} {abs(lf - lt):>9.2e} "
                f"{lr_f:>12.3e} {lr_t:>10.3e}"
            )

    for name, ts in times.items():
        ts = ts[TIMING_WARMUP:] or ts
        print(
            f"{name:>8} AdamW: {1e3 * sum(ts) / len(ts):.3f} ms per optimizer step "
            f"(mean of {len(ts)} steps on {device})"
        )


if __name__ == "__main__":
    main()
