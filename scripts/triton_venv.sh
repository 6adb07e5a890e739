#!/usr/bin/env bash
# A side virtual environment with another Triton, for compiling the kernels with it
# (tests/test_triton_compile.py compiles every variant with the oldest supported Triton too):
#
#   bash scripts/triton_venv.sh 3.6.0
#
# creates ${FUSEDOPT_CACHE:-$HOME/.cache/fusedopt}/triton-VERSION (never inside the checkout) with
# --system-site-packages and installs only triton==VERSION into it: it shadows the main
# environment's triton and reuses everything else, torch and the editable fusedopt of this checkout
# included (about 1 GB less than a venv of its own, and nothing but triton to download).
# Idempotent: an existing venv that imports that Triton and this checkout's kernels is kept; one
# that does not is rebuilt. Prints the venv's python last.
set -euo pipefail

VERSION="${1:?usage: triton_venv.sh VERSION (e.g. 3.6.0)}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FUSEDOPT_CACHE:-$HOME/.cache/fusedopt}/triton-$VERSION"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION="${PIP_ROOT_USER_ACTION:-ignore}"

usable() {  # the venv's triton is VERSION and fusedopt's kernels come from this checkout
    [[ -x "$PY" ]] && "$PY" - "$VERSION" "$ROOT" <<'PYEOF' >/dev/null 2>&1
import os, sys
import triton
import fusedopt.kernels
assert triton.__version__ == sys.argv[1], triton.__version__
assert os.path.realpath(fusedopt.kernels.__file__).startswith(os.path.realpath(sys.argv[2]) + os.sep)
PYEOF
}

if usable; then
    echo "triton_venv: $VENV has triton $VERSION, reusing it"
else
    echo "triton_venv: creating $VENV (triton==$VERSION over the packages of" \
         "$(python3 -c 'import sys; print(sys.executable)'))"
    rm -rf "$VENV"
    python3 -m venv --system-site-packages "$VENV"
    "$PY" -m pip install --quiet --no-deps "triton==$VERSION"
    if ! usable; then
        echo "triton_venv: $VENV does not import triton $VERSION and $ROOT's kernels" \
             "(is fusedopt installed editable from $ROOT: bash scripts/setup_env.sh?)" >&2
        exit 1
    fi
fi
echo "$PY"
