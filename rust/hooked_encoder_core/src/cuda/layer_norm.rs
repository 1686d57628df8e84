//! LayerNorm on NVIDIA GPUs, in one kernel where none of its hook points is wanted, else in
//! two: the hooked parts (`hook_scale`, `hook_normalized`) in one pass over each row, then the
//! affine map on what the hooks return (Candle's ops take about a dozen kernels for the same).

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::imp::{column_walk, contiguous, cuda_storage, suffix, MODULE, PTX, THREADS};
use crate::{Error, Result};

/// Rows wider than this do not fit the kernels' shared memory (32 KiB of float32 per block).
const MAX_COLS: usize = 8192;

/// LayerNorm over the last dimension of `x`, or of `x + residual` (a residual add and the norm
/// after it), in one kernel; `None` where a row does not fit the kernel's shared memory (the
/// caller then runs the portable ops).
pub fn layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Option<Tensor>> {
    let Some((rows, cols)) = rows_and_cols(x) else {
        return Ok(None);
    };
    if residual.is_some_and(|r| r.dims() != x.dims() || r.dtype() != x.dtype()) {
        return Err(Error::Input(
            "internal: a residual that does not match the LayerNorm input".into(),
        ));
    }
    let x = x.contiguous()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let out = {
        let (x_guard, x_layout) = x.storage_and_layout();
        let residual_guard = residual.as_ref().map(|r| r.storage_and_layout());
        let (w_guard, w_layout) = w.storage_and_layout();
        let (b_guard, b_layout) = b.storage_and_layout();
        let norm = Norm {
            x: (cuda_storage(&x_guard)?, x_layout),
            residual: match &residual_guard {
                Some((guard, layout)) => Some((cuda_storage(guard)?, *layout)),
                None => None,
            },
            w: (cuda_storage(&w_guard)?, w_layout),
            b: (cuda_storage(&b_guard)?, b_layout),
            rows,
            cols,
            eps: eps as f32,
        };
        match x.dtype() {
            DType::F16 => norm.launch::<half::f16>()?,
            DType::BF16 => norm.launch::<half::bf16>()?,
            _ => norm.launch::<f32>()?,
        }
    };
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(out),
        x.dims(),
        BackpropOp::none(),
        false,
    )))
}

/// `(rows, cols)` of `x` over its last dimension, or `None` where its rows do not fit a kernel
/// that stages a row in shared memory (or are too many for the grid).
fn rows_and_cols(x: &Tensor) -> Option<(usize, usize)> {
    let cols = x.dims().last().copied().unwrap_or(0);
    let rows = x.elem_count() / cols.max(1);
    (cols > 0 && cols <= MAX_COLS && rows <= u32::MAX as usize).then_some((rows, cols))
}

/// The launch of a kernel that gives each row a block and stages it in float32 in shared
/// memory, whatever the element type (`row_moments` in `cuda/fused.cu`).
fn one_block_per_row(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: (cols * std::mem::size_of::<f32>()) as u32,
    }
}

/// One launch of `layer_norm_*`.
struct Norm<'a> {
    x: (&'a CudaStorage, &'a Layout),
    residual: Option<(&'a CudaStorage, &'a Layout)>,
    w: (&'a CudaStorage, &'a Layout),
    b: (&'a CudaStorage, &'a Layout),
    rows: usize,
    cols: usize,
    eps: f32,
}

impl Norm<'_> {
    fn launch<T: CudaDType + DeviceRepr>(&self) -> Result<CudaStorage> {
        let (storage, layout) = self.x;
        let device = storage.device().clone();
        let x = contiguous::<T>(storage, layout, "the LayerNorm input")?;
        let residual = match self.residual {
            Some((storage, layout)) => Some(contiguous::<T>(storage, layout, "the residual")?),
            None => None,
        };
        let w = contiguous::<T>(self.w.0, self.w.1, "weight")?;
        let b = contiguous::<T>(self.b.0, self.b.1, "bias")?;
        if w.len() != self.cols || b.len() != self.cols {
            return Err(Error::Input(format!(
                "LayerNorm weights do not match {} columns",
                self.cols
            )));
        }
        // SAFETY: every element is written by the kernel before anyone reads it.
        let mut out = unsafe { device.alloc::<T>(x.len()) }?;
        let name = format!("layer_norm_{}", suffix(storage.dtype())?);
        let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&x);
        // A missing residual is a null pointer, which the kernel checks.
        let null: u64 = 0;
        match &residual {
            Some(residual) => builder.arg(residual),
            None => builder.arg(&null),
        };
        builder.arg(&mut out);
        builder.arg(&w);
        builder.arg(&b);
        candle_core::builder_arg!(builder, self.cols as i32, self.eps);
        let cfg = one_block_per_row(self.rows, self.cols);
        // SAFETY: one block per row reads `cols` elements of that row of `x` (and of the
        // residual, same shape, checked) and writes as many of `out`, reading `cols` weights
        // and biases, all of element type `T`; the row is staged in `cols` floats of shared
        // memory.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, device))
    }
}

/// A LayerNorm's hooked parts in one kernel: `(scale, normalized)`, the scale `[.., 1]` and
/// `(x - mean) / scale` shaped as `x`, both in `x`'s dtype; `None` where a row does not fit the
/// kernel (the caller then runs the portable ops).
pub fn layer_norm_parts(x: &Tensor, eps: f64) -> Result<Option<(Tensor, Tensor)>> {
    let Some((rows, cols)) = rows_and_cols(x) else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let (normalized, scale) = {
        let (guard, layout) = x.storage_and_layout();
        let parts = Parts {
            x: (cuda_storage(&guard)?, layout),
            rows,
            cols,
            eps: eps as f32,
        };
        match x.dtype() {
            DType::F16 => parts.launch::<half::f16>()?,
            DType::BF16 => parts.launch::<half::bf16>()?,
            _ => parts.launch::<f32>()?,
        }
    };
    let mut scale_dims = x.dims().to_vec();
    *scale_dims.last_mut().unwrap_or(&mut 0) = 1;
    let wrap = |storage, dims: &[usize]| {
        Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false)
    };
    Ok(Some((wrap(scale, &scale_dims), wrap(normalized, x.dims()))))
}

/// One launch of `layer_norm_parts_*`.
struct Parts<'a> {
    x: (&'a CudaStorage, &'a Layout),
    rows: usize,
    cols: usize,
    eps: f32,
}

impl Parts<'_> {
    /// Returns the storages of `(normalized, scale)`.
    fn launch<T: CudaDType + DeviceRepr>(&self) -> Result<(CudaStorage, CudaStorage)> {
        let (storage, layout) = self.x;
        let device = storage.device().clone();
        let x = contiguous::<T>(storage, layout, "the LayerNorm input")?;
        // SAFETY: the kernel writes every element of both before anyone reads them.
        let mut normalized = unsafe { device.alloc::<T>(x.len()) }?;
        let mut scale = unsafe { device.alloc::<T>(self.rows) }?;
        let name = format!("layer_norm_parts_{}", suffix(storage.dtype())?);
        let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&mut normalized);
        builder.arg(&mut scale);
        candle_core::builder_arg!(builder, self.cols as i32, self.eps);
        let cfg = one_block_per_row(self.rows, self.cols);
        // SAFETY: one block per row reads `cols` elements of `x` and writes as many of
        // `normalized` and one scale, all of element type `T`; the row is staged in `cols`
        // floats of shared memory.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(normalized, device.clone()),
            CudaStorage::wrap_cuda_slice(scale, device),
        ))
    }
}

/// `x * w + b` over the last dimension (a LayerNorm's affine map), as a new tensor.
pub fn scale_shift(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3_no_bwd(w, b, &ScaleShift)?)
}

struct ScaleShift;

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "scale-shift"
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
        candle_core::bail!("the fused scale-shift runs on CUDA devices only")
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
            DType::F16 => scale_shift_launch::<half::f16>(x, x_l, w, w_l, b, b_l),
            DType::BF16 => scale_shift_launch::<half::bf16>(x, x_l, w, w_l, b, b_l),
            _ => scale_shift_launch::<f32>(x, x_l, w, w_l, b, b_l),
        }
    }
}

fn scale_shift_launch<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    b: &CudaStorage,
    b_l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let device = x.device().clone();
    let name = format!("scale_shift_{}", suffix(x.dtype())?);
    let cols = x_l.dims().last().copied().unwrap_or(0);
    let x_view = contiguous::<T>(x, x_l, "the scale-shift input")?;
    let w = contiguous::<T>(w, w_l, "weight")?;
    let b = contiguous::<T>(b, b_l, "bias")?;
    if cols == 0 || w.len() != cols || b.len() != cols || x_view.len() % cols != 0 {
        candle_core::bail!("scale-shift weights do not match {cols} columns");
    }
    let rows = x_view.len() / cols;
    // SAFETY: every element is written by the kernel before anyone reads it.
    let mut out = unsafe { device.alloc::<T>(x_view.len()) }?;
    let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut builder = func.builder();
    builder.arg(&x_view);
    builder.arg(&mut out);
    builder.arg(&w);
    builder.arg(&b);
    let cols_i = i32::try_from(cols)
        .map_err(|_| candle_core::Error::Msg(format!("{cols} columns is too many")))?;
    candle_core::builder_arg!(builder, rows, cols_i);
    let cfg = column_walk(rows, cols);
    // SAFETY: the kernel reads `rows * cols` elements of `x` and `cols` weights and biases and
    // writes `rows * cols` elements of `out`, all of element type `T`.
    unsafe { builder.launch(cfg) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, device),
        x_l.shape().clone(),
    ))
}
