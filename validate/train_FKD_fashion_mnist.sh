#!/usr/bin/env bash
# Student training on the stored soft labels and validation on the real set, for Fashion-MNIST IPC 10 (100 images, 150 epochs: matching + training about 5 minutes on 2 loaded CPU cores).
# Runs from any folder; NPROC=8 runs it under torchrun with 8 processes; extra flags are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
IPC=${IPC:-10}  # images per class; the same value must reach all four stages
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
NAME=fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
"${RUN[@]}" validate/train_FKD.py \
    --train-dir "outputs/syn/$NAME" \
    --fkd-path "outputs/fkd/$NAME" \
    --output-dir "outputs/student/$NAME" \
    --dataset fashion_mnist --data-dir data/fashion_mnist \
    --model convnet \
    --batch-size 50 \
    --epochs 150 \
    --input-size 32 \
    -j 0 \
    --cos \
    -T 20 \
    --adamw-lr 0.001 \
    --adamw-weight-decay 0.01 \
    --mix-type cutmix \
    "$@"
