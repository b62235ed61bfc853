#!/usr/bin/env bash
# The checks to run on your own GPU before a long grid (tests/test_gpu.py, pytest marker `cuda`):
# one training step in fp32 / bf16 / fp16, deterministic kernels (QAMP, ADNet, SSL-ALPNet, PANet, GMRD, Q-Net and its
# test-time refinement) and a bit-exact repeat and resume of train.py on CUDA, TF32 off and the
# cuDNN decoder against the CPU Winograd branch, 2 NCCL ranks
# against one process (two GPUs or more), bench/gpu_step.py at 256 px ResNet-101, and the sweep
# giving every cell its own GPU. Extra arguments go to pytest (e.g. -k bench).
# Without CUDA it says so in one line and exits 0; when nvidia-smi sees a GPU that torch cannot use
# (a driver older than the CUDA build of the torch wheel), it says so and exits 1.
# The bench numbers are kept in bench/results/gpu_check/gpu_step.json (record them in docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONUTF8=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo "gpu_check: nvidia-smi lists a GPU but torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, end=")")') cannot use it: update the NVIDIA driver to one that supports that CUDA version (device='auto' would train on the CPU)"
        exit 1
    fi
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), '|', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
export QAMP_GPU_CHECK_OUT=${QAMP_GPU_CHECK_OUT:-bench/results/gpu_check}
mkdir -p "$QAMP_GPU_CHECK_OUT"
exec "$PY" -m pytest -m cuda -n 0 -s -rs -v "$@" tests/test_gpu.py
