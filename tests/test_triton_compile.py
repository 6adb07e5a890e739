"""The Triton kernels compile for sm_80 and sm_90 (no GPU needed), not only interpret; at sm_90
the main passes have 128-bit accesses (whole aligned chunks) and nothing spills (issue 13; the
full table: benchmarks/kernel_report.py). With the installed Triton (the newest supported on CI)
and with the oldest supported one (issue 22: torch 2.11's, on the GPU machine), from a side venv
that scripts/triton_venv.sh makes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
# the oldest Triton the kernels support: torch 2.11 pins it
OLDEST_TRITON = "3.6.0"


def _side_python(version):
    """The python of scripts/triton_venv.sh's venv for ``version`` (the same path rule)."""
    cache = os.environ.get("FUSEDOPT_CACHE") or Path.home() / ".cache" / "fusedopt"
    return Path(cache) / f"triton-{version}" / "bin" / "python"


def _interpreter(which):
    """(python, the Triton version it must import, or None for whichever is installed)."""
    triton = pytest.importorskip("triton")
    if which == "installed":
        return sys.executable, None
    if triton.__version__ == OLDEST_TRITON:
        pytest.skip(f"the installed triton is {OLDEST_TRITON}: the [installed] case covers it")
    python = _side_python(OLDEST_TRITON)
    if not python.exists():
        why = f"no triton {OLDEST_TRITON} venv at {python}: run"
        why += f" bash scripts/triton_venv.sh {OLDEST_TRITON}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{why} (CI must compile with the oldest supported triton)")
        pytest.skip(why)
    return str(python), OLDEST_TRITON


@pytest.mark.parametrize("which", ["installed", f"triton-{OLDEST_TRITON}"])
def test_kernels_compile_for_nvidia_targets(which):
    python, version = _interpreter(which)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_aot.py")
    out = subprocess.run(
        [python, str(script), "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("this triton build has no ptxas to compile with")
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    meta, rows = lines[0], lines[1:]
    # the side venv compiled this checkout's kernels with the Triton it was made for
    assert Path(meta["kernels"]).resolve().is_relative_to(ROOT), meta
    assert version is None or meta["triton"] == version, meta
    # per arch: amp off (4 prologues: groups, adam, rmsprop, sgd; 3 sumsq; 3 dtypes x 8 main:
    # adam 2, rmsprop 4, sgd 2 flag sets; 8-bit state with fp32 and bf16 parameters x 8 main) +
    # on (the same, the clipping reduction's first stage, 3 mixed precisions x 8 main; 8-bit
    # state with fp32, bf16, fp32 masters of bf16 and of fp16, bf16 stochastic x 8 main;
    # compressed masters, int16 with fp32 state and int8 with 8-bit state x 8 main)
    assert len(rows) == 2 * ((4 + 3 + 3 * 8 + 2 * 8) + (4 + 1 + 3 + 6 * 8 + 5 * 8 + 2 * 8))
    assert all(r["cubin_bytes"] > 0 for r in rows)
    # explicit FMAs only: the same count on both archs for each kernel (but the 8-bit passes:
    # their chunk loop is a runtime loop, which LLVM unrolls at sm_90 and not at sm_80 for some:
    # SGD without momentum, 12 FMAs at sm_80, 36 at sm_90 with Triton 3.9)
    by_kernel = {}
    for r in rows:
        if "uint8" not in r["dtypes"]:
            by_kernel.setdefault(r["kernel"], set()).add(r["fma_f32"])
    assert all(len(v) == 1 for v in by_kernel.values()), by_kernel

    # issue 13: from the SASS at sm_90 (tests/triton_aot.py, benchmarks/kernel_report.py)
    sm90 = [r for r in rows if r["arch"] == 90]
    # (the single-program group prologue keeps one register in local memory around the fp64
    # sqrt and division slow-path subroutines it calls: reported by kernel_report, not checked)
    streaming = [r for r in sm90 if "_main[" in r["kernel"] or r["kernel"].startswith("sumsq[")]
    older_than_3_9 = tuple(int(x) for x in meta["triton"].split(".")[:2]) < (3, 9)
    spilling = [(r["kernel"], r["stack"], r.get("blocal", 0)) for r in streaming]
    assert not [s for s in spilling if s[1] or s[2]], spilling
    for r in streaming:
        name = r["kernel"]
        if "uint8" in r["dtypes"] or r["err"]:
            # 8-bit state: 4 elements per thread (multi_tensor.main_warps), so 128-bit accesses
            # to fp32 arrays, 64-bit to 16-bit ones (and 32-bit to the codes); compressed masters
            # with fp32 state: 128-bit. Their register cap (multi_tensor.MAXNREG_QUANTIZED, 128)
            # bounds them: the maps' lookups hold registers per element (sm_90, 2026-12-06: Triton
            # 3.9 40-80, 3.6 up to 128), and beyond it ptxas would spill (asserted above: none)
            only_16_bit = r["dtypes"][2] == "uint8" and "fp32" not in r["dtypes"][:2]
            wide = "b64" if only_16_bit else "b128"
            assert r.get(wide, 0) > 0, f"{name}: no {wide[1:]}-bit access: {r}"
            assert r["regs"] <= 128, r
            continue
        # every main pass and the clipping pre-pass, fp32, bf16 and fp16, mixed buckets too
        assert r.get("b128", 0) > 0, f"{name}: no 128-bit access (scalar only): {r}"
        plain = len(set(r["dtypes"])) == 1
        if plain and r["dtypes"][0] == "fp32":
            assert r["regs"] <= 64, r  # 38-59 when written (benchmarks/results/kernel_report_*)
        elif plain:
            # 16-bit: 8 elements per thread per array; 47-65 when written, 70-104 before the
            # masked path went half a block at a time (multi_tensor.TAIL_SPLIT). Triton 3.6's
            # masked path holds more (its 128-bit path the same): 32-96 (2026-12-05)
            assert r["regs"] <= (96 if older_than_3_9 else 72), r
        else:
            # mixed (fp32 masters, state or grads of another width): the fp32 arrays at 8 per
            # thread on the 128-bit path; 60-89 when written (87-128 before TAIL_SPLIT)
            assert r["regs"] <= 96, r
