// Fused kernels for the CUDA path (rust/hooked_encoder_core/src/cuda.rs), in float32, float16
// and bfloat16. Candle runs a bias add as a broadcast kernel that recomputes every element's
// index with divisions, and a LayerNorm as eight separate kernels; on bert-base at 32x128 those
// took as long as all the matmuls together in float32, and three times as long in bfloat16
// (scripts/gpu_profile.py). These do each in one pass. Half-precision values are computed in
// float32 and rounded once, on the store (PyTorch's LayerNorm and cuBLAS's bias epilogue do the
// same).

#include <cstddef>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 ReLU; as Activation in config.rs.
// A grid of (column blocks, row groups): each thread walks one column down its rows, so no
// element needs its column recomputed with a 64-bit division (which made the kernel compute-
// rather than memory-bound in half precision).
template <typename T>
__device__ void bias_act(T *y, const T *bias, const size_t rows, const int cols, const int act) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    const float b = to_float(bias[c]);
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        T *at = y + r * cols + c;
        float v = to_float(*at) + b;
        if (act == 1) {
            v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        } else if (act == 2) {
            const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
            v = 0.5f * v * (1.0f + tanhf(inner));
        } else if (act == 3) {
            v = fmaxf(v, 0.0f);
        }
        *at = from_float<T>(v);
    }
}

// The sum of `v` over the block, returned to every thread. `partial` holds one value per warp.
__device__ float block_sum(float v, float *partial) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's readers are done with `partial`
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? partial[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// One block per row: out = (x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b, with the
// variance from a second pass over the centred row (kept in shared memory), as the CPU kernels
// and the portable path compute it, so near-constant rows keep their precision.
// The row is staged in float32 whatever T is.
template <typename T>
__device__ void layer_norm(
    const T *x, T *out, const T *w, const T *b, const int cols, const float eps
) {
    extern __shared__ float row[];
    __shared__ float partial[32];
    const T *x_row = x + (size_t)blockIdx.x * cols;
    T *out_row = out + (size_t)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_float(x_row[c]);
        row[c] = v;
        sum += v;
    }
    const float mean = block_sum(sum, partial) / cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float centred = row[c] - mean;
        squares += centred * centred;
    }
    const float scale = sqrtf(block_sum(squares, partial) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out_row[c] = from_float<T>((row[c] - mean) / scale * to_float(w[c]) + to_float(b[c]));
    }
}

// One entry point per element type (C names, for the Rust side to load by name).
#define FUSED_KERNELS(T, SUFFIX)                                                               \
    extern "C" __global__ void bias_act_##SUFFIX(                                              \
        T *y, const T *bias, const size_t rows, const int cols, const int act                  \
    ) {                                                                                        \
        bias_act(y, bias, rows, cols, act);                                                    \
    }                                                                                          \
    extern "C" __global__ void layer_norm_##SUFFIX(                                            \
        const T *x, T *out, const T *w, const T *b, const int cols, const float eps            \
    ) {                                                                                        \
        layer_norm(x, out, w, b, cols, eps);                                                   \
    }

FUSED_KERNELS(float, f32)
FUSED_KERNELS(__half, f16)
FUSED_KERNELS(__nv_bfloat16, bf16)
