#!/usr/bin/env bash
# Everything that only a GPU can show, in one command (about 40 minutes on one H100):
#   bash benchmarks/gpu_check.sh [CIFAR10_SPEC]
# 1. the GPU-only tests (tests/test_gpu.py: augmentation cuda == cpu, each speed switch ==
#    the plain step, bf16 vs fp32, .beton batches into device memory, a real `train --gpu`
#    run with NCCL and SyncBatchNorm, 2-GPU workers when there are 2 GPUs);
# 2. benchmarks/step.py and benchmarks/augment.py on cuda;
# 3. the 20-minute cifar10-imc-swav-fast time-to-accuracy curve on a 40,000 / 10,000 split of
#    CIFAR10_SPEC (default: ../shared/data/cifar10-train-jpg.zip).
# Each benchmark writes its section of benchmarks/RESULTS.md. Stops at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
PY=.venv/bin/python
DATA="${1:-../shared/data/cifar10-train-jpg.zip}"
SPLIT="${TMPDIR:-/tmp}/distcluster-gpu-check-cifar10"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU here')"
$PY -m pytest -q -m gpu tests/test_gpu.py
$PY benchmarks/step.py --device cuda
$PY -m pip install -q -e '.[bench]'
$PY benchmarks/augment.py --device cuda
$PY benchmarks/split_data.py "$DATA" --held-out 10000 --out "$SPLIT"
$PY benchmarks/time_to_accuracy.py --recipe cifar10-imc-swav-fast --minutes 20 \
    --data "$SPLIT-train.npz" --eval-data "$SPLIT-heldout.npz"
