#!/usr/bin/env bash
# Stage 3 for CIFAR-10: training-time matching, soft labels of a ConvNet teacher for
# every augmented view of the images of gen_syn_image_cifar10.sh (RDED's recipe, below);
# writes $OUT_DIR/fkd/cifar10_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/. Resumes an interrupted run.
# Before matching, the label check scores the teacher on the images and on DATA_DIR's validation split.
# Recipe: RDED's validation settings for this dataset (Sun et al., "On the Diversity and Realism of
# Distilled Dataset", CVPR 2024; github.com/LINs-lab/RDED, argument.py), which scale the batch with the
# set: BATCH images (10 at IPC 1, 50 up to IPC 10, 100 above, at most the set), 300 epochs,
# CutMix, T 20, AdamW lr 1e-3, weight decay 0.01, a half cosine. Matching and training share BATCH.
# Environment, shared by the four CIFAR-10 launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder, for the label check (default data/cifar10)
#   TEACHER   teacher file of matching/train_teacher.py (default models/cifar10/teacher_convnet.pt)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --soft-label-topk 50).
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-models/cifar10/teacher_convnet.pt}
DATA_DIR=${DATA_DIR:-data/cifar10}
IPC=${IPC:-10}
OUT_DIR=${OUT_DIR:-outputs}
[[ $IPC =~ ^[1-9][0-9]*$ ]] || { echo "error: IPC must be a positive integer, got '$IPC'" >&2; exit 2; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
    RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
fi
case $IPC in 1) BATCH=10 ;; [2-9]|10) BATCH=50 ;; *) BATCH=100 ;; esac  # RDED: by IPC
BATCH=$(( BATCH < IPC * 10 ? BATCH : IPC * 10 ))  # at most the whole set
NAME=cifar10_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
"${RUN[@]}" matching/generate_soft_label.py \
    --data "$OUT_DIR/syn/$NAME" \
    --fkd-path "$OUT_DIR/fkd/$NAME" \
    --dataset cifar10 --data-dir "$DATA_DIR" \
    --teacher-path "$TEACHER" \
    -b "$BATCH" \
    --epochs 300 \
    --input-size 32 \
    --use-fp16 \
    --mix-type cutmix \
    "$@"
