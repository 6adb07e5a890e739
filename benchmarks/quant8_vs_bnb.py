"""8-bit AdamW written out with fusedopt.quant8 against bitsandbytes' AdamW8bit on CPU, 10 steps
(issue 24): how many state codes agree, per quantizer and map.

    python3 benchmarks/quant8_vs_bnb.py

Modes: "fusedopt" (quant8's nearest-code quantization), "bnb-quantizer" (bitsandbytes' own
quantize_blockwise in the same step: agreement there means the step itself is bitsandbytes'),
"map-minus-1" (fusedopt's quantization with the signed map's lowest value set to -1.0).
Raw output: benchmarks/results/quant8_vs_bnb_2026-12-05.txt.
"""

import math

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

from fusedopt import quant8 as q

SHAPES = [(64, 128), (5000,), (300, 77)]  # >= 4096 elements: 8-bit in bitsandbytes
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01


def run(mode):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = bnb.optim.AdamW8bit(theirs, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    signed, unsigned = q.dynamic_map(True), q.dynamic_map(False)
    if mode == "map-minus-1":
        signed = signed.clone()
        signed[0] = -1.0

    def quantize(x, code):
        if mode == "bnb-quantizer":
            codes, st = F.quantize_blockwise(x.contiguous(), code=code.clone(), blocksize=256)
            return codes, st.absmax
        return q.quantize_blockwise(x, code)

    ours = [
        {
            "p": p.clone(),
            "m": quantize(torch.zeros_like(p), signed),
            "v": quantize(torch.zeros_like(p), unsigned),
        }
        for p in params
    ]
    for step in range(1, 11):
        grads = [torch.randn(s) * 0.01 for s in SHAPES]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        for st, g in zip(ours, grads):
            m = q.dequantize_blockwise(*st["m"], signed)
            v = q.dequantize_blockwise(*st["v"], unsigned)
            st["p"].mul_(1 - LR * WD)
            m.mul_(B1).add_(g, alpha=1 - B1)
            v.mul_(B2).addcmul_(g, g, value=1 - B2)
            denom = (v.sqrt() / math.sqrt(1 - B2**step)).add_(EPS)
            st["p"].addcdiv_(m, denom, value=-LR / (1 - B1**step))
            st["m"], st["v"] = quantize(m, signed), quantize(v, unsigned)
    total = within = exact = 0
    for p, st in zip(theirs, ours):
        for name, key in (("m", "state1"), ("v", "state2")):
            d = (st[name][0].int() - opt.state[p][key].int()).abs()
            total += d.numel()
            within += int((d <= 1).sum())
            exact += int((d == 0).sum())
            print(
                f"  {mode:14} {str(tuple(p.shape)):11} {name}: exact {(d == 0).float().mean():.4%},"
                f" within one {(d <= 1).float().mean():.4%}, max {int(d.max())}"
            )
    print(
        f"{mode}: exact {exact / total:.4%}, within one code {within / total:.4%} of {total} codes"
    )


if __name__ == "__main__":
    for mode in ("fusedopt", "bnb-quantizer", "map-minus-1"):
        run(mode)
