#!/usr/bin/env bash
# Prepares .whl/ for bench/gpu_check.sh on a machine with PyPI access: the wheels the GPU
# machine lacks, for its Python 3.12 (it has torch, Triton, numpy and packaging, and no network).
#
#   bash bench/fetch_gpu_wheels.sh            # then carry .whl/ to the GPU machine with the repo
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$WHEELS"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WHEELS" "megatron-core==0.16.1" "liger-kernel==0.8.5"
ls -l "$WHEELS"
