"""The kernel families agree with each other element for element on the same inputs.

They are written to round identically (same operation order, FMAs in the same places, correctly
rounded division and square root, bf16/fp16 stores rounded to nearest even, per-step scalars from
the same float64 formulas), so the comparison is exact: any difference is a divergence to explain.
On CPU: the native C++ kernels against the Triton kernels in the interpreter. On the GPU machine:
the CUDA kernels against the compiled Triton kernels.
"""

import pytest
import torch
from parity import clone_params, grads, make_params, set_grads

import fusedopt
from fusedopt import backends

PAIRS = [
    pytest.param("cpu", "triton", "cpu", marks=pytest.mark.triton, id="cpu-vs-triton"),
    pytest.param(
        "cuda", "triton", "cuda", marks=[pytest.mark.cuda, pytest.mark.triton], id="cuda-vs-triton"
    ),
]
SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 4), (1030,), (4099,)]


@pytest.mark.parametrize("native,other,device", PAIRS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    "cls,groups",
    [
        ("AdamW", [dict(amsgrad=True), dict(lr=fusedopt.Noam(32, 3), maximize=True)]),
        ("Adam", [dict(weight_decay=0.1), dict(lr=3e-3, betas=(0.3, 0.9))]),
        ("RMSprop", [dict(centered=True, momentum=0.9), dict(weight_decay=0.1, maximize=True)]),
        ("RMSprop", [dict(), dict(lr=fusedopt.Noam(32, 3), alpha=0.9)]),
        (
            "SGD",
            [
                dict(momentum=0.9, nesterov=True, weight_decay=0.1),
                dict(lr=fusedopt.Noam(32, 3), momentum=0.5, dampening=0.3, maximize=True),
            ],
        ),
        ("SGD", [dict(), dict(weight_decay=0.1, maximize=True)]),
    ],
)
def test_exact_agreement(native, other, device, dtype, cls, groups):
    for name in (native, other):
        reason = backends.unavailable(name, device)
        if reason:
            pytest.skip(f"{name}: {reason}")
    params = make_params(SHAPES, dtype=dtype, device=device)
    runs = []
    for name in (native, other):
        ps = clone_params(params)
        opt = getattr(fusedopt, cls)(
            [dict(params=ps[i::2], **g) for i, g in enumerate(groups)], lr=1e-2, backend=name
        )
        for k in range(5):
            set_grads(ps, grads(k, ps, none=lambda step, i: (step + i) % 4 == 0))
            opt.step()
        runs.append((opt, ps))
    (oa, pa), (ob, pb) = runs
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i}"
        for key in oa.state[a]:
            assert torch.equal(oa.state[a][key], ob.state[b][key]), f"param {i} {key}"
    for x, y in zip(oa.get_last_lr(), ob.get_last_lr()):
        assert float(x) == float(y)


@pytest.mark.parametrize("native,other,device", PAIRS)
@pytest.mark.parametrize(
    "dtype,options",
    [
        pytest.param(torch.bfloat16, dict(master_weights=True), id="bf16-master"),
        pytest.param(torch.float16, dict(master_weights=True), id="fp16-master"),
        pytest.param(torch.float32, dict(state_dtype=torch.bfloat16), id="fp32-bf16state"),
        pytest.param(torch.bfloat16, dict(stochastic_rounding=True), id="bf16-stochastic"),
        pytest.param(
            torch.bfloat16,
            dict(stochastic_rounding=True, state_dtype=torch.float32),
            id="bf16-stochastic-fp32state",
        ),
        pytest.param(torch.bfloat16, dict(state_dtype=torch.float32), id="bf16-fp32state"),
    ],
)
@pytest.mark.parametrize("cls", ["AdamW", "RMSprop", "SGD"])
def test_exact_agreement_low_precision(native, other, device, dtype, options, cls):
    """The mixed-precision buckets (fp32 master written back rounded, state in another dtype,
    stochastic rounding with its hashed noise) agree bit for bit as well."""
    for name in (native, other):
        reason = backends.unavailable(name, device)
        if reason:
            pytest.skip(f"{name}: {reason}")
    params = make_params(SHAPES, dtype=dtype, device=device)
    kw = dict(amsgrad=True) if cls == "AdamW" else dict(momentum=0.9)
    runs = []
    for name in (native, other):
        ps = clone_params(params)
        opt = getattr(fusedopt, cls)(ps, lr=1e-2, backend=name, **kw, **options)
        for k in range(4):
            set_grads(ps, grads(k, ps))
            opt.step()
        runs.append((opt, ps))
    (oa, pa), (ob, pb) = runs
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert torch.equal(a, b), f"param {i}"
        for key in oa.state[a]:
            assert torch.equal(oa.state[a][key], ob.state[b][key]), f"param {i} {key}"
