#!/usr/bin/env bash
# Stage 1 for CIFAR-100: IPC prototypes per class (k-means mini-batches of km_expand*IPC latents)
# from Stable Diffusion v1.5; writes $OUT_DIR/prototypes/cifar100-ipc${IPC}-kmexpand1.safetensors.
# Environment, shared by the four CIFAR-100 launchers (same names, same defaults); this one reads:
#   DATA_DIR  the dataset's folder (default data/cifar100)
#   SD_MODEL  Stable Diffusion: a diffusers folder or hub id (default stable-diffusion-v1-5/stable-diffusion-v1-5)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --prototype_format json).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data/cifar100}
SD_MODEL=${SD_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
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
    --dataset cifar100 \
    --data_dir "$DATA_DIR" \
    --diffusion_checkpoints_path "$SD_MODEL" \
    --label_file_path distillation/label-prompt/cifar100.txt \
    --ipc "$IPC" \
    --km_expand 1 \
    --batch_size 10 \
    --size 512 \
    --save_prototype_path "$OUT_DIR/prototypes" \
    "$@"
