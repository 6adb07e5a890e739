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
#   backends   which of the "cuda" and "triton" backends can step CUDA tensors, each in its own
#              process; fails when one cannot, but stops the later stages only when none can
#              (dry run: the "cpu" and interpreted "triton" backends, on CPU tensors)
# From here each stage runs once per usable backend, each whatever the other did, and its notes
# give each backend's result:
#   workload   scripts/gpu_workload.py: every bucket and option against torch.optim, 8 shards
#              per backend, all at once: a functional check that also compiles the Triton
#              variants into ~/.triton/cache for the later stages (dry run: one shard each)
#   tests_cuda    pytest -m cuda -k "not triton" (the cuda backend, and torch's on CUDA)
#   tests_triton  pytest -m cuda -k triton; each with its own JUnit XML (dry run: --collect-only;
#              each must collect > 0 tests)
#   sanitizer  compute-sanitizer memcheck and racecheck on the workload (dry run: skipped)
#   bench      python -m fusedopt.bench on llama-1b and many-small, per backend (dry run: tiny)
#   ncu        a 2^26-parameter fp32 AdamW and RMSprop step per backend (dry run: skipped)
#
# OUTDIR gets: summary.md (each stage's status and wall time, device and versions), env.txt,
# build_tests.log, junit_cuda.xml, junit_triton.xml, workload.log (warm-up, sanitizers, ncu's
# console), bench.md (the benchmark's tables and CSV), ncu.csv: 8 files. Exit status: 0 when no
# stage failed; 1 otherwise (every stage still runs, except that stages after a failed gpu or
# build stage, or a backends stage that found no usable backend, need what failed and are
# reported as not run); 2 for bad arguments.
#
# Time boxes. Together they exceed the 9 minutes, so a global budget (BUDGET_S) caps each box at
# what is left of it: the least valuable stages lose time first, and one hang costs at most its
# own box. Sized from the first GPU run (H200, 16 cores, 2026-12-04, fusedopt 9862cc5; logs in
# benchmarks/results/gpu-2026-12-04/ and the project's shared notes), where a measurement exists:
#   env 30 s       two torch imports (a few s each) and nvidia-smi.
#   gpu 20 s       one torch import and CUDA initialization.
#   build 150 s    measured: 121.6 s and 127 s with MAX_JOBS=16 when update.cu and update.cpp
#                  were one translation unit each, plan.cpp included torch/extension.h, the
#                  libraries built one after the other and with -g: the longest chain was
#                  update.cpp then update.cu, 64.6 s of CPU on the 2-core machine; the first,
#                  cold, build hit the then 150 s box. Since issue 22 (split by optimizer, one
#                  ninja run for both libraries, -g0) the longest file is plan.cpp, 17.7 s of CPU
#                  there (2026-12-05): predicted 35-45 s on 16 cores, not yet measured on one.
#                  The box keeps its size for a cold machine.
#   backends 40 s  one process per backend: a torch import, loading the CUDA library or
#                  compiling one Triton variant (Triton 3.6 compiles its launcher with gcc at
#                  first use), one step.
#   workload 90 s  its scenarios in 8 shards per backend, all at once; each compiles its Triton
#                  variants. Not measured per stage on 2026-12-04 (the stage never ran);
#                  interpreted on 2 CPU cores: 23 s in one process, measured.
#   tests_cuda 90 s   measured: the non-Triton cuda tests took 45.6 s with 10 xdist workers
#                  (485 tests). GPU memory: the largest test, a 2^31-element bf16 tensor with its
#                  state, needs about 21 GiB; 10 workers fit in the H200's 139 GiB even with
#                  several at once. 120 s per test at most (pytest-timeout).
#   tests_triton 120 s  not measured yet (Triton never compiled there): fewer tests, but each
#                  worker compiles the variants its tests use unless the workload cached them.
#   sanitizer 100 s  memcheck and racecheck on each backend, 4 processes at once, each on the
#                  whole workload with torch's caching allocator off, so that each tensor is its
#                  own allocation and memcheck sees its bounds.
#   bench 150 s    llama-1b and many-small with --repeats 10, one run per backend, each with an
#                  equal share of what is left (many-small's torch for-loop step, 10,000 tensors,
#                  takes most of a run: torch's baselines are timed in each run, so each
#                  backend's ratios come from its own run).
#   ncu 60 s       per backend: ncu starting python and torch, 2 profiled kernels, a few replay
#                  passes each.
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
# Triton's interpreter would make the triton backend unavailable for CUDA tensors; the dry run
# runs it on CPU tensors, where it needs it.
unset TRITON_INTERPRET
((DRY)) && export TRITON_INTERPRET=1
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
MODE=$([[ $DRY == 1 ]] && echo "dry run on CPU" || echo "GPU")

SUMMARY=$OUTDIR/summary.md
ENV_TXT=$OUTDIR/env.txt
LOG=$OUTDIR/build_tests.log
WORKLOAD_LOG=$OUTDIR/workload.log
BENCH_MD=$OUTDIR/bench.md
NCU_CSV=$OUTDIR/ncu.csv
rm -f "$SUMMARY" "$ENV_TXT" "$LOG" "$OUTDIR"/junit_*.xml "$WORKLOAD_LOG" "$BENCH_MD" "$NCU_CSV"

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

# The backends checked, the proven one first (GPU_CHECK_BACKENDS overrides: the dry-run test names
# one that cannot run). Each later stage runs once per usable backend, whatever the other did (on
# 2026-12-04 the Triton backend failed to compile and its gate stopped every stage of both). The
# dry run checks the CPU ones the same way, on CPU tensors, Triton interpreted.
if ((DRY)); then DEVICE=cpu DEFAULT_BACKENDS="cpu triton"; else DEVICE=cuda DEFAULT_BACKENDS="cuda triton"; fi
read -ra GPU_BACKENDS <<<"${GPU_CHECK_BACKENDS:-$DEFAULT_BACKENDS}"
USABLE=() # set by the backends stage
BR=()     # this stage's per-backend results: "name: status, note"
LEFT=0    # per_backend: the backends still to run, this one included

stage_backends() {
    section "$ENV_TXT" "python -m fusedopt.info (after the build)"
    boxed "$PY" -m fusedopt.info >>"$ENV_TXT" 2>&1
    section "$ENV_TXT" "backends for $DEVICE tensors"
    # one process per backend: a crash in one (a compiler error, a segfault) says nothing of the other
    local b why
    for b in "${GPU_BACKENDS[@]}"; do
        boxed -s 60 "$PY" -c 'import sys, torch, fusedopt
from fusedopt import backends
name, device = sys.argv[1:]
try:
    why = backends.unavailable(name, device)
    if why is None:  # available is not enough: one small step must run
        p = torch.nn.Parameter(torch.ones(10, device=device))
        p.grad = torch.ones_like(p)
        fusedopt.AdamW([p], backend=name).step()
        if device == "cuda":
            torch.cuda.synchronize()
except Exception as e:
    why = f"{type(e).__name__}: {e}".replace("\n", " ")
print(f"{name}: " + ("ok" if why is None else f"unusable: {why}"))
sys.exit(0 if why is None else 1)' "$b" "$DEVICE" >"$SCRATCH/backend.$b" 2>&1
        local rc=$?
        cat "$SCRATCH/backend.$b" >>"$ENV_TXT"
        if ((rc == 0)); then
            USABLE+=("$b")
        else
            why=$(grep -m1 "^$b: " "$SCRATCH/backend.$b" || tail -1 "$SCRATCH/backend.$b")
            BR+=("${why:-$b: exit $rc}$( ((rc != 1)) && echo " (exit $rc)")")
        fi
    done
    if ((${#USABLE[@]} == 0)); then
        fatal "no GPU backend is usable: ${BR[*]}"
        finish FAIL "${BR[*]}"
    elif ((${#BR[@]})); then
        finish FAIL "${BR[*]}; the later stages run ${USABLE[*]} only"
    else
        finish pass "${USABLE[*]} usable for $DEVICE tensors"
    fi
    BR=()
}

# per_backend FN: FN BACKEND for each usable backend, each whatever the others did; FN returns 0
# on success and appends its note to BR. The stage passes when every one did.
per_backend() {
    local fn=$1 b failed=0
    BR=() LEFT=${#USABLE[@]}
    for b in "${USABLE[@]}"; do
        "$fn" "$b" || failed=1
        LEFT=$((LEFT - 1))
    done
    finish_backends "$failed" "${@:2}"
}

# finish_backends FAILED [FAIL_SUFFIX [PASS_SUFFIX]]: end the stage with BR's notes.
finish_backends() {
    local notes
    notes=$(printf '%s; ' "${BR[@]}")
    notes=${notes%; }
    if (($1)); then finish FAIL "$notes${2:-}"; else finish pass "$notes${3:-}"; fi
}

stage_workload() {
    # every backend's shards at once (16 cores; 8 each, each compiling its Triton variants)
    local b k shards=8 pids=() names=()
    ((DRY)) && shards=1
    for b in "${USABLE[@]}"; do
        section "$WORKLOAD_LOG" "workload $b: $PY scripts/gpu_workload.py --device $DEVICE --backend $b --shard K/$shards (at once)"
        for ((k = 0; k < shards; k++)); do
            boxed "$PY" scripts/gpu_workload.py --device "$DEVICE" --backend "$b" \
                --shard "$k/$shards" >"$SCRATCH/workload.$b.$k" 2>&1 &
            pids+=($!) names+=("$b")
        done
    done
    local rcs=() i
    for i in "${!pids[@]}"; do
        wait "${pids[i]}"
        rcs+=($?)
    done
    BR=()
    local failed=0
    for b in "${USABLE[@]}"; do
        local rc=0 ok bad
        for i in "${!pids[@]}"; do
            [[ ${names[i]} == "$b" ]] || continue
            ((rcs[i] != 0)) && rc=${rcs[i]}
        done
        # timeouts inside the background jobs do not reach TIMED_OUT here
        ((rc == 124 || rc == 137)) && TIMED_OUT=1
        for ((k = 0; k < shards; k++)); do
            append "$SCRATCH/workload.$b.$k" "$WORKLOAD_LOG" $((512 * 1024))
        done
        ok=$(cat "$SCRATCH"/workload."$b".* | grep -c ' ok$')
        bad=$(cat "$SCRATCH"/workload."$b".* | grep -c ' FAIL ')
        if ((rc == 0)); then
            BR+=("$b: pass, $ok runs ok")
        else
            BR+=("$b: FAIL (exit $rc), $ok ok, $bad failed")
            failed=1
        fi
    done
    finish_backends "$failed" ": see workload.log"
}

# stage_tests BACKEND: the cuda-marked tests of one GPU backend (cuda: every test that is not
# Triton's, the torch backend's on CUDA included; triton: Triton's), in its own JUnit file.
stage_tests() {
    local b=$1 junit=$OUTDIR/junit_$1.xml sel
    sel=$([[ $b == triton ]] && echo "triton" || echo "not triton")
    if ((!DRY)) && [[ " ${USABLE[*]} " != *" $b "* ]]; then
        record "not run" 0 "backend $b is not usable (see the backends stage)"
        return
    fi
    section "$LOG" "tests ($b)"
    local cmd=("$PY" -m pytest -m cuda -k "$sel" -rs -q tests "--junitxml=$junit")
    if ((DRY)); then
        cmd=("$PY" -m pytest -m cuda -k "$sel" --collect-only -q tests "--junitxml=$junit")
    else
        "$PY" -c 'import xdist' 2>/dev/null && cmd+=(-n 10)
        "$PY" -c 'import pytest_timeout' 2>/dev/null && cmd+=(--timeout=120)
        cmd+=(--durations=15)
    fi
    echo "\$ ${cmd[*]}" >>"$LOG"
    boxed "${cmd[@]}" >"$SCRATCH/tests.$b.log" 2>&1
    local rc=$?
    append "$SCRATCH/tests.$b.log" "$LOG" $((6 * 1024 * 1024))
    if ((DRY)); then
        local n
        n=$(grep -oE '^[0-9]+(/[0-9]+)? tests? collected' "$SCRATCH/tests.$b.log" | grep -oE '^[0-9]+')
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
print(f"{t} tests: {t - f - e - s} passed, {f} failed, {e} errors, {s} skipped")' "$junit" 2>/dev/null)
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
    # both tools on both backends at once, each process on its own
    local b tool pids=() runs=()
    for b in "${USABLE[@]}"; do
        for tool in memcheck racecheck; do
            PYTORCH_NO_CUDA_MEMORY_CACHING=1 boxed "$cs" --tool "$tool" --error-exitcode 1 \
                --print-limit 100 "$PY" scripts/gpu_workload.py --device cuda --backend "$b" \
                >"$SCRATCH/sanitizer.$b.$tool" 2>&1 &
            pids+=($!) runs+=("$b.$tool")
        done
    done
    local i failed=0
    BR=()
    for i in "${!pids[@]}"; do
        local r=0 run=${runs[i]}
        wait "${pids[i]}" || r=$?
        section "$WORKLOAD_LOG" "compute-sanitizer --tool ${run#*.} on backend ${run%%.*} (exit $r)"
        append "$SCRATCH/sanitizer.$run" "$WORKLOAD_LOG" $((1024 * 1024))
        ((r == 124 || r == 137)) && TIMED_OUT=1
        ((r != 0)) && failed=1
        BR+=("${run%%.*} ${run#*.}: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$SCRATCH/sanitizer.$run" | tail -1 | sed 's/^=* *//') (exit $r)")
    done
    finish_backends "$failed" "; see workload.log"
}

bench_one() { # bench_one BACKEND: one run of the benchmark, appended to bench.md
    local b=$1 args out=$SCRATCH/bench.$1 r=0 FENCE='```'
    if ((DRY)); then
        args="--device cpu --preset tiny --optimizer adamw --optimizer rmsprop --optimizer train-step --backend $b --repeats 3"
    else
        args="--preset llama-1b --preset many-small --optimizer adamw --optimizer rmsprop --optimizer sgd-momentum --optimizer train-step --backend $b --repeats 10"
    fi
    # shellcheck disable=SC2086 # the run's flags are split on purpose
    # an equal share of what is left of the box for each backend still to run
    boxed -s $(((STAGE_END - $(elapsed_s)) / LEFT)) "$PY" -m fusedopt.bench $args --no-progress \
        --out "$out" >"$SCRATCH/bench.$b.log" 2>&1 || r=$?
    {
        printf '\n## python -m fusedopt.bench %s (exit %s)\n\n' "$args" "$r"
        cat "$out"/*.md 2>/dev/null
        printf '\n%scsv\n' "$FENCE"
        cat "$out"/*.csv 2>/dev/null
        printf '%s\n\n### console\n\n%s\n' "$FENCE" "$FENCE"
    } >>"$BENCH_MD"
    append "$SCRATCH/bench.$b.log" "$BENCH_MD" $((512 * 1024))
    echo "$FENCE" >>"$BENCH_MD"
    BR+=("$b: $( ((r == 0)) && echo pass || echo "FAIL (exit $r)")")
    return $r
}

stage_bench() {
    echo "# python -m fusedopt.bench ($MODE)" >"$BENCH_MD"
    per_backend bench_one
}

NCU="" # the ncu stage's ncu

ncu_one() { # ncu_one BACKEND: the main kernels of a 2^26-parameter fp32 AdamW and RMSprop step
    local b=$1 ncu=$NCU rows
    local metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum
    metrics+=,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
    metrics+=,dram__bytes_read.sum,dram__bytes_write.sum
    section "$WORKLOAD_LOG" "ncu, backend $b (the main kernels of a 2^26-parameter fp32 step)"
    # --launch-skip 2: the workload's warm-up steps (AdamW, then RMSprop) come first
    boxed -s $(((STAGE_END - $(elapsed_s)) / LEFT)) "$ncu" --target-processes application-only \
        --clock-control none --kernel-name-base demangled \
        --kernel-name 'regex:.*(_main|main_kernel).*' --launch-skip 2 --launch-count 2 \
        --metrics "$metrics" -f -o "$SCRATCH/ncu.$b" \
        "$PY" scripts/gpu_workload.py --profile --backend "$b" >"$SCRATCH/ncu.$b.log" 2>&1
    local rc=$?
    append "$SCRATCH/ncu.$b.log" "$WORKLOAD_LOG" $((512 * 1024))
    if ((rc == 0)); then
        boxed -s 30 "$ncu" --import "$SCRATCH/ncu.$b.ncu-rep" --csv --page raw \
            >"$SCRATCH/ncu.$b.csv" 2>>"$WORKLOAD_LOG"
        rc=$?
    fi
    rows=$(($(cat "$SCRATCH/ncu.$b.csv" 2>/dev/null | grep -c .) - 2)) # less header and units
    cat "$SCRATCH/ncu.$b.csv" >>"$NCU_CSV" 2>/dev/null
    BR+=("$b: $rows kernels profiled (exit $rc)")
    ((rc == 0 && rows > 0))
}

stage_ncu() {
    if ((DRY)); then
        finish skip "dry run: ncu needs a GPU"
        return
    fi
    if ! NCU=$(find_tool ncu); then
        finish FAIL "ncu not found"
        return
    fi
    per_backend ncu_one ": see workload.log" ": ncu.csv"
}

# ------------------------------------------------------------------------------- the run

echo "gpu_check: $MODE into $OUTDIR (budget ${BUDGET_S} s)"
begin env 30 && stage_env
begin gpu 20 && stage_gpu
begin build 150 gated && stage_build
begin backends 40 gated && stage_backends
begin workload 90 gated && stage_workload
begin tests_cuda 90 gated && stage_tests cuda
begin tests_triton 120 gated && stage_tests triton
begin sanitizer 100 gated && stage_sanitizer
begin bench 150 gated && stage_bench
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
