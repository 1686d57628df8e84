//! Attention on NVIDIA GPUs without putting heads first. Candle's batched matmul wants each
//! operand as `[batch * heads, rows, cols]` with one batch stride, so the portable path copies
//! q, k and v heads-first and z back (seven copies a layer, a third of the bfloat16 forward on
//! an H200). cuBLAS takes any row stride, so here q, k and v are read where they lie (in the
//! fused projection `[batch, pos, 3 * heads * d_head]`, or hooked tensors `[batch, pos, heads,
//! d_head]`) and z is written straight into `[batch, pos, heads, d_head]`. Between the two
//! matmuls, one kernel adds the mask and takes the softmax (`attention_softmax` in
//! `cuda/fused.cu`).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublas::sys;
use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor};

use super::imp::{contiguous, cuda_storage, suffix, MODULE, PTX, THREADS};
use super::{Heads, ScoreMask};
use crate::kernels::AttentionShape;
use crate::{Error, Result};

/// `scale * q @ kᵀ` for every batch and head: `[batch, heads, pos, pos]`, in the dtype of q.
pub fn attention_scores(
    q: Heads<'_>,
    k: Heads<'_>,
    shape: AttentionShape,
    scale: f64,
) -> Result<Tensor> {
    let AttentionShape {
        batch: b,
        pos: p,
        heads: h,
        d_head: dh,
    } = shape;
    // Column-major, as cuBLAS sees row-major data: scoresᵀ (keys x queries) = k · qᵀ, with k
    // read transposed from its rows.
    let plan = HeadsGemm {
        transpose_a: true,
        m: p,
        n: p,
        k: dh,
        a: Operand::heads(k, shape),
        b: Operand::heads(q, shape),
        c: Operand {
            offset: 0,
            batch_stride: h * p * p,
            head_stride: p * p,
            ld: p,
        },
        alpha: scale,
    };
    plan.run(k.tensor, q.tensor, &[b, h, p, p], shape)
}

/// `pattern @ v` for every batch and head, written as z: `[batch, pos, heads, d_head]`.
pub fn attention_z(pattern: &Tensor, v: Heads<'_>, shape: AttentionShape) -> Result<Tensor> {
    let AttentionShape {
        batch: b,
        pos: p,
        heads: h,
        d_head: dh,
    } = shape;
    if pattern.dims() != [b, h, p, p] || !pattern.is_contiguous() {
        return Err(Error::Input(format!(
            "internal: attention pattern {:?} is not a contiguous [{b}, {h}, {p}, {p}]",
            pattern.dims()
        )));
    }
    // zᵀ (d_head x queries, one row of z every h * d_head) = vᵀ · patternᵀ.
    let plan = HeadsGemm {
        transpose_a: false,
        m: dh,
        n: p,
        k: p,
        a: Operand::heads(v, shape),
        b: Operand {
            offset: 0,
            batch_stride: h * p * p,
            head_stride: p * p,
            ld: p,
        },
        c: Operand {
            offset: 0,
            batch_stride: p * h * dh,
            head_stride: dh,
            ld: h * dh,
        },
        alpha: 1.0,
    };
    plan.run(v.tensor, pattern, &[b, p, h, dh], shape)
}

/// The scores with `mask` added (if given), then their softmax (if `softmax`), as a new tensor
/// of the same shape `[batch, heads, pos, pos]`.
pub fn attention_softmax(
    scores: &Tensor,
    mask: Option<&ScoreMask<'_>>,
    softmax: bool,
) -> Result<Tensor> {
    let (b, h, queries, keys) = scores.dims4()?;
    let scores = scores.contiguous()?;
    let dtype = scores.dtype();
    let additive = mask.and_then(|m| m.additive);
    let bias = mask.and_then(|m| m.bias);
    let (mask_batch_stride, mask_query_stride) = match additive {
        Some(additive) => {
            let (mb, one, mq, mk) = additive.dims4()?;
            if !additive.is_contiguous()
                || one != 1
                || mk != keys
                || !(mb == 1 || mb == b)
                || !(mq == 1 || mq == queries)
                || additive.dtype() != dtype
            {
                return Err(Error::Input(format!(
                    "internal: attention mask {:?} does not fit scores {:?}",
                    additive.dims(),
                    scores.dims()
                )));
            }
            let query_stride = if mq == 1 { 0 } else { keys };
            let batch_stride = if mb == 1 { 0 } else { mq * keys };
            (batch_stride as i64, query_stride as i64)
        }
        None => (0, 0),
    };
    if let Some(bias) = bias {
        if bias.dims() != scores.dims() || !bias.is_contiguous() || bias.dtype() != dtype {
            return Err(Error::Input(format!(
                "internal: attention bias {:?} does not fit scores {:?}",
                bias.dims(),
                scores.dims()
            )));
        }
    }
    let rows = b * h * queries;
    let too_big = |n: usize| i32::try_from(n).is_err();
    if too_big(rows.saturating_mul(32)) || too_big(keys) {
        return Err(Error::Input(format!(
            "{rows} attention rows of {keys} keys are too many for the GPU kernel"
        )));
    }
    let window = mask
        .and_then(|m| m.window)
        .map_or(-1, |w| i32::try_from(w).unwrap_or(i32::MAX));
    let out = {
        let (scores_guard, scores_layout) = scores.storage_and_layout();
        let scores_storage = cuda_storage(&scores_guard)?;
        let additive_guard = additive.map(|t| t.storage_and_layout());
        let bias_guard = bias.map(|t| t.storage_and_layout());
        let launch = Softmax {
            scores: (scores_storage, scores_layout),
            additive: match &additive_guard {
                Some((guard, layout)) => Some((cuda_storage(guard)?, *layout)),
                None => None,
            },
            bias: match &bias_guard {
                Some((guard, layout)) => Some((cuda_storage(guard)?, *layout)),
                None => None,
            },
            mask_strides: (mask_batch_stride, mask_query_stride),
            dims: [rows, h, queries, keys],
            window,
            apply_mask: mask.is_some(),
            softmax,
        };
        match dtype {
            DType::F16 => launch.run::<half::f16>()?,
            DType::BF16 => launch.run::<half::bf16>()?,
            DType::F32 => launch.run::<f32>()?,
            other => return Err(Error::Input(format!("no attention kernel for {other:?}"))),
        }
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(out),
        scores.dims(),
        BackpropOp::none(),
        false,
    ))
}

/// One launch of `attention_softmax_*`: the storages it reads, with their layouts.
struct Softmax<'a> {
    scores: (&'a CudaStorage, &'a Layout),
    additive: Option<(&'a CudaStorage, &'a Layout)>,
    bias: Option<(&'a CudaStorage, &'a Layout)>,
    mask_strides: (i64, i64),
    /// rows (`batch * heads * queries`), heads, queries, keys.
    dims: [usize; 4],
    window: i32,
    apply_mask: bool,
    softmax: bool,
}

impl Softmax<'_> {
    fn run<T: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(
        &self,
    ) -> Result<CudaStorage> {
        let (scores, layout) = self.scores;
        let device = scores.device().clone();
        let [rows, heads, queries, keys] = self.dims;
        let scores = contiguous::<T>(scores, layout, "the attention scores")?;
        let additive = match self.additive {
            Some((storage, layout)) => Some(contiguous::<T>(storage, layout, "the mask")?),
            None => None,
        };
        let bias = match self.bias {
            Some((storage, layout)) => Some(contiguous::<T>(storage, layout, "the bias")?),
            None => None,
        };
        // SAFETY: the kernel writes every element before anyone reads it.
        let mut out = unsafe { device.alloc::<T>(scores.len()) }?;
        let name = format!("attention_softmax_{}", suffix(self.scores.0.dtype())?);
        let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&scores);
        builder.arg(&mut out);
        // A missing mask or bias is a null pointer, which the kernel checks.
        let null: u64 = 0;
        match &additive {
            Some(additive) => builder.arg(additive),
            None => builder.arg(&null),
        };
        let (mask_batch_stride, mask_query_stride) = self.mask_strides;
        builder.arg(&mask_batch_stride);
        builder.arg(&mask_query_stride);
        match &bias {
            Some(bias) => builder.arg(bias),
            None => builder.arg(&null),
        };
        let (rows_i, heads_i, queries_i, keys_i) =
            (rows as i32, heads as i32, queries as i32, keys as i32);
        let (apply_mask, softmax) = (i32::from(self.apply_mask), i32::from(self.softmax));
        candle_core::builder_arg!(
            builder,
            rows_i,
            heads_i,
            queries_i,
            keys_i,
            self.window,
            apply_mask,
            softmax
        );
        // One warp per row.
        let warps_per_block = (THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: each warp reads and writes the `keys` elements of its row (`rows * keys`
        // elements of the scores and of `out`), the same row of the bias (same shape as the
        // scores, checked) and one row of `keys` mask values at the strides derived from the
        // mask's checked shape; all of element type `T`.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, device))
    }
}

/// Where one operand of a per-head matmul lies: head `j` of batch `i` starts at element
/// `offset + i * batch_stride + j * head_stride`, its rows `ld` elements apart.
#[derive(Clone, Copy)]
struct Operand {
    offset: usize,
    batch_stride: usize,
    head_stride: usize,
    ld: usize,
}

impl Operand {
    fn heads(heads: Heads<'_>, shape: AttentionShape) -> Operand {
        Operand {
            offset: heads.offset,
            batch_stride: shape.pos * heads.row_stride,
            head_stride: shape.d_head,
            ld: heads.row_stride,
        }
    }

    /// The elements one (batch, head) matrix of `rows` rows touches past its start.
    fn extent(&self, shape: AttentionShape, rows: usize, cols: usize) -> usize {
        (shape.batch - 1) * self.batch_stride
            + (shape.heads - 1) * self.head_stride
            + (rows - 1) * self.ld
            + cols
    }
}

/// `batch * heads` column-major products `C = op(A) · B` (m x n, inner k), `op` a transpose
/// if `transpose_a`, as one batched cuBLAS call over a table of the matrices' addresses (a
/// strided batch cannot step over both batch and heads; a loop of strided calls, one per head,
/// was 3-15% slower on an H200 at 32 and 128 rows, 6-8% faster at one row).
struct HeadsGemm {
    transpose_a: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Operand,
    b: Operand,
    c: Operand,
    alpha: f64,
}

impl HeadsGemm {
    /// Runs the product with `A` read from `a_tensor` and `B` from `b_tensor` (which may be
    /// the same tensor), into a new tensor of `out_dims`.
    fn run(
        &self,
        a_tensor: &Tensor,
        b_tensor: &Tensor,
        out_dims: &[usize],
        shape: AttentionShape,
    ) -> Result<Tensor> {
        let dtype = a_tensor.dtype();
        if b_tensor.dtype() != dtype {
            return Err(Error::Input(format!(
                "attention operands disagree on dtype: {:?} and {:?}",
                a_tensor.dtype(),
                b_tensor.dtype()
            )));
        }
        // In elements of each stored matrix: A is k x m (or m x k transposed) column-major,
        // i.e. `cols` rows of `ld`; check each operand stays inside its tensor.
        let (a_rows, a_cols) = if self.transpose_a {
            (self.m, self.k)
        } else {
            (self.k, self.m)
        };
        let fits = |t: &Tensor, operand: &Operand, rows: usize, cols: usize| {
            t.is_contiguous()
                && operand.offset + operand.extent(shape, rows, cols) <= t.elem_count()
        };
        if !fits(a_tensor, &self.a, a_rows, a_cols) || !fits(b_tensor, &self.b, self.n, self.k) {
            return Err(Error::Input(
                "internal: an attention operand does not lie inside its tensor".into(),
            ));
        }
        for n in [self.m, self.n, self.k, self.a.ld, self.b.ld, self.c.ld] {
            int_arg(n)?;
        }
        let (a_guard, a_layout) = a_tensor.storage_and_layout();
        let (b_guard, b_layout) = b_tensor.storage_and_layout();
        let a = (cuda_storage(&a_guard)?, a_layout);
        let b = (cuda_storage(&b_guard)?, b_layout);
        let out = match dtype {
            DType::F32 => self.launch::<f32>(a, b, shape, sys::cudaDataType_t::CUDA_R_32F),
            DType::F16 => self.launch::<half::f16>(a, b, shape, sys::cudaDataType_t::CUDA_R_16F),
            DType::BF16 => self.launch::<half::bf16>(a, b, shape, sys::cudaDataType_t::CUDA_R_16BF),
            other => return Err(Error::Input(format!("no attention matmul for {other:?}"))),
        }?;
        drop((a_guard, b_guard));
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            out_dims,
            BackpropOp::none(),
            false,
        ))
    }

    fn launch<T: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(
        &self,
        (a, a_layout): (&CudaStorage, &Layout),
        (b, b_layout): (&CudaStorage, &Layout),
        shape: AttentionShape,
        data_type: sys::cudaDataType_t,
    ) -> Result<CudaStorage> {
        let device: CudaDevice = a.device().clone();
        let stream = device.cuda_stream();
        let blas = device.cublas_handle();
        let out_len = shape.batch * shape.heads * self.m * self.n;
        // SAFETY: the calls below write every element of the output (each (batch, head)
        // product covers its m x n block, and the blocks tile the output).
        let mut out = unsafe { device.alloc::<T>(out_len) }?;
        let element = std::mem::size_of::<T>() as u64;
        let a_slice = a.as_cuda_slice::<T>()?;
        let b_slice = b.as_cuda_slice::<T>()?;
        // Candle's float32 matmuls use TF32 only when asked to; so do these.
        let compute = match (a.dtype(), candle_core::cuda::gemm_reduced_precision_f32()) {
            (DType::F32, true) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let alpha = self.alpha as f32;
        let beta = 0.0f32;
        let transa = if self.transpose_a {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        };
        {
            let (a_ptr, _a_sync) = a_slice.device_ptr(&stream);
            let (b_ptr, _b_sync) = b_slice.device_ptr(&stream);
            let (c_ptr, _c_sync) = out.device_ptr_mut(&stream);
            let a_base = a_ptr + (a_layout.start_offset() + self.a.offset) as u64 * element;
            let b_base = b_ptr + (b_layout.start_offset() + self.b.offset) as u64 * element;
            let c_base = c_ptr + self.c.offset as u64 * element;
            let count = shape.batch * shape.heads;
            let count_i = int_arg(count)?;
            // SAFETY: the kernel below writes all 3 * count entries.
            let mut pointers = unsafe { device.alloc::<u64>(3 * count) }?;
            let func = device.get_or_load_custom_func("head_pointers", MODULE, PTX)?;
            let mut builder = func.builder();
            builder.arg(&mut pointers);
            let bytes = |n: usize| (n as u64 * element) as i64;
            let (a_b, a_h) = (bytes(self.a.batch_stride), bytes(self.a.head_stride));
            let (b_b, b_h) = (bytes(self.b.batch_stride), bytes(self.b.head_stride));
            let (c_b, c_h) = (bytes(self.c.batch_stride), bytes(self.c.head_stride));
            let heads_i = shape.heads as i32;
            candle_core::builder_arg!(
                builder, a_base, a_b, a_h, b_base, b_b, b_h, c_base, c_b, c_h, heads_i, count_i
            );
            let cfg = LaunchConfig {
                grid_dim: (count.div_ceil(THREADS as usize) as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel writes `3 * count` entries of `pointers`, its length.
            unsafe { builder.launch(cfg) }.w()?;
            let (table, _table_sync) = pointers.device_ptr(&stream);
            let entry = std::mem::size_of::<u64>() as u64;
            // SAFETY: the table (written above, on the same stream) holds the address of
            // every (batch, head) matrix of A, B and C, each inside its storage (checked by
            // `run`); cuBLAS runs on the device's stream, as every later reader does.
            unsafe {
                sys::cublasGemmBatchedEx(
                    *blas.handle(),
                    transa,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    self.m as i32,
                    self.n as i32,
                    self.k as i32,
                    (&alpha) as *const f32 as *const _,
                    table as *const *const _,
                    data_type,
                    self.a.ld as i32,
                    (table + count as u64 * entry) as *const *const _,
                    data_type,
                    self.b.ld as i32,
                    (&beta) as *const f32 as *const _,
                    (table + 2 * count as u64 * entry) as *const *mut _,
                    data_type,
                    self.c.ld as i32,
                    count_i,
                    compute,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
            }
            .result()
            .map_err(|e| Error::Input(format!("cuBLAS attention matmul failed: {e:?}")))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, device))
    }
}

/// `n` as a cuBLAS or kernel `int`.
fn int_arg(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Input(format!("attention dimension {n} is too large")))
}
