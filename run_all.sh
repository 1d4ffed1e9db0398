#!/usr/bin/env bash
# The whole D4M chain with one command.
#   bash run_all.sh                 # Fashion-MNIST, offline, CPU (IPC=10 by default): prototypes, synthesis, soft labels, student,
#                                   # plus the random-real baseline, a results table and a picture
#   bash run_all.sh imagenet        # chains that dataset's four launchers (also tiny_imagenet, cifar10, cifar100)
# The launchers' environment applies here too and reaches every stage: DATA_DIR, SD_MODEL, TEACHER, IPC (default 10),
# OUT_DIR (default outputs), NPROC and PYTHON. The Fashion-MNIST chain writes its table to $OUT_DIR and its picture
# to misc/, or to $OUT_DIR as well when OUT_DIR is set.
# Stages resume: rerunning after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${1:-fashion_mnist}
export IPC=${IPC:-10}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
export PYTHON

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

FIGURE=misc/fashion_mnist_d4m.png
if [ -n "${OUT_DIR:-}" ]; then FIGURE=$OUT_DIR/fashion_mnist_d4m.png; fi
export OUT_DIR=${OUT_DIR:-outputs}
export DATA_DIR=${DATA_DIR:-data/fashion_mnist}
export SD_MODEL=${SD_MODEL:-models/fashion_mnist/ldm}
export TEACHER=${TEACHER:-models/fashion_mnist/teacher_convnet.pt}
start=$(date +%s)
NAME=fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
REAL=real_fashion_mnist_ipc${IPC}
echo "== 1/4 prototypes"
bash distillation/gen_prototype_fashion_mnist.sh
echo "== 2/4 synthesis"
bash distillation/gen_syn_image_fashion_mnist.sh
echo "== 3/4 soft labels (D4M images, then the random-real baseline)"
"$PYTHON" distillation/sample_real.py --dataset fashion_mnist --data_dir "$DATA_DIR" --ipc "$IPC" --output "$OUT_DIR/syn/$REAL"
bash matching/matching_fashion_mnist.sh
bash matching/matching_fashion_mnist.sh --data "$OUT_DIR/syn/$REAL" --fkd-path "$OUT_DIR/fkd/$REAL"
echo "== 4/4 student training (D4M images, then the random-real baseline)"
bash validate/train_FKD_fashion_mnist.sh
bash validate/train_FKD_fashion_mnist.sh --train-dir "$OUT_DIR/syn/$REAL" --fkd-path "$OUT_DIR/fkd/$REAL" \
    --output-dir "$OUT_DIR/student/$REAL"
"$PYTHON" validate/report.py --dataset fashion_mnist --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
    --d4m-dir "$OUT_DIR/student/$NAME" --real-dir "$OUT_DIR/student/$REAL" \
    --syn-images "$OUT_DIR/syn/$NAME" --real-images "$OUT_DIR/syn/$REAL" \
    --prototypes "$OUT_DIR/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors" --ipc "$IPC" \
    --diffusion_checkpoints_path "$SD_MODEL" \
    --output-json "$OUT_DIR/results_fashion_mnist.json" --figure "$FIGURE" \
    --seconds $(( $(date +%s) - start ))
echo "whole chain: $(( $(date +%s) - start )) s"
