#!/usr/bin/env bash
# Download, here, the wheels bench/gpu/run.sh installs on the GPU machine (Python 3.12, x86-64 Linux) into .whl/,
# which git ignores and the device call carries. Fails if they and the code would not fit the 64 MiB that travels.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl  # afresh: a wheel of a version no longer pinned would travel beside its successor, and pip refuses both
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' bench/gpu/wheels.txt | grep -v '^$' | while read -r spec; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "$spec"
done
# The GPU machine's torch is built for CUDA 13: bitsandbytes' libraries for other CUDA, ROCm and XPU releases stay here
# (41.1 MiB packed down to 6.8).
for wheel in .whl/bitsandbytes-*.whl; do
  python3 bench/gpu/slim_wheel.py "$wheel" 'bitsandbytes/libbitsandbytes_(cuda1[0-2][0-9]|rocm[0-9]+|xpu[0-9]+)\.so'
done
wheels=$(du -sk .whl | cut -f1)
code=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "wheels ${wheels} KiB + code ${code} KiB (limit 65536 KiB)"
[ $((wheels + code)) -lt 65536 ] || { echo "too large to travel: drop a wheel from bench/gpu/wheels.txt"; exit 1; }
# Preflight, here, before a GPU minute is spent: the carried wheels import beside the huggingface_hub the GPU image
# has (KINDS.md lists 1.33.0; transformers checks it at import). The compiled wheels for Python 3.12 (pydantic-core,
# multiprocess) and bitsandbytes are left to this machine's own; torch is this project's .venv's.
image_hub=1.33.0
[ -x .venv/bin/python ] || { echo "no .venv for the preflight: run make install first"; exit 1; }
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
find .whl -type f -name '*.whl' ! -name '*cp312*' ! -name '*py312*' ! -name 'bitsandbytes-*' -print0 \
  | xargs -0 .venv/bin/python -m pip install -q --no-index --no-deps --target "$site"
.venv/bin/python -m pip install -q --no-deps --target "$site" "huggingface_hub==$image_hub"
if ! out=$(PYTHONPATH="$site" .venv/bin/python -c "import transformers, trl, peft, datasets, accelerate" 2>&1); then
  echo "$out" | grep -E "Error|error" | tail -1
  echo "the carried wheels do not import beside huggingface_hub $image_hub: pin another version in bench/gpu/wheels.txt"
  exit 1
fi
echo "preflight: the carried wheels import beside huggingface_hub $image_hub"
