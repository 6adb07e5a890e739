"""The native libraries: op registration (schemas, fake kernels), loading and fallback, info."""

import subprocess
import sys

import pytest
import torch
from parity import clone_params, grads, make_params, set_grads

import fusedopt
from fusedopt import _tables, backends
from fusedopt.backends import native


def _require_cpu_backend():
    reason = backends.unavailable("cpu", "cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize(
    "cls,kw", [("AdamW", dict(amsgrad=True)), ("RMSprop", dict(centered=True, momentum=0.9))]
)
def test_opcheck_schema_and_fake(cls, kw, monkeypatch):
    """torch.library.opcheck: the schema declares every mutated argument, and the fake kernel
    traces. (Its aot_dispatch check is for torch.compile support, which is later work: the kernels
    read parameter addresses from the cached tables, not from the op's tensor arguments.)"""
    _require_cpu_backend()
    params = clone_params(make_params([(7,), (1030,)]))
    opt = getattr(fusedopt, cls)(params, backend="cpu", **kw)
    set_grads(params, grads(0, params))
    opt.step()  # creates state and tables
    work = opt._gather()[torch.device("cpu")]
    opt._prepare(work)
    tables = opt._tables[("cpu", torch.device("cpu"))].update(work)
    slots = work.slots
    args = (
        [s.param for s in slots],
        [t for s in slots for t in s.states if t is not None],
        [s.step for s in slots],
        [],
        [s.grad for s in slots],
        tables.tmeta,
        tables.grads,
        tables.chunks,
        tables.hyper,
        tables.gptr,
        tables.glr,
        tables.scal,
        tables.partials,
        tables.clip,
        [0],
        tables.bucket_offsets,
        tables.chunk,
        torch.tensor(1024.0),
        torch.tensor(0.0),
        1.0,  # GradScaler's scale, no inf; clipping
    )
    if cls == "RMSprop":
        op, args = torch.ops.fusedopt.rmsprop_step.default, args + (True, True, 0)
    else:
        op, args = torch.ops.fusedopt.adam_step.default, args + (True, 0)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_missing_library_falls_back(monkeypatch, tmp_path):
    """Without the compiled library, the cpu backend says why and "auto" uses "torch"."""
    monkeypatch.setattr(native, "_HERE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    reason = backends.unavailable("cpu", "cpu")
    assert reason is not None and "was not built" in reason
    assert backends.select("auto", "cpu") == "torch"
    p = torch.nn.Parameter(torch.randn(4))
    opt = fusedopt.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[p]["step"]) == 1
    with pytest.raises(RuntimeError, match="'cpu' cannot run on cpu: .*was not built"):
        fusedopt.Adam([p], backend="cpu")


def test_broken_library_falls_back(monkeypatch, tmp_path):
    (tmp_path / "_C.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(native, "_HERE", str(tmp_path))
    monkeypatch.setattr(native, "_LOADED", {})
    assert "failed to load" in backends.unavailable("cpu", "cpu")
    assert backends.select("auto", "cpu") == "torch"


def test_info_command():
    out = subprocess.run(
        [sys.executable, "-m", "fusedopt.info"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"torch {torch.__version__}" in text
    assert "fusedopt._C" in text and "fusedopt._cuda" in text
    for name in backends.BACKENDS:
        assert f" {name} " in text
    if not torch.cuda.is_available():
        assert "GPU: none" in text


def test_cpu_tables_cached_across_steps(monkeypatch):
    _require_cpu_backend()
    builds = []
    original = _tables.DeviceTables._tensor_rows
    monkeypatch.setattr(
        _tables.DeviceTables,
        "_tensor_rows",
        staticmethod(lambda slots: builds.append(1) or original(slots)),
    )
    params = clone_params(make_params())
    opt = fusedopt.RMSprop(params, backend="cpu")
    for k in range(3):
        set_grads(params, grads(k, params))  # new grad tensors: only the grad table changes
        opt.step()
    assert len(builds) == 1
