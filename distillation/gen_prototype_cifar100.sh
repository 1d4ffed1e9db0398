#!/usr/bin/env bash
# Stage 1 for CIFAR-100: IPC k-means prototypes per class of the Stable Diffusion v1.5 latents,
# encoded at 512 px; writes $OUT_DIR/prototypes/cifar100-ipc${IPC}-kmexpand1.safetensors.
# The environment (DATA_DIR, SD_MODEL, TEACHER, IPC, SEEDS, OUT_DIR, NPROC, PYTHON) is read by d4m/launch.sh;
# extra flags are passed through last, so they override these (e.g. --num_workers 16).
source "$(dirname "$0")/../d4m/launch.sh" cifar100
prototypes --size 512 "$@"
