"""Static report of every main kernel (issue 13): what the compiled code does with memory,
without a GPU.

For each Triton kernel variant (tests/triton_aot.py's list, compiled for sm_90 the way run_step
launches it) and each CUDA kernel (csrc/cuda, nvcc for sm_90), from the SASS the GPU would run:
global loads and stores by width (128-bit vector, 64-bit, 32-bit, 16-bit), local-memory accesses
(spills), registers per thread, threads per block and the theoretical occupancy those allow on
an H100/H200 SM (Hopper: 64 warps, 32 blocks, 65,536 registers allocated 256 per warp, 228 KiB
of shared memory with 1 KiB reserved per block).

A kernel's SASS holds both of its paths (128-bit for whole aligned chunks, scalar for tails and
misaligned tensors), so a main kernel shows both kinds; the count is of instructions in the code,
not of accesses executed.

    python3 benchmarks/kernel_report.py [--triton-only | --cuda-only] [--arch 90]

needs Triton's bundled nvdisasm and cuobjdump (every Triton wheel for NVIDIA has them) and, for
the CUDA part, nvcc. CI runs the same analysis: tests/test_triton_compile.py (through
tests/triton_aot.py) and tests/test_cuda_compile.py.
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Hopper (sm_90) per-SM limits: CUDA C Programming Guide, "Compute Capabilities" table
SM90 = dict(warps=64, blocks=32, regs=65536, reg_unit=256, smem=233472, smem_per_block=1024)

_ACCESS = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9]+)*)")


def _triton_tool(name):
    import triton  # noqa: PLC0415 - only the report needs it

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def sass_accesses(sass):
    """Counter of the global accesses by width ("128", "64", "32", "16", "8") and of the local
    (spill) accesses ("local") in SASS text."""
    out = Counter()
    for op, suffix in _ACCESS.findall(sass):
        if op in ("LDL", "STL"):
            out["local"] += 1
            continue
        parts = set(suffix.strip(".").split("."))
        if "128" in parts:
            out["128"] += 1
        elif "64" in parts:
            out["64"] += 1
        elif parts & {"U16", "S16"}:
            out["16"] += 1
        elif parts & {"U8", "S8"}:
            out["8"] += 1
        else:
            out["32"] += 1
    return out


def analyze_cubin(cubin):
    """(registers, stack bytes, sass_accesses) of a one-kernel cubin (bytes), as Triton makes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = _run([_triton_tool("nvdisasm"), path])
        usage = _run([_triton_tool("cuobjdump"), "-res-usage", path])
    regs = int(re.search(r"REG:(\d+)", usage)[1])
    stack = int(re.search(r"STACK:(\d+)", usage)[1])
    return regs, stack, sass_accesses(sass)


def cuda_object_kernels(obj, arch=90):
    """(demangled name, registers, stack bytes, sass_accesses) per kernel in an nvcc object or
    cubin holding code for sm_``arch``."""
    cuobjdump = shutil.which("cuobjdump") or _triton_tool("cuobjdump")
    usage = _run([cuobjdump, "-res-usage", "-arch", f"sm_{arch}", str(obj)])
    sass = _run([cuobjdump, "-sass", "-arch", f"sm_{arch}", str(obj)])
    resources = {
        m[0]: (int(m[1]), int(m[2]))
        for m in re.findall(r"Function (\w+):\s*REG:(\d+) STACK:(\d+)", usage)
    }
    out = []
    for fn, body in _sass_functions(sass):
        regs, stack = resources.get(fn, (0, 0))
        out.append((_demangle(fn), regs, stack, sass_accesses(body)))
    return out


def occupancy(regs, threads, smem=0, sm=SM90):
    """(blocks per SM, fraction of the SM's warps) for a kernel with these resources."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(regs, 1) * 32 / sm["reg_unit"]) * sm["reg_unit"]
    by_regs = (sm["regs"] // per_warp) // warps
    by_warps = sm["warps"] // warps
    by_smem = sm["smem"] // (smem + sm["smem_per_block"]) if smem else sm["blocks"]
    blocks = min(sm["blocks"], by_regs, by_warps, by_smem)
    return blocks, blocks * warps / sm["warps"]


def _row(kind, name, regs, stack, threads, smem, acc):
    blocks, occ = occupancy(regs, threads, smem)
    return dict(
        kind=kind,
        kernel=name,
        regs=regs,
        stack=stack,
        spill_accesses=acc["local"],
        threads=threads,
        smem=smem,
        blocks_per_sm=blocks,
        occupancy=occ,
        **{f"b{w}": acc[w] for w in ("128", "64", "32", "16", "8")},
    )


def triton_rows(arch=90, select=None):
    """One row per Triton kernel variant (tests/triton_aot.py's list)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import triton_aot  # noqa: PLC0415

    rows = []
    for name, fn, sig, constexprs in triton_aot.variants():
        if select is not None and not select(name):
            continue
        kernel = triton_aot.compile_variant(fn, sig, constexprs, arch)
        regs, stack, acc = analyze_cubin(kernel.asm["cubin"])
        threads = triton_aot.launch_options(constexprs).get("num_warps", 4) * 32
        rows.append(_row("triton", name, regs, stack, threads, kernel.metadata.shared, acc))
    return rows


def cuda_rows(arch=90, objects=None):
    """One row per CUDA kernel (every csrc/cuda/*.cu, nvcc -cubin for sm_``arch``; or the given
    object files, which hold code for that arch). All launch 256 threads per block
    (csrc/cuda/multi_tensor.cuh: kBlock, kPrologueBlock)."""
    with tempfile.TemporaryDirectory() as tmp:
        if objects is None:
            nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
            objects = []
            for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
                out = os.path.join(tmp, src.stem + ".cubin")
                _run([nvcc, *CUDA_FLAGS, f"-arch=sm_{arch}", "-cubin", "-o", out, str(src)])
                objects.append(out)
        rows = []
        for obj in objects:
            for name, regs, stack, acc in cuda_object_kernels(obj, arch):
                rows.append(_row("cuda", name, regs, stack, 256, 0, acc))
    return rows


# What torch's CUDAExtension defines: the kernels must not rely on implicit half/bf16 conversions
# (tests/test_cuda_compile.py compiles with these too).
TORCH_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
CUDA_FLAGS = [
    "-std=c++17",
    "-O3",
    "-fmad=false",
    "-I",
    str(ROOT / "csrc" / "include"),
    *TORCH_DEFINES,
]


def _sass_functions(sass):
    """(mangled name, SASS text) per function in ``cuobjdump -sass`` output."""
    parts = re.split(r"^\s*Function : (\w+)\s*$", sass, flags=re.M)
    return list(zip(parts[1::2], parts[2::2]))


def _demangle(name):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    out = subprocess.run([cxxfilt], input=name, capture_output=True, text=True).stdout.strip()
    out = out.replace("(anonymous namespace)::", "").split("(", 1)[0]
    out = re.sub(r"^void ", "", out).replace("fusedopt::cuda::", "")
    for long, short in (("__nv_bfloat16", "bf16"), ("__half", "f16"), ("float", "f32")):
        out = out.replace(long, short)
    return out or name


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n{res.stderr[-3000:]}")
    return res.stdout


def short_triton_name(name):
    return (
        name.replace("triton.language.", "")
        .replace("float32", "f32")
        .replace("bfloat16", "bf16")
        .replace("float16", "f16")
        .replace("'HAS_SCALE': ", "scale=")
        .replace("'HAS_INF': ", "inf=")
        .replace("'CLIP': ", "clip=")
    )


def table(rows):
    head = (
        f"{'kernel':<110} {'regs':>4} {'spill':>5} {'thr':>4} {'occ':>5} "
        f"{'128b':>5} {'64b':>4} {'32b':>4} {'16b':>4}"
    )
    lines = [head]
    for r in rows:
        name = short_triton_name(r["kernel"]) if r["kind"] == "triton" else r["kernel"]
        lines.append(
            f"{name[:110]:<110} {r['regs']:>4} {r['spill_accesses']:>5} {r['threads']:>4} "
            f"{r['occupancy']:>5.0%} {r['b128']:>5} {r['b64']:>4} {r['b32']:>4} {r['b16']:>4}"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--triton-only", action="store_true")
    ap.add_argument("--cuda-only", action="store_true")
    args = ap.parse_args()
    print(f"# python3 benchmarks/kernel_report.py {' '.join(sys.argv[1:])}".rstrip())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"# commit {commit}, sm_{args.arch}; counts are SASS instructions (both paths of a kernel)"
    )
    print("# occ: theoretical occupancy (resident warps / 64) from registers and threads per block")
    if not args.cuda_only:
        import triton  # noqa: PLC0415

        print(f"\n## Triton {triton.__version__}\n")
        print(table(triton_rows(args.arch)))
    if not args.triton_only:
        print("\n## CUDA (nvcc)\n")
        print(table(cuda_rows(args.arch)))


if __name__ == "__main__":
    main()
