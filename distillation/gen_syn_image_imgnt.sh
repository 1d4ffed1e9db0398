#!/usr/bin/env bash
# Stage 2 for ImageNet-1K: IPC images per class from the prototypes of gen_prototype_imgnt.sh
# (guidance 8, strength 0.7, Stable Diffusion v1.5), saved at 224 px under
# $OUT_DIR/syn/imagenet_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1/<class>/. Resumes an interrupted run.
# Environment, shared by the four ImageNet-1K launchers (same names, same defaults); this one reads:
#   SD_MODEL  Stable Diffusion: a diffusers folder or hub id (default stable-diffusion-v1-5/stable-diffusion-v1-5)
#   IPC       images per class; give all four stages the same value (default 10)
#   OUT_DIR   stage outputs: $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run under torchrun with that many processes (default: one process)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
# Relative paths are taken from the repository root; the launcher runs from any folder.
# Extra flags are passed through last, so they override the ones below (e.g. --batch_size 20).
set -euo pipefail
cd "$(dirname "$0")/.."
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
"${RUN[@]}" distillation/gen_syn_image.py \
    --dataset imagenet \
    --diffusion_checkpoints_path "$SD_MODEL" \
    --label_file_path distillation/label-prompt/imagenet.txt \
    --prototype_path "$OUT_DIR/prototypes/imagenet-ipc${IPC}-kmexpand1.safetensors" \
    --save_init_image_path "$OUT_DIR/syn" \
    --ipc "$IPC" \
    --km_expand 1 \
    --guidance_scale 8 \
    --strength 0.7 \
    --image_size 224 \
    "$@"
