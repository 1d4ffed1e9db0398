#!/usr/bin/env bash
# Stage 4 for CIFAR-10: a student trained from scratch on stage 2's images and stage 3's soft labels,
# validated on DATA_DIR's real validation split; writes $OUT_DIR/student/cifar10_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/.
# A rerun continues the run that folder holds (--overwrite starts afresh).
# Recipe: RDED's validation recipe (Sun et al., CVPR 2024; github.com/LINs-lab/RDED, argument.py):
# the batch by IPC (d4m/launch.sh, rded_batch), 300 epochs, a half cosine; matching and training share the batch.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --eval-interval 10).
source "$(dirname "$0")/../d4m/launch.sh" cifar10
training --model convnet --batch-size "$(rded_batch 10)" --epochs 300 --input-size 32 --lr-schedule half-cosine "$@"
