# Sourced by every stage launcher (distillation/, matching/, validate/) as
#     source "$(dirname "$0")/../d4m/launch.sh" DATASET
# It moves to the repository root (relative paths are taken from there), reads and checks the environment, and
# defines one function per stage that runs the stage's script with the flags all datasets share; the launcher
# adds its dataset's flags, then the user's ("$@", last, so they override). The environment:
#   DATA_DIR  the dataset's folder (stage 1's training images, the label check's and stage 4's validation split)
#   SD_MODEL  the diffusion model of stages 1 and 2: a diffusers folder or a hub id
#   TEACHER   stage 3's teacher file (matching/train_teacher.py); unset for ImageNet: torchvision's ResNet-18
#   NAME      names the outputs (default: the dataset, or an image folder's own name); for DATASET imagefolder,
#             SD_MODEL and TEACHER default to what run_all.sh imagefolder trains: $OUT_DIR/models/$NAME/
#   IPC       images per class; the stages find each other's folders by it (default 10)
#   STRENGTH, GUIDANCE  stage 2's img2img strength and classifier-free guidance (default the paper's 0.7 and 8); they
#             name the folder stages 2, 3 and 4 share, so they are set here, not as flags of one stage
#   SEEDS     students trained by stage 4, seeds 0 .. SEEDS-1, reported as mean and std (default 1)
#   OUT_DIR   $OUT_DIR/prototypes, syn, fkd and student (default outputs)
#   NPROC     run the stage under torchrun with that many processes (default: one process, no torchrun)
#   PYTHON    the interpreter (default .venv/bin/python if present, else python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATASET=$1
SD_HUB=stable-diffusion-v1-5/stable-diffusion-v1-5
case $DATASET in
    imagenet) DATA_DEFAULT=data/imagenet TEACHER_DEFAULT= SD_DEFAULT=$SD_HUB ;;
    tiny_imagenet) DATA_DEFAULT=data/tiny-imagenet-200 SD_DEFAULT=$SD_HUB
        TEACHER_DEFAULT=models/tiny_imagenet/teacher_resnet18_modified.pt ;;
    cifar10|cifar100) DATA_DEFAULT=data/$DATASET TEACHER_DEFAULT=models/$DATASET/teacher_convnet.pt SD_DEFAULT=$SD_HUB ;;
    fashion_mnist) DATA_DEFAULT=data/fashion_mnist TEACHER_DEFAULT=models/fashion_mnist/teacher_convnet.pt
        SD_DEFAULT=models/fashion_mnist/ldm ;;
    imagefolder)
        if [ -z "${DATA_DIR:-}" ] || [ ! -d "$DATA_DIR/train" ] || [ ! -d "$DATA_DIR/val" ]; then
            echo "error: imagefolder needs DATA_DIR, a folder holding train/<class>/ and val/<class>/ image folders" >&2
            exit 2
        fi
        DATA_DEFAULT=$DATA_DIR NAME=${NAME:-$(basename "$(cd "$DATA_DIR" && pwd)")}
        SD_DEFAULT=${OUT_DIR:-outputs}/models/$NAME/ldm TEACHER_DEFAULT=${OUT_DIR:-outputs}/models/$NAME/teacher_convnet.pt ;;
esac
DATA_DIR=${DATA_DIR:-$DATA_DEFAULT}
SD_MODEL=${SD_MODEL:-$SD_DEFAULT}
TEACHER=${TEACHER:-$TEACHER_DEFAULT}
NAME=${NAME:-$DATASET}
IPC=${IPC:-10}
SEEDS=${SEEDS:-1}
OUT_DIR=${OUT_DIR:-outputs}
for variable in IPC SEEDS ${NPROC:+NPROC}; do
    [[ ${!variable} =~ ^[1-9][0-9]*$ ]] || {
        echo "error: $variable must be a positive integer, got '${!variable}'" >&2; exit 2; }
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
RUN=("$PY")
# glibc hands blocks above its mmap threshold back to the kernel on every free, and PyTorch's CPU allocator keeps
# no cache: each step's activations were mapped, zero-filled page by page and unmapped again (15 % of the
# demo's CPU time in the kernel). Blocks up to 32 MB are reused from the heap instead; results do not change.
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-33554432} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
if [ -n "${NPROC:-}" ]; then RUN=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC"); fi
PROMPTS=()  # the shipped prompts of the paper's datasets; an image folder's prompts are its class names
if [ -e "distillation/label-prompt/$DATASET.txt" ]; then PROMPTS=(--label_file_path "distillation/label-prompt/$DATASET.txt"); fi

float_name() {  # $2 as Python's str(float()) writes it (0.70 -> 0.7, 8 -> 8.0), as gen_syn_image.py names its folder
    [[ $2 =~ [0-9] && $2 =~ ^([0-9]*)(\.([0-9]*))?$ ]] || {
        echo "error: $1 must be a plain decimal number (e.g. 0.7), got '$2'" >&2; exit 2; }
    local whole=${BASH_REMATCH[1]} fraction=${BASH_REMATCH[3]}
    while [[ $fraction == *0 ]]; do fraction=${fraction%0}; done
    echo "$(( 10#${whole:-0} )).${fraction:-0}"
}
STRENGTH=$(float_name STRENGTH "${STRENGTH:-0.7}")
GUIDANCE=$(float_name GUIDANCE "${GUIDANCE:-8}")

set_folder() {  # the folder stage 2 writes for the set name $1 at this IPC, strength and guidance
    echo "${1}_ipc${IPC}_${IPC}_s${STRENGTH}_g${GUIDANCE}_kmexpand1"
}
stage_names() {  # PROTOTYPES (stage 1's file) and SET_NAME (the folder stages 2, 3 and 4 share) of this IPC
    PROTOTYPES=$OUT_DIR/prototypes/$NAME-ipc$IPC-kmexpand1.safetensors
    SET_NAME=$(set_folder "$NAME")
}
stage_names

rded_batch() {  # RDED's batch for CLASSES classes: 10 at IPC 1, 50 up to IPC 10, 100 above, doubled from 100 classes
    local classes=$1 batch
    case $IPC in 1) batch=10 ;; [2-9]|10) batch=50 ;; *) batch=100 ;; esac
    if (( classes >= 100 )); then batch=$(( batch * 2 )); fi
    echo $(( batch < IPC * classes ? batch : IPC * classes ))  # at most the whole set
}

prototypes() {  # stage 1
    "${RUN[@]}" distillation/gen_prototype.py --dataset "$DATASET" --data_dir "$DATA_DIR" \
        --diffusion_checkpoints_path "$SD_MODEL" "${PROMPTS[@]}" --name "$NAME" --ipc "$IPC" --km_expand 1 \
        --save_prototype_path "$OUT_DIR/prototypes" "$@"
}

synthesis() {  # stage 2, with STRENGTH and GUIDANCE (the paper's 0.7 and 8 by default)
    local arg
    for arg in "$@"; do
        case $arg in --strength*|--guidance_scale*|-[sg]*)
            echo "error: $arg names the folder that matching and training read; set STRENGTH or GUIDANCE instead" \
                "(e.g. STRENGTH=0.5), which reaches every stage" >&2; exit 2 ;;
        esac
    done
    "${RUN[@]}" distillation/gen_syn_image.py --dataset "$DATASET" --diffusion_checkpoints_path "$SD_MODEL" \
        "${PROMPTS[@]}" --prototype_path "$PROTOTYPES" --save_init_image_path "$OUT_DIR/syn" --ipc "$IPC" \
        --km_expand 1 --guidance_scale "$GUIDANCE" --strength "$STRENGTH" "$@"
}

matching() {  # stage 3: soft labels stored in fp16, CutMix
    local teacher=(--teacher-path "$TEACHER")
    if [ -z "$TEACHER" ]; then teacher=(-a resnet18); fi
    "${RUN[@]}" matching/generate_soft_label.py --data "$OUT_DIR/syn/$SET_NAME" --fkd-path "$OUT_DIR/fkd/$SET_NAME" \
        --dataset "$DATASET" --data-dir "$DATA_DIR" "${teacher[@]}" --use-fp16 --mix-type cutmix "$@"
}

training() {  # stage 4: AdamW lr 1e-3 wd 0.01, T 20, CutMix; continues the run its folder holds
    local student=$OUT_DIR/student/$SET_NAME resume=()
    if [ -e "$student/checkpoint.pth.tar" ] || compgen -G "$student/seed*/checkpoint.pth.tar" >/dev/null; then
        [[ " $* " == *" --overwrite "* || " $* " == *" --resume"* ]] || resume=(--resume)
    fi
    "${RUN[@]}" validate/train_FKD.py --train-dir "$OUT_DIR/syn/$SET_NAME" --fkd-path "$OUT_DIR/fkd/$SET_NAME" \
        --output-dir "$student" --dataset "$DATASET" --data-dir "$DATA_DIR" -T 20 --adamw-lr 0.001 \
        --adamw-weight-decay 0.01 --mix-type cutmix --seeds "$SEEDS" "${resume[@]}" "$@"
}
