//! Glue between Candle tensors and the CPU kernels: borrowing a tensor's data as a slice, and
//! wrapping a freshly computed buffer as a tensor without copying it.

use candle_core::{CpuStorage, InplaceOp1, Layout, Storage, StorageRef, Tensor};

use crate::kernels;
use crate::{Activation, Error, Result};

/// Whether our fused CPU kernels handle tensors of `dtype` on `device`: float32 on the CPU.
/// Elsewhere (a GPU, or half precision) the model uses portable Candle ops; tests can force
/// those on the CPU too (see [`portable_ops`]), so the GPU's code path is checked against the
/// reference on every machine.
#[inline]
pub fn kernels_on(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    device.is_cpu() && dtype == candle_core::DType::F32 && !portable_ops::forced()
}

/// A read-locked view of a contiguous float32 CPU tensor's elements.
pub struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl F32View<'_> {
    /// The elements, in row-major order.
    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(data)) => &data[self.start..self.end],
            // `view` only builds an F32View over float32 CPU storage.
            _ => &[],
        }
    }
}

/// Borrows the elements of `t`, which must be a contiguous float32 tensor on the CPU.
pub fn view(t: &Tensor) -> Result<F32View<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Input("internal: CPU kernel given a non-contiguous tensor".into()))?;
    if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
        return Err(Error::Input(
            "internal: CPU kernel given a non-float32 tensor".into(),
        ));
    }
    Ok(F32View { guard, start, end })
}

/// Wraps `data` as a CPU tensor of shape `dims` (the buffer moves; nothing is copied).
pub fn tensor(data: Vec<f32>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, dims, &candle_core::Device::Cpu)?)
}

/// `x[r, :] += bias` and then the activation, in place on `x`'s storage.
struct BiasAct<'a> {
    bias: &'a [f32],
    act: Option<Activation>,
}

impl InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("bias-act needs a contiguous float32 tensor")
        };
        kernels::bias_act_inplace(&mut data[start..end], self.bias, self.act);
        Ok(())
    }
}

/// Adds `bias` to every row of `x` and applies `act`, in place. `x` must be a tensor nobody else
/// holds (a fresh matmul result).
pub fn bias_act_inplace(x: &Tensor, bias: &Tensor, act: Option<Activation>) -> Result<()> {
    let bias = view(bias)?;
    x.inplace_op1(&BiasAct {
        bias: bias.slice(),
        act,
    })?;
    Ok(())
}

/// Forcing the portable code path in this thread (tests only).
#[cfg(test)]
pub(crate) mod portable_ops {
    use std::cell::Cell;

    thread_local! {
        static FORCED: Cell<bool> = const { Cell::new(false) };
    }

    pub fn forced() -> bool {
        FORCED.with(Cell::get)
    }

    /// Runs `work` with the portable ops in this thread.
    pub fn with<T>(work: impl FnOnce() -> T) -> T {
        FORCED.with(|f| f.set(true));
        let result = work();
        FORCED.with(|f| f.set(false));
        result
    }
}

#[cfg(not(test))]
pub(crate) mod portable_ops {
    #[inline(always)]
    pub fn forced() -> bool {
        false
    }
}
