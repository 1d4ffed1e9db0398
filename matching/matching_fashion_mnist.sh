#!/usr/bin/env bash
# Stage 3 for Fashion-MNIST: training-time matching, the teacher's soft labels of every augmented view of
# stage 2's images, after a label check; writes $OUT_DIR/fkd/fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/; resumes.
# Recipe: the demo's: the carried ConvNet teacher, batch 50, 150 epochs.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --soft-label-int8).
source "$(dirname "$0")/../d4m/launch.sh" fashion_mnist
matching -b 50 --epochs 150 --input-size 32 -j 0 "$@"
