#!/usr/bin/env bash
# benchmarks/peers.py on an NVIDIA GPU: the same table as on a CPU, in bf16, plus torch.compile rows, one row per
# SDPA backend (flash, memory-efficient, cuDNN, math), and model FLOP utilisation against the H200's bf16 dense
# peak (H200_BF16_DENSE_PEAK in peers.py, with its source).
#
#   bash benchmarks/gpu.sh [more peers.py flags, which override these, e.g. --batch 256]
#
# Runs from anywhere on a machine with Python >= 3.10 and an NVIDIA driver. If $PYTHON (python3) already imports
# vitrail from src/ and the peers (torch with CUDA, transformers, timm, scikit-learn, psutil), as on the GPU
# machines lent here, which have those and no network, it runs with it. Otherwise it makes .venv in the repository
# (as `make` does) and installs vitrail with its dev extras from PyPI (torch, whose Linux wheels there are CUDA
# builds). Budget: under 5 minutes on an H200, an install included (about 2 of them on a fast link); to stay
# within it inference is compiled and training is not (add `--compile` for both). docs/benchmarks.md (GPU)
# shows the table of the run on an H200 and how that machine got transformers 5.24.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PEERS_FLAGS=(--device cuda --dtype bfloat16 --batch 128 --rounds 5 --compile inference
             --sdpa-backends flash,efficient,cudnn,math)

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi -L fails); on a CPU run: python benchmarks/peers.py" >&2
    exit 1
fi
nvidia-smi -L

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if "$PYTHON" -c "import torch, timm, sklearn, psutil, vitrail; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu.sh: running with $("$PYTHON" -c "import sys; print(sys.executable)"), vitrail from src/"
    exec "$PYTHON" benchmarks/peers.py "${PEERS_FLAGS[@]}" "$@"
fi
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
exec "$VENV/bin/python" benchmarks/peers.py "${PEERS_FLAGS[@]}" "$@"
