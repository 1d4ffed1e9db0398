#!/usr/bin/env bash
# Stage 1 for Fashion-MNIST: IPC prototypes per class (k-means mini-batches of km_expand*IPC latents)
# from the small latent diffusion model of distillation/train_tiny_ldm.py; writes $OUT_DIR/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors.
# Environment, shared by the four Fashion-MNIST launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder (default data/fashion_mnist)
#   SD_MODEL  Stable Diffusion: a diffusers folder or hub id (default models/fashion_mnist/ldm)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --prototype_format json).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/fashion_mnist}
SD_MODEL=${SD_MODEL:-models/fashion_mnist/ldm}
IPC=${IPC:-10}
OUT_DIR=${OUT_DIR:-outputs}
[[ $IPC =~ ^[1-9][0-9]*$ ]] || { echo "error: IPC must be a positive integer, got '$IPC'" >&2; exit 2; }
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
RUN=("$PY")
if [ -n "${NPROC:-}" ]; then
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "error: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
    RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")
fi
"${RUN[@]}" distillation/gen_prototype.py \
    --dataset fashion_mnist \
    --data_dir "$DATA_DIR" \
    --diffusion_checkpoints_path "$SD_MODEL" \
    --label_file_path distillation/label-prompt/fashion_mnist.txt \
    --ipc "$IPC" \
    --km_expand 1 \
    --batch_size 10 \
    --size 32 \
    --save_prototype_path "$OUT_DIR/prototypes" \
    "$@"
