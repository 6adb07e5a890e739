"""The CUDA kernels in csrc/cuda compile with nvcc for sm_80 and sm_90 without register spills (no
GPU needed), and csrc/cuda/launchers.h is a self-contained C++ header.

``pytest -s`` prints ptxas's registers and spills per kernel and arch, so CI logs keep them.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_report  # noqa: E402  (benchmarks/kernel_report.py: the SASS analysis)

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")
# Kernels per arch. update.cu: per optimizer its prologue's two kernels. update_<optimizer>.cu: a
# main kernel for each bucket with kernels (19: csrc/cuda/multi_tensor.cuh's SupportedBuckets, the
# (param, grad, state) dtypes with the shadow, stochastic rounding and a compressed master's error
# term) x each set of the state slots its options use (adam: the AMSGrad maximum, 2; rmsprop:
# momentum and centered, 4; sgd: momentum, 2) x GradScaler's unscaling (HAS_SCALE, 2). sumsq.cu:
# the clipping pre-pass for the 3 grad dtypes and the clipping reduction's first stage.
N_BUCKETS = 19  # 11, the 4 with 8-bit state, and the 4 compressed masters
KERNELS_PER_ARCH = {
    "update.cu": 3 * 2,
    "update_adam.cu": N_BUCKETS * 2 * 2,
    "update_rmsprop.cu": N_BUCKETS * 4 * 2,
    "update_sgd.cu": N_BUCKETS * 2 * 2,
    "sumsq.cu": 3 + 1,
}
TORCH_DEFINES = kernel_report.TORCH_DEFINES

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def _find_nvcc():
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if os.environ.get("CUDA_HOME"):
        candidates.insert(1, os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _nvcc_command(nvcc, src, out, archs=ARCHS):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    include = ["-I", str(ROOT / "csrc" / "include")]
    flags = ["-c", "-std=c++17", "-O3", "-fmad=false", "-Xptxas", "-v", *TORCH_DEFINES]
    return [nvcc, *flags, *include, *gencode, "-o", str(out), str(src)]


def _kernel_stats(ptxas_log):
    """[kernel, arch, registers, spill bytes] for each entry function in ``nvcc -Xptxas -v``'s
    log. Spills of any callee ptxas reports for an entry count towards that entry."""
    rows, row = [], None
    for line in ptxas_log.splitlines():
        if m := _ENTRY.search(line):
            row = [m[1], f"sm_{m[2]}", None, 0]
            rows.append(row)
        elif row is not None and (m := _SPILLS.search(line)):
            row[3] += int(m[1]) + int(m[2])
        elif row is not None and (m := _REGISTERS.search(line)):
            row[2] = int(m[1])
    return rows


def _short_names(mangled):
    """``adam_main_kernel<float, true>`` for each mangled name (unchanged without c++filt)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not mangled:
        return mangled
    out = subprocess.run([cxxfilt], input="\n".join(mangled), capture_output=True, text=True)
    names = out.stdout.splitlines()
    if out.returncode != 0 or len(names) != len(mangled):
        return mangled
    short = []
    for name in names:
        name = name.replace("(anonymous namespace)::", "")
        name = re.sub(r"^void ", "", name.split("(", 1)[0])
        short.append(re.sub(r"^(\w+::)+", "", name))
    return short


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(source, nvcc result, seconds, {arch: object file}) per .cu file. Each (file, arch) is
    compiled apart, two at a time: update_rmsprop.cu holds half the kernels, so two files at a
    time would leave one core idle much of the time."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (neither on PATH, in $CUDA_HOME/bin nor /usr/local/cuda/bin)")
    out_dir = tmp_path_factory.mktemp("cuda_objects")

    def build(job):
        src, arch = job
        t0 = time.perf_counter()
        obj = out_dir / f"{src.stem}.sm_{arch}.o"
        res = subprocess.run(
            _nvcc_command(nvcc, src, obj, (arch,)), capture_output=True, text=True, timeout=600
        )
        return src, arch, res, time.perf_counter() - t0, obj

    jobs = [(src, arch) for src in SOURCES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(build, jobs))
    merged = []
    for src in SOURCES:
        mine = [r for r in results if r[0] == src]
        res = subprocess.CompletedProcess(
            [r[2].args for r in mine],
            max(r[2].returncode for r in mine),
            "".join(r[2].stdout for r in mine),
            "".join(r[2].stderr for r in mine),
        )
        objs = {r[1]: r[4] for r in mine}
        merged.append((src, res, sum(r[3] for r in mine), objs))
    return merged


def test_kernels_compile_for_sm80_sm90_without_spills(compiled):
    assert [s.name for s in SOURCES] == sorted(KERNELS_PER_ARCH)
    table = []
    for src, res, seconds, _ in compiled:
        assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr[-6000:]}"
        rows = _kernel_stats(res.stdout + res.stderr)
        for arch in ARCHS:
            n = sum(r[1] == f"sm_{arch}" for r in rows)
            assert n == KERNELS_PER_ARCH[src.name], (src.name, arch, n)
        assert all(r[2] is not None for r in rows), rows
        for row, name in zip(rows, _short_names([r[0] for r in rows])):
            table.append([src.name, name, *row[1:]])
        print(f"\n{src.name}: compiled in {seconds:.1f} s")
    width = max(len(r[1]) for r in table)
    print(f"\n{'file':<12} {'kernel':<{width}} {'arch':<6} {'regs':>4} {'spill bytes':>11}")
    for file, name, arch, regs, spills in sorted(table):
        print(f"{file:<12} {name:<{width}} {arch:<6} {regs:>4} {spills:>11}")
    spilling = [r for r in table if r[4] > 0]
    assert not spilling, f"register spills: {spilling}"


def test_main_kernels_use_128_bit_accesses_at_sm90(compiled):
    """Issue 13: every main kernel and the clipping pre-pass has 128-bit global accesses in its
    SASS (the vector path for aligned chunks) and no local-memory access (spills or arrays). The
    full table: benchmarks/kernel_report.py."""
    if shutil.which("cuobjdump") is None and kernel_report._triton_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's) to read the SASS with")
    seen = 0
    wide = {}  # 64-bit accesses of each main kernel, by (kernel, bucket, template flags)
    for _src, res, _, obj in compiled:
        assert res.returncode == 0, res.stderr[-3000:]
        for name, regs, _stack, acc in kernel_report.cuda_object_kernels(obj["90"], 90):
            # The groups' prologue evaluates the lr schedules: CUDA's float64 cos keeps its
            # argument reduction's table in a 40-byte local array (the slow path, for huge
            # arguments). Nothing spills there either (the test above); every other kernel has
            # no local memory at all.
            if not name.startswith("prologue_kernel"):
                assert acc["local"] == 0, (name, acc)
            if "main_kernel" in name or "sumsq" in name:
                seen += 1
                assert acc["128"] > 0, f"{name}: no 128-bit access: {dict(acc)}"
            if "main_kernel_8bit" in name:
                # 8-bit state (update_kernels.cuh): a lane holds 8 elements' codes, parameters
                # and grads through the update, then the absmax shuffles; 40-106 at 6324db7+1,
                # 40-117 at 73ac1f2 (tmeta 12 wide), under __launch_bounds__(256, 1) (capped at
                # 64-80, ptxas spilled 8-24 bytes); with a compressed master (the error term's
                # load and rebuild, its store) 56-112 at sm_80, 56-124 at sm_90 (Adam's). What
                # counts is occupancy: up to 128 registers two 256-thread blocks fit in an SM's
                # 64K registers, above it only one.
                assert regs <= 128, (name, regs)
            elif "main_kernel" in name:
                # 32-66 when written (kernel_report); compressed masters 40-71 at sm_80 (71:
                # Adam's, int16), 40-64 at sm_90
                assert regs <= 72, (name, regs)
                kernel, rest = name.split("Bucket<", 1)
                bucket, flags = rest.split(">", 1)
                wide[kernel, bucket, flags] = acc["64"]
    assert seen == sum(KERNELS_PER_ARCH.values()) - 7  # all but the prologues and clip stage
    # 16 bytes per access for every array of every bucket, mixed ones too (kVec: 16 bytes of the
    # narrowest dtype): 64-bit accesses are the tables' int64 reads only, as many as the fp32
    # bucket's with the same flags, plus one for a master's shadow address. With kVec sized by
    # the widest dtype (before), a bf16 array beside fp32 ones moved 8 bytes: 10-18 against 6-8.
    # A compressed master's error term (Bucket's last argument, its bits) adds its address, as a
    # shadow does; an int8 one also moves kVec = 8 bytes per access (multi_tensor.cuh's Bucket:
    # it does not count towards kVec), one 64-bit load and one store (int16: 16 bytes).
    assert wide
    for (kernel, bucket, flags), n in wide.items():
        # (the 8-bit kernels: against their own fp32-parameter bucket)
        state = "unsigned char" if "8bit" in kernel else "f32"
        fp32 = wide[kernel, f"f32, f32, {state}, false, 0", flags]
        extra = 3 if bucket.endswith(", 8") else 1
        assert n <= fp32 + extra, f"{kernel}<{bucket}>{flags}: {n} 64-bit accesses, fp32 {fp32}"


def test_launchers_header_is_self_contained(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or c++) on PATH")
    tu = tmp_path / "uses_launchers.cpp"
    tu.write_text('#include "launchers.h"\n')
    flags = ["-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-pedantic", "-Werror"]
    cmd = [cxx, *flags, "-I", str(CUDA_DIR), str(tu)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_cuda_binding_compiles_against_torch():
    """csrc/cuda/binding.cpp includes no CUDA header, so it compiles here against the CPU torch:
    the op signatures it registers stay in step with the launchers and torch's API."""
    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parents[1]
    cmd = [
        "g++",
        "-fsyntax-only",
        "-std=c++20",
        f"-I{root / 'csrc' / 'include'}",
        f"-I{root / 'csrc' / 'cuda'}",
        *(f"-I{p}" for p in include_paths()),
        str(root / "csrc" / "cuda" / "binding.cpp"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
