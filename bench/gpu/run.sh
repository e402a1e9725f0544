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
python3 -c "import torch, transformers, trl, peft; print(torch.__version__, transformers.__version__, trl.__version__, peft.__version__)"
timeout 480 python3 bench/gpu/bench.py --out "$out" "$@" 2>&1 | tee "$out/bench.log"
