#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONUTF8=1  # UTF-8 text I/O even after ITK/GDCM (DICOM tests) switch the process to the C locale
exec .venv/bin/python -m pytest -q "$@" tests
