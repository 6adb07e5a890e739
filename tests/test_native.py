"""The native libraries: op registration (schemas, fake kernels), loading and fallback, info."""

import subprocess
import sys

import pytest
import torch
from parity import clone_params, grads, make_params, set_grads
from test_binding_checks import step_call
from torch._subclasses import CrossRefFakeMode
from torch._subclasses.schema_check_mode import SchemaCheckMode

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
def test_opcheck_schema_and_fake(cls, kw):
    """What torch.library.opcheck's test_schema and test_faketensor check, on the call itself:
    the schema declares every argument the op mutates (SchemaCheckMode), and the fake kernel agrees
    with the real one (CrossRefFakeMode). opcheck runs the op on copies of the tensors, which the
    tables do not describe, and the op refuses such a call. (opcheck's aot_dispatch check is for
    torch.compile support, which is later work: the kernels read parameter addresses from the
    cached tables, not from the op's tensor arguments.)"""
    _require_cpu_backend()
    params = clone_params(make_params([(7,), (1030,)]))
    opt = getattr(fusedopt, cls)(params, backend="cpu", max_grad_norm=1.0, **kw)
    opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    set_grads(params, grads(0, params))
    opt.step()  # creates state and tables
    op, kwargs = step_call(opt)
    with SchemaCheckMode():
        op.default(**kwargs)
    with CrossRefFakeMode(ignore_op_fn=lambda o: o.namespace != "fusedopt"):
        op.default(**kwargs)


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
