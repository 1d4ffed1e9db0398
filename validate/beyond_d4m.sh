#!/usr/bin/env bash
# Beyond D4M on the Fashion-MNIST chain: the faithful D4M set, each training-free option alone, their combination,
# and the real baselines, trained under one protocol and scored in the teacher's feature space.
#   bash validate/beyond_d4m.sh                         # IPC 2 and 10, three seeds, stored soft labels
#   IPCS="1 5" PROTOCOLS=fkd,hard SETS="d4m groups random" bash validate/beyond_d4m.sh
# Sets (d4m/launch.sh's environment applies: OUT_DIR, NPROC, PYTHON):
#   d4m       the faithful chain (k-means prototypes, img2img)
#   mode      + mode guidance (MGD3): --mode_guidance $MODE_LAMBDA for the first 25 of 50 steps
#   select    + candidate selection (CaO2): $CANDIDATES candidates per slot, the teacher keeps a diverse right set
#   groups    group-sampled prototypes (after D3HR) in place of k-means centres
#   combined  groups + select
#   random    $SEEDS random draws of real images; nearest: the real image nearest each k-means prototype
# Every set is trained by validate/evaluate.py with the demo's recipe (ConvNet, 150 epochs, batch 50, T 20); the
# report goes to $OUT_DIR/results_$EVAL.json (EVAL default beyond) and the curve to FIGURES (default OUT_DIR).
SEEDS=${SEEDS:-3}  # before d4m/launch.sh, whose default is 1
source "$(dirname "$0")/../d4m/launch.sh" fashion_mnist
IPCS=${IPCS:-2 10}
PROTOCOLS=${PROTOCOLS:-fkd}
MODE_LAMBDA=${MODE_LAMBDA:-0.5}
CANDIDATES=${CANDIDATES:-4}
SETS=${SETS:-d4m mode select groups combined random nearest}  # which of them to make, train and score
EVAL=${EVAL:-beyond}  # names the evaluation folders ($OUT_DIR/eval/${EVAL}_ipc<IPC>) and the report
FIGURES=${FIGURES:-$OUT_DIR}
export D4M_CPU_NOTED=1
echo "== every stage takes this machine's GPU when torch can use one, else the CPU (this chain is sized for a CPU)"
SELECT=(--candidates "$CANDIDATES" --select diverse --teacher_path "$TEACHER")
syn() { echo "$OUT_DIR/syn/${1}_ipc${IPC}_${IPC}_s0.7_g8.0_kmexpand1${2:-}"; }  # NAME [SUFFIX]

prototype_file() {  # k-means or groups: the file of this IPC, made when missing
    local name=fashion_mnist flags=()
    if [ "$1" = groups ]; then name=fashion_mnist_groups flags=(--kmeans groups); fi
    local file=$OUT_DIR/prototypes/$name-ipc$IPC-kmexpand1.safetensors
    [ -e "$file" ] || prototypes --size 32 --ipc "$IPC" "${flags[@]}" >&2
    echo "$file"
}

make_set() {  # SET: make it at this IPC (what exists is kept) and print NAME=FOLDER[,FOLDER...] for evaluate.py
    local folders=""
    case $1 in
        d4m|mode|select) local kmeans; kmeans=$(prototype_file kmeans) ;;&
        groups|combined) local grouped; grouped=$(prototype_file groups) ;;&
        d4m) synthesis --image_size 32 --ipc "$IPC" --prototype_path "$kmeans" >&2
             folders=$(syn fashion_mnist) ;;
        mode) synthesis --image_size 32 --ipc "$IPC" --prototype_path "$kmeans" --mode_guidance "$MODE_LAMBDA" \
                  --mode_guidance_stop 25 >&2
              folders=$(syn fashion_mnist "_mg$MODE_LAMBDA-25") ;;
        select) synthesis --image_size 32 --ipc "$IPC" --prototype_path "$kmeans" "${SELECT[@]}" >&2
                folders=$(syn fashion_mnist "_c$CANDIDATES-diverse") ;;
        groups) synthesis --image_size 32 --ipc "$IPC" --prototype_path "$grouped" >&2
                folders=$(syn fashion_mnist_groups) ;;
        combined) synthesis --image_size 32 --ipc "$IPC" --prototype_path "$grouped" "${SELECT[@]}" >&2
                  folders=$(syn fashion_mnist_groups "_c$CANDIDATES-diverse") ;;
        random) for seed in $(seq 0 $(( SEEDS - 1 ))); do
                    local draw=$OUT_DIR/syn/real_fashion_mnist_ipc${IPC}_seed$seed
                    [ -e "$draw/classes.json" ] || "$PY" distillation/sample_real.py --dataset fashion_mnist \
                        --data-dir "$DATA_DIR" --select random --seed "$seed" --ipc "$IPC" --output "$draw" >&2
                    folders=${folders:+$folders,}$draw
                done ;;
        nearest) folders=$OUT_DIR/syn/nearest_fashion_mnist_ipc$IPC
                 [ -e "$folders/classes.json" ] || "$PY" distillation/sample_real.py --dataset fashion_mnist \
                     --data-dir "$DATA_DIR" --select nearest --prototype_path "$(prototype_file kmeans)" \
                     --output "$folders" >&2 ;;
        *) echo "error: unknown set '$1' in SETS; choose from d4m mode select groups combined random nearest" >&2
           exit 2 ;;
    esac
    echo "$1=$folders"
}

start=$(date +%s)
EVALS=()
for IPC in $IPCS; do
    echo "== IPC $IPC: the sets $SETS"
    EVAL_SETS=()
    for set in $SETS; do EVAL_SETS+=(--set "$(make_set "$set")"); done
    echo "== IPC $IPC: matching, students ($PROTOCOLS, $SEEDS seeds) and the sets' scores"
    "$PY" validate/evaluate.py --dataset fashion_mnist --data-dir "$DATA_DIR" --teacher-path "$TEACHER" "${EVAL_SETS[@]}" \
        --models convnet --protocols "$PROTOCOLS" --seeds "$SEEDS" --nproc "${NPROC:-1}" --epochs 150 -b 50 \
        --input-size 32 -T 20 --use-fp16 -j 0 --output "$OUT_DIR/eval/${EVAL}_ipc$IPC"
    EVALS+=("$OUT_DIR/eval/${EVAL}_ipc$IPC")
done
"$PY" validate/report.py --dataset fashion_mnist --data-dir "$DATA_DIR" --teacher-path "$TEACHER" \
    --evals "${EVALS[@]}" --output-json "$OUT_DIR/results_$EVAL.json" --curve "$FIGURES/${EVAL}_curve.png" \
    --seconds $(( $(date +%s) - start ))
echo "whole comparison: $(( $(date +%s) - start )) s"
