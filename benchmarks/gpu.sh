#!/usr/bin/env bash
# benchmarks/peers.py on an NVIDIA GPU: the same table as on a CPU, in bf16, plus torch.compile rows, one row per
# SDPA backend (flash, memory-efficient, cuDNN, math), vitrail's training step with fp8 linear layers (on compute
# capability 8.9 or later, with torchao installed), the pipeline's end-to-end rate, and in every model row the
# model FLOP utilisation (MFU) against the GPU's dense bf16 peak (BF16_DENSE_PEAKS in peers.py: H100, H200).
#
#   bash benchmarks/gpu.sh [more peers.py flags, which override these, e.g. --batch 256 --compile]
#
# Runs from anywhere on a machine with Python >= 3.10 and an NVIDIA driver. If $PYTHON (python3) already imports
# vitrail from src/ and the peers (torch with CUDA, transformers, timm, scikit-learn, psutil), it runs with it and
# installs nothing, so it also works without network access. Otherwise it makes .venv in the repository (as
# `make` does) and installs vitrail with its dev extras from PyPI (torch, whose Linux wheels there are CUDA
# builds); torchao, for the fp8 row, is not among them (`pip install torchao`). Budget: under 5 minutes on an
# H200, an install included (about 2 of them on a fast link); to stay within it inference is compiled and
# training is not (add `--compile` for both, which the fp8 row needs to gain speed). docs/benchmarks.md (GPU)
# shows the table of a run on an H200.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PEERS_FLAGS=(--device cuda --dtype bfloat16 --batch 128 --rounds 5 --compile inference
             --sdpa-backends flash,efficient,cudnn,math --fp8)

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
