// Fused kernels for the CUDA path (rust/hooked_encoder_core/src/cuda.rs and src/cuda/), in float32,
// float16 and bfloat16. Candle runs a bias add as a broadcast kernel that recomputes every
// element's index with divisions, and a LayerNorm as eight separate kernels; on bert-base at 32x128
// those took as long as all the matmuls together in float32, and three times as long in bfloat16
// (scripts/gpu_profile.py). These do each in one pass. Half-precision values are computed in
// float32 and rounded once, on the store (PyTorch's LayerNorm and cuBLAS's bias epilogue do the
// same). The attention softmax adds the mask to scores from cuBLAS and takes the softmax in one
// pass per row, in place of the casts, broadcast adds and softmax of Candle's ops.

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
// `bias` may be null (the activation alone, after a matmul that added the bias itself).
// A grid of (column blocks, row groups): each thread walks one column down its rows, so no
// element needs its column recomputed with a 64-bit division (which made the kernel compute-
// rather than memory-bound in half precision).
template <typename T>
__device__ void bias_act(T *y, const T *bias, const size_t rows, const int cols, const int act) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    const float b = bias ? to_float(bias[c]) : 0.0f;
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

// The sum of `v` over the warp, returned to every lane.
__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// The sum of `v` over the block, returned to every thread. `partial` holds one value per warp.
__device__ float block_sum(float v, float *partial) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // an earlier call's readers are done with `partial`
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

// Stages row blockIdx.x of x (plus `residual`'s row if given, the sum rounded to T as the
// separate add it replaces stored it) in `row`, in float32, and returns the row's mean and
// sqrt(mean((x - mean)^2) + eps): one block per row, two passes over the staged row.
template <typename T>
__device__ float2 row_moments(
    const T *x, const T *residual, float *row, const int cols, const float eps
) {
    __shared__ float partial[32];
    const T *x_row = x + (size_t)blockIdx.x * cols;
    const T *residual_row = residual ? residual + (size_t)blockIdx.x * cols : nullptr;
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_float(x_row[c]);
        if (residual_row) {
            v = to_float(from_float<T>(v + to_float(residual_row[c])));
        }
        row[c] = v;
        sum += v;
    }
    const float mean = block_sum(sum, partial) / cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float centred = row[c] - mean;
        squares += centred * centred;
    }
    return make_float2(mean, sqrtf(block_sum(squares, partial) / cols + eps));
}

// One block per row: out = (x - mean) / sqrt(mean((x - mean)^2) + eps) * w + b, x plus
// `residual` if given (a residual add and the norm after it in one pass), with the
// variance from a second pass over the centred row (kept in shared memory), as the CPU kernels
// and the portable path compute it, so near-constant rows keep their precision.
// The row is staged in float32 whatever T is.
template <typename T>
__device__ void layer_norm(
    const T *x, const T *residual, T *out, const T *w, const T *b, const int cols, const float eps
) {
    extern __shared__ float row[];
    const float2 moments = row_moments(x, residual, row, cols, eps);
    T *out_row = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out_row[c] =
            from_float<T>((row[c] - moments.x) / moments.y * to_float(w[c]) + to_float(b[c]));
    }
}

// A LayerNorm's hooked parts, one block per row: scale = sqrt(mean((x - mean)^2) + eps) (one
// value per row, rounded to T) and normalized = (x - mean) / scale, with the scale as rounded,
// as the portable path computes them for `hook_scale` and `hook_normalized`.
template <typename T>
__device__ void layer_norm_parts(
    const T *x, T *normalized, T *scale_out, const int cols, const float eps
) {
    extern __shared__ float row[];
    const float2 moments = row_moments(x, (const T *)nullptr, row, cols, eps);
    const T scale = from_float<T>(moments.y);
    if (threadIdx.x == 0) {
        scale_out[blockIdx.x] = scale;
    }
    const float divisor = to_float(scale);
    T *out_row = normalized + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out_row[c] = from_float<T>((row[c] - moments.x) / divisor);
    }
}

// out[r, c] = x[r, c] * w[c] + b[c]: a LayerNorm's affine map on its (hooked) normalized
// values. The grid is laid out as bias_act's.
template <typename T>
__device__ void scale_shift(
    const T *x, T *out, const T *w, const T *b, const size_t rows, const int cols
) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) {
        return;
    }
    const float weight = to_float(w[c]), bias = to_float(b[c]);
    for (size_t r = blockIdx.y; r < rows; r += gridDim.y) {
        out[r * cols + c] = from_float<T>(to_float(x[r * cols + c]) * weight + bias);
    }
}

// The attention pattern from raw scores `[batch, head, query, key]`, one warp per row of keys
// (rust/hooked_encoder_core/src/cuda/attention.rs). With `apply_mask`, adds to each score the
// relative bias `bias[row, key]` (if given), the additive mask `mask[batch * mask_batch_stride
// + query * mask_query_stride + key]` (padding and causality, 0 or -inf; if given) and -inf
// outside a local `window` (if >= 0), in that order, as the portable path does. With
// `softmax`, the row's softmax follows, computed in float32; a row with a NaN or with no finite
// maximum (every key masked, or +inf) becomes all zeros: TransformerLens turns the NaNs of such
// a row into 0 (the query attends to nothing). Without `softmax`, the masked scores are written.
template <typename T>
__device__ void attention_softmax(
    const T *scores, T *out, const T *mask, const long long mask_batch_stride,
    const long long mask_query_stride, const T *bias, const int rows, const int heads,
    const int queries, const int keys, const int window, const int apply_mask, const int softmax
) {
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) {
        return;
    }
    const int query = row % queries;
    const int batch = row / queries / heads;
    const T *in = scores + (size_t)row * keys;
    T *out_row = out + (size_t)row * keys;
    const T *mask_row =
        mask ? mask + batch * mask_batch_stride + query * mask_query_stride : nullptr;
    const T *bias_row = bias ? bias + (size_t)row * keys : nullptr;
    auto score = [&](const int key) {
        float v = to_float(in[key]);
        if (apply_mask) {
            if (bias_row) {
                v += to_float(bias_row[key]);
            }
            if (mask_row) {
                v += to_float(mask_row[key]);
            }
            if (window >= 0 && abs(query - key) > window) {
                v = -INFINITY;
            }
        }
        return v;
    };
    if (!softmax) {
        for (int key = lane; key < keys; key += 32) {
            out_row[key] = from_float<T>(score(key));
        }
        return;
    }
    float max = -INFINITY;
    int nan = 0;
    for (int key = lane; key < keys; key += 32) {
        const float v = score(key);
        nan |= v != v;
        max = fmaxf(max, v);
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        max = fmaxf(max, __shfl_xor_sync(0xffffffffu, max, offset));
        nan |= __shfl_xor_sync(0xffffffffu, nan, offset);
    }
    if (nan || !isfinite(max)) {
        for (int key = lane; key < keys; key += 32) {
            out_row[key] = from_float<T>(0.0f);
        }
        return;
    }
    float sum = 0.0f;
    for (int key = lane; key < keys; key += 32) {
        sum += expf(score(key) - max);
    }
    const float inverse = 1.0f / warp_sum(sum);
    for (int key = lane; key < keys; key += 32) {
        out_row[key] = from_float<T>(expf(score(key) - max) * inverse);
    }
}

// The addresses of every (batch, head) matrix of a per-head matmul's three operands, for one
// batched cuBLAS call over them all (rust/hooked_encoder_core/src/cuda/attention.rs): entry
// i = batch * heads + head of operand o at out[o * count + i], its address base[o] +
// batch * batch_stride[o] + head * head_stride[o] (in bytes).
extern "C" __global__ void head_pointers(
    unsigned long long *out, const unsigned long long a, const long long a_batch,
    const long long a_head, const unsigned long long b, const long long b_batch,
    const long long b_head, const unsigned long long c, const long long c_batch,
    const long long c_head, const int heads, const int count
) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) {
        return;
    }
    const long long batch = i / heads, head = i % heads;
    out[i] = a + batch * a_batch + head * a_head;
    out[count + i] = b + batch * b_batch + head * b_head;
    out[2 * count + i] = c + batch * c_batch + head * c_head;
}

// One entry point per element type (C names, for the Rust side to load by name).
#define FUSED_KERNELS(T, SUFFIX)                                                               \
    extern "C" __global__ void bias_act_##SUFFIX(                                              \
        T *y, const T *bias, const size_t rows, const int cols, const int act                  \
    ) {                                                                                        \
        bias_act(y, bias, rows, cols, act);                                                    \
    }                                                                                          \
    extern "C" __global__ void layer_norm_##SUFFIX(                                            \
        const T *x, const T *residual, T *out, const T *w, const T *b, const int cols,         \
        const float eps                                                                        \
    ) {                                                                                        \
        layer_norm(x, residual, out, w, b, cols, eps);                                         \
    }                                                                                          \
    extern "C" __global__ void layer_norm_parts_##SUFFIX(                                      \
        const T *x, T *normalized, T *scale, const int cols, const float eps                   \
    ) {                                                                                        \
        layer_norm_parts(x, normalized, scale, cols, eps);                                     \
    }                                                                                          \
    extern "C" __global__ void scale_shift_##SUFFIX(                                           \
        const T *x, T *out, const T *w, const T *b, const size_t rows, const int cols          \
    ) {                                                                                        \
        scale_shift(x, out, w, b, rows, cols);                                                 \
    }                                                                                          \
    extern "C" __global__ void attention_softmax_##SUFFIX(                                     \
        const T *scores, T *out, const T *mask, const long long mask_batch_stride,             \
        const long long mask_query_stride, const T *bias, const int rows, const int heads,     \
        const int queries, const int keys, const int window, const int apply_mask,             \
        const int softmax                                                                      \
    ) {                                                                                        \
        attention_softmax(                                                                     \
            scores, out, mask, mask_batch_stride, mask_query_stride, bias, rows, heads,        \
            queries, keys, window, apply_mask, softmax                                         \
        );                                                                                     \
    }

FUSED_KERNELS(float, f32)
FUSED_KERNELS(__half, f16)
FUSED_KERNELS(__nv_bfloat16, bf16)
