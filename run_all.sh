#!/usr/bin/env bash
# The whole D4M chain with one command.
#   bash run_all.sh                 # Fashion-MNIST, offline, CPU (IPC=10 by default): prototypes, synthesis, and the evaluation:
#                                   # D4M's images beside random real and nearest-real images, soft and hard labels,
#                                   # a results table, the accuracy-vs-IPC curve and a picture of the set
#   IPCS="1 2 5 10" SEEDS=3 bash run_all.sh      # the curve over several IPCs, three seeds each
#   MODELS=convnet,resnet18_modified PROTOCOLS=fkd,online,hard bash run_all.sh
#   DATA_DIR=my_data bash run_all.sh imagefolder # your own data (my_data/train/<class>/, my_data/val/<class>/), the
#                                   # same evaluation; without SD_MODEL a tiny LDM is trained on it first, without
#                                   # TEACHER a ConvNet teacher; NO_FLIP=1 where flipping changes the class (digits)
#   bash run_all.sh imagenet        # chains that dataset's four launchers (also tiny_imagenet, cifar10, cifar100)
# The launchers' environment applies here too and reaches every stage: DATA_DIR, SD_MODEL, TEACHER, IPC (default 10),
# SEEDS (default 1), OUT_DIR (default outputs), NPROC and PYTHON. The Fashion-MNIST and imagefolder chains also read
# IPCS, MODELS, PROTOCOLS, EPOCHS (the students', default 150) and EVAL_FLAGS (more flags of validate/evaluate.py).
# imagefolder also reads NAME (default: the data folder's name), IMAGE_SIZE (the distilled images' side: 32 with the
# tiny LDM, 224 with SD_MODEL), LDM_SIZE (the side stage 1 encodes: IMAGE_SIZE with the tiny LDM, 512 with SD_MODEL),
# LDM_FLAGS and TEACHER_FLAGS (more flags of distillation/train_tiny_ldm.py and matching/train_teacher.py), NO_FLIP.
# Pictures go to FIGURES (default OUT_DIR); FIGURES=misc updates the README's pictures.
# Stages resume: rerunning after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${1:-fashion_mnist}
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
    fashion_mnist|imagefolder) ;;
    *)
        echo "error: unknown dataset '$DATASET'; choose fashion_mnist (default), imagefolder, imagenet, tiny_imagenet, cifar10 or cifar100" >&2
        exit 2 ;;
esac
USER_SD_MODEL=${SD_MODEL:-} USER_TEACHER=${TEACHER:-}
source d4m/launch.sh "$DATASET"  # the environment, NAME, the stage commands (prototypes, synthesis), PY and RUN
FIGURES=${FIGURES:-$OUT_DIR}
IPCS=${IPCS:-$IPC}
MODELS=${MODELS:-convnet}
PROTOCOLS=${PROTOCOLS:-fkd,hard}
EPOCHS=${EPOCHS:-150}
for value in $IPCS $EPOCHS; do
    [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "error: IPCS and EPOCHS take positive integers, got '$value'" >&2; exit 2; }
done
FLIP=()
if [ -n "${NO_FLIP:-}" ]; then FLIP=(--no-flip); fi
echo "== every stage takes this machine's GPU when torch can use one, else the CPU (this chain is sized for a CPU)"
export D4M_CPU_NOTED=1  # said here once, so the stages do not each warn of the CPU

if [ "$DATASET" = fashion_mnist ]; then
    IMAGE_SIZE=32 LDM_SIZE=32
    REAL_SIZE=()  # the real images keep their 28 px: the students' crops bring every image to 32 px
else
    if [ -z "$USER_SD_MODEL" ]; then
        IMAGE_SIZE=${IMAGE_SIZE:-32}
        LDM_SIZE=${LDM_SIZE:-$IMAGE_SIZE}
        if [ ! -e "$SD_MODEL/model_index.json" ]; then
            echo "== no SD_MODEL: a tiny LDM trained on $DATA_DIR ($SD_MODEL)"
            # shellcheck disable=SC2086  # LDM_FLAGS holds several flags
            "$PY" distillation/train_tiny_ldm.py --dataset imagefolder --data-dir "$DATA_DIR" --output "$SD_MODEL" \
                --image_size "$LDM_SIZE" ${LDM_FLAGS:-}
        fi
    else
        IMAGE_SIZE=${IMAGE_SIZE:-224}
        LDM_SIZE=${LDM_SIZE:-512}
    fi
    if [ -z "$USER_TEACHER" ] && [ ! -e "$TEACHER" ]; then
        echo "== no TEACHER: a ConvNet teacher trained on $DATA_DIR ($TEACHER)"
        # shellcheck disable=SC2086  # TEACHER_FLAGS holds several flags
        "$PY" matching/train_teacher.py --dataset imagefolder --data-dir "$DATA_DIR" -a convnet \
            --input-size "$IMAGE_SIZE" "${FLIP[@]}" --output "$TEACHER" ${TEACHER_FLAGS:-}
    fi
    REAL_SIZE=(--size "$IMAGE_SIZE")  # real photos of any size, made the size of D4M's images
fi

start=$(date +%s)
EVALS=()
for IPC in $IPCS; do
    stage_names
    SYN=$OUT_DIR/syn/$SET_NAME
    echo "== IPC $IPC: 1/4 prototypes"
    if [ "$DATASET" = fashion_mnist ] || [ ! -e "$PROTOTYPES" ]; then prototypes --size "$LDM_SIZE"; fi
    echo "== IPC $IPC: 2/4 synthesis"
    synthesis --image_size "$IMAGE_SIZE"
    echo "== IPC $IPC: 3/4 baselines: $SEEDS random draw(s), the real images nearest to the prototypes"
    RANDOM_SETS=""
    for seed in $(seq 0 $(( SEEDS - 1 ))); do
        SET=$OUT_DIR/syn/real_${NAME}_ipc${IPC}_seed$seed
        [ -e "$SET/classes.json" ] || "$PY" distillation/sample_real.py --dataset "$DATASET" --data-dir "$DATA_DIR" \
            --select random --seed "$seed" --ipc "$IPC" "${REAL_SIZE[@]}" --output "$SET"
        RANDOM_SETS=${RANDOM_SETS:+$RANDOM_SETS,}$SET
    done
    NEAREST=$OUT_DIR/syn/nearest_${NAME}_ipc${IPC}
    [ -e "$NEAREST/classes.json" ] || "$PY" distillation/sample_real.py --dataset "$DATASET" --data-dir "$DATA_DIR" \
        --select nearest --prototype_path "$PROTOTYPES" "${REAL_SIZE[@]}" --output "$NEAREST"
    echo "== IPC $IPC: 4/4 matching and students ($MODELS; $PROTOCOLS; $SEEDS seed(s))"
    "$PY" validate/evaluate.py --dataset "$DATASET" --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
        --set "d4m=$SYN" --set "random=$RANDOM_SETS" --set "nearest=$NEAREST" \
        --models "$MODELS" --protocols "$PROTOCOLS" --seeds "$SEEDS" "${FLIP[@]}" --nproc "${NPROC:-1}" \
        --epochs "$EPOCHS" -b 50 --input-size "$IMAGE_SIZE" -T 20 --use-fp16 -j 0 --output "$OUT_DIR/eval/${NAME}_ipc$IPC" \
        ${EVAL_FLAGS:-}
    EVALS+=("$OUT_DIR/eval/${NAME}_ipc$IPC")
done
"$PY" validate/report.py --dataset "$DATASET" --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
    --evals "${EVALS[@]}" --output-json "$OUT_DIR/results_$NAME.json" \
    --curve "$FIGURES/${NAME}_ipc_curve.png" --models-figure "$FIGURES/${NAME}_models.png" \
    --figure "$FIGURES/${NAME}_d4m.png" --syn-images "$SYN" \
    --real-images "$OUT_DIR/syn/real_${NAME}_ipc${IPC}_seed0" --prototypes "$PROTOTYPES" \
    --diffusion_checkpoints_path "$SD_MODEL" --seconds $(( $(date +%s) - start ))
echo "whole chain: $(( $(date +%s) - start )) s"
