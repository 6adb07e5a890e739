"""scripts/gpu_check.sh, the GPU machine's first command: its dry run (the same control flow on a
CPU machine) and its loud, early failure on a machine without a GPU."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fusedopt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STAGES = [
    "env",
    "gpu",
    "build",
    "backends",
    "workload",
    "tests_cuda",
    "tests_triton",
    "sanitizer",
    "bench",
    "ncu",
]
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what comes back from the GPU machine

pytestmark = pytest.mark.skipif(
    not Path(fusedopt.__file__).resolve().is_relative_to(ROOT),
    reason="gpu_check.sh builds and checks the checkout in place; this run tests an installed "
    "fusedopt",
)


def _run(args, timeout, **env_vars):
    env = dict(os.environ, PYTHON=sys.executable, **env_vars)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _stages(summary):
    """{stage: (status, wall seconds, notes)} from summary.md's table, in order."""
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| ([0-9.]+) \| ([0-9]+) \| (.*) \|$", summary, re.M)
    return {name: (status, float(wall), notes) for name, status, wall, _, notes in rows}


def test_dry_run(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--dry-run", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(out.iterdir())
    assert 0 < len(files) <= MAX_FILES, [f.name for f in files]
    for f in files:
        assert f.is_file() and f.stat().st_size < MAX_BYTES, f
    summary = (out / "summary.md").read_text()
    stages = _stages(summary)
    assert list(stages) == STAGES, summary
    for name, (status, wall, notes) in stages.items():
        expected = {"skip"} if name in ("gpu", "sanitizer", "ncu") else {"pass"}
        assert status in expected, f"{name}: {status} ({notes})"
        assert wall >= 0
    for name in ("tests_cuda", "tests_triton"):
        collected = re.search(r"(\d+) cuda tests collected", stages[name][2])
        assert collected and int(collected[1]) > 0, stages[name]
    for name in ("workload", "bench"):  # once per backend
        assert "cpu: pass" in stages[name][2] and "triton: pass" in stages[name][2], stages[name]
    assert "result: PASS" in summary
    bench = (out / "bench.md").read_text()
    assert bench.count("| tiny | adamw |") >= 2, bench
    assert (out / "workload.log").read_text().count("all checks passed") == 2


def test_a_backend_that_cannot_step_stops_only_itself(tmp_path):
    """On 2026-12-04 one backend that did not compile stopped every later stage of both: now the
    backends stage fails and names it, and every later stage still runs for the other."""
    out = tmp_path / "out"
    proc = _run(["--dry-run", str(out)], timeout=300, GPU_CHECK_BACKENDS="cpu nosuch")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    stages = _stages((out / "summary.md").read_text())
    assert list(stages) == STAGES
    status, _, notes = stages["backends"]
    assert status == "FAIL" and "nosuch: unusable" in notes and "run cpu only" in notes, notes
    for name in ("workload", "bench"):
        assert stages[name][0] == "pass" and "cpu: pass" in stages[name][2], stages[name]
        assert "nosuch" not in stages[name][2]
    assert all(stages[s][0] != "not run" for s in STAGES), stages


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs for real")
def test_without_a_gpu_it_fails_loudly_before_the_build(tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = _run([str(out)], timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failures = [ln for ln in proc.stderr.splitlines() if ln.startswith("gpu_check: FAIL:")]
    assert len(failures) == 1 and "no CUDA GPU" in failures[0], proc.stderr
    stages = _stages((out / "summary.md").read_text())
    assert list(stages) == STAGES
    assert stages["env"][0] == "pass" and stages["gpu"][0] == "FAIL"
    assert all(stages[s][0] == "not run" for s in STAGES[2:]), stages
    assert elapsed < 60, f"took {elapsed:.0f} s: it must stop before the long stages"


def test_usage():
    proc = _run([], timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
