# The README's commands (bench: the main job). `make setup` is idempotent and quick once everything is installed.
.PHONY: setup demo test bench wheel check-wheel

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
