#!/usr/bin/env bash
# Checks a CUDA wheel on a machine with an NVIDIA GPU: the CUDA tests (parity with Hugging Face
# on the same GPU, cached activations, hooks, device moves), then a short benchmark.
#
# The GPU machine needs Python >= 3.10 with torch (CUDA 13 build) and transformers; it needs no
# Rust, no network and no pip: the wheels are unpacked onto PYTHONPATH.
#
#   bash scripts/gpu_check.sh WHEEL_DIR [OUT_DIR]
#
# WHEEL_DIR holds the CUDA wheel (scripts/build_cuda_wheel.sh) and, if the GPU machine lacks
# them, pure-Python wheels of pytest and its dependencies (pip download pytest -d WHEEL_DIR).
# OUT_DIR (default ./gpu-check) receives the test log and the benchmark's JSON.
set -euo pipefail

wheels="$(realpath "$1")"
out="$(realpath -m "${2:-gpu-check}")"
cd "$(dirname "$0")/.."
mkdir -p "$out"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
for wheel in "$wheels"/*.whl; do
    python3 -m zipfile -e "$wheel" "$site"
done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import sys, torch, transformers, hooked_encoder as h
print(sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "hooked_encoder", h.__version__, "cuda build:", h.cuda_available())'
} 2>&1 | tee "$out/environment.txt"

status=0
python3 -m pytest -p no:cacheprovider -v tests/test_cuda.py 2>&1 | tee "$out/tests.log" \
    || status=1
python3 bench/gpu_bench.py --json "$out/gpu_bench.json" 2>&1 | tee "$out/bench.md" || status=1
exit $status
