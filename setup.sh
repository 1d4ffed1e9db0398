#!/usr/bin/env bash
# From a fresh machine to a working .venv (and the Fashion-MNIST files the demo uses), in one command.
#   bash setup.sh            # PYTHON=python3.11 bash setup.sh to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -r requirements.txt
.venv/bin/python -m pip install --no-deps -e .

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
