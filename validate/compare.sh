#!/usr/bin/env bash
# D4M beside the methods that claim to beat it (MGD3, D3HR, CaO2) and real images, under one protocol, on any dataset.
#   bash validate/compare.sh                      # Fashion-MNIST with the carried models: IPC 1 and 10, 3 seeds
#   DATA_DIR=path/to/shoes bash validate/compare.sh imagefolder   # your data, with the tiny LDM and teacher that
#                                                 # `run_all.sh imagefolder` trained (or your SD_MODEL and TEACHER)
#   NPROC=8 IPCS=10 SEEDS=3 bash validate/compare.sh imagenet      # a paper dataset with its launchers' settings
# Sets (SETS, default all six), one folder per seed k (its synthesis seed and its students' seed are both k):
#   d4m     the paper's chain: k-means prototypes (stage 1, seed 0), img2img at STRENGTH 0.7, GUIDANCE 8
#   mgd3    distillation/gen_mgd3.py: pure noise, DDPM, mode guidance toward the same prototypes
#   d3hr    distillation/gen_d3hr.py: DDIM-inverted class Gaussians, the best of 100,000 groups, DDIM decoding
#   cao2    distillation/gen_cao2.py: 4 x IPC candidates, the teacher keeps IPC, latent optimisation
#   random  random real training images; nearest: the real image nearest each prototype (one folder for all seeds)
# Every set gets one soft-label store per folder and students trained by validate/evaluate.py with the dataset's
# recipe (model, epochs, batch, input size: the demo's for Fashion-MNIST and image folders, the launchers' for the
# paper's datasets), under PROTOCOLS (default fkd,hard). Variables: SETS, IPCS (default "1 10"), SEEDS (default 3),
# PROTOCOLS, EPOCHS, EVAL_FLAGS (more flags of validate/evaluate.py), EVAL (names $OUT_DIR/eval/${EVAL}_ipc<IPC> and the report, default compare), FIGURES (the
# pictures, default OUT_DIR), and d4m/launch.sh's: DATA_DIR, SD_MODEL, TEACHER, OUT_DIR, NAME, NPROC, PYTHON; for
# image folders also IMAGE_SIZE (saved images, default 32 with the tiny LDM, 224 with SD_MODEL), LDM_SIZE (the
# generators' side, default IMAGE_SIZE with the tiny LDM, 512 with SD_MODEL) and NO_FLIP.
# Writes $OUT_DIR/results_$EVAL.json (a row per set, IPC and protocol; gaps to random real with 95 % intervals; set
# scores), $FIGURES/${EVAL}_curve.png and one picture per set in $FIGURES/${EVAL}_sets/.
SEEDS=${SEEDS:-3}  # before d4m/launch.sh, whose default is 1
DATASET=${1:-fashion_mnist}
case $DATASET in
    imagenet|tiny_imagenet|cifar10|cifar100|fashion_mnist|imagefolder) ;;
    *) echo "error: unknown dataset '$DATASET'; choose fashion_mnist (default), imagefolder, imagenet, tiny_imagenet," \
            "cifar10 or cifar100" >&2; exit 2 ;;
esac
USER_SD_MODEL=${SD_MODEL:-}
source "$(dirname "$0")/../d4m/launch.sh" "$DATASET"
IPCS=${IPCS:-1 10}
PROTOCOLS=${PROTOCOLS:-fkd,hard}
SETS=${SETS:-d4m mgd3 d3hr cao2 random nearest}
EVAL=${EVAL:-compare}
FIGURES=${FIGURES:-$OUT_DIR}
for set in $SETS; do
    case $set in d4m|mgd3|d3hr|cao2|random|nearest) ;;
        *) echo "error: unknown set '$set' in SETS; choose from d4m mgd3 d3hr cao2 random nearest" >&2; exit 2 ;;
    esac
done
# the dataset's recipe: generator side, saved side, the students' model, epochs and batch, the generators' batch;
# REAL_SIZE: real images resized to the saved side (Fashion-MNIST's 28 px stay as the demo has them: the students'
# crops make every image 32 px)
REAL_SIZE=()
case $DATASET in
    fashion_mnist) SIZE=32 IMAGE_SIZE=32 MODEL=convnet EPOCHS=${EPOCHS:-150} GEN_BATCH=100 ;;
    imagefolder)
        if [ -n "$USER_SD_MODEL" ]; then IMAGE_SIZE=${IMAGE_SIZE:-224} SIZE=${LDM_SIZE:-512} GEN_BATCH=10
        else IMAGE_SIZE=${IMAGE_SIZE:-32} SIZE=${LDM_SIZE:-$IMAGE_SIZE} GEN_BATCH=100; fi
        MODEL=convnet EPOCHS=${EPOCHS:-150} REAL_SIZE=(--size "$IMAGE_SIZE")
        for model in "$SD_MODEL" "$TEACHER"; do
            [ -e "$model" ] || { echo "error: $model does not exist; run 'DATA_DIR=$DATA_DIR bash run_all.sh imagefolder'" \
                "first (it trains the tiny LDM and the teacher), or set SD_MODEL and TEACHER" >&2; exit 2; }
        done ;;
    imagenet) SIZE=512 IMAGE_SIZE=224 MODEL=resnet18 EPOCHS=${EPOCHS:-300} GEN_BATCH=10 ;;
    tiny_imagenet) SIZE=512 IMAGE_SIZE=64 MODEL=resnet18_modified EPOCHS=${EPOCHS:-300} GEN_BATCH=10 ;;
    cifar10|cifar100) SIZE=512 IMAGE_SIZE=32 MODEL=convnet EPOCHS=${EPOCHS:-300} GEN_BATCH=10 ;;
esac
student_batch() {  # the students' batch at this IPC: the demo's 50, or the dataset's training launcher's
    case $DATASET in
        fashion_mnist|imagefolder) echo 50 ;;
        imagenet) echo 1024 ;;
        tiny_imagenet) echo $(( IPC * 200 < 100 ? IPC * 200 : 100 )) ;;
        cifar10) rded_batch 10 ;;
        cifar100) rded_batch 100 ;;
    esac
}
[[ $EPOCHS =~ ^[1-9][0-9]*$ ]] || { echo "error: EPOCHS must be a positive integer, got '$EPOCHS'" >&2; exit 2; }
TEACHER_FLAGS=(--teacher_path "$TEACHER")
EVAL_TEACHER=(--teacher-path "$TEACHER")
if [ -z "$TEACHER" ]; then TEACHER_FLAGS=(--teacher_arch resnet18) EVAL_TEACHER=(-a resnet18); fi
FLIP=()
if [ -n "${NO_FLIP:-}" ]; then FLIP=(--no-flip); fi
COMMON=(--dataset "$DATASET" --diffusion_checkpoints_path "$SD_MODEL" "${PROMPTS[@]}" --name "$NAME"
        --size "$SIZE" --image_size "$IMAGE_SIZE" --batch_size "$GEN_BATCH"
        --save_init_image_path "$OUT_DIR/syn")
export D4M_CPU_NOTED=1
echo "== every stage takes this machine's GPU when torch can use one, else the CPU"

make_set() {  # SET: make its folder for each seed at this IPC (what exists is kept); print NAME=FOLDER[,FOLDER...]
    local folders="" folder seed
    for seed in $(seq 0 $(( SEEDS - 1 ))); do
        case $1 in
            d4m) synthesis --image_size "$IMAGE_SIZE" --batch_size "$GEN_BATCH" --seed "$seed" \
                     --name "${NAME}_seed$seed" >&2
                 folder=$OUT_DIR/syn/$(set_folder "${NAME}_seed$seed") ;;
            mgd3) "${RUN[@]}" distillation/gen_mgd3.py "${COMMON[@]}" --ipc "$IPC" --prototype_path "$PROTOTYPES" \
                      --seed "$seed" >&2
                  folder=$OUT_DIR/syn/${NAME}_mgd3_ipc${IPC}_seed$seed ;;
            d3hr) "${RUN[@]}" distillation/gen_d3hr.py "${COMMON[@]}" --ipc "$IPC" --data_dir "$DATA_DIR" \
                      --statistics_dir "$OUT_DIR/d3hr" --seed "$seed" >&2
                  folder=$OUT_DIR/syn/${NAME}_d3hr_ipc${IPC}_seed$seed ;;
            cao2) "${RUN[@]}" distillation/gen_cao2.py "${COMMON[@]}" --ipc "$IPC" --data_dir "$DATA_DIR" \
                      "${TEACHER_FLAGS[@]}" --seed "$seed" >&2
                  folder=$OUT_DIR/syn/${NAME}_cao2_ipc${IPC}_seed$seed ;;
            random) folder=$OUT_DIR/syn/real_${NAME}_ipc${IPC}_seed$seed
                    [ -e "$folder/classes.json" ] || "$PY" distillation/sample_real.py --dataset "$DATASET" \
                        --data-dir "$DATA_DIR" --select random --seed "$seed" --ipc "$IPC" "${REAL_SIZE[@]}" \
                        --output "$folder" >&2 ;;
            nearest) folder=$OUT_DIR/syn/nearest_${NAME}_ipc$IPC
                     [ -e "$folder/classes.json" ] || "$PY" distillation/sample_real.py --dataset "$DATASET" \
                         --data-dir "$DATA_DIR" --select nearest --prototype_path "$PROTOTYPES" "${REAL_SIZE[@]}" \
                         --output "$folder" >&2
                     echo "nearest=$folder"; return ;;
        esac
        folders=${folders:+$folders,}$folder
    done
    echo "$1=$folders"
}

start=$(date +%s)
EVALS=()
COSTS=$OUT_DIR/${EVAL}_costs.tsv  # IPC, set, seconds, images made (all seeds): what each set cost here
mkdir -p "$OUT_DIR"
: > "$COSTS"
for IPC in $IPCS; do
    stage_names
    echo "== IPC $IPC: the prototypes (stage 1), then the sets $SETS ($SEEDS seeds)"
    if [[ " $SETS " =~ " "(d4m|mgd3|nearest)" " ]] && [ ! -e "$PROTOTYPES" ]; then
        prototypes --ipc "$IPC" --size "$SIZE" --batch_size "$GEN_BATCH"
    fi
    EVAL_SETS=()
    for set in $SETS; do
        SECONDS=0
        EVAL_SETS+=(--set "$(make_set "$set")")
        echo "$set: $SECONDS s"
        printf '%s\t%s\t%s\n' "$IPC" "$set" "$SECONDS" >> "$COSTS"
    done
    echo "== IPC $IPC: matching, students ($MODEL, $PROTOCOLS, $SEEDS seeds) and the sets' scores"
    "$PY" validate/evaluate.py --dataset "$DATASET" --data-dir "$DATA_DIR" "${EVAL_TEACHER[@]}" "${EVAL_SETS[@]}" \
        --models "$MODEL" --protocols "$PROTOCOLS" --seeds "$SEEDS" --nproc "${NPROC:-1}" --epochs "$EPOCHS" \
        -b "$(student_batch)" --input-size "$IMAGE_SIZE" -T 20 --use-fp16 -j 0 \
        "${FLIP[@]}" --output "$OUT_DIR/eval/${EVAL}_ipc$IPC" ${EVAL_FLAGS:-}
    EVALS+=("$OUT_DIR/eval/${EVAL}_ipc$IPC")
done
"$PY" validate/report.py --dataset "$DATASET" --data-dir "$DATA_DIR" "${EVAL_TEACHER[@]}" --evals "${EVALS[@]}" \
    --output-json "$OUT_DIR/results_$EVAL.json" --curve "$FIGURES/${EVAL}_curve.png" \
    --set-figures "$FIGURES/${EVAL}_sets" --prototypes "$PROTOTYPES" --diffusion_checkpoints_path "$SD_MODEL" \
    --costs "$COSTS" --seconds $(( $(date +%s) - start ))
echo "whole comparison: $(( $(date +%s) - start )) s"
