"""benchmarks/host_overhead.py end to end on a tiny config (N=8, a few steps, no FSDP2): it runs and
prints the table the committed results are read from. Timings themselves are not checked."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "host_overhead.py"
ROW = re.compile(
    r"^(?P<case>N=8 (same|fresh)) +8  (?P<provider>fusedopt cpu|torch fused|torch foreach) +"
    r"(?P<ms>\d+\.\d{3}) +(?P<us>\d+\.\d{2}) +(?P<ratio>\d+\.\d{2})x$"
)


def test_tiny_run_prints_the_table():
    args = ["--cases", "n8-same,n8-fresh", "--steps", "3", "--warmup", "1"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == f"# python3 benchmarks/host_overhead.py {' '.join(args)}"
    assert re.match(r"# commit \S+.*, \d{4}-\d\d-\d\dT\d\d:\d\dZ$", lines[1])
    assert lines[2].startswith("# torch ") and "load average" in lines[2]
    assert "median of 3 timed steps after 1 warm-up" in lines[3]
    assert lines[4].split() == ["case", "tensors", "provider", "ms/step", "us/tensor", "ratio"]
    rows = [ROW.match(line) for line in lines[5:-1]]
    assert all(rows), lines[5:-1]
    assert [(m["case"], m["provider"]) for m in rows] == [
        (case, provider)
        for case in ("N=8 same", "N=8 fresh")
        for provider in ("fusedopt cpu", "torch fused", "torch foreach")
    ]
    for m in rows:
        assert float(m["us"]) * 8 / 1e3 == pytest.approx(float(m["ms"]), abs=1e-3)
        if m["provider"] == "torch fused":
            assert m["ratio"] == "1.00"
    assert re.match(r"# total \d+\.\d s$", lines[-1])


@pytest.mark.cuda
def test_tiny_run_on_the_gpu():
    """--device cuda: fusedopt's cuda and triton backends against torch's, on GPU parameters."""
    args = ["--device", "cuda", "--cases", "n8-fresh", "--steps", "3", "--warmup", "1"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "parameters on " in lines[2]
    providers = [re.search(r"(fusedopt|torch) \w+", line).group(0) for line in lines[5:-1]]
    assert providers == ["fusedopt cuda", "fusedopt triton", "torch fused", "torch foreach"]
