// Fused float32 kernels for the CUDA path (rust/hooked_encoder_core/src/cuda.rs). Candle runs a
// bias add as a broadcast kernel that recomputes every element's index with divisions, and a
// LayerNorm as eight separate kernels; on bert-base at 32x128 those took as long as all the
// matmuls together (scripts/gpu_profile.py). These do each in one pass.

#include <cstddef>

// act: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 ReLU; as Activation in config.rs.
extern "C" __global__ void bias_act_f32(
    float *y, const float *bias, const size_t numel, const size_t cols, const int act
) {
    const size_t stride = (size_t)blockDim.x * gridDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += stride) {
        float v = y[i] + bias[i % cols];
        if (act == 1) {
            v = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        } else if (act == 2) {
            const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
            v = 0.5f * v * (1.0f + tanhf(inner));
        } else if (act == 3) {
            v = fmaxf(v, 0.0f);
        }
        y[i] = v;
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
extern "C" __global__ void layer_norm_f32(
    const float *x, float *out, const float *w, const float *b, const int cols, const float eps
) {
    extern __shared__ float row[];
    __shared__ float partial[32];
    const float *x_row = x + (size_t)blockIdx.x * cols;
    float *out_row = out + (size_t)blockIdx.x * cols;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = x_row[c];
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
        out_row[c] = (row[c] - mean) / scale * w[c] + b[c];
    }
}
