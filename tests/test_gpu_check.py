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
STAGES = ["env", "gpu", "build", "backends", "workload", "tests", "sanitizer", "bench", "ncu"]
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what comes back from the GPU machine

pytestmark = pytest.mark.skipif(
    not Path(fusedopt.__file__).resolve().is_relative_to(ROOT),
    reason="gpu_check.sh builds and checks the checkout in place; this run tests an installed "
    "fusedopt",
)


def _run(args, timeout):
    env = dict(os.environ, PYTHON=sys.executable)
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
        expected = {"skip"} if name in ("gpu", "backends", "sanitizer", "ncu") else {"pass"}
        assert status in expected, f"{name}: {status} ({notes})"
        assert wall >= 0
    collected = re.search(r"(\d+) cuda tests collected", stages["tests"][2])
    assert collected and int(collected[1]) > 0, stages["tests"]
    assert "result: PASS" in summary
    assert "| tiny | adamw |" in (out / "bench.md").read_text()
    assert "all checks passed" in (out / "workload.log").read_text()


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
