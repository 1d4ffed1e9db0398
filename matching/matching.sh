#!/usr/bin/env bash
# Stage 3 for ImageNet-1K: training-time matching, soft labels of a ResNet-18 teacher for
# every augmented view of the images of gen_syn_image_imgnt.sh (300 epochs, batch 1024, CutMix);
# writes $OUT_DIR/fkd/imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/. Resumes an interrupted run.
# Before matching, the label check scores the teacher on the images and on DATA_DIR's validation split.
# Environment, shared by the four ImageNet-1K launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder, for the label check (default data/imagenet)
#   TEACHER   teacher file of matching/train_teacher.py (default: unset, torchvision's ImageNet ResNet-18)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --soft-label-topk 50).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/imagenet}
IPC=${IPC:-10}
OUT_DIR=${OUT_DIR:-outputs}
[[ $IPC =~ ^[1-9][0-9]*$ ]] || { echo "error: IPC must be a positive integer, got '$IPC'" >&2; exit 2; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
    RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
fi
if [ -n "${TEACHER:-}" ]; then TEACHER_FLAGS=(--teacher-path "$TEACHER"); else TEACHER_FLAGS=(-a resnet18); fi
NAME=imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
"${RUN[@]}" matching/generate_soft_label.py \
    --data "$OUT_DIR/syn/$NAME" \
    --fkd-path "$OUT_DIR/fkd/$NAME" \
    --dataset imagenet --data-dir "$DATA_DIR" \
    "${TEACHER_FLAGS[@]}" \
    -b 1024 \
    --epochs 300 \
    --input-size 224 \
    --use-fp16 \
    --mix-type cutmix \
    "$@"
