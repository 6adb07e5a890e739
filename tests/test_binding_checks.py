"""The native ops check their arguments before any kernel runs (csrc/include/fusedopt/step_args.h).

Each case builds the call the cpu backend makes (fusedopt/backends/native.py) from real tables,
corrupts one thing, and expects a RuntimeError that says what is wrong, with the parameters, the
states, the steps, the counters and the grads unchanged bit for bit. Without the checks these calls
read or write out of bounds, update the wrong memory, or silently skip the step.
"""

import pytest
import torch

import fusedopt
from fusedopt import _layout as L
from fusedopt import backends

CPU = torch.device("cpu")
MUTATED = ("params", "states", "steps", "counters", "grads")


@pytest.fixture(autouse=True)
def _cpu_backend():
    reason = backends.unavailable("cpu", "cpu")
    if reason:
        pytest.skip(f"the cpu backend is unavailable: {reason}")


def step_call(opt):
    """(op, kwargs) of the call the cpu backend makes for ``opt``'s next step, as
    fusedopt/backends/native.py assembles it (kwargs by the schema's names)."""
    work = opt._gather()[CPU]
    opt._prepare(work)
    tables = opt._tables[("cpu", CPU)].update(work)
    slots = work.slots
    kw = {
        "params": [s.param for s in slots] + [s.shadow for s in slots if s.shadow is not None],
        "states": [t for s in slots for t in s.states if t is not None],
        "steps": [s.step for s in slots],
        "counters": [g.counter for g in work.lrs if g.counter is not None],
        "grads": [s.grad for s in slots],
        "tmeta": tables.tmeta,
        "grads_meta": tables.grads,
        "chunks": tables.chunks,
        "hyper": tables.hyper,
        "gptr": tables.gptr,
        "glr": tables.glr,
        "scal": tables.scal,
        "partials": tables.partials,
        "clip": tables.clip,
        "bucket_dtypes": [L.bucket_code(b) for b, _ in tables.bucket_chunks],
        "bucket_offsets": list(tables.bucket_offsets),
        "chunk_size": tables.chunk,
        "grad_scale": work.amp["grad_scale"],
        "found_inf": work.amp["found_inf"],
        "max_norm": work.amp["max_norm"],
    }
    kw["optimizer"] = L.OPTIMIZERS[opt._op]
    used = {k for s in slots for k, t in enumerate(s.states) if t is not None}
    kw["state_mask"] = sum(1 << k for k in used)
    return torch.ops.fusedopt.step, kw


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _stepped(cls, params, **kw):
    """A cpu-backend optimizer after one step (state and tables exist), with fresh grads for the
    next."""
    opt = cls(params, backend="cpu", **kw)
    gen = torch.Generator().manual_seed(1)
    for k in range(2):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if k == 0:
            opt.step()
    return opt


# Optimizers whose next step the cases corrupt.
SETUPS = {
    # 3 fp32 tensors of 7, 40000 (3 chunks of 16384) and 15 elements in 2 groups: 5 chunks, one
    # bucket
    "adam": lambda: _stepped(
        fusedopt.Adam,
        [{"params": _params([(7,), (40000,)])}, {"params": _params([(3, 5)], seed=1), "lr": 0.01}],
        amsgrad=True,
    ),
    "rmsprop": lambda: _stepped(
        fusedopt.RMSprop, _params([(7,), (40000,)]), centered=True, momentum=0.9
    ),
    # two buckets: fp32 (row 0), bf16 (row 1)
    "mixed": lambda: _stepped(fusedopt.Adam, _params([(7,)]) + _params([(40,)], torch.bfloat16)),
    # bf16 parameters updated through fp32 masters: params = [master, shadow]
    "master": lambda: _stepped(
        fusedopt.Adam, _params([(40,)], torch.bfloat16), master_weights=True
    ),
    "noam": lambda: _stepped(
        fusedopt.Adam, _params([(7,)]), lr=fusedopt.Noam(d_model=16, warmup=10)
    ),
    "tensor_lr": lambda: _stepped(fusedopt.Adam, _params([(7,)]), lr=torch.tensor(1e-3)),
    "schedule": lambda: _stepped(
        fusedopt.Adam, _params([(7,)]), lr=fusedopt.schedules.cosine(1e-3, 2, 10)
    ),
}


def _set(name, fn):
    """A corruption that replaces kwargs[name] by fn(kwargs[name])."""

    def corrupt(kw):
        kw[name] = fn(kw[name])

    return corrupt


def _edit(name, index, value):
    """A corruption that writes ``value`` at ``index`` of a copy of the table kwargs[name]."""

    def fn(t):
        t = t.clone()
        t[index] = value
        return t

    return _set(name, fn)


def _grad_of_3(kw):
    g = torch.zeros(3)
    kw["grads"] = [g] + kw["grads"][1:]
    kw["grads_meta"] = kw["grads_meta"].clone()
    kw["grads_meta"][0] = g.data_ptr()


def _swap_bucket_codes(kw):
    kw["bucket_dtypes"] = kw["bucket_dtypes"][::-1]


def _steal_chunk(kw):  # bucket 1's chunk names tensor 0, which has a chunk in bucket 0
    kw["chunks"] = kw["chunks"].clone()
    kw["chunks"][1, 0] = 0


def _two_buckets_decreasing(kw):
    kw["bucket_dtypes"] = kw["bucket_dtypes"] * 2
    kw["bucket_offsets"] = [0, 4, 2]


def _clipping(corrupt):
    def fn(kw):
        kw["max_norm"] = 1.0
        corrupt(kw)

    return fn


def _skipped_step(corrupt):  # GradScaler found an inf: the checks still run first
    def fn(kw):
        kw["found_inf"] = torch.tensor(1.0)
        corrupt(kw)

    return fn


CASES = [
    # (setup, id, corruption, message)
    (
        "adam",
        "tmeta-width",
        _set("tmeta", lambda t: t[:, :7].contiguous()),
        rf"tmeta must be \[n_tensors, {L.TMETA_WIDTH}\]",
    ),
    (
        "adam",
        "tmeta-1d",
        _set("tmeta", lambda t: t.reshape(-1)),
        rf"tmeta must be \[n_tensors, {L.TMETA_WIDTH}\]",
    ),
    (
        "adam",
        "grads-meta-short",
        _set("grads_meta", lambda t: t[:-1]),
        r"grads_meta must hold one address per row of tmeta",
    ),
    ("adam", "scal-short", _set("scal", lambda t: t[:-1]), r"scal must be \[n_tensors, 12\]"),
    (
        "adam",
        "hyper-width",
        _set("hyper", lambda t: t[:, :-1].contiguous()),
        r"hyper must be \[n_groups, 12\]",
    ),
    (
        "adam",
        "gptr-rows",
        _set("gptr", lambda t: t[:1]),
        rf"gptr must be \[n_groups, {L.GPTR_WIDTH}\]",
    ),
    ("adam", "glr-short", _set("glr", lambda t: t[:1]), r"glr must hold one lr per group \(2\)"),
    (
        "adam",
        "chunks-width",
        _set("chunks", lambda t: t[:, :1].contiguous()),
        r"chunks must be \[n_chunks, 2\]",
    ),
    (
        "adam",
        "chunk-size-0",
        _set("chunk_size", lambda c: 0),
        r"chunk_size must be in \[1, 2\^31\); got 0",
    ),
    ("adam", "chunk-size-negative", _set("chunk_size", lambda c: -c), r"chunk_size must be in"),
    (
        "adam",
        "chunk-size-not-the-tables",
        _set("chunk_size", lambda c: 2 * c),
        r"chunk 2 starts at element 16384, not a multiple of chunk_size \(32768\)",
    ),
    (
        "adam",
        "offsets-past-end",
        _set("bucket_offsets", lambda o: [0, o[-1] + 1]),
        r"bucket_offsets end at chunk 6, past the end of the chunk table \(5 chunks\)",
    ),
    (
        "adam",
        "offsets-not-from-0",
        _set("bucket_offsets", lambda o: [1, o[-1]]),
        r"bucket_offsets must start at 0",
    ),
    ("adam", "offsets-decreasing", _two_buckets_decreasing, r"bucket_offsets must not decrease"),
    (
        "adam",
        "chunk-tensor-past-end",
        _edit("chunks", (0, 0), 3),
        r"chunk 0 names tensor 3, outside \[0, 3\)",
    ),
    ("adam", "chunk-tensor-negative", _edit("chunks", (4, 0), -1), r"chunk 4 names tensor -1"),
    (
        "adam",
        "chunk-start-past-numel",
        _edit("chunks", (0, 1), 16384),
        r"chunk 0 starts at element 16384, outside tensor 0 \(7 elements\)",
    ),
    (
        "adam",
        "chunk-start-negative",
        _edit("chunks", (1, 1), -16384),
        r"chunk 1 starts at element -16384, outside tensor 1",
    ),
    (
        "adam",
        "chunk-start-unaligned",
        _edit("chunks", (2, 1), 16000),
        r"chunk 2 starts at element 16000, not a multiple",
    ),
    (
        "adam",
        "group-past-end",
        _edit("tmeta", (2, L.T_GROUP), 2),
        r"tmeta row 2 has param group 2, outside \[0, 2\)",
    ),
    (
        "adam",
        "group-negative",
        _edit("tmeta", (0, L.T_GROUP), -1),
        r"tmeta row 0 has param group -1",
    ),
    ("adam", "numel-negative", _edit("tmeta", (0, L.T_NUMEL), -1), r"tmeta row 0 has numel -1"),
    (
        "adam",
        "numel-too-large",
        _edit("tmeta", (1, L.T_NUMEL), 50000),
        r"params\[1\] \(40000 elements .*\) is not the tensor tmeta row 1 describes "
        r"\(50000 elements",
    ),
    (
        "adam",
        "params-swapped",
        _set("params", lambda p: [p[1], p[0], *p[2:]]),
        r"params\[0\] .* is not the tensor tmeta row 0 describes",
    ),
    (
        "adam",
        "params-short",
        _set("params", lambda p: p[:-1]),
        r"params must hold the 3 updated parameters",
    ),
    (
        "adam",
        "steps-short",
        _set("steps", lambda s: s[:-1]),
        r"steps must hold one tensor per row of tmeta \(3\); got 2",
    ),
    (
        "adam",
        "step-not-the-tables",
        _set("steps", lambda s: [torch.zeros(()), *s[1:]]),
        r"tmeta row 0's step address is not that of steps\[0\]",
    ),
    (
        "adam",
        "step-float64",
        _set("steps", lambda s: [s[0].double(), *s[1:]]),
        r"steps\[0\] must be a float32 scalar",
    ),
    (
        "adam",
        "grads-short",
        _set("grads", lambda g: g[:-1]),
        r"grads must hold one tensor per row of tmeta \(3\); got 2",
    ),
    (
        "adam",
        "grad-address",
        _edit("grads_meta", 1, 0),
        r"grads\[1\] .* is not the tensor grads_meta row 1 describes",
    ),
    (
        "adam",
        "grad-numel",
        _grad_of_3,
        r"grads\[0\] \(3 elements .* is not the tensor grads_meta row 0 describes \(7 elements",
    ),
    (
        "adam",
        "grad-strided",
        _set("grads", lambda g: [torch.zeros(14)[::2], *g[1:]]),
        r"grads\[0\] must be dense in memory",
    ),
    (
        "adam",
        "state-address-0",
        _edit("tmeta", (1, L.T_S1), 0),
        r"tmeta row 1: state slot 1 at 0x0 is not a tensor of states with 40000 elements",
    ),
    (
        "adam",
        "state-not-listed",
        _set("states", lambda s: s[:-1]),
        r"tmeta row 2: state slot 2 .* is not a tensor of states",
    ),
    (
        "adam",
        "partials-short-clipping",
        _clipping(_set("partials", lambda t: t[:4])),
        rf"clipping needs one partial sum per chunk \(5\) and the reduction's first stage: "
        rf"{L.partials_numel(5)} floats .*; partials has 4",
    ),
    (
        "adam",
        "partials-without-first-stage",  # a sum per chunk, no room for the stage's float64s
        _clipping(_set("partials", lambda t: t[:5])),
        rf"first stage: {L.partials_numel(5)} floats .*; partials has 5",
    ),
    (
        "adam",
        "clip-short-clipping",
        _clipping(_set("clip", lambda t: t[:1])),
        r"clipping needs clip to hold 2 floats",
    ),
    (
        "adam",
        "checked-before-skipped-step",
        _skipped_step(_edit("chunks", (0, 0), 3)),
        r"chunk 0 names tensor 3",
    ),
    (
        "rmsprop",
        "tmeta-width",
        _set("tmeta", lambda t: t[:, :7].contiguous()),
        rf"tmeta must be \[n_tensors, {L.TMETA_WIDTH}\]",
    ),
    (
        "rmsprop",
        "chunk-tensor-past-end",
        _edit("chunks", (1, 0), 2),
        r"chunk 1 names tensor 2, outside \[0, 2\)",
    ),
    (
        "rmsprop",
        "momentum-buffer-address-0",
        _edit("tmeta", (0, L.T_S1), 0),
        r"tmeta row 0: state slot 1 .* is not a tensor of states",
    ),
    (
        "rmsprop",
        "partials-short-clipping",
        _clipping(_set("partials", lambda t: t[:1])),
        r"clipping needs one partial sum per chunk",
    ),
    (
        "mixed",
        "bucket-dtype-not-the-params",
        _swap_bucket_codes,
        r"tensor 0 has chunks in the bucket \(param bfloat16.*\), "
        r"which needs params\[0\] to be BFloat16; it is Float",
    ),
    ("mixed", "tensor-in-two-buckets", _steal_chunk, r"tensor 0 has chunks in buckets 0 and 1"),
    (
        "master",
        "shadow-not-listed",
        _set("params", lambda p: p[:1]),
        r"tmeta row 0: the model parameter its master is rounded into \(T_SHADOW\) "
        r".* is not a tensor of params",
    ),
    (
        "master",
        "shadow-address-0",
        _edit("tmeta", (0, L.T_SHADOW), 0),
        r"is not a tensor of params after the first n_tensors",
    ),
    (
        "noam",
        "counter-not-listed",
        _set("counters", lambda c: []),
        r"group 0 takes its lr from a Noam schedule, and its counter address",
    ),
    (
        "schedule",
        "counter-not-listed",
        _set("counters", lambda c: []),
        r"group 0 takes its lr from a schedule, and its counter address",
    ),
    (
        "schedule",
        "parameters-address-0",
        _edit("gptr", (0, L.G_SCHED_PTR), 0),
        r"group 0 takes its lr from a schedule, and gptr holds no address for its parameters",
    ),
    (
        "tensor_lr",
        "lr-address-0",
        _edit("gptr", (0, L.G_LR_PTR), 0),
        r"group 0 takes its lr from a tensor, and gptr holds no address",
    ),
]


def _bits(kw):
    """A bit-for-bit copy of every tensor the op may write (NaN-safe: compared as bytes)."""
    return {
        name: [t.detach().reshape(-1).clone().view(torch.uint8) for t in kw[name]]
        for name in MUTATED
    }


def _assert_same_bits(before, kw):
    after = _bits(kw)
    for name in MUTATED:
        assert len(before[name]) == len(after[name])
        for i, (a, b) in enumerate(zip(before[name], after[name])):
            assert torch.equal(a, b), f"{name}[{i}] changed"


@pytest.mark.parametrize(
    "setup,corrupt,message",
    [pytest.param(s, c, m, id=f"{s}-{i}") for s, i, c, m in CASES],
)
def test_malformed_call_raises_and_changes_nothing(setup, corrupt, message):
    op, kw = step_call(SETUPS[setup]())
    corrupt(kw)
    before = _bits(kw)
    with pytest.raises(RuntimeError, match=message):
        op(**kw)
    _assert_same_bits(before, kw)


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("amp", ["plain", "scaled-clipped"])
def test_well_formed_call_is_the_step(setup, amp):
    """The call step_call builds passes the checks and does exactly what opt.step() does."""
    direct, stepped = SETUPS[setup](), SETUPS[setup]()
    if amp == "scaled-clipped":
        for o in (direct, stepped):
            o.max_grad_norm = 0.5
            o.grad_scale, o.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    op, kw = step_call(direct)
    op(**kw)
    stepped.step()
    for a, b in zip(direct.param_groups, stepped.param_groups):
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(p.grad.view(torch.uint8), q.grad.view(torch.uint8))
            for name, t in direct.state[p].items():
                assert torch.equal(t, stepped.state[q][name]), name
