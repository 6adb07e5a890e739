"""fusedopt.schedules: in-kernel learning-rate schedules against transformers' schedule functions
and torch's schedulers on torch.optim.AdamW, on every backend; exact resume, checkpoints that
interchange with torch.optim, GradScaler's skipped steps, argument checks."""

import pytest
import torch
from conftest import backend_device_params
from parity import assert_same, clone_params, grads, make_params, roundtrip, set_grads
from torch.optim.lr_scheduler import ExponentialLR, LambdaLR, MultiStepLR

import fusedopt
from fusedopt import schedules as S

try:
    from transformers import optimization as hf
except ImportError:  # a machine without transformers (the GPU machine may lack it): see below
    hf = None

BACKENDS = backend_device_params()
# Triton on the CPU (interpreted, slow) is checked against the cpu backend instead, to the bit
# (test_cpu_and_triton_agree_bit_for_bit), and the cpu backend against the references here
NOT_INTERPRETED = [p for p in BACKENDS if p.id != "triton-cpu"]
LR = 1e-2
STEPS = 31
W, T = 5, 24  # warm-up and total: every phase, and steps past the end, within STEPS

# (id, fusedopt schedule, the reference scheduler on a torch optimizer built with lr=LR)
CASES = [
    ("constant", S.constant(LR, W), lambda o: hf.get_constant_schedule_with_warmup(o, W)),
    ("linear", S.linear(LR, W, T), lambda o: hf.get_linear_schedule_with_warmup(o, W, T)),
    ("cosine", S.cosine(LR, W, T), lambda o: hf.get_cosine_schedule_with_warmup(o, W, T)),
    (
        "cosine-min-lr",
        S.cosine(LR, W, T, cycles=0.75, min_lr=1e-3),
        lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, W, T, 0.75, min_lr=1e-3),
    ),
    (
        "cosine-restarts",
        S.cosine_restarts(LR, W, T, cycles=3),
        lambda o: hf.get_cosine_with_hard_restarts_schedule_with_warmup(o, W, T, num_cycles=3),
    ),
    (
        "polynomial",
        S.polynomial(LR, W, T, end_lr=1e-4),
        lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, W, T, lr_end=1e-4),
    ),
    (
        "polynomial-power-2",
        S.polynomial(LR, W, T, end_lr=1e-4, power=2.0),
        lambda o: hf.get_polynomial_decay_schedule_with_warmup(o, W, T, lr_end=1e-4, power=2.0),
    ),
    ("inverse-sqrt", S.inverse_sqrt(LR, W), lambda o: hf.get_inverse_sqrt_schedule(o, W)),
    (
        "inverse-sqrt-timescale",
        S.inverse_sqrt(LR, 0, timescale=3),
        lambda o: hf.get_inverse_sqrt_schedule(o, 0, timescale=3),
    ),
    (
        "wsd",
        S.wsd(LR, W, 8, total=T),
        lambda o: hf.get_wsd_schedule(o, W, 8, num_training_steps=T),
    ),
    (
        "wsd-shapes",
        S.wsd(LR, W, 9, stable=6, warmup_type="cosine", decay_type="1-sqrt", min_lr_ratio=0.1),
        lambda o: hf.get_wsd_schedule(
            o, W, 9, num_stable_steps=6, warmup_type="cosine", decay_type="1-sqrt", min_lr_ratio=0.1
        ),
    ),
    (
        "wsd-linear",
        S.wsd(LR, W, 7, stable=4, warmup_type="1-sqrt", decay_type="linear", min_lr_ratio=0.2),
        lambda o: hf.get_wsd_schedule(
            o, W, 7, num_stable_steps=4, warmup_type="1-sqrt", decay_type="linear", min_lr_ratio=0.2
        ),
    ),
    ("exponential", S.exponential(LR, 0.9), lambda o: ExponentialLR(o, 0.9)),
    (
        "multistep",
        S.multistep(LR, [3, 9, 9, 20], gamma=0.5),
        lambda o: MultiStepLR(o, [3, 9, 9, 20], gamma=0.5),
    ),
]
IDS = [c[0] for c in CASES]
TORCH_REFERENCED = ("exponential", "multistep")


def _lambda_of(schedule):
    """LambdaLR stepping the schedule's own host rate: the reference where transformers is not
    installed. Those rates are checked against transformers wherever it is (CI always is)."""
    return lambda o: LambdaLR(o, lambda e: schedule.rate(e + 1) / LR)


if hf is None:
    CASES = [(i, s, m if i in TORCH_REFERENCED else _lambda_of(s)) for i, s, m in CASES]

# The lr of each update against the reference's. transformers' lambdas: the kernels do their
# float64 operations in their order, so the cpu backend (the host's libm, as transformers) is
# exact; on the host the others stay within 1e-15 relative.
# torch's ExponentialLR multiplies by gamma once per step: after 31 steps its rounding may stand
# up to about 31 half-ulps from the closed form lr * gamma**(t-1) every backend computes (1e-14).
HF_RTOL, TORCH_RTOL = 1e-15, 1e-14
# On a GPU, cos, pow and sqrt come from the device's math library (CUDA's libdevice, for the cuda
# and Triton kernels and torch's CUDA ops alike): within 2 ulps of the exact value in float64
# (CUDA C Programming Guide, mathematical functions), where the host's libm is correctly rounded
# in practice. That error is absolute, not relative: cos(x) in [-1, 1] is off by at most
# 2 ulp(1) = 2**-52, and lr * 0.5 * (1 + cos(x)) (or (lr - end) * (1 - p)**power + end) scales
# it by at most lr / 2, so near the bottom of a cosine, where 1 + cos(x) cancels, the relative
# error grows without bound while the absolute one stays under 2**-53 * lr. With the float64
# roundings of the few operations around it (each within half an ulp of a value <= lr), the
# bound used on CUDA is 4 * 2**-52 * lr (8.9e-18 at lr = 1e-2). Measured on an H200 on
# 2026-12-04: 3.9e-18 (the torch backend's cosine), 5e-19 (a cosine after 784 graph replays).
DEVICE_ATOL = 4 * 2.0**-52 * LR


def _rtol(case_id):
    return TORCH_RTOL if case_id in TORCH_REFERENCED else HF_RTOL


def _atol(device):
    return DEVICE_ATOL if torch.device(device).type == "cuda" else 0.0


def _reference(make_sched, params, steps):
    """torch.optim.AdamW with the reference scheduler, stepped after each optimizer step: its
    optimizer, and the lr of each update."""
    opt = torch.optim.AdamW(params, lr=LR, foreach=False)
    sched = make_sched(opt)
    lrs = []
    for k in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        set_grads(params, grads(k, params))
        opt.step()
        sched.step()
    return opt, lrs


def _lrs_of(opt, params, steps, start=0):
    lrs = []
    for k in range(start, start + steps):
        set_grads(params, grads(k, params))
        opt.step()
        lrs.append(float(opt.get_last_lr()[0]))
    return lrs


@pytest.mark.parametrize("backend,device", NOT_INTERPRETED)
@pytest.mark.parametrize("case_id,schedule,make_sched", CASES, ids=IDS)
def test_schedule_matches_reference(
    backend, device, case_id, schedule, make_sched, require_backend
):
    """Every update's lr equals the reference set-up's, and so do the parameters and state after
    31 steps (warm-up, decay, and past the end)."""
    require_backend(backend, device)
    init = make_params([(3,), (2, 5), (17,)], device=device)
    ref, ours = clone_params(init), clone_params(init)
    ropt, ref_lrs = _reference(make_sched, ref, STEPS)
    opt = fusedopt.AdamW(ours, lr=schedule, backend=backend)
    tol = dict(rel=_rtol(case_id), abs=_atol(device))
    assert opt.get_last_lr()[0] == pytest.approx(ref_lrs[0], **tol)
    lrs = _lrs_of(opt, ours, STEPS)
    assert lrs == pytest.approx(ref_lrs, **tol)
    if backend == "cpu" and hf is not None and case_id not in TORCH_REFERENCED:
        assert lrs == ref_lrs  # libm and transformers' order of operations: the same bits
    assert [schedule.rate(t) for t in range(1, STEPS + 1)] == pytest.approx(
        ref_lrs, rel=_rtol(case_id), abs=0.0
    )
    assert float(opt.param_groups[0]["lr_step"]) == STEPS
    assert_same(ropt, ref, opt, ours)


AGREE = [c[1] for c in CASES if c[0] != "polynomial-power-2"]


@pytest.mark.triton
def test_cpu_and_triton_agree_bit_for_bit(require_backend):
    """The cpu backend and Triton (interpreted) compute the same lrs and parameters, to the bit:
    every schedule at once, one param group each, beside a float lr (so the Triton prologue also
    selects among them per group). Polynomial decay with a power other than 1 is left out:
    Triton raises to it with exp(log), libm with pow."""
    require_backend("cpu", "cpu")
    require_backend("triton", "cpu")
    init = make_params([(3,)] * len(AGREE) + [(17,)])
    runs = []
    for backend in ("cpu", "triton"):
        ps = clone_params(init)
        groups = [{"params": [p], "lr": s} for p, s in zip(ps, AGREE)]
        groups.append({"params": ps[-1:], "lr": LR})
        opt = fusedopt.AdamW(groups, lr=LR, backend=backend)
        lrs = []
        for k in range(STEPS):
            set_grads(ps, grads(k, ps))
            opt.step()
            lrs.append([float(x) for x in opt.get_last_lr()])
        runs.append((lrs, ps))
    (lrs_a, ps_a), (lrs_b, ps_b) = runs
    assert lrs_a == lrs_b
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)


RESUME_PARAMS = [
    pytest.param(*b.values, *c[1:], id=f"{b.id}-{c[0]}", marks=b.marks)
    for b in BACKENDS
    for c in CASES
    if b.id != "triton-cpu" or c[0] == "wsd-shapes"  # interpreted: one schedule is enough
]


@pytest.mark.parametrize("backend,device,schedule,make_sched", RESUME_PARAMS)
def test_exact_resume_mid_schedule(backend, device, schedule, make_sched, require_backend):
    """Stopped after 12 steps and resumed from a weights_only checkpoint into an optimizer built
    with another lr: the same bits as never stopping, the schedule restored from the checkpoint."""
    require_backend(backend, device)
    init = make_params([(3,), (2, 5)], device=device)
    straight, first = clone_params(init), clone_params(init)
    opt = fusedopt.AdamW(straight, lr=schedule, backend=backend)
    lrs = _lrs_of(opt, straight, 20)
    opt1 = fusedopt.AdamW(first, lr=schedule, backend=backend)
    _lrs_of(opt1, first, 12)
    state = roundtrip(opt1.state_dict())  # plain data: torch.load(weights_only=True) accepts it
    assert state["param_groups"][0]["lr"] == pytest.approx(schedule.rate(13), rel=HF_RTOL)
    second = [p.detach().clone().requires_grad_() for p in first]
    opt2 = fusedopt.AdamW(second, lr=0.5, backend=backend)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == schedule
    assert _lrs_of(opt2, second, 8, start=12) == lrs[12:]
    for a, b in zip(straight, second):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case_id,schedule,make_sched", CASES, ids=IDS)
def test_checkpoints_interchange_with_torch_optim(backend, case_id, schedule, make_sched):
    """fusedopt -> torch.optim: torch reads the next update's lr as a plain float and continues
    from the same state. torch.optim (with transformers' scheduler) -> fusedopt: the optimizer
    keeps its schedule and resumes its counter from the parameters' steps."""
    init = make_params([(3,), (2, 5)])
    ref, ours = clone_params(init), clone_params(init)
    ropt, _ = _reference(make_sched, ref, 10)
    opt = fusedopt.AdamW(ours, lr=schedule, backend=backend)
    _lrs_of(opt, ours, 10)
    # fusedopt -> torch.optim
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    topt = torch.optim.AdamW(theirs, lr=0.5, foreach=False)
    topt.load_state_dict(roundtrip(opt.state_dict()))
    assert topt.param_groups[0]["lr"] == pytest.approx(schedule.rate(11), rel=HF_RTOL, abs=0.0)
    for o, ps in ((opt, ours), (topt, theirs)):
        set_grads(ps, grads(10, ps))
        o.step()
    assert_same(topt, theirs, opt, ours)
    # torch.optim -> fusedopt: the reference run's checkpoint after 10 steps
    mine = [p.detach().clone().requires_grad_() for p in ref]
    opt2 = fusedopt.AdamW(mine, lr=schedule, backend=backend)
    opt2.load_state_dict(roundtrip(ropt.state_dict()))
    assert opt2.param_groups[0]["lr"] == schedule
    assert float(opt2.param_groups[0]["lr_step"]) == 10
    ropt2 = torch.optim.AdamW(ref, lr=LR, foreach=False)  # the reference goes on as it was
    ropt2.load_state_dict(ropt.state_dict())
    for group in ropt2.param_groups:  # torch's chainable schedulers start from the group's lr
        group["lr"] = group["initial_lr"]
    sched = make_sched(ropt2)
    for _ in range(10):  # a scheduler made now restarts: bring it to where the run was
        sched.step()
    for k in range(10, 20):
        expected = ropt2.param_groups[0]["lr"]
        for o, ps in ((ropt2, ref), (opt2, mine)):
            set_grads(ps, grads(k, ps))
            o.step()
        sched.step()
        assert float(opt2.get_last_lr()[0]) == pytest.approx(expected, rel=_rtol(case_id), abs=0)
    assert_same(ropt2, ref, opt2, mine)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradscaler_skipped_step_keeps_the_schedule(backend):
    """A step GradScaler skips (an inf grad) advances nothing: the counter stays, and the next
    update has the lr the skipped one would have had."""
    schedule = S.linear(LR, 2, 10)
    p = torch.nn.Parameter(torch.randn(4))
    opt = fusedopt.AdamW([p], lr=schedule, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # creates its scale tensor
    for k in range(5):
        p.grad = torch.full_like(p, float("inf") if k == 2 else 4.0)
        scaler.step(opt)
        scaler.update()
    assert float(opt.param_groups[0]["lr_step"]) == 4
    assert float(opt.get_last_lr()[0]) == schedule.rate(4)


def test_counter_advances_without_grads():
    """As LambdaLR's: a step() with no grads at all still moves the schedule on."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = fusedopt.AdamW([p], lr=S.linear(LR, 2, 10), backend="cpu")
    for _ in range(3):
        opt.step()
    assert float(opt.param_groups[0]["lr_step"]) == 3


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: S.constant(1e-3, -1), "warmup"),
        (lambda: S.linear(1e-3, 10, 5), "total"),
        (lambda: S.cosine(1e-3, 10, 5), "total"),
        (lambda: S.cosine(-1e-3, 1, 5), "lr"),
        (lambda: S.cosine(1e-3, 1, 5, min_lr=1e-2), "min_lr"),
        (lambda: S.cosine_restarts(1e-3, 1, 5, cycles=0), "cycles"),
        (lambda: S.polynomial(1e-3, 5, 5), "total"),
        (lambda: S.polynomial(1e-3, 1, 5, end_lr=1e-2), "end_lr"),
        (lambda: S.inverse_sqrt(1e-3, 2.5), "warmup"),
        (lambda: S.wsd(1e-3, 2, 3), "total or stable"),
        (lambda: S.wsd(1e-3, 2, 3, total=4), "total"),
        (lambda: S.wsd(1e-3, 2, 3, total=10, decay_type="step"), "decay_type"),
        (lambda: S.wsd(1e-3, 2, 3, total=10, warmup_type="exp"), "warmup_type"),
        (lambda: S.wsd(1e-3, 2, 3, total=10, stable=4), "total"),
        (lambda: S.exponential(1e-3, 0.0), "gamma"),
        (lambda: S.multistep(1e-3, []), "empty"),
        (lambda: S.multistep(1e-3, [5, 3]), "sorted"),
        (lambda: S.multistep(1e-3, [1, -2]), "milestone"),
        (lambda: S.linear(float("nan"), 1, 5), "lr"),
    ],
)
def test_invalid_arguments_raise_before_anything_changes(make, match):
    p = torch.nn.Parameter(torch.randn(3))
    opt = fusedopt.AdamW([p], lr=1e-3, backend="cpu")
    before = p.detach().clone()
    with pytest.raises((ValueError, TypeError), match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": make()})
    assert len(opt.param_groups) == 1 and torch.equal(p.detach(), before) and not opt.state


def test_schedules_are_plain_data():
    for _, schedule, _ in CASES:
        d = schedule.to_dict()
        assert S.from_dict(roundtrip({"d": d})["d"]) == schedule
    assert S.noam(512, 4000) == fusedopt.Noam(512, 4000)
    with pytest.raises(TypeError, match="evaluated inside the optimizer step"):
        torch.optim.lr_scheduler.LambdaLR(
            fusedopt.AdamW([torch.nn.Parameter(torch.randn(2))], lr=S.constant(1e-3)),
            lambda e: 1.0,
        )


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_graph_replays_follow_a_cosine_schedule(backend, require_backend):
    """One optimizer step captured in a CUDA graph and replayed 1,000 times: the lr read back
    after every replay is the schedule's (transformers' cosine), with nothing done on the host."""
    require_backend(backend, "cuda")
    schedule = S.cosine(LR, 50, 900, min_lr=1e-4)
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if hf is not None:
        ref = hf.get_cosine_with_min_lr_schedule_with_warmup(ref_opt, 50, 900, min_lr=1e-4)
    else:
        ref = _lambda_of(schedule)(ref_opt)
    p = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    p.grad = torch.randn_like(p)
    opt = fusedopt.AdamW([p], lr=schedule, backend=backend, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # eager warm-up: state, tables, kernels
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    last = opt._last_lr[0]  # the buffer the captured prologue writes
    for k in range(1000):
        expected = ref_opt.param_groups[0]["lr"]
        graph.replay()
        ref.step()
        assert float(last) == pytest.approx(expected, rel=HF_RTOL, abs=DEVICE_ATOL), k
    assert float(opt.param_groups[0]["lr_step"]) == 1003


@pytest.mark.parametrize("backend,device", NOT_INTERPRETED)
def test_last_lr_is_a_snapshot(backend, device, require_backend):
    """get_last_lr() before the first step is the first update's lr (a float); after a step, a
    0-d device tensor that later steps do not change."""
    require_backend(backend, device)
    schedule = S.linear(LR, 2, 10)
    p = torch.nn.Parameter(torch.randn(5, device=device))
    opt = fusedopt.AdamW([p], lr=schedule, backend=backend)
    assert opt.get_last_lr()[0] == schedule.rate(1) == 0.0
    seen = []
    for _ in range(4):
        p.grad = torch.ones_like(p)
        opt.step()
        seen.append(opt.get_last_lr()[0])
    assert all(isinstance(x, torch.Tensor) and x.device == p.device for x in seen)
    assert [float(x) for x in seen] == [schedule.rate(t) for t in (1, 2, 3, 4)]
