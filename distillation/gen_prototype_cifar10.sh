#!/usr/bin/env bash
# Stage 1 for CIFAR-10: 10 prototypes per class (k-means mini-batches of km_expand*ipc = 10 latents)
# from Stable Diffusion v1.5; writes outputs/prototypes/cifar10-ipc10-kmexpand1.safetensors.
# Runs from any folder. DATA_DIR, SD_MODEL and PYTHON override the defaults; NPROC=8 runs it under torchrun
# with 8 processes; extra flags are passed through (e.g. --prototype_format json).
set -euo pipefail
cd "$(dirname "$0")/.."
IPC=${IPC:-10}  # images per class; the same value must reach all four stages
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
"${RUN[@]}" distillation/gen_prototype.py \
    --dataset cifar10 \
    --data_dir "${DATA_DIR:-data/cifar10}" \
    --diffusion_checkpoints_path "${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}" \
    --label_file_path distillation/label-prompt/cifar10.txt \
    --ipc "$IPC" \
    --km_expand 1 \
    --batch_size 10 \
    --size 512 \
    --save_prototype_path outputs/prototypes \
    "$@"
