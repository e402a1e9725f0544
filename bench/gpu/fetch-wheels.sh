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
