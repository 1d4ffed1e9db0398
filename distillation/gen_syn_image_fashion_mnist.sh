#!/usr/bin/env bash
# Stage 2 for Fashion-MNIST: IPC images per class from stage 1's prototypes (the small latent diffusion model of distillation/train_tiny_ldm.py),
# saved at 32 px under $OUT_DIR/syn/fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/<class>/; resumes.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --batch_size 20).
source "$(dirname "$0")/../d4m/launch.sh" fashion_mnist
synthesis --image_size 32 "$@"
