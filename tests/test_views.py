"""Parameters, grads and optimizer state that are views at odd element offsets of shared buffers.

The CUDA and Triton kernels move 128-bit vectors only when every pointer a chunk touches is
16-byte aligned, else one element at a time; the CPU kernels are auto-vectorized. Fresh
allocations are always aligned, so every other test takes the vector path. Here the same training
runs twice on one backend, once on fresh tensors and once on views at odd offsets (never 16-byte
aligned, for 2- and 4-byte dtypes alike), and the two must agree bit for bit: the element-wise
path computes exactly what the vector path does. The elements of the buffers between the views
must stay untouched.
"""

import pytest
import torch
from conftest import backend_device_params
from parity import assert_same, clone_params, grads, make_params, set_grads

import fusedopt
from fusedopt._layout import bucket_code
from fusedopt.backends.native import NATIVE_BUCKETS
from fusedopt.optimizer import PRECISION_DEFAULTS, _bucket_of

BACKENDS = backend_device_params()
STEPS = 5  # the state is moved into shared buffers after the first
# empty, one element, odd sizes, 2-d, and more than one 1024-element block; both groups below get
# a 1030-element tensor. About 2k elements: the Triton interpreter is slow.
SHAPES = [(1030,), (0,), (7,), (3, 5), (1,), (1030,)]

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# Every bucket the native kernels have (test_every_native_bucket_is_covered): parameter dtype and
# the optimizer options that select it.
BUCKETS = [
    pytest.param(f32, {}, id="fp32"),
    pytest.param(bf16, {}, id="bf16"),
    pytest.param(f16, {}, id="fp16"),
    pytest.param(f32, dict(state_dtype=bf16), id="fp32-bf16state"),
    pytest.param(f32, dict(state_dtype=f16), id="fp32-fp16state"),
    pytest.param(bf16, dict(master_weights=True), id="bf16-master"),
    pytest.param(f16, dict(master_weights=True), id="fp16-master"),
    pytest.param(bf16, dict(master_weights=True, state_dtype=bf16), id="bf16-master-bf16state"),
    pytest.param(bf16, dict(state_dtype=f32), id="bf16-fp32state"),
    pytest.param(bf16, dict(stochastic_rounding=True), id="bf16-stochastic"),
    pytest.param(
        bf16, dict(stochastic_rounding=True, state_dtype=f32), id="bf16-stochastic-fp32state"
    ),
]
# Two groups per optimizer, so one pass holds tensors with and without each optional state:
# the kernels check an optional state's alignment only where the tensor's group uses it.
GROUPS = {
    "Adam": [
        dict(amsgrad=True, maximize=True, weight_decay=0.1),
        dict(decoupled_weight_decay=True, weight_decay=0.1, betas=(0.8, 0.99)),
    ],
    "RMSprop": [
        dict(centered=True, momentum=0.9, weight_decay=0.1),
        dict(maximize=True, alpha=0.9),
    ],
}
STATES = {
    "Adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "RMSprop": ("square_avg", "momentum_buffer", "grad_avg"),
}
_BITS = {f32: torch.int32, bf16: torch.int16, f16: torch.int16}


def _aligned(t):
    return t.data_ptr() % 16 == 0


class Shared:
    """A flat buffer of ``dtype`` holding one view per shape, each at an odd element offset, with
    at least one element before, between and after them that no view covers."""

    def __init__(self, shapes, dtype, device, seed):
        offsets, off = [], 1
        for shape in shapes:
            offsets.append(off)
            off += torch.Size(shape).numel() + 1
            off += 1 - off % 2
        gen = torch.Generator().manual_seed(seed)
        self.buf = torch.randn(off, generator=gen, dtype=torch.float64).to(dtype).to(device)
        self.initial = self.buf.clone()
        self.free = torch.ones(off, dtype=torch.bool, device=device)
        self.views = []
        for shape, o in zip(shapes, offsets):
            n = torch.Size(shape).numel()
            self.free[o : o + n] = False
            self.views.append(self.buf[o : o + n].view(shape))

    def assert_free_untouched(self, what):
        bits = _BITS[self.buf.dtype]
        free_now = self.buf[self.free].view(bits)
        assert torch.equal(free_now, self.initial[self.free].view(bits)), (
            f"{what}: an element between the views was written"
        )


def _move_state(opt, params, names, seed):
    """Replace every state tensor named in ``names`` (including ``master_param``) with a view of a
    shared buffer (one per dtype) holding the same values. Returns the Shared buffers by role."""
    picked = [(p, name) for p in params for name in names if name in opt.state[p]]
    by_dtype = {}
    for p, name in picked:
        by_dtype.setdefault(opt.state[p][name].dtype, []).append((p, name))
    out = {}
    for i, (dtype, items) in enumerate(by_dtype.items()):
        shared = Shared(
            [opt.state[p][n].shape for p, n in items], dtype, params[0].device, seed + i
        )
        for (p, name), view in zip(items, shared.views):
            view.copy_(opt.state[p][name])
            opt.state[p][name] = view
        out[f"{dtype} state"] = shared
    return out


def _train(cls, dtype, precision, params, backend, roles):
    """STEPS steps of ``cls`` on copies of ``params``. Tensors of the ``roles`` named ("param",
    "grad", "master_param", state names) are views into Shared buffers; the rest are fresh."""
    device = params[0].device
    shapes = [p.shape for p in params]
    buffers = {}
    if "param" in roles:
        buffers["param"] = Shared(shapes, dtype, device, seed=10)
        ps = []
        for view, p in zip(buffers["param"].views, params):
            q = torch.nn.Parameter(view.copy_(p))
            assert q.data_ptr() == view.data_ptr()  # a Parameter shares its tensor's storage
            ps.append(q)
    else:
        ps = clone_params(params)
    if "grad" in roles:
        buffers["grad"] = Shared(shapes, dtype, device, seed=11)
        for p, view in zip(ps, buffers["grad"].views):
            p.grad = view
            assert p.grad.stride() == p.stride()  # else fusedopt would pass the kernel a copy
    groups = [dict(params=ps[i::2], **g) for i, g in enumerate(GROUPS[cls])]
    opt = getattr(fusedopt, cls)(groups, lr=1e-2, backend=backend, **precision)
    state_roles = [n for n in (*STATES[cls], "master_param") if n in roles]
    moved = {}
    for k in range(STEPS):
        gs = grads(k, ps)
        if "grad" in roles:
            for p, g in zip(ps, gs):
                p.grad.copy_(g)
        else:
            set_grads(ps, gs)
        opt.step()
        if k == 0 and state_roles:
            buffers.update(_move_state(opt, ps, state_roles, seed=12))
            moved = {(p, n): opt.state[p][n] for p in ps for n in state_roles if n in opt.state[p]}
    for (p, name), view in moved.items():
        assert opt.state[p][name] is view, f"fusedopt replaced the {name} view"
    if "grad" in roles:
        for p, view in zip(ps, buffers["grad"].views):
            assert p.grad is view
    return opt, ps, buffers


def _assert_alignment(opt, params, roles):
    """The tensors of ``roles`` are not 16-byte aligned, all others are."""
    for i, p in enumerate(params):
        state = [(k, v) for k, v in opt.state[p].items() if k != "step"]
        for role, t in [("param", p), ("grad", p.grad), *state]:
            if t.numel() == 0:
                continue
            if role in roles:
                assert not _aligned(t), f"param {i} {role}: the view is 16-byte aligned"
            else:
                assert _aligned(t), f"param {i} {role}: a fresh tensor is not 16-byte aligned"


def _assert_bitwise(opt_a, params_a, opt_b, params_b):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        bits = _BITS[a.dtype]
        assert torch.equal(a.detach().view(bits), b.detach().view(bits)), f"param {i}"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sb)} != {sorted(sa)}"
        for key, va in sa.items():
            vb = sb[key]
            assert va.dtype == vb.dtype, f"param {i} {key}: dtype"
            if key == "step":
                assert float(va) == float(vb) == STEPS, f"param {i} step"
            else:
                bits = _BITS[va.dtype]
                assert torch.equal(va.view(bits), vb.view(bits)), f"param {i} {key}"


def _check(backend, device, cls, dtype, precision, roles):
    params = make_params(SHAPES, dtype=dtype, device=device)
    ref = _train(cls, dtype, precision, params, backend, roles=())
    opt, ps, buffers = _train(cls, dtype, precision, params, backend, roles)
    _assert_alignment(*ref[:2], roles=())
    _assert_alignment(opt, ps, roles)
    _assert_bitwise(*ref[:2], opt, ps)
    for what, shared in buffers.items():
        shared.assert_free_untouched(what)
    return opt, ps


@pytest.mark.parametrize("dtype,precision", BUCKETS)
@pytest.mark.parametrize("cls", ["Adam", "RMSprop"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_odd_offset_views_match_fresh_tensors(
    backend, device, cls, dtype, precision, require_backend
):
    """Every tensor the step reads or writes a view at an odd offset: bit-identical results to
    fresh tensors, nothing written between the views; fp32 also matches torch.optim."""
    require_backend(backend, device)
    roles = ("param", "grad", "master_param", *STATES[cls])
    opt, ps = _check(backend, device, cls, dtype, precision, roles)
    if dtype == f32 and not precision:
        ref = clone_params(make_params(SHAPES, device=device))
        ropt = getattr(torch.optim, cls)(
            [dict(params=ref[i::2], **g) for i, g in enumerate(GROUPS[cls])], lr=1e-2
        )
        for k in range(STEPS):
            set_grads(ref, grads(k, ref))
            ropt.step()
        assert_same(ropt, ref, opt, ps)


@pytest.mark.parametrize(
    "cls,role",
    [(cls, r) for cls in GROUPS for r in ("param", "grad", "master_param", *STATES[cls])],
    ids=lambda v: v,
)
@pytest.mark.parametrize("backend,device", backend_device_params(("triton", "cpu", "cuda")))
def test_one_unaligned_tensor(backend, device, cls, role, require_backend):
    """One tensor misaligned, the others fresh (aligned). The CUDA and Triton kernels choose the
    vector path per chunk from every pointer it touches; with all pointers misaligned a forgotten
    check goes unnoticed, with one alone it is a misaligned vector access (a fault, or wrong
    values; on a GPU: the Triton interpreter reads any address). bf16 parameters with an fp32
    master have every role: the model's parameter ("param"), the master the update reads and
    writes, the grad and each state."""
    require_backend(backend, device)
    _check(backend, device, cls, bf16, dict(master_weights=True), roles=(role,))


def test_every_native_bucket_is_covered():
    """BUCKETS selects exactly the buckets the native kernels support."""
    p = torch.empty(1)
    selected = {
        bucket_code(_bucket_of(p.to(param.values[0]), {**PRECISION_DEFAULTS, **param.values[1]}))
        for param in BUCKETS
    }
    assert selected == NATIVE_BUCKETS
