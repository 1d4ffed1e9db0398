#!/usr/bin/env bash
# Stage 3 for CIFAR-100: training-time matching, the teacher's soft labels of every augmented view of
# stage 2's images, after a label check; writes $OUT_DIR/fkd/cifar100_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/; resumes.
# Recipe: RDED's validation recipe (Sun et al., CVPR 2024; github.com/LINs-lab/RDED, argument.py):
# the batch by IPC (d4m/launch.sh, rded_batch), 300 epochs, a half cosine; matching and training share the batch.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --soft-label-topk 50).
source "$(dirname "$0")/../d4m/launch.sh" cifar100
matching -b "$(rded_batch 100)" --epochs 300 --input-size 32 "$@"
