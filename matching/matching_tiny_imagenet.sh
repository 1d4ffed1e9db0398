#!/usr/bin/env bash
# Stage 3 for Tiny-ImageNet: training-time matching, the teacher's soft labels of every augmented view of
# stage 2's images, after a label check; writes $OUT_DIR/fkd/tiny_imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/; resumes.
# Recipe: RDED's validation recipe (Sun et al., CVPR 2024; github.com/LINs-lab/RDED, argument.py):
# batches of 100 (at most the set), 300 epochs, a half cosine; matching and training share the batch.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --soft-label-topk 50).
source "$(dirname "$0")/../d4m/launch.sh" tiny_imagenet
matching -b $(( IPC * 200 < 100 ? IPC * 200 : 100 )) --epochs 300 --input-size 64 "$@"
