#!/usr/bin/env bash
# Stage 4 for Fashion-MNIST: a student trained from scratch on stage 2's images and stage 3's soft labels,
# validated on DATA_DIR's real validation split; writes $OUT_DIR/student/fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/.
# A rerun continues the run that folder holds (--overwrite starts afresh).
# Recipe: the demo's: ConvNet, batch 50, 150 epochs, cosine.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --eval-interval 10).
source "$(dirname "$0")/../d4m/launch.sh" fashion_mnist
training --model convnet --batch-size 50 --epochs 150 --input-size 32 --cos "$@"
