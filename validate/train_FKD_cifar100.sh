#!/usr/bin/env bash
# Student training on the stored soft labels and validation on the real set, for CIFAR100 IPC 10.
# Runs from any folder; NPROC=8 runs it under torchrun with 8 processes; extra flags are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
IPC=${IPC:-10}  # images per class; the same value must reach all four stages
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
NAME=cifar100_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
"${RUN[@]}" validate/train_FKD.py \
    --train-dir "outputs/syn/$NAME" \
    --fkd-path "outputs/fkd/$NAME" \
    --output-dir "outputs/student/$NAME" \
    --dataset cifar100 --data-dir data/cifar100 \
    --model convnet \
    --batch-size 1024 \
    --epochs 300 \
    --gradient-accumulation-steps 2 \
    --input-size 32 \
    --cos \
    -T 20 \
    --adamw-lr 0.001 \
    --adamw-weight-decay 0.01 \
    --mix-type cutmix \
    "$@"
