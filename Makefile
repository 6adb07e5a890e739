# The README's commands (bench: the main job). `make setup` is idempotent and quick once everything is installed.
.PHONY: setup demo test bench wheel check-wheel wheel-cuda

setup:
	bash scripts/setup_env.sh

demo: setup
	python3 benchmarks/demo.py

test: setup
	TRITON_INTERPRET=1 python3 -m pytest -q tests

bench: setup
	python3 -m fusedopt.bench --quick

wheel: setup
	python3 -m pip wheel . --no-build-isolation --no-deps -w dist

check-wheel: setup
	bash scripts/check_wheel.sh

# CUDA wheels for torch 2.13 and 2.11 (CUDA 13, Python 3.12) into dist/, on a machine without a
# GPU: built, checked, installed into a fresh venv and tested (scripts/wheel_cuda.sh says how).
# No `setup` first: the build venvs are its own.
wheel-cuda:
	bash scripts/wheel_cuda.sh
