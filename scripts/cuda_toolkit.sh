# Source this file: it installs NVIDIA's CUDA 13.0 compiler, headers and libraries from PyPI into
# a private virtual environment (no GPU, driver or system toolkit needed) and exports what
# Candle's build scripts look for. Used to compile the `cuda` feature on machines without CUDA.
#
#   source scripts/cuda_toolkit.sh [DIR] [link]
#
# DIR defaults to .cuda-toolkit (git-ignored). Without `link` it installs what compiling needs
# (`cargo check --features cuda`: nvcc and headers, ~0.3 GB); with `link`, also the libraries a
# wheel links against (cuBLAS, cuRAND, NVRTC, ~0.8 GB more).
#
# CUDA 13.0 matches the driver API the wheel is tested on (driver 580, see README); the
# kernels are compiled to compute capability 8.0 PTX, which the driver JIT-compiles for any
# Ampere, Ada or Hopper GPU.

_cuda_dir="$(realpath -m "${1:-.cuda-toolkit}")"
if [ ! -x "$_cuda_dir/venv/bin/python" ]; then
    python3 -m venv "$_cuda_dir/venv" || return 1
fi
_cuda_site="$("$_cuda_dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CUDA_ROOT="$_cuda_site/nvidia/cu13"
if [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
    "$_cuda_dir/venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
        "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" || return 1
fi
if [ "${2:-}" = link ] && [ ! -e "$CUDA_ROOT/lib/libcublas.so.13" ]; then
    "$_cuda_dir/venv/bin/pip" install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" \
        || return 1
fi
# The link step wants unversioned library names, and libcuda (part of the driver, not of any
# wheel). A stub with the driver's soname is enough to link; the real one is loaded at run time.
_cuda_stubs="$CUDA_ROOT/lib/stubs"
mkdir -p "$_cuda_stubs"
for _lib in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
    if [ -e "$CUDA_ROOT/lib/lib${_lib}" ]; then
        ln -sf "../lib${_lib}" "$_cuda_stubs/lib${_lib%%.so*}.so"
    fi
done
if [ ! -e "$_cuda_stubs/libcuda.so" ]; then
    echo "" | cc -x c -shared -Wl,-soname,libcuda.so.1 -o "$_cuda_stubs/libcuda.so" - || return 1
fi
export CUDA_ROOT CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:$PATH"
# Candle's kernels: compute capability 8.0 PTX unless the caller chose another.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
unset _cuda_dir _cuda_site _cuda_stubs _lib
