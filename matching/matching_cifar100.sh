#!/usr/bin/env bash
# Training-time matching (soft labels) for CIFAR100 IPC 10 (ConvNet teacher from matching/train_teacher.py).
# Runs from any folder; NPROC=8 runs it under torchrun with 8 processes; extra flags are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
IPC=${IPC:-10}  # images per class; the same value must reach all four stages
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
NAME=cifar100_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
"${RUN[@]}" matching/generate_soft_label.py \
    --data "outputs/syn/$NAME" \
    --fkd-path "outputs/fkd/$NAME" \
    --teacher-path models/cifar100/teacher_convnet.pt \
    -b 1024 \
    --epochs 300 \
    --input-size 32 \
    --use-fp16 \
    --mix-type cutmix \
    "$@"
