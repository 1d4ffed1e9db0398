#!/usr/bin/env bash
# Stage 2 for Fashion-MNIST: 10 images per class from the 10 prototypes of gen_prototype_fashion_mnist.sh
# (guidance 8, strength 0.7, the small latent diffusion model that distillation/train_tiny_ldm.py writes), saved at 32 px under
# outputs/syn/fashion_mnist_ipc10_10_s0.7_g8.0_kmexpand1/<class>/.
# Runs from any folder and resumes an interrupted run. SD_MODEL and PYTHON override the defaults; NPROC=8 runs
# it under torchrun with 8 processes; extra flags are passed through (e.g. --batch_size 20).
set -euo pipefail
cd "$(dirname "$0")/.."
IPC=${IPC:-10}  # images per class; the same value must reach all four stages
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
"${RUN[@]}" distillation/gen_syn_image.py \
    --dataset fashion_mnist \
    --diffusion_checkpoints_path "${SD_MODEL:-models/fashion_mnist/ldm}" \
    --label_file_path distillation/label-prompt/fashion_mnist.txt \
    --prototype_path "outputs/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors" \
    --save_init_image_path outputs/syn \
    --ipc "$IPC" \
    --km_expand 1 \
    --guidance_scale 8 \
    --strength 0.7 \
    --image_size 32 \
    "$@"
