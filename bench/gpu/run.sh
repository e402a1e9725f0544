#!/usr/bin/env bash
# On a fresh GPU machine: install the wheels carried in .whl/ (bench/gpu/fetch-wheels.sh), then measure.
#   device run: carry [".whl"], command: bench/gpu/run.sh "$OUT"
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:?usage: bench/gpu/run.sh OUT [--smoke]}"
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# What the carried wheels run beside (the image's pyarrow, fsspec, huggingface_hub): an import that fails stops here.
python3 -c "import torch, transformers, trl, peft, datasets, pyarrow, fsspec, huggingface_hub as hub, bitsandbytes as bnb
print({m.__name__: m.__version__ for m in (torch, transformers, trl, peft, datasets, pyarrow, fsspec, hub, bnb)})"
timeout 480 python3 bench/gpu/bench.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
