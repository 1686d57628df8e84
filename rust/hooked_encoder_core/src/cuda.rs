//! Fused kernels for NVIDIA GPUs (`cuda/fused.cu`, compiled to PTX by `build.rs` in CUDA
//! builds), in float32, float16 and bfloat16: a bias add with the activation, in place on a
//! matmul result, a LayerNorm in one pass (used when none of its hook points is wanted, else
//! its hooked parts in one pass: `cuda/layer_norm.rs`), and attention read straight from the
//! projection's layout (`cuda/attention.rs`); linear layers as cuBLASLt matmuls that add the
//! bias (`cuda/linear.rs`). Elsewhere the model runs Candle's portable ops.

use candle_core::{DType, Tensor};

#[cfg(not(feature = "cuda"))]
use crate::{kernels::AttentionShape, Activation, Result};

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod layer_norm;
#[cfg(feature = "cuda")]
mod linear;

/// q, k or v inside a `[batch, pos, ...]` tensor: position `r`'s heads lie side by side from
/// element `offset + r * row_stride`, `d_head` elements each.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Heads<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub row_stride: usize,
}

/// What `attention_softmax` adds to the scores before the softmax.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct ScoreMask<'a> {
    /// Padding and causality, 0 or -inf, `[batch or 1, 1, pos or 1, pos]` in the model's dtype.
    pub additive: Option<&'a Tensor>,
    /// A bias per score, `[batch, head, query, key]`, contiguous, in the model's dtype.
    pub bias: Option<&'a Tensor>,
    /// Keys further than this from the query are masked (a local attention layer).
    pub window: Option<usize>,
}

/// Whether the fused kernels handle `t`: float32, float16 or bfloat16 on a CUDA device, in a
/// CUDA build.
#[inline]
pub fn kernels_on(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !crate::cpu::portable_ops::forced()
}

#[cfg(feature = "cuda")]
pub use attention::{attention_scores, attention_softmax, attention_z};
#[cfg(feature = "cuda")]
pub use imp::bias_act_inplace;
#[cfg(feature = "cuda")]
pub use layer_norm::{layer_norm, layer_norm_parts, scale_shift};
#[cfg(feature = "cuda")]
pub use linear::linear;

/// Opens NVIDIA GPU `ordinal` for a model, with freed memory kept in the device's memory pool
/// instead of going back to the driver at each synchronisation (CUDA's default release
/// threshold, 0): a forward's activations then reuse the last one's memory, as PyTorch's
/// caching allocator does. The pool keeps what the largest pass needed until the process ends.
///
/// (cudarc's event tracking, which orders several streams at the cost of events per
/// allocation and kernel argument, stays on: switching it off gained nothing measurable on an
/// H200 at 32 or 128 rows, 10% at one row of 16 in bfloat16, not worth an unsafe promise.)
#[cfg(feature = "cuda")]
pub fn open_device(ordinal: usize) -> crate::Result<candle_core::Device> {
    use candle_core::cuda::cudarc::driver::{result, sys};
    use candle_core::cuda::WrapErr;
    let device = candle_core::Device::new_cuda(ordinal)?;
    if let candle_core::Device::Cuda(cuda) = &device {
        let stream = cuda.cuda_stream();
        let keep_everything = u64::MAX;
        // SAFETY: the device is the context's own; the release threshold is a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(stream.context().cu_device()).w()?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&keep_everything as *const u64).cast_mut().cast(),
            )
            .w()?;
        }
    }
    Ok(device)
}

/// Opens NVIDIA GPU `ordinal`; in a build without CUDA, Candle's error saying so.
#[cfg(not(feature = "cuda"))]
pub fn open_device(ordinal: usize) -> Result<candle_core::Device> {
    Ok(candle_core::Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
pub fn bias_act_inplace(_: &Tensor, _: Option<&Tensor>, _: Option<Activation>) -> Result<()> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn layer_norm(
    _: &Tensor,
    _: Option<&Tensor>,
    _: &Tensor,
    _: &Tensor,
    _: f64,
) -> Result<Option<Tensor>> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn linear(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn layer_norm_parts(_: &Tensor, _: f64) -> Result<Option<(Tensor, Tensor)>> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn scale_shift(_: &Tensor, _: &Tensor, _: &Tensor) -> Result<Tensor> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn attention_scores(_: Heads, _: Heads, _: AttentionShape, _: f64) -> Result<Tensor> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn attention_softmax(_: &Tensor, _: Option<&ScoreMask>, _: bool) -> Result<Tensor> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn attention_z(_: &Tensor, _: Heads, _: AttentionShape) -> Result<Tensor> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, InplaceOp1, InplaceOp2, Layout, Tensor};

    use crate::{Activation, Result};

    pub(super) const MODULE: &str = "hooked_encoder_fused";
    pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    pub(super) const THREADS: u32 = 256;

    pub(super) fn contiguous<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what} must be contiguous")
        };
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// The launch of a kernel whose threads each walk one column: column blocks across x,
    /// rows split over at most 1024 groups along y (each thread then walks its column down
    /// `rows / 1024` rows), so no element's column is recomputed with a division.
    pub(super) fn column_walk(rows: usize, cols: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (cols as u32).div_ceil(THREADS),
                rows.clamp(1, 1024) as u32,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The CUDA storage of a tensor a kernel was given (an error if it is off the GPU).
    pub(super) fn cuda_storage(storage: &candle_core::Storage) -> crate::Result<&CudaStorage> {
        match storage {
            candle_core::Storage::Cuda(storage) => Ok(storage),
            _ => Err(crate::Error::Input(
                "internal: a CUDA kernel was given a tensor off the GPU".into(),
            )),
        }
    }

    /// The suffix of a kernel's entry points for an element type (`bias_act_bf16`).
    pub(super) fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("no fused kernel for {other:?}"),
        })
    }

    /// `x[r, :] += bias` (if given), then the activation, in place.
    struct BiasAct {
        act: Option<Activation>,
    }

    impl InplaceOp1 for BiasAct {
        fn name(&self) -> &'static str {
            "act"
        }

        fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
            candle_core::bail!("the fused activation runs on CUDA devices only")
        }

        fn cuda_fwd(&self, dst: &mut CudaStorage, dst_l: &Layout) -> candle_core::Result<()> {
            match dst.dtype() {
                DType::F16 => self.launch::<half::f16>(dst, dst_l, None),
                DType::BF16 => self.launch::<half::bf16>(dst, dst_l, None),
                _ => self.launch::<f32>(dst, dst_l, None),
            }
        }
    }

    impl InplaceOp2 for BiasAct {
        fn name(&self) -> &'static str {
            "bias-act"
        }

        fn cpu_fwd(
            &self,
            _: &mut candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<()> {
            candle_core::bail!("the fused bias-act runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            dst: &mut CudaStorage,
            dst_l: &Layout,
            bias: &CudaStorage,
            bias_l: &Layout,
        ) -> candle_core::Result<()> {
            let bias = Some((bias, bias_l));
            match dst.dtype() {
                DType::F16 => self.launch::<half::f16>(dst, dst_l, bias),
                DType::BF16 => self.launch::<half::bf16>(dst, dst_l, bias),
                _ => self.launch::<f32>(dst, dst_l, bias),
            }
        }
    }

    impl BiasAct {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dst: &mut CudaStorage,
            dst_l: &Layout,
            bias: Option<(&CudaStorage, &Layout)>,
        ) -> candle_core::Result<()> {
            let device = dst.device().clone();
            let name = format!("bias_act_{}", suffix(dst.dtype())?);
            let bias = match bias {
                Some((bias, bias_l)) => Some(contiguous::<T>(bias, bias_l, "the bias")?),
                None => None,
            };
            let Some((start, end)) = dst_l.contiguous_offsets() else {
                candle_core::bail!("bias-act needs a contiguous tensor")
            };
            let numel = end - start;
            let cols = match &bias {
                Some(bias) => bias.len(),
                None => dst_l.dims().last().copied().unwrap_or(0),
            };
            if cols == 0 || numel % cols != 0 {
                candle_core::bail!("rows of {cols} do not divide {numel} elements");
            }
            let act: i32 = match self.act {
                None => 0,
                Some(Activation::Gelu) => 1,
                Some(Activation::GeluTanh) => 2,
                Some(Activation::Relu) => 3,
            };
            let rows = numel / cols;
            if rows == 0 {
                return Ok(());
            }
            let cols = i32::try_from(cols)
                .map_err(|_| candle_core::Error::Msg(format!("{cols} columns is too many")))?;
            let mut y = dst.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut builder = func.builder();
            builder.arg(&mut y);
            // No bias is a null pointer, which the kernel checks.
            let null: u64 = 0;
            match &bias {
                Some(bias) => builder.arg(bias),
                None => builder.arg(&null),
            };
            candle_core::builder_arg!(builder, rows, cols, act);
            let cfg = column_walk(rows, cols as usize);
            // SAFETY: the kernel reads `cols` bias values (if any) and reads and writes
            // `rows * cols` elements of `y`, the bounds of both views, all of element type `T`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
    }

    /// Adds `bias` (if given) to every row of `x` and applies `act` (if given), in place. `x`
    /// must be a contiguous tensor nobody else holds (a fresh matmul result).
    pub fn bias_act_inplace(
        x: &Tensor,
        bias: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<()> {
        match (bias, act) {
            (Some(bias), _) => x.inplace_op2(bias, &BiasAct { act })?,
            (None, Some(_)) => x.inplace_op1(&BiasAct { act })?,
            (None, None) => {} // nothing to do
        }
        Ok(())
    }
}
