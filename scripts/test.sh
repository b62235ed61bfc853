#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest (e.g. -k supervoxels;
# -n 0 runs it in this one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One pytest-xdist worker per core, each running whole test files (module fixtures built once) on
# one thread: a worker's small tensors gain nothing from a second thread, the other worker does.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@" tests
