#!/usr/bin/env bash
# Builds the CUDA wheel (the `cuda` Cargo feature) on a machine without a GPU or a CUDA toolkit:
# NVIDIA's compiler and libraries come from PyPI (scripts/cuda_toolkit.sh).
#
#   bash scripts/build_cuda_wheel.sh [OUT_DIR]     # default OUT_DIR: dist-cuda
#
# The wheel links against CUDA 13's cuBLAS and cuRAND and the driver's libcuda; it does not
# bundle them (they are large and come with the driver, a CUDA toolkit, or torch's CUDA 13
# wheels). Install it with pip on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist-cuda}"
# shellcheck source=cuda_toolkit.sh
source scripts/cuda_toolkit.sh .cuda-toolkit link
# `--compatibility linux`: the CUDA libraries are outside every manylinux policy, so the wheel
# is tagged for this platform only instead of being rejected by auditwheel.
maturin build --release --features cuda --compatibility linux --out "$out"
