#!/usr/bin/env bash
# The whole D4M chain with one command.
#   bash run_all.sh                 # Fashion-MNIST, offline, CPU (IPC=10 by default): prototypes, synthesis, soft labels, student,
#                                   # plus the random-real baseline, a results table and a picture
#   bash run_all.sh imagenet        # chains that dataset's four launchers (also tiny_imagenet, cifar10, cifar100)
# Stages resume: rerunning after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${1:-fashion_mnist}
export IPC=${IPC:-10}
export PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python

case "$DATASET" in
    imagenet)
        bash distillation/gen_prototype_imgnt.sh
        bash distillation/gen_syn_image_imgnt.sh
        bash matching/matching.sh
        bash validate/train_FKD.sh
        exit 0 ;;
    tiny_imagenet|cifar10|cifar100)
        bash "distillation/gen_prototype_$DATASET.sh"
        bash "distillation/gen_syn_image_$DATASET.sh"
        bash "matching/matching_$DATASET.sh"
        bash "validate/train_FKD_$DATASET.sh"
        exit 0 ;;
    fashion_mnist) ;;
    *)
        echo "error: unknown dataset '$DATASET'; choose fashion_mnist (default), imagenet, tiny_imagenet, cifar10 or cifar100" >&2
        exit 2 ;;
esac

start=$(date +%s)
NAME=fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
REAL=real_fashion_mnist_ipc${IPC}
echo "== 1/4 prototypes"
bash distillation/gen_prototype_fashion_mnist.sh
echo "== 2/4 synthesis"
bash distillation/gen_syn_image_fashion_mnist.sh
echo "== 3/4 soft labels (D4M images, then the random-real baseline)"
"$PYTHON" distillation/sample_real.py --dataset fashion_mnist --data_dir data/fashion_mnist --ipc "$IPC" --output "outputs/syn/$REAL"
bash matching/matching_fashion_mnist.sh
bash matching/matching_fashion_mnist.sh --data "outputs/syn/$REAL" --fkd-path "outputs/fkd/$REAL"
echo "== 4/4 student training (D4M images, then the random-real baseline)"
bash validate/train_FKD_fashion_mnist.sh
bash validate/train_FKD_fashion_mnist.sh --train-dir "outputs/syn/$REAL" --fkd-path "outputs/fkd/$REAL" --output-dir "outputs/student/$REAL"
"$PYTHON" validate/report.py --dataset fashion_mnist --data-dir data/fashion_mnist \
    --teacher-path models/fashion_mnist/teacher_convnet.pt \
    --d4m-dir "outputs/student/$NAME" --real-dir "outputs/student/$REAL" \
    --syn-images "outputs/syn/$NAME" --real-images "outputs/syn/$REAL" \
    --prototypes "outputs/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors" --ipc "$IPC" \
    --diffusion_checkpoints_path models/fashion_mnist/ldm \
    --output-json outputs/results_fashion_mnist.json --figure misc/fashion_mnist_d4m.png \
    --seconds $(( $(date +%s) - start ))
echo "whole chain: $(( $(date +%s) - start )) s"
