#!/usr/bin/env bash
# Stage 4 for ImageNet-1K: a student trained from scratch on stage 2's images and stage 3's soft labels,
# validated on DATA_DIR's real validation split; writes $OUT_DIR/student/imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/.
# A rerun continues the run that folder holds (--overwrite starts afresh).
# Recipe: the paper's: ResNet-18, batch 1024 in 2 accumulation steps, 300 epochs, cosine.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --eval-interval 10).
source "$(dirname "$0")/../d4m/launch.sh" imagenet
training --model resnet18 --batch-size 1024 --gradient-accumulation-steps 2 --epochs 300 --input-size 224 \
    --cos "$@"
