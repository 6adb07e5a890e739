#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment outside the source tree, and run
# the test suite against the installed package (not the checkout). CI runs this after the tests.
#
#   bash scripts/check_wheel.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d /tmp/fusedopt-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

echo "check_wheel: building the wheel"
python3 -m pip wheel "$ROOT" --no-build-isolation --no-deps -q -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/fusedopt-*.whl)"
echo "check_wheel: built $(basename "$WHEEL")"

# The same torch (and triton) the wheel was built against, then the test dependencies.
read -r TORCH_VERSION TRITON_VERSION < <(python3 - <<'PYEOF'
import importlib, torch
try:
    triton = importlib.import_module("triton").__version__
except Exception:
    triton = "-"
print(torch.__version__.split("+")[0], triton)
PYEOF
)
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
echo "check_wheel: fresh venv with torch==$TORCH_VERSION, triton $TRITON_VERSION"
"$PY" -m pip install -q "torch==$TORCH_VERSION"
if [[ "$TRITON_VERSION" != "-" ]]; then "$PY" -m pip install -q "triton==$TRITON_VERSION"; fi
"$PY" -m pip install -q pytest hypothesis numpy matplotlib expecttest transformers accelerate \
    lightning "setuptools>=64"
"$PY" -m pip install -q --no-deps "$WHEEL"

cd "$WORK"  # not the checkout: `import fusedopt` must find the installed wheel
"$PY" - "$WORK" <<'PYEOF'
import sys, fusedopt
assert fusedopt.__file__.startswith(sys.argv[1]), f"imported {fusedopt.__file__}"
print("check_wheel: testing", fusedopt.__file__)
PYEOF
# The source run (.ci/run) has run every test, the interpreted Triton ones included, on the same
# sources. Here, against the wheel: every test but those, then the Triton kernels the wheel
# carries against the cpu backend, to the bit (test_backends_agree.py): they load and run.
# Running the interpreted tests twice took about 4 of CI's 20 minutes. Also left to the source
# run, as they test the checkout, not the wheel, or the same compiled code at length (CI at
# 2c5d35a took 1,239 s with them here): the compile checks of csrc (test_cuda_compile.py), the
# GPU script's dry run (test_gpu_check.py, 59 s: it builds the checkout), building a wheel
# (test_wheel.py, 9 s), a 2^31-element tensor (38 s) and 20,000 tensors (25 s).
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -m "not triton" \
    --ignore="$ROOT/tests/test_cuda_compile.py" --ignore="$ROOT/tests/test_gpu_check.py" \
    --ignore="$ROOT/tests/test_wheel.py" \
    -k "not test_tensor_beyond_2_31_elements_cpu and not test_twenty_thousand_tensors" \
    "$ROOT/tests"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider -m triton \
    "$ROOT/tests/test_backends_agree.py"
