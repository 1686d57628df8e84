//! Fused float32 kernels for NVIDIA GPUs (`cuda/fused.cu`, compiled to PTX by `build.rs` in
//! CUDA builds): a bias add with the activation, in place on a matmul result, and a LayerNorm
//! in one pass (used when none of its hook points is wanted). Elsewhere, and in half precision,
//! the model runs Candle's portable ops.

use candle_core::{DType, Tensor};

#[cfg(not(feature = "cuda"))]
use crate::{Activation, Result};

/// Whether the fused kernels handle `t`: float32 on a CUDA device, in a CUDA build.
#[inline]
pub fn kernels_on(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && t.dtype() == DType::F32
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
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::WrapErr;
    use candle_core::{CudaStorage, CustomOp3, InplaceOp2, Layout, Shape, Tensor};

    use crate::{Activation, Result};

    const MODULE: &str = "hooked_encoder_fused";
    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const THREADS: u32 = 256;

    fn contiguous<'a>(
        storage: &'a CudaStorage,
        layout: &Layout,
        what: &str,
    ) -> candle_core::Result<candle_core::cuda::cudarc::driver::CudaView<'a, f32>> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{what} must be contiguous")
        };
        Ok(storage.as_cuda_slice::<f32>()?.slice(start..end))
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
            let device = dst.device().clone();
            let bias = contiguous(bias, bias_l, "the bias")?;
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
            let mut y = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
            let func = device.get_or_load_custom_func("bias_act_f32", MODULE, PTX)?;
            let mut builder = func.builder();
            builder.arg(&mut y);
            builder.arg(&bias);
            candle_core::builder_arg!(builder, numel, cols, act);
            let blocks = numel.div_ceil(THREADS as usize).min(65_535) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads `cols` bias values and reads and writes `numel` elements
            // of `y`, the bounds of both views.
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
            let device = x.device().clone();
            let cols = x_l.dims().last().copied().unwrap_or(0);
            let x_view = contiguous(x, x_l, "the LayerNorm input")?;
            let (w, b) = (contiguous(w, w_l, "weight")?, contiguous(b, b_l, "bias")?);
            let rows = x_view.len() / cols.max(1);
            if w.len() != cols || b.len() != cols {
                candle_core::bail!("LayerNorm weights do not match {cols} columns");
            }
            // SAFETY: every element is written by the kernel before anyone reads it.
            let mut out = unsafe { device.alloc::<f32>(x_view.len()) }?;
            let func = device.get_or_load_custom_func("layer_norm_f32", MODULE, PTX)?;
            let mut builder = func.builder();
            builder.arg(&x_view);
            builder.arg(&mut out);
            builder.arg(&w);
            builder.arg(&b);
            candle_core::builder_arg!(builder, cols as i32, self.eps);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: (cols * std::mem::size_of::<f32>()) as u32,
            };
            // SAFETY: one block per row reads and writes `cols` elements of that row, and
            // `cols` weights and biases; the row is staged in `cols` floats of shared memory.
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
