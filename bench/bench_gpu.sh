#!/usr/bin/env bash
# The GPU table of the README: every stage, ours vs the original's way vs the network alone, on ImageNet-shaped
# synthetic data (JPEGs of 300-500 px for stage 1, 224 px PNGs for stages 3-4) and SD-1.5-sized random models.
#   bash bench/bench_gpu.sh            # figures in outputs/bench_gpu/*.json
# WORKERS (default: cores - 2) sets the DataLoader workers, PYTHON the interpreter, OUT the folder.
set -uo pipefail  # a benchmark that fails is reported and the others still run
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"; [ -x "$PY" ] || PY=python
OUT=${OUT:-outputs/bench_gpu}
WORKERS=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
mkdir -p "$OUT"
FAILED=()
part() { "$@" || FAILED+=("$2"); }
echo "== D4M's successors: one image's cost with each generator"
part "$PY" bench/bench_successors.py --sd15 --ipc 10 --device cuda --json "$OUT/successors.json"
echo "== stage 1: VAE encoding"
part "$PY" bench/bench_prototypes.py --sd15 --jpeg 2048 --size 512 --batch-size 32 -j "$WORKERS" --compile \
    --device cuda --json "$OUT/prototypes.json"
echo "== stage 2: synthesis"
part "$PY" bench/bench_synthesis.py --sd15 --images 48 --original-images 8 --batch-size 24 --compile \
    --device cuda --json "$OUT/synthesis.json"
echo "== stages 3 and 4: matching and student training"
part "$PY" bench/bench_fkd.py --size 224 --input-size 224 --arch resnet18 --images 4096 --classes 1000 \
    --batch-size 1024 --accumulation 2 --epochs 1 -j "$WORKERS" --compile --device cuda --json "$OUT/fkd.json"
part "$PY" bench/gpu_table.py "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed: ${FAILED[*]}" >&2; exit 1; fi
