#!/usr/bin/env bash
# Idempotent: a Python 3.12 virtual environment with torch==2.13.0 (or the torch given), for
# building and testing fusedopt under Python 3.12 (scripts/check_py312.sh) and for building CUDA
# wheels for Python 3.12 (scripts/wheel_cuda.sh). It lives outside the checkout, so that it
# survives new work trees:
#
#   ${FUSEDOPT_CACHE:-$HOME/.cache/fusedopt}/py312               torch 2.13.0
#   ${FUSEDOPT_CACHE:-$HOME/.cache/fusedopt}/py312-torch2.11.0   bash scripts/py312_env.sh 2.11.0
#
#   bash scripts/py312_env.sh [TORCH]   # prints the venv's python on its last line of stdout
#
#  - Python 3.12: the newest pyenv 3.12.x ($(pyenv root) or ${PYENV_ROOT:-~/.pyenv}, versions/3.12.*),
#    else a python3.12 on PATH, else /usr/bin or /usr/local/bin/python3.12. None: exit status 2.
#  - torch==2.13.0: for cp312 pip resolves torch's CUDA build (about 4.7 GB with its nvidia
#    runtime packages, and the triton it pins, 3.7.1); it runs CPU tensors without a GPU and has
#    the CUDA headers and libraries to build CUDA extensions. Another torch there is replaced.
#    torch==2.11.0 for cp312 is likewise PyPI's CUDA 13.0 build (the GPU machine's 2.11.0+cu130),
#    with triton 3.6.0.
#  - pytest, hypothesis, numpy (also the Triton interpreter's), expecttest, matplotlib (the
#    benchmark's --plot), setuptools>=64, wheel, ninja (what building fusedopt needs): installed
#    when missing. The ecosystem tests' transformers and lightning are not (they skip).
# Everything but the venv's python goes to stderr.
set -euo pipefail

CACHE="${FUSEDOPT_CACHE:-$HOME/.cache/fusedopt}"
TORCH_WANTED="${1:-2.13.0}"
if [[ "$TORCH_WANTED" == 2.13.0 ]]; then VENV="$CACHE/py312"; else VENV="$CACHE/py312-torch$TORCH_WANTED"; fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}"

log() { echo "py312_env: $*" >&2; }

is_312() { [[ -x "$1" ]] && "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python312() {
    local candidates=() root roots=()
    if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then roots+=("$root"); fi
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}")  # pyenv installed but not on this PATH
    for root in "${roots[@]}"; do
        # newest 3.12.x first (sort -V), plain builds only (not 3.12-dev, 3.12.1t, ...)
        while IFS= read -r dir; do
            candidates+=("$dir/bin/python3.12")
        done < <(ls -d "$root"/versions/3.12.* 2>/dev/null | grep -E '/3\.12\.[0-9]+$' | sort -Vr)
    done
    if command -v python3.12 >/dev/null 2>&1; then candidates+=("$(command -v python3.12)"); fi
    candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12)
    local c
    for c in "${candidates[@]}"; do
        # a pyenv shim is a script that may resolve to another version: ask the interpreter
        if is_312 "$c"; then
            "$c" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    return 1
}

if is_312 "$PY"; then
    log "reusing $VENV ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
else
    if ! BASE="$(find_python312)"; then
        log "ERROR: no Python 3.12 found (looked in \$(pyenv root)/versions/3.12.*, python3.12 on" \
            "PATH, /usr/bin, /usr/local/bin). Install one, e.g. 'pyenv install 3.12'."
        exit 2
    fi
    log "creating $VENV from $BASE"
    rm -rf "$VENV"
    mkdir -p "$CACHE"
    "$BASE" -m venv "$VENV"
fi

# One interpreter start for all checks: "name version" or "name MISSING" per package.
STATUS="$("$PY" - <<'PYEOF'
import importlib

def version(name):
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:
        return "MISSING"

def major_minor(v):
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return (0, 0)

found = {n: version(n) for n in ("torch", "pytest", "hypothesis", "numpy", "expecttest",
                                 "matplotlib", "wheel", "ninja", "setuptools")}
if found["setuptools"] != "MISSING" and major_minor(found["setuptools"]) < (64, 0):
    found["setuptools"] = "MISSING"
for name, v in found.items():
    print(name, v)
PYEOF
)"
version_of() { awk -v n="$1" '$1 == n { print $2 }' <<<"$STATUS"; }

want=()
TORCH="$(version_of torch)"
if [[ "$TORCH" == "$TORCH_WANTED" || "$TORCH" == "$TORCH_WANTED"+* ]]; then
    log "torch $TORCH already installed"
else
    log "torch is $TORCH: installing torch==$TORCH_WANTED (CUDA build for cp312, about 4.7 GB)"
    want+=("torch==$TORCH_WANTED")
fi
# torch before 2.13 pins triton 3.6, whose interpreter cannot run fusedopt's kernels with numpy
# 2.4 or later (int() of a one-element array became an error): numpy<2.4 there (2.3.5 measured
# to work, 2026-12-05).
NUMPY=numpy
if [[ "$TORCH_WANTED" =~ ^2\.([0-9]+)\. ]] && ((BASH_REMATCH[1] < 13)); then
    NUMPY="numpy<2.4"
    NUMPY_HAVE="$(version_of numpy)"
    if [[ "$NUMPY_HAVE" =~ ^([0-9]+)\.([0-9]+) ]] &&
        ((BASH_REMATCH[1] > 2 || (BASH_REMATCH[1] == 2 && BASH_REMATCH[2] >= 4))); then
        want+=("$NUMPY")
    fi
fi
for name in pytest hypothesis numpy expecttest matplotlib wheel ninja setuptools; do
    if [[ "$(version_of "$name")" == MISSING ]]; then
        case "$name" in
            setuptools) want+=("setuptools>=64") ;;
            numpy) want+=("$NUMPY") ;;
            *) want+=("$name") ;;
        esac
    fi
done
if ((${#want[@]})); then
    log "pip install ${want[*]}"
    "$PY" -m pip install -q "${want[@]}" >&2
fi
echo "$PY"
