#!/usr/bin/env bash
# From a fresh machine to a working .venv (and the Fashion-MNIST files the demo uses), in one command.
#   bash setup.sh                                  # PYTHON=python3.11 bash setup.sh to choose the interpreter
#   TORCH_INDEX=https://download.pytorch.org/whl/cu121 bash setup.sh   # a torch built for another CUDA
# On a machine with an NVIDIA GPU, setup checks that the installed torch can use it; when the driver is older
# than torch's CUDA build, it reinstalls torch from the newest PyTorch index the driver supports.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install --upgrade pip
if [ -n "${TORCH_INDEX:-}" ]; then
    "${PIP[@]}" install --index-url "$TORCH_INDEX" torch torchvision
fi
"${PIP[@]}" install -r requirements.txt
"${PIP[@]}" install --no-deps -e .

# A GPU that torch cannot use would turn every stage into a CPU run: check, and fix the usual cause.
torch_sees_gpu() { .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && ! torch_sees_gpu; then
    DRIVER_CUDA=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -1)
    BUILD=$(.venv/bin/python -c "import torch; print(torch.__version__, torch.version.cuda)")
    echo "torch ($BUILD) cannot use the GPU; the driver supports CUDA up to ${DRIVER_CUDA:-unknown}" >&2
    INDEX=""
    for cu in 130 128 126 124 121 118; do
        if [ -n "$DRIVER_CUDA" ] && [ "$DRIVER_CUDA" -ge "$cu" ]; then INDEX=https://download.pytorch.org/whl/cu$cu; break; fi
    done
    if [ -n "$INDEX" ] && [ -z "${TORCH_INDEX:-}" ]; then
        echo "reinstalling torch and torchvision from $INDEX" >&2
        "${PIP[@]}" install --force-reinstall --index-url "$INDEX" torch torchvision
    fi
    if ! torch_sees_gpu; then
        echo "error: torch still cannot use the GPU; install a build for your driver, e.g." \
             "TORCH_INDEX=https://download.pytorch.org/whl/cu118 bash setup.sh (README, Set-up)" >&2
        exit 1
    fi
fi
.venv/bin/python -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"

# Fashion-MNIST for the embedded demo: Debian's package when apt is there (works offline),
# else torchvision's download.
mkdir -p data
if [ ! -e data/fashion_mnist/train-images-idx3-ubyte.gz ] && [ ! -e data/fashion_mnist/FashionMNIST/raw/train-images-idx3-ubyte ]; then
    if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
        ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) || true
    fi
    if [ -d /usr/share/datasets/fashion-mnist ]; then
        rm -rf data/fashion_mnist && ln -s /usr/share/datasets/fashion-mnist data/fashion_mnist
    else
        .venv/bin/python -c "import torchvision; torchvision.datasets.FashionMNIST('data/fashion_mnist', train=True, download=True); torchvision.datasets.FashionMNIST('data/fashion_mnist', train=False, download=True)"
    fi
fi
echo "setup done: activate with 'source .venv/bin/activate'"
