"""Compile every Triton kernel variant for NVIDIA targets, without a GPU (Triton ships ptxas).

Run without TRITON_INTERPRET (the interpreter never compiles); prints one JSON line per variant
(after one naming the Triton that compiled them).
Used by test_triton_compile.py, so that CI catches what only the compiler sees (types, casts,
unsupported ops) on machines where the kernels otherwise run only in the interpreter.
"""

import itertools
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedopt.kernels import adam, multi_tensor, rmsprop, sgd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import kernel_report  # noqa: E402

GROUPS_SIG = {
    "hyper": "*fp64",
    "gptr": "*i64",
    "glr": "*fp64",
    "n_groups": "i32",
    "partials": "*fp64",
    "n_partials": "i32",
    "clip": "*fp32",
    "max_norm": "fp32",
    "found_inf": "*fp32",
    "HAS_INF": "constexpr",
    "CLIP": "constexpr",
    "BLOCK": "constexpr",
}
CLIP_PARTIALS_SIG = {
    "partials": "*fp32",
    "n_partials": "i32",
    "sums": "*fp64",
    "PER_PROGRAM": "constexpr",
    "BLOCK": "constexpr",
}
PROLOGUE_SIG = {
    "tmeta": "*i64",
    "n_tensors": "i32",
    "hyper": "*fp64",
    "glr": "*fp64",
    "scal": "*fp32",
    "found_inf": "*fp32",
    "HAS_INF": "constexpr",
    "BLOCK_T": "constexpr",
}
MAIN_SIG = {
    "tmeta": "*i64",
    "grads": "*i64",
    "scal": "*fp32",
    "chunks": "*i64",
    "grad_scale": "*fp32",
    "found_inf": "*fp32",
    "clip": "*fp32",
    "qmaps": "constexpr",  # None, a constexpr, without 8-bit state (run_step); else _QMAPS_SIG
    "DTYPE": "constexpr",
    "HAS_SCALE": "constexpr",
    "HAS_INF": "constexpr",
    "CLIP": "constexpr",
    "BLOCK": "constexpr",
    "ITERS": "constexpr",
    "EIGHT_BIT": "constexpr",
}
_QMAPS_SIG = {"qmaps": "*fp32"}
SUMSQ_SIG = {
    "tmeta": "*i64",
    "grads": "*i64",
    "chunks": "*i64",
    "partials": "*fp32",
    "grad_scale": "*fp32",
    "found_inf": "*fp32",
    "DTYPE": "constexpr",
    "HAS_SCALE": "constexpr",
    "HAS_INF": "constexpr",
    "BLOCK": "constexpr",
    "ITERS": "constexpr",
}
# GradScaler and clipping: all off, or all on (each flag only adds code)
AMP = (
    {"HAS_SCALE": False, "HAS_INF": False, "CLIP": False},
    {"HAS_SCALE": True, "HAS_INF": True, "CLIP": True},
)
MAIN = {"BLOCK": multi_tensor.BLOCK, "ITERS": 4}
# each optimizer's per-tensor prologue, main pass and the constexpr flags of its main pass
OPTIMIZERS = {
    "adam": (adam._adam_prologue, adam._adam_main, ("HAS_AMSGRAD",)),
    "rmsprop": (rmsprop._rmsprop_prologue, rmsprop._rmsprop_main, ("HAS_CENTERED", "HAS_MOMENTUM")),
    "sgd": (sgd._sgd_prologue, sgd._sgd_main, ("HAS_MOMENTUM",)),
}


def _precisions(amp_on):
    """(param, grad, state dtypes, shadow, stochastic): one dtype throughout, and with everything
    else on, the mixed-precision buckets too (fp32 master for bf16, bf16 state for fp32, bf16
    with stochastic rounding and fp32 state)."""
    f32, bf16 = tl.float32, tl.bfloat16
    plain = [(d, d, d, False, False) for d in multi_tensor.TL_DTYPE.values()]
    mixed = [
        (f32, bf16, f32, True, False),
        (f32, f32, bf16, False, False),
        (bf16, bf16, f32, False, True),
    ]
    return plain + (mixed if amp_on else [])


def _precisions_8bit(amp_on):
    """The 8-bit state buckets (uint8 codes): fp32 and bf16 parameters, and with everything else
    on, fp32 masters of bf16 and fp16 parameters and bf16 with stochastic rounding too."""
    f32, bf16, f16, u8 = tl.float32, tl.bfloat16, tl.float16, tl.uint8
    plain = [(f32, f32, u8, False, False), (bf16, bf16, u8, False, False)]
    mixed = [
        (f32, bf16, u8, True, False),
        (f32, f16, u8, True, False),
        (bf16, bf16, u8, False, True),
    ]
    return plain + (mixed if amp_on else [])


def _precisions_compressed(amp_on):
    """Compressed masters (bf16 parameters and an error term of ERR bits: the last field): int16
    with fp32 state, int8 with 8-bit state; with everything else on."""
    bf16 = tl.bfloat16
    both = [(bf16, bf16, tl.float32, False, False, 16), (bf16, bf16, tl.uint8, False, False, 8)]
    return both if amp_on else []


def _main_flags(precision, amp):
    p, g, st, shadow, sr, *err = precision
    eight_bit = st == tl.uint8
    return {
        "DTYPE": p,
        "GDTYPE": g,
        "SDTYPE": st,
        "SHADOW": shadow,
        "SR": sr,
        "ERR": err[0] if err else 0,
        **amp,
        **MAIN,
        "EIGHT_BIT": eight_bit,
        **({} if eight_bit else {"qmaps": None}),
    }


def variants():
    for amp in AMP:
        groups = {
            "HAS_INF": amp["HAS_INF"],
            "CLIP": amp["CLIP"],
            "SCHED": amp["CLIP"],  # the lr schedules compiled in with the amp-on set only
            "BLOCK": multi_tensor.PROLOGUE_BLOCK,
        }
        yield f"groups_prologue[{amp['CLIP']}]", multi_tensor._groups_prologue, GROUPS_SIG, groups
        if amp["CLIP"]:
            reduce = {
                "PER_PROGRAM": multi_tensor.CLIP_PER_PROGRAM,
                "BLOCK": multi_tensor.CLIP_BLOCK,
            }
            yield "clip_partials", multi_tensor._clip_partials, CLIP_PARTIALS_SIG, reduce
        flags = {"HAS_INF": amp["HAS_INF"], "BLOCK_T": multi_tensor.PROLOGUE_BLOCK}
        for name, (prologue, _, _) in OPTIMIZERS.items():
            yield f"{name}_prologue[{amp['HAS_INF']}]", prologue, PROLOGUE_SIG, flags
        for dtype in multi_tensor.TL_DTYPE.values():
            yield (
                f"sumsq[{dtype},{amp['HAS_SCALE']}]",
                multi_tensor._sumsq_main,
                SUMSQ_SIG,
                {"DTYPE": dtype, "HAS_SCALE": amp["HAS_SCALE"], "HAS_INF": amp["HAS_INF"], **MAIN},
            )
        amp_on = amp["CLIP"]
        for precision in (
            _precisions(amp_on) + _precisions_8bit(amp_on) + _precisions_compressed(amp_on)
        ):
            eight_bit = precision[2] == tl.uint8
            for name, (_, main, options) in OPTIMIZERS.items():
                for values in itertools.product((False, True), repeat=len(options)):
                    chosen = dict(zip(options, values))
                    label = ",".join(f"{k}={v}" for k, v in chosen.items())
                    yield (
                        f"{name}_main[{precision},{label},{amp}]",
                        main,
                        {
                            **MAIN_SIG,
                            **(_QMAPS_SIG if eight_bit else {}),
                            **dict.fromkeys(options, "constexpr"),
                        },
                        {**chosen, **_main_flags(precision, amp)},
                    )


def launch_options(constexprs):
    """The options run_step launches a variant with (the main passes' warps by dtype)."""
    options = dict(multi_tensor.LAUNCH_OPTIONS)
    if "SDTYPE" in constexprs:
        dtypes = (constexprs["DTYPE"], constexprs["GDTYPE"], constexprs["SDTYPE"])
        options.update(multi_tensor.main_options(dtypes, constexprs["ERR"]))
    return options


def compile_variant(fn, sig, constexprs, arch):
    return triton.compile(
        ASTSource(fn, sig, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=launch_options(constexprs),
    )


def _row(job):
    """Compile variant number ``i`` of variants() for ``arch``; its JSON row."""
    arch, i = job
    name, fn, sig, constexprs = list(variants())[i]
    kernel = compile_variant(fn, sig, constexprs, arch)
    ptx = kernel.asm["ptx"]
    row = {
        "arch": arch,
        "kernel": name,
        "ptx_bytes": len(ptx),
        "cubin_bytes": len(kernel.asm["cubin"]),
        "fma_f32": ptx.count("fma.rn.f32"),
        "dtypes": [str(constexprs[k]) for k in ("DTYPE", "GDTYPE", "SDTYPE") if k in constexprs],
        "err": constexprs.get("ERR", 0),
    }
    if arch == 90:  # what the SASS does with memory (benchmarks/kernel_report.py)
        regs, stack, acc = kernel_report.analyze_cubin(kernel.asm["cubin"])
        row.update(regs=regs, stack=stack, **{f"b{k}": v for k, v in acc.items()})
    return json.dumps(row)


def main(archs):
    """Every variant for every arch, on as many processes as there are cores (each compile is
    single-threaded; on CI's 2 cores this halves the test's time), printed in order, after a line
    that names the Triton and the kernels compiled (a side venv's too: scripts/triton_venv.sh)."""
    print(json.dumps({"triton": triton.__version__, "kernels": multi_tensor.__file__}), flush=True)
    jobs = [(arch, i) for arch in archs for i in range(len(list(variants())))]
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    if workers == 1:
        rows = map(_row, jobs)
    else:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        rows = pool.map(_row, jobs)
    for row in rows:
        print(row, flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
