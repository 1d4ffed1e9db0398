#!/usr/bin/env bash
# The whole D4M chain with one command.
#   bash run_all.sh                 # Fashion-MNIST, offline, CPU (IPC=10 by default): prototypes, synthesis, and the evaluation:
#                                   # D4M's images beside random real and nearest-real images, soft and hard labels,
#                                   # a results table, the accuracy-vs-IPC curve and a picture of the set
#   IPCS="1 2 5 10" SEEDS=3 bash run_all.sh      # the curve over several IPCs, three seeds each
#   MODELS=convnet,resnet18_modified PROTOCOLS=fkd,online,hard bash run_all.sh
#   bash run_all.sh imagenet        # chains that dataset's four launchers (also tiny_imagenet, cifar10, cifar100)
# The launchers' environment applies here too and reaches every stage: DATA_DIR, SD_MODEL, TEACHER, IPC (default 10),
# SEEDS (default 1), OUT_DIR (default outputs), NPROC and PYTHON. The Fashion-MNIST chain also reads IPCS, MODELS and
# PROTOCOLS, writes its table to $OUT_DIR and its pictures to misc/, or to $OUT_DIR as well when OUT_DIR is set.
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

MISC=misc
if [ -n "${OUT_DIR:-}" ]; then MISC=$OUT_DIR; fi  # a run of one's own keeps the README's pictures
export OUT_DIR=${OUT_DIR:-outputs}
export DATA_DIR=${DATA_DIR:-data/fashion_mnist}
export SD_MODEL=${SD_MODEL:-models/fashion_mnist/ldm}
export TEACHER=${TEACHER:-models/fashion_mnist/teacher_convnet.pt}
IPCS=${IPCS:-$IPC}
SEEDS=${SEEDS:-1}
MODELS=${MODELS:-convnet}
PROTOCOLS=${PROTOCOLS:-fkd,hard}
for value in $IPCS $SEEDS; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "error: IPCS and SEEDS take positive integers, got '$value'" >&2; exit 2; }
done
start=$(date +%s)
EVALS=()
for IPC in $IPCS; do
    export IPC
    NAME=fashion_mnist_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1
    PROTOTYPES=$OUT_DIR/prototypes/fashion_mnist-ipc${IPC}-kmexpand1.safetensors
    echo "== IPC $IPC: 1/4 prototypes"
    bash distillation/gen_prototype_fashion_mnist.sh
    echo "== IPC $IPC: 2/4 synthesis"
    bash distillation/gen_syn_image_fashion_mnist.sh
    echo "== IPC $IPC: 3/4 baselines: $SEEDS random draw(s), the real images nearest to the prototypes"
    RANDOM_SETS=""
    for seed in $(seq 0 $(( SEEDS - 1 ))); do
        SET=$OUT_DIR/syn/real_fashion_mnist_ipc${IPC}_seed$seed
        [ -e "$SET/classes.json" ] || "$PYTHON" distillation/sample_real.py --dataset fashion_mnist --data_dir "$DATA_DIR" \
            --select random --seed "$seed" --ipc "$IPC" --output "$SET"
        RANDOM_SETS=${RANDOM_SETS:+$RANDOM_SETS,}$SET
    done
    NEAREST=$OUT_DIR/syn/nearest_fashion_mnist_ipc${IPC}
    [ -e "$NEAREST/classes.json" ] || "$PYTHON" distillation/sample_real.py --dataset fashion_mnist --data_dir "$DATA_DIR" \
        --select nearest --prototype_path "$PROTOTYPES" --output "$NEAREST"
    echo "== IPC $IPC: 4/4 matching and students ($MODELS; $PROTOCOLS; $SEEDS seed(s))"
    "$PYTHON" validate/evaluate.py --dataset fashion_mnist --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
        --set "d4m=$OUT_DIR/syn/$NAME" --set "random=$RANDOM_SETS" --set "nearest=$NEAREST" \
        --models "$MODELS" --protocols "$PROTOCOLS" --seeds "$SEEDS" \
        --epochs 150 -b 50 --input-size 32 -T 20 --use-fp16 -j 0 --output "$OUT_DIR/eval/fashion_mnist_ipc$IPC"
    EVALS+=("$OUT_DIR/eval/fashion_mnist_ipc$IPC")
done
"$PYTHON" validate/report.py --dataset fashion_mnist --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
    --evals "${EVALS[@]}" --output-json "$OUT_DIR/results_fashion_mnist.json" \
    --curve "$MISC/fashion_mnist_ipc_curve.png" --models-figure "$MISC/fashion_mnist_models.png" \
    --figure "$MISC/fashion_mnist_d4m.png" --syn-images "$OUT_DIR/syn/$NAME" \
    --real-images "$OUT_DIR/syn/real_fashion_mnist_ipc${IPC}_seed0" --prototypes "$PROTOTYPES" \
    --diffusion_checkpoints_path "$SD_MODEL" --seconds $(( $(date +%s) - start ))
echo "whole chain: $(( $(date +%s) - start )) s"
