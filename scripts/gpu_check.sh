#!/usr/bin/env bash
# The first command a session with a GPU machine runs, in one remote call: builds fusedopt with its
# CUDA kernels and checks, benchmarks and profiles them, writing at most 8 files (each under
# 16 MiB: what comes back from that machine) into OUTDIR, in at most 9 minutes.
#
#   scripts/gpu_check.sh OUTDIR            # on the GPU machine (offline: no pip downloads)
#   scripts/gpu_check.sh --dry-run OUTDIR  # the same control flow on a CPU machine (about 1 min)
#
# Stages, most valuable first, each under its own time box:
#   env        nvidia-smi, compilers, tools, torch/triton/CUDA versions, `python -m fusedopt.info`
#   gpu        torch sees a CUDA GPU; without one the script stops here, loudly (dry run: skipped)
#   build      pip install --no-build-isolation --no-deps --no-index -e . with the CUDA library
#              for sm_90 (dry run: the installed build is reused, or built without CUDA)
#   backends   the "cuda" and "triton" backends are available for CUDA tensors, else stop, loudly
#              (dry run: their reasons are reported)
#   workload   scripts/gpu_workload.py: every bucket and option on both backends against
#              torch.optim, in parallel shards: a functional check that also compiles the Triton
#              variants into ~/.triton/cache for the later stages (dry run: the cpu, torch and
#              interpreted triton backends)
#   tests      pytest -m cuda -rs, JUnit XML (dry run: --collect-only; must collect > 0 tests)
#   sanitizer  compute-sanitizer memcheck and racecheck on the workload (dry run: skipped)
#   bench      python -m fusedopt.bench on llama-1b and many-small, then --quick (dry run: tiny)
#   ncu        a 2^26-parameter fp32 AdamW and RMSprop step of each backend (dry run: skipped)
#
# OUTDIR gets: summary.md (each stage's status and wall time, device and versions), env.txt,
# build_tests.log, junit.xml, workload.log (warm-up, sanitizers, ncu's console), bench.md (the
# benchmark's tables and CSV), ncu.csv. Exit status: 0 when no stage failed; 1 otherwise (every
# stage still runs, except that stages after a failed gpu, build or backends stage need what
# failed and are reported as not run); 2 for bad arguments.
#
# Time boxes. Together they exceed the 9 minutes, so a global budget (BUDGET_S) caps each box at
# what is left of it: the least valuable stages lose time first, and one hang costs at most its
# own box. Sized from:
#   env 30 s       two torch imports (a few s each) and nvidia-smi.
#   gpu 20 s       one torch import and CUDA initialization.
#   build 150 s    measured on the 2-core development machine: the CPU library alone takes 49 s
#                  at MAX_JOBS=2 (binding.cpp the slowest file); nvcc for sm_90 alone takes 35 s
#                  for update.cu (every optimizer's kernels since issue 15), 2 s for sumsq.cu.
#                  With MAX_JOBS=16 all 6 files of setup.py (4 C++, 2 .cu, the CUDA binding.cpp
#                  with torch's CUDA headers) compile at once, so about the slowest file plus pip
#                  and linking: 60-90 s (estimated).
#   backends 30 s  one torch import, loading the CUDA library, importing triton.
#   workload 90 s  its 11 scenarios run in 11 processes at once: each compiles its Triton variants
#                  (one main kernel per bucket, 11, plus the prologue and the clipping pre-pass)
#                  and checks against torch.optim. Triton 3.6's compile time per variant there is
#                  not measured yet; at about a second each, 20-30 s (estimated). Interpreted on
#                  2 CPU cores: 23 s in one process, measured.
#   tests 150 s    the cuda-marked tests (426 when this was written), 8 pytest-xdist workers (GPU memory: the largest test,
#                  a 2^31-element bf16 tensor with its state, needs about 21 GiB; 8 workers fit in
#                  the H200's 139 GiB even with two of them at once), 120 s per test at most
#                  (pytest-timeout; the torch.compile tests compile with inductor).
#   sanitizer 100 s  memcheck and racecheck side by side, each on the whole workload (Triton's
#                  variants already compiled) with torch's caching allocator off, so that each
#                  tensor is its own allocation and memcheck sees its bounds.
#   bench 120 s    llama-1b and many-small with --repeats 10 (many-small's torch for-loop step,
#                  10,000 tensors, takes most of it), then --quick with what is left.
#   ncu 60 s       ncu starting python and torch, 4 profiled kernels, a few replay passes each.
set -uo pipefail # not -e: a stage that fails must not stop the others; each status is checked

BUDGET_S=530 # 9 minutes, less a margin for the summary and a stage killed at its limit
MIN_STAGE_S=15 # a stage given less than this is reported as not run
MAX_FILE_BYTES=$((15 * 1024 * 1024)) # under the 16 MiB that comes back per file

usage() {
    echo "usage: scripts/gpu_check.sh [--dry-run] OUTDIR" >&2
    exit 2
}
DRY=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUTDIR" ]] || usage; OUTDIR=$arg ;;
    esac
done
[[ -n "$OUTDIR" ]] || usage
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
# Triton's interpreter would make the triton backend unavailable for CUDA tensors.
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
MODE=$([[ $DRY == 1 ]] && echo "dry run on CPU" || echo "GPU")

SUMMARY=$OUTDIR/summary.md
ENV_TXT=$OUTDIR/env.txt
LOG=$OUTDIR/build_tests.log
JUNIT=$OUTDIR/junit.xml
WORKLOAD_LOG=$OUTDIR/workload.log
BENCH_MD=$OUTDIR/bench.md
NCU_CSV=$OUTDIR/ncu.csv
rm -f "$SUMMARY" "$ENV_TXT" "$LOG" "$JUNIT" "$WORKLOAD_LOG" "$BENCH_MD" "$NCU_CSV"

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }
T0=$(now_us)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if COMMIT=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || COMMIT+=" (with local changes)"
else
    COMMIT=unknown
fi
elapsed_s() { echo $((($(now_us) - T0) / 1000000)); }
secs() { awk -v us="$1" 'BEGIN { printf "%.1f", us / 1e6 }'; }

# ---------------------------------------------------------------------------------- stages

STAGES=() STATUS=() WALL=() BOXES=() NOTES=()
GATE="" # set when a gpu, build or backends stage failed: why the later stages are not run
STAGE="" STAGE_T0=0 STAGE_END=0 BOX=0 TIMED_OUT=0

# begin NAME BOX [needs-gate]: start a stage; false (and reported as not run) if it cannot run.
begin() {
    local name=$1 box=$2 gated=${3:-}
    local left=$((BUDGET_S - $(elapsed_s)))
    ((box > left)) && box=$left
    STAGE=$name STAGE_T0=$(now_us) TIMED_OUT=0
    if [[ -n "$gated" && -n "$GATE" ]]; then
        record "not run" 0 "$GATE"
        return 1
    fi
    if ((box < MIN_STAGE_S)); then
        record "not run" 0 "the ${BUDGET_S} s budget is spent"
        return 1
    fi
    STAGE_END=$(($(elapsed_s) + box))
    BOX=$box
    echo "gpu_check: [$(elapsed_s) s] $name (box ${box} s) ..."
}

# boxed [-s SECONDS] CMD...: CMD under timeout, within the stage's box (and SECONDS if given).
boxed() {
    local limit=$((STAGE_END - $(elapsed_s)))
    if [[ $1 == -s ]]; then
        (($2 < limit)) && limit=$2
        shift 2
    fi
    ((limit < 1)) && limit=1
    timeout -k 5 "$limit" "$@"
    local rc=$?
    ((rc == 124 || rc == 137)) && TIMED_OUT=1
    return $rc
}

# finish STATUS NOTE: end the current stage (a timeout turns it into a failure).
finish() {
    local status=$1 note=$2
    if ((TIMED_OUT)); then
        status=FAIL
        note="timed out (box ${BOX} s); $note"
    fi
    record "$status" "$BOX" "$note"
    echo "gpu_check: [$(elapsed_s) s] $STAGE: $status (${WALL[-1]} s) $note"
}

record() {
    STAGES+=("$STAGE") STATUS+=("$1") BOXES+=("$2") NOTES+=("${3//|/\\|}")
    WALL+=("$(secs $(($(now_us) - STAGE_T0)))")
    write_summary
}

# fatal MESSAGE: the one line that says why the later stages cannot run; they are not run.
fatal() {
    GATE="needs the $STAGE stage, which failed"
    echo "gpu_check: FAIL: $1" >&2
}

# section FILE TITLE: a header in a log file.
section() { printf '\n==== %s\n' "$2" >>"$1"; }

# append FROM TO MAX_BYTES: FROM's end (at most MAX_BYTES) onto TO.
append() {
    local size
    size=$(stat -c %s "$1" 2>/dev/null || echo 0)
    if ((size > $3)); then
        echo "[... the first $((size - $3)) bytes are cut ...]" >>"$2"
    fi
    tail -c "$3" "$1" >>"$2" 2>/dev/null
}

version_of() { sed -n "s/^$1: //p" "$SCRATCH/versions.txt" 2>/dev/null | head -1; }

write_summary() {
    {
        echo "# gpu_check summary ($MODE)"
        echo
        echo "- device: $(version_of device)"
        echo "- torch $(version_of torch), triton $(version_of triton), CUDA $(version_of cuda)," \
            "driver $(version_of driver), python $(version_of python)"
        echo "- fusedopt commit $COMMIT, started $STARTED"
        echo
        echo "| stage | status | wall s | box s | notes |"
        echo "| --- | --- | ---: | ---: | --- |"
        local i
        for i in "${!STAGES[@]}"; do
            echo "| ${STAGES[i]} | ${STATUS[i]} | ${WALL[i]} | ${BOXES[i]} | ${NOTES[i]} |"
        done
        echo
        echo "total: $(secs $(($(now_us) - T0))) s of a ${BUDGET_S} s budget; result: $(result)"
    } >"$SUMMARY"
}

result() {
    local i s failed=()
    for i in "${!STATUS[@]}"; do
        s=${STATUS[i]}
        [[ $s == FAIL ]] && failed+=("${STAGES[i]}")
    done
    if ((${#failed[@]})); then echo "FAIL (${failed[*]})"; else echo "PASS"; fi
}

find_tool() { # find_tool NAME: on PATH, or in CUDA's and Nsight Compute's usual places
    command -v "$1" 2>/dev/null && return
    local c
    for c in "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /usr/local/cuda/bin/"$1" \
        /opt/nvidia/nsight-compute/*/"$1"; do
        [[ -x $c ]] && echo "$c" && return
    done
    return 1
}

# -------------------------------------------------------------------------- the stages

stage_env() {
    {
        echo "gpu_check $MODE, $(date -u +%Y-%m-%dT%H:%M:%SZ), host $(hostname), $(nproc) cores"
        echo "repo $ROOT, commit $(git rev-parse HEAD 2>/dev/null), OUTDIR $OUTDIR"
        git status --short 2>/dev/null | head -50
    } >>"$ENV_TXT"
    section "$ENV_TXT" "nvidia-smi"
    boxed -s 15 nvidia-smi >>"$ENV_TXT" 2>&1 || echo "(nvidia-smi failed or is absent)" >>"$ENV_TXT"
    section "$ENV_TXT" "tools"
    local tool
    for tool in nvcc compute-sanitizer ncu gcc; do
        local path
        path=$(find_tool "$tool") || { echo "$tool: not found" >>"$ENV_TXT"; continue; }
        echo "$tool: $path: $("$path" --version 2>&1 | grep -m1 -iE 'release|version|^gcc')" >>"$ENV_TXT"
    done
    section "$ENV_TXT" "python"
    boxed "$PY" - >"$SCRATCH/versions.txt" 2>>"$ENV_TXT" <<'PYEOF'
import importlib.metadata as md, platform, subprocess
import torch
print("python:", platform.python_version())
print("torch:", torch.__version__)
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton: not importable:", e)
print("cuda:", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("device: none visible to torch (CPU only)")
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10).stdout.split()
    print("driver:", out[0] if out else "none")
except (OSError, subprocess.TimeoutExpired):
    print("driver: none (no nvidia-smi)")
for name in ("pytest", "pytest-xdist", "pytest-timeout", "hypothesis", "numpy", "setuptools"):
    try:
        print(f"package {name}:", md.version(name))
    except md.PackageNotFoundError:
        print(f"package {name}: not installed")
PYEOF
    local rc=$?
    cat "$SCRATCH/versions.txt" >>"$ENV_TXT"
    section "$ENV_TXT" "python -m fusedopt.info (before the build)"
    boxed "$PY" -m fusedopt.info >>"$ENV_TXT" 2>&1
    local info=$?
    if ((rc == 0 && info == 0)); then
        finish pass "$(version_of device)"
    else
        finish FAIL "version probe exit $rc, fusedopt.info exit $info: see env.txt"
    fi
}

# gate PYTHON_CODE [HINT]: run a check that prints one line and exits non-zero when the GPU stages
# cannot run; log it in env.txt and judge the stage: skipped in a dry run, else pass, or fail
# loudly (with HINT).
gate() {
    boxed "$PY" -c "$1" >"$SCRATCH/gate.txt" 2>&1
    local rc=$? what
    cat "$SCRATCH/gate.txt" >>"$ENV_TXT"
    what=$(tail -1 "$SCRATCH/gate.txt")
    if ((DRY)); then
        finish skip "dry run: $what"
    elif ((rc == 0)); then
        finish pass "$what"
    else
        fatal "$what${2:-}"
        finish FAIL "$what"
    fi
}

stage_gpu() {
    section "$ENV_TXT" "gpu: torch.cuda.is_available()"
    gate 'import sys, torch
where = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
if not torch.cuda.is_available():
    sys.exit(print(f"no CUDA GPU visible to torch ({where})") or 1)
print(f"{torch.cuda.get_device_name(0)} ({where})")' "; on a machine without a GPU, run with --dry-run"
}

stage_build() {
    section "$LOG" "build"
    local rc
    if ((DRY)) && "$PY" -c 'import sys; from fusedopt import backends
sys.exit(backends.unavailable("cpu", "cpu") is not None)' >>"$LOG" 2>&1; then
        echo "dry run: fusedopt is installed and its CPU library loads; not rebuilt" >>"$LOG"
        finish pass "dry run: the installed build (its CPU library loads) is reused"
        return
    fi
    local env_=(FUSEDOPT_BUILD_CUDA=0 "MAX_JOBS=$(nproc)")
    ((DRY)) || env_=(TORCH_CUDA_ARCH_LIST=9.0 FUSEDOPT_BUILD_CUDA=1 MAX_JOBS=16)
    local cmd=("$PY" -m pip install --no-build-isolation --no-deps --no-index -e .)
    echo "\$ ${env_[*]} ${cmd[*]}" >>"$LOG"
    boxed env "${env_[@]}" "${cmd[@]}" >"$SCRATCH/build.log" 2>&1
    rc=$?
    ((!DRY && rc == 0)) && [[ ! -f fusedopt/_cuda.so ]] && rc=99
    append "$SCRATCH/build.log" "$LOG" $((2 * 1024 * 1024))
    if ((rc == 0)); then
        finish pass "$( ((DRY)) && echo "CPU library" || echo "CPU and CUDA (sm_90) libraries")"
    else
        local why
        why="the build failed (exit $rc$( ((rc == 99)) && echo ': no fusedopt/_cuda.so')); see build_tests.log"
        fatal "$why"
        finish FAIL "$why"
    fi
}

stage_backends() {
    section "$ENV_TXT" "python -m fusedopt.info (after the build)"
    boxed "$PY" -m fusedopt.info >>"$ENV_TXT" 2>&1
    section "$ENV_TXT" "backends for CUDA tensors"
    gate 'import sys, torch, fusedopt
from fusedopt import backends
why = {n: backends.unavailable(n, "cuda") for n in ("cuda", "triton")}
for n in [n for n, r in why.items() if r is None and torch.cuda.is_available()]:
    try:  # available is not enough: one small step must run
        p = torch.nn.Parameter(torch.ones(10, device="cuda"))
        p.grad = torch.ones_like(p)
        fusedopt.AdamW([p], backend=n).step()
        torch.cuda.synchronize()
    except Exception as e:
        why[n] = f"a step raised {type(e).__name__}: {e}".replace("\n", " ")
print("; ".join(f"backend {n!r} unavailable for CUDA tensors: {r}" for n, r in why.items() if r)
      or "backends cuda and triton available for CUDA tensors")
sys.exit(1 if any(why.values()) else 0)'
}

stage_workload() {
    local shards=11 k rc=0 pids=() env_=()
    ((DRY)) && shards=2 env_=(env TRITON_INTERPRET=1)
    local args=(--device cuda --backend cuda --backend triton)
    ((DRY)) && args=(--device cpu)
    section "$WORKLOAD_LOG" "workload: ${env_[*]:-} $PY scripts/gpu_workload.py ${args[*]} --shard K/$shards (at once)"
    for ((k = 0; k < shards; k++)); do
        boxed "${env_[@]}" "$PY" scripts/gpu_workload.py "${args[@]}" --shard "$k/$shards" \
            >"$SCRATCH/workload.$k" 2>&1 &
        pids+=($!)
    done
    for k in "${!pids[@]}"; do
        wait "${pids[k]}" || rc=$?
        append "$SCRATCH/workload.$k" "$WORKLOAD_LOG" $((1024 * 1024))
    done
    # timeouts inside the background jobs do not reach TIMED_OUT here
    ((rc == 124 || rc == 137)) && TIMED_OUT=1
    local ok failed
    ok=$(cat "$SCRATCH"/workload.* | grep -c ' ok$')
    failed=$(cat "$SCRATCH"/workload.* | grep -c ' FAIL ')
    if ((rc == 0)); then
        finish pass "$ok scenario x backend runs ok"
    else
        finish FAIL "exit $rc; $ok runs ok, $failed failed: see workload.log"
    fi
}

stage_tests() {
    section "$LOG" "tests"
    local cmd=("$PY" -m pytest -m cuda -rs -q tests "--junitxml=$JUNIT")
    if ((DRY)); then
        cmd=("$PY" -m pytest -m cuda --collect-only -q tests "--junitxml=$JUNIT")
    else
        "$PY" -c 'import xdist' 2>/dev/null && cmd+=(-n 8)
        "$PY" -c 'import pytest_timeout' 2>/dev/null && cmd+=(--timeout=120)
        cmd+=(--durations=15)
    fi
    echo "\$ ${cmd[*]}" >>"$LOG"
    boxed "${cmd[@]}" >"$SCRATCH/tests.log" 2>&1
    local rc=$?
    append "$SCRATCH/tests.log" "$LOG" $((12 * 1024 * 1024))
    if ((DRY)); then
        local n
        n=$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$SCRATCH/tests.log" | grep -oE '^[0-9]+')
        if ((rc == 0 && ${n:-0} > 0)); then
            finish pass "dry run: $n cuda tests collected"
        else
            finish FAIL "dry run: pytest --collect-only exit $rc, ${n:-0} cuda tests collected"
        fi
        return
    fi
    local counts
    counts=$("$PY" -c 'import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t, f, e, s = (sum(int(x.get(k, 0)) for x in suites) for k in ("tests", "failures", "errors", "skipped"))
print(f"{t} tests: {t - f - e - s} passed, {f} failed, {e} errors, {s} skipped")' "$JUNIT" 2>/dev/null)
    if ((rc == 0)); then
        finish pass "${counts:-pytest exit 0}"
    else
        finish FAIL "pytest exit $rc; ${counts:-no junit}"
    fi
}

stage_sanitizer() {
    if ((DRY)); then
        finish skip "dry run: compute-sanitizer needs a GPU"
        return
    fi
    local cs
    if ! cs=$(find_tool compute-sanitizer); then
        finish FAIL "compute-sanitizer not found"
        return
    fi
    local tool pids=() rc=0 notes=()
    for tool in memcheck racecheck; do
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 boxed "$cs" --tool "$tool" --error-exitcode 1 \
            --print-limit 100 "$PY" scripts/gpu_workload.py --device cuda --backend cuda \
            --backend triton >"$SCRATCH/sanitizer.$tool" 2>&1 &
        pids+=($!)
    done
    local i=0
    for tool in memcheck racecheck; do
        local r=0
        wait "${pids[i]}" || r=$?
        i=$((i + 1))
        section "$WORKLOAD_LOG" "compute-sanitizer --tool $tool (exit $r)"
        append "$SCRATCH/sanitizer.$tool" "$WORKLOAD_LOG" $((3 * 1024 * 1024))
        ((r == 124 || r == 137)) && TIMED_OUT=1
        ((r != 0)) && rc=$r
        notes+=("$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$SCRATCH/sanitizer.$tool" | tail -1 | sed 's/^=* *//') (exit $r)")
    done
    if ((rc == 0)); then
        finish pass "${notes[*]}"
    else
        finish FAIL "${notes[*]}; see workload.log"
    fi
}

stage_bench() {
    local runs
    if ((DRY)); then
        runs=("--device cpu --preset tiny --optimizer adamw --optimizer rmsprop --optimizer train-step --repeats 3")
    else
        runs=("--preset llama-1b --preset many-small --optimizer adamw --optimizer rmsprop --optimizer sgd-momentum --optimizer train-step --repeats 10"
            "--quick")
    fi
    local i rc=0 done_=0 FENCE='```'
    echo "# python -m fusedopt.bench ($MODE)" >"$BENCH_MD"
    for i in "${!runs[@]}"; do
        local out=$SCRATCH/bench.$i r=0
        # the first run leaves 40 s of the box to the --quick run after it
        local cap=$((STAGE_END - $(elapsed_s) - (i + 1 < ${#runs[@]} ? 40 : 0)))
        # shellcheck disable=SC2086 # the run's flags are split on purpose
        boxed -s "$cap" "$PY" -m fusedopt.bench ${runs[i]} --no-progress --out "$out" \
            >"$SCRATCH/bench.$i.log" 2>&1 || r=$?
        ((r != 0)) && rc=$r
        ((r == 0)) && done_=$((done_ + 1))
        {
            printf '\n## python -m fusedopt.bench %s (exit %s)\n\n' "${runs[i]}" "$r"
            cat "$out"/*.md 2>/dev/null
            printf '\n%scsv\n' "$FENCE"
            cat "$out"/*.csv 2>/dev/null
            printf '%s\n\n### console\n\n%s\n' "$FENCE" "$FENCE"
        } >>"$BENCH_MD"
        append "$SCRATCH/bench.$i.log" "$BENCH_MD" $((512 * 1024))
        echo "$FENCE" >>"$BENCH_MD"
    done
    if ((rc == 0)); then
        finish pass "${#runs[@]} runs: bench.md"
    else
        finish FAIL "$done_ of ${#runs[@]} runs passed (last failing exit $rc): see bench.md"
    fi
}

stage_ncu() {
    if ((DRY)); then
        finish skip "dry run: ncu needs a GPU"
        return
    fi
    local ncu
    if ! ncu=$(find_tool ncu); then
        finish FAIL "ncu not found"
        return
    fi
    local metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
    metrics+=,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
    metrics+=,dram__bytes_read.sum,dram__bytes_write.sum
    section "$WORKLOAD_LOG" "ncu (the main kernels of a 2^26-parameter fp32 step)"
    # --launch-skip 4: the workload's warm-up steps (AdamW and RMSprop on each backend) come first
    boxed "$ncu" --target-processes application-only --clock-control none \
        --kernel-name-base demangled --kernel-name 'regex:.*(_main|main_kernel).*' \
        --launch-skip 4 --launch-count 4 --metrics "$metrics" -f -o "$SCRATCH/ncu" \
        "$PY" scripts/gpu_workload.py --profile --backend cuda --backend triton \
        >"$SCRATCH/ncu.log" 2>&1
    local rc=$?
    append "$SCRATCH/ncu.log" "$WORKLOAD_LOG" $((1024 * 1024))
    if ((rc == 0)); then
        boxed -s 30 "$ncu" --import "$SCRATCH/ncu.ncu-rep" --csv --page raw >"$NCU_CSV" 2>>"$WORKLOAD_LOG"
        rc=$?
    fi
    local rows
    rows=$(($(grep -c . "$NCU_CSV" 2>/dev/null || echo 0) - 2)) # less the header and units rows
    if ((rc == 0 && rows > 0)); then
        finish pass "$rows kernels profiled: ncu.csv"
    else
        finish FAIL "ncu exit $rc, $rows kernels profiled: see workload.log"
    fi
}

# ------------------------------------------------------------------------------- the run

echo "gpu_check: $MODE into $OUTDIR (budget ${BUDGET_S} s)"
begin env 30 && stage_env
begin gpu 20 && stage_gpu
begin build 150 gated && stage_build
begin backends 30 gated && stage_backends
begin workload 90 gated && stage_workload
begin tests 150 gated && stage_tests
begin sanitizer 100 gated && stage_sanitizer
begin bench 120 gated && stage_bench
begin ncu 60 gated && stage_ncu

STAGE=total STAGE_T0=$T0
write_summary
# What comes back from the GPU machine: at most 8 files, each under 16 MiB.
for f in "$OUTDIR"/*; do
    [[ -f $f ]] || continue
    if (($(stat -c %s "$f") > MAX_FILE_BYTES)); then
        tail -c "$MAX_FILE_BYTES" "$f" >"$SCRATCH/cut" && mv "$SCRATCH/cut" "$f"
    fi
done
n_files=$(find "$OUTDIR" -maxdepth 1 -type f | wc -l)
((n_files > 8)) && echo "gpu_check: note: $OUTDIR holds $n_files files; only 8 come back" >&2

verdict=$(result)
echo "gpu_check: $verdict in $(secs $(($(now_us) - T0))) s; summary: $SUMMARY"
[[ $verdict == PASS ]]
