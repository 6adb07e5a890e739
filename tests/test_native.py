"""The native libraries: op registration (schemas, fake kernels), loading and fallback, info."""

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

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
    "cls,kw",
    [
        ("AdamW", dict(amsgrad=True)),
        ("RMSprop", dict(centered=True, momentum=0.9)),
        ("SGD", dict(momentum=0.9, nesterov=True)),
    ],
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


# Variant loops per (optimizer, bucket) function of csrc/cpu/update_<optimizer>.cpp: its option sets
# (canonical Args::on values: Adam 4, RMSprop 8, SGD 10) x GradScaler's unscaling (2).
_CPU_LOOPS = {"Adam": 8, "Rmsprop": 16, "Sgd": 20}


def test_cpu_update_loops_are_vectorized():
    """The optimizers' updates are auto-vectorized in the AVX2 and AVX-512 clones of every bucket
    without fp16 (GCC does not vectorize its _Float16 conversions): from _C.so's disassembly,
    each (optimizer, bucket) clone has at least as many packed square roots (Adam, RMSprop: one
    per element update) or packed FMAs (SGD: p - lr * g) as it has variant loops. At 16e375e
    Adam had 28-32 and RMSprop 38-64 packed square roots per clone, exactly as many as before
    their math moved to fusedopt/optim/*.h; SGD 80-160 packed FMAs."""
    objdump = shutil.which("objdump")
    lib = Path(native.__file__).resolve().parents[1] / "_C.so"
    if objdump is None or not lib.exists():
        pytest.skip("needs objdump and the built fusedopt/_C.so")
    dis = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", str(lib)], capture_output=True, text=True
    ).stdout
    counts, current = {}, None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            m = re.search(
                r"update_chunks_typed<fusedopt::(\w+), fusedopt::cpu::Bucket<([^>]*)>", head[1]
            )
            clone = re.search(r"\.(arch_x86_64_v[34])", head[1])
            current = (m[1], m[2], clone[1]) if m and clone else None
            if current:
                counts[current] = Counter()
            continue
        if current:
            if re.search(r"\bv?sqrtps\b", line):
                counts[current]["sqrt"] += 1
            if re.search(r"\bvfn?m(add|sub)\w*ps\b", line):
                counts[current]["fma"] += 1
    checked = 0
    for (opt, bucket, clone), c in counts.items():
        if "2" in [x.strip() for x in bucket.split(",")[:3]]:
            continue  # an fp16 array: not vectorized, before the shared headers as after
        fields = [x.strip() for x in bucket.split(",")]
        if clone == "arch_x86_64_v3" and fields[-1] in ("8", "16"):
            # compressed masters (an int8/int16 error term): GCC keeps the AVX2 clone's loop
            # scalar (the float -> int8/int16 narrowing; measured at 4f0e1c2+1), the AVX-512
            # one is vectorized and checked
            continue
        packed = c["fma"] if opt == "Sgd" else c["sqrt"]
        assert packed >= _CPU_LOOPS[opt], f"{opt} {bucket} {clone}: {dict(c)}"
        checked += 1
    # 3 optimizers, 16 buckets without fp16 (4 with 8-bit state, 4 with compressed masters),
    # 2 ISAs, less the compressed masters' AVX2 clones
    assert checked == 3 * 16 * 2 - 3 * 4, sorted(counts)
