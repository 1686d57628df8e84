//! Fused kernels for NVIDIA GPUs (`cuda/fused.cu`, compiled to PTX by `build.rs` in CUDA
//! builds), in float32, float16 and bfloat16: a bias add with the activation, in place on a
//! matmul result, and a LayerNorm in one pass (used when none of its hook points is wanted).
//! Elsewhere the model runs Candle's portable ops.

use candle_core::{DType, Tensor};

#[cfg(not(feature = "cuda"))]
use crate::{Activation, Result};

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
pub use imp::{bias_act_inplace, layer_norm};

#[cfg(not(feature = "cuda"))]
pub fn bias_act_inplace(_: &Tensor, _: &Tensor, _: Option<Activation>) -> Result<()> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(not(feature = "cuda"))]
pub fn layer_norm(_: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
    Err(crate::Error::Input("this build has no CUDA kernels".into()))
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};

    use crate::{Activation, Result};

    const MODULE: &str = "hooked_encoder_fused";
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const THREADS: u32 = 256;

    fn contiguous<'a, T: CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what} must be contiguous")
        };
        Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
    }

    /// The suffix of a kernel's entry points for an element type (`bias_act_bf16`).
    fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
        Ok(match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => candle_core::bail!("no fused kernel for {other:?}"),
        })
    }

    /// `x[r, :] += bias`, then the activation, in place.
    struct BiasAct {
        act: Option<Activation>,
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
            match dst.dtype() {
                DType::F16 => self.launch::<half::f16>(dst, dst_l, bias, bias_l),
                DType::BF16 => self.launch::<half::bf16>(dst, dst_l, bias, bias_l),
                _ => self.launch::<f32>(dst, dst_l, bias, bias_l),
            }
        }
    }

    impl BiasAct {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            dst: &mut CudaStorage,
            dst_l: &Layout,
            bias: &CudaStorage,
            bias_l: &Layout,
        ) -> candle_core::Result<()> {
            let device = dst.device().clone();
            let name = format!("bias_act_{}", suffix(dst.dtype())?);
            let bias = contiguous::<T>(bias, bias_l, "the bias")?;
            let Some((start, end)) = dst_l.contiguous_offsets() else {
                candle_core::bail!("bias-act needs a contiguous tensor")
            };
            let (numel, cols) = (end - start, bias.len());
            if cols == 0 || numel % cols != 0 {
                candle_core::bail!("bias of {cols} does not divide {numel} elements");
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
            builder.arg(&bias);
            candle_core::builder_arg!(builder, rows, cols, act);
            // Column blocks across x; rows split over at most 1024 groups along y (each thread
            // then walks its column down `rows / 1024` rows).
            let column_blocks = (cols as u32).div_ceil(THREADS);
            let row_groups = rows.min(1024) as u32;
            let cfg = LaunchConfig {
                grid_dim: (column_blocks, row_groups, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads `cols` bias values and reads and writes `rows * cols`
            // elements of `y`, the bounds of both views, all of element type `T`.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }
    }

    /// Adds `bias` to every row of `x` and applies `act`, in place. `x` must be a contiguous
    /// tensor nobody else holds (a fresh matmul result).
    pub fn bias_act_inplace(x: &Tensor, bias: &Tensor, act: Option<Activation>) -> Result<()> {
        x.inplace_op2(bias, &BiasAct { act })?;
        Ok(())
    }

    struct LayerNorm {
        eps: f32,
    }

    impl CustomOp3 for LayerNorm {
        fn name(&self) -> &'static str {
            "layer-norm"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused LayerNorm runs on CUDA devices only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
            b: &CudaStorage,
            b_l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            match x.dtype() {
                DType::F16 => self.launch::<half::f16>(x, x_l, w, w_l, b, b_l),
                DType::BF16 => self.launch::<half::bf16>(x, x_l, w, w_l, b, b_l),
                _ => self.launch::<f32>(x, x_l, w, w_l, b, b_l),
            }
        }
    }

    impl LayerNorm {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            x_l: &Layout,
            w: &CudaStorage,
            w_l: &Layout,
            b: &CudaStorage,
            b_l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let device = x.device().clone();
            let name = format!("layer_norm_{}", suffix(x.dtype())?);
            let cols = x_l.dims().last().copied().unwrap_or(0);
            let x_view = contiguous::<T>(x, x_l, "the LayerNorm input")?;
            let w = contiguous::<T>(w, w_l, "weight")?;
            let b = contiguous::<T>(b, b_l, "bias")?;
            let rows = x_view.len() / cols.max(1);
            if w.len() != cols || b.len() != cols {
                candle_core::bail!("LayerNorm weights do not match {cols} columns");
            }
            // SAFETY: every element is written by the kernel before anyone reads it.
            let mut out = unsafe { device.alloc::<T>(x_view.len()) }?;
            let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut builder = func.builder();
            builder.arg(&x_view);
            builder.arg(&mut out);
            builder.arg(&w);
            builder.arg(&b);
            candle_core::builder_arg!(builder, cols as i32, self.eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                // The row is staged in float32 whatever `T` is.
                shared_mem_bytes: (cols * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: one block per row reads and writes `cols` elements of that row, and
            // `cols` weights and biases, all of element type `T`; the row is staged in `cols`
            // floats of shared memory.
            unsafe { builder.launch(cfg) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, device),
                x_l.shape().clone(),
            ))
        }
    }

    /// LayerNorm over the last dimension in one kernel, or `None` where a row does not fit the
    /// kernel's shared memory (the caller then runs the portable ops).
    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
        const MAX_COLS: usize = 8192; // 32 KiB of shared memory per block
        let cols = x.dims().last().copied().unwrap_or(0);
        if cols == 0 || cols > MAX_COLS || x.elem_count() / cols > u32::MAX as usize {
            return Ok(None);
        }
        let op = LayerNorm { eps: eps as f32 };
        Ok(Some(x.contiguous()?.apply_op3_no_bwd(w, b, &op)?))
    }
}
