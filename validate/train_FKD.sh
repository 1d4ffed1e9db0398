#!/usr/bin/env bash
# Stage 4 for ImageNet-1K: a resnet18 student trained from scratch on the images and soft labels
# of stages 2 and 3 (300 epochs, cosine, T 20, AdamW lr 1e-3 wd 0.01), validated on the real
# validation split of DATA_DIR; writes $OUT_DIR/student/imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/.
# A rerun continues the run that folder holds (--overwrite among the flags starts afresh instead).
# Environment, shared by the four ImageNet-1K launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder (default data/imagenet)
#   SEEDS     students trained, seeds 0 .. SEEDS-1, summarised as mean and std (default 1)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --eval-interval 10).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/imagenet}
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
NAME=imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
STUDENT=$OUT_DIR/student/$NAME
RESUME=  # set when the folder holds a run and the flags choose neither --overwrite nor --resume
if [ -e "$STUDENT/checkpoint.pth.tar" ] || compgen -G "$STUDENT/seed*/checkpoint.pth.tar" >/dev/null; then
    [[ " $* " == *" --overwrite "* || " $* " == *" --resume"* ]] || RESUME=--resume
fi
"${RUN[@]}" validate/train_FKD.py \
    --train-dir "$OUT_DIR/syn/$NAME" \
    --fkd-path "$OUT_DIR/fkd/$NAME" \
    --output-dir "$STUDENT" \
    --dataset imagenet --data-dir "$DATA_DIR" \
    --model resnet18 \
    --batch-size 1024 \
    --epochs 300 \
    --gradient-accumulation-steps 2 \
    --input-size 224 \
    --cos \
    -T 20 \
    --adamw-lr 0.001 \
    --adamw-weight-decay 0.01 \
    --mix-type cutmix \
    --seeds "$SEEDS" \
    ${RESUME:+"$RESUME"} \
    "$@"
