#!/usr/bin/env bash
# Create .venv, install the pinned requirements and build the Cython supervoxel extension.
# Idempotent: re-running does nothing when requirements.txt and the .pyx are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing requirements.txt (torch is large: a few minutes the first time)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r requirements.txt
    echo "$want" > "$stamp"
else
    echo "[setup] requirements up to date"
fi

# build_ext is incremental: it recompiles only when the .pyx is newer than the extension.
.venv/bin/python data/supervoxels/setup.py build_ext --inplace -q 2>&1 | grep -v '^$' || true
.venv/bin/python -c "import data.supervoxels.felzenszwalb_3d_cy" \
    || { echo "[setup] the Cython extension failed to build" >&2; exit 1; }
echo "[setup] done: activate with 'source .venv/bin/activate'"
