#!/usr/bin/env bash
# Stage 1 for Fashion-MNIST: IPC k-means prototypes per class of the the small latent diffusion model of distillation/train_tiny_ldm.py latents,
# encoded at 32 px; writes $OUT_DIR/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --num_workers 16).
source "$(dirname "$0")/../d4m/launch.sh" fashion_mnist
prototypes --size 32 "$@"
