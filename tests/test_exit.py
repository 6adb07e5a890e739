"""A process that stepped exits with status 0, with every backend and optimizer.

A Python object held in a C++ static (csrc/plan.cpp's dict keys, issue 22) was released by the C++
exit handlers after the interpreter had finalized: under Python 3.12 every process that had
stepped, whatever the backend (they all go through the step plan), then died with SIGSEGV (exit
status 139 in a shell, -11 from subprocess) after its work was done. Only a fresh process, run
to its end, shows that.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

import fusedopt

# Steps each backend named on the command line that can run on the device, every optimizer three
# times (the first step builds the plan, the later ones reuse it), and says what it did.
CHILD = r"""
import sys, torch, fusedopt
from fusedopt import backends

device, names = sys.argv[1], sys.argv[2:]
options = {"Adam": dict(amsgrad=True), "AdamW": {}, "RMSprop": dict(momentum=0.9),
           "SGD": dict(momentum=0.9)}
for name in names:
    reason = backends.unavailable(name, device)
    if reason:
        print(f"unavailable {name}: {reason}", flush=True)
        continue
    for cls, kwargs in options.items():
        ps = [torch.nn.Parameter(torch.ones(n, device=device)) for n in (10, 3)]
        opt = getattr(fusedopt, cls)(ps, lr=1e-2, backend=name, **kwargs)
        for _ in range(3):
            for p in ps:
                p.grad = torch.ones_like(p)
            opt.step()
        for p in ps:
            assert bool(torch.isfinite(p).all()) and float(p.detach()[0]) != 1.0, (name, cls)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"stepped {name}", flush=True)
"""

DEVICES = [
    # Triton on CPU tensors only through its interpreter, which must be set before the import.
    pytest.param("cpu", ("cpu", "torch", "triton"), {"TRITON_INTERPRET": "1"}, id="cpu"),
    pytest.param("cuda", ("cuda", "triton", "torch"), {}, id="cuda", marks=pytest.mark.cuda),
]


@pytest.mark.parametrize("device,names,env", DEVICES)
def test_process_that_stepped_exits_cleanly(device, names, env, tmp_path):
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env)
    # the fusedopt this process imported (the checkout's or an installed one), from any cwd
    child_env["PYTHONPATH"] = os.path.dirname(os.path.dirname(fusedopt.__file__))
    r = subprocess.run(
        [sys.executable, "-c", CHILD, device, *names],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=child_env,
    )
    out = f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    signal = " (SIGSEGV)" if r.returncode == -11 else ""
    assert r.returncode == 0, f"exit status {r.returncode}{signal}\n{out}"
    stepped = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("stepped ")}
    # Every backend that can run here must have stepped: on CPU the native library and torch
    # always, Triton wherever it is installed; on a GPU machine all three.
    must = set(names)
    if device == "cpu" and importlib.util.find_spec("triton") is None:
        must.discard("triton")
    assert must <= stepped, f"did not step {sorted(must - stepped)}\n{out}"
