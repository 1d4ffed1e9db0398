#!/usr/bin/env bash
# Stage 3 for ImageNet-1K: training-time matching, the teacher's soft labels of every augmented view of
# stage 2's images, after a label check; writes $OUT_DIR/fkd/imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/; resumes.
# Recipe: the paper's: a ResNet-18 teacher, batch 1024, 300 epochs.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --soft-label-topk 50).
source "$(dirname "$0")/../d4m/launch.sh" imagenet
matching -b 1024 --epochs 300 --input-size 224 "$@"
