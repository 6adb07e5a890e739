#!/usr/bin/env bash
# Python 3.12: a CPU-only fusedopt wheel built with torch 2.13 under Python 3.12 (the cached venv
# of scripts/py312_env.sh), checked, installed into a fresh venv and the CPU test suite run against
# it from outside the checkout. The GPU machine runs Python 3.12, where a process that had stepped
# died at exit (issue 22). CI runs scripts/wheel_cuda.sh instead, which does the same for the CUDA
# wheels (the same CPU library, and the CUDA one beside it); this is the quicker check without
# CUDA: 1 min 50 s on the 2-core machine with the venv cached (creating it adds about 2;
# benchmarks/results/check_py312_2026-12-05.log).
#
#   bash scripts/check_py312.sh
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/wheel_cuda.sh" --cpu 2.13.0
