#!/usr/bin/env bash
# Stage 4 for Tiny-ImageNet: a resnet18_modified student trained from scratch on the images and soft labels
# of stages 2 and 3 (RDED's recipe, below), validated on the real
# validation split of DATA_DIR; writes $OUT_DIR/student/tiny_imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/.
# A rerun continues the run that folder holds (--overwrite among the flags starts afresh instead).
# Recipe: RDED's validation settings for Tiny-ImageNet (Sun et al., "On the Diversity and Realism of
# Distilled Dataset", CVPR 2024; github.com/LINs-lab/RDED, argument.py): batches of 100 images (at most the
# set), 300 epochs, CutMix, T 20, AdamW lr 1e-3, weight decay 0.01, a half cosine. Matching and training
# share BATCH.
# Environment, shared by the four Tiny-ImageNet launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder (default data/tiny-imagenet-200)
#   SEEDS     students trained, seeds 0 .. SEEDS-1, summarised as mean and std (default 1)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --eval-interval 10).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/tiny-imagenet-200}
IPC=${IPC:-10}
SEEDS=${SEEDS:-1}
OUT_DIR=${OUT_DIR:-outputs}
[[ $IPC =~ ^[1-9][0-9]*$ ]] || { echo "error: IPC must be a positive integer, got '$IPC'" >&2; exit 2; }
[[ $SEEDS =~ ^[1-9][0-9]*$ ]] || { echo "error: SEEDS must be a positive integer, got '$SEEDS'" >&2; exit 2; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
    RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
fi
BATCH=$(( IPC * 200 < 100 ? IPC * 200 : 100 ))  # RDED: Tiny-ImageNet trains in batches of 100
NAME=tiny_imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
STUDENT=$OUT_DIR/student/$NAME
RESUME=  # set when the folder holds a run and the flags choose neither --overwrite nor --resume
if [ -e "$STUDENT/checkpoint.pth.tar" ] || compgen -G "$STUDENT/seed*/checkpoint.pth.tar" >/dev/null; then
    [[ " $* " == *" --overwrite "* || " $* " == *" --resume"* ]] || RESUME=--resume
fi
"${RUN[@]}" validate/train_FKD.py \
    --train-dir "$OUT_DIR/syn/$NAME" \
    --fkd-path "$OUT_DIR/fkd/$NAME" \
    --output-dir "$STUDENT" \
    --dataset tiny_imagenet --data-dir "$DATA_DIR" \
    --model resnet18_modified \
    --batch-size "$BATCH" \
    --epochs 300 \
    --input-size 64 \
    --lr-schedule half-cosine \
    -T 20 \
    --adamw-lr 0.001 \
    --adamw-weight-decay 0.01 \
    --mix-type cutmix \
    --seeds "$SEEDS" \
    ${RESUME:+"$RESUME"} \
    "$@"
