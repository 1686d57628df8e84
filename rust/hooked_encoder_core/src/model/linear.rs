//! A dense layer `y = x Wᵀ + b`: its forward, and its backward (the gradient to its input).

use std::sync::{Arc, OnceLock};

use super::*;
use crate::packed_matmul::{self, PackedWeight};

/// A dense layer `y = x Wᵀ + b`. `W` is `[out, in]` as in Hugging Face; on the CPU in float32
/// the encoder blocks' weights are stored only packed for the matmul kernel (see
/// [`Linear::packed`]).
#[derive(Clone)]
pub(super) struct Linear {
    weight: LinearWeight,
    pub(super) bias: Tensor,
}

/// How a layer's weight is stored.
#[derive(Clone)]
enum LinearWeight {
    /// A tensor in Hugging Face's `[out, in]` layout, on the model's device and in its dtype.
    Dense(Tensor),
    /// Packed once for [`PackedWeight::matmul`] (CPU, float32), and shared by copies of the
    /// model. [`Linear::weight`] unpacks it when asked; the backward pass, which multiplies by
    /// the weight untransposed, keeps an unpacked copy from its first call on (`unpacked`), so
    /// only models that are differentiated hold the weight twice.
    Packed {
        packed: Arc<PackedWeight>,
        unpacked: Arc<OnceLock<Tensor>>,
    },
}

impl Linear {
    /// A layer with `weight` (`[out, in]`) and `bias` (`[out]`) stored as given.
    pub(super) fn new(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight: LinearWeight::Dense(weight),
            bias,
        }
    }

    /// A layer whose weight is `packed` (shared, e.g. with the word embeddings it is tied to).
    pub(super) fn from_packed(packed: Arc<PackedWeight>, bias: Tensor) -> Self {
        Self {
            weight: LinearWeight::Packed {
                packed,
                unpacked: Arc::default(),
            },
            bias,
        }
    }

    /// The same layer with its weight stored packed, if it is a float32 CPU tensor and this
    /// CPU is one where packing was measured to pay ([`packed_matmul::pays_on_this_cpu`]).
    ///
    /// `gemm`, behind Candle's matmul, packs the weight on every call, which at 128 rows was
    /// 15% of a bert-base forward (`perf`, AMD EPYC Zen 3). The packed copy replaces the dense
    /// one, so memory does not grow.
    pub(super) fn packed(self) -> Result<Self> {
        let LinearWeight::Dense(weight) = &self.weight else {
            return Ok(self);
        };
        if !Self::packing_pays(weight) {
            return Ok(self);
        }
        Ok(Self::from_packed(Arc::new(pack(weight)?), self.bias))
    }

    /// Whether packing `weight` pays: a float32 CPU tensor on a CPU where packing was measured
    /// to pay ([`packed_matmul::pays_on_this_cpu`]).
    pub(super) fn packing_pays(weight: &Tensor) -> bool {
        weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && packed_matmul::pays_on_this_cpu()
    }

    /// The layer on `device` in `dtype` (a packed weight that stays a float32 CPU weight is
    /// shared, not unpacked).
    pub(super) fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let bias = self.bias.to_dtype(dtype)?.to_device(device)?;
        if matches!(self.weight, LinearWeight::Packed { .. })
            && device.is_cpu()
            && dtype == DType::F32
        {
            return Ok(Self {
                weight: self.weight.clone(),
                bias,
            });
        }
        let weight = self.weight()?.to_dtype(dtype)?.to_device(device)?;
        Ok(Self::new(weight, bias))
    }

    /// The weight, `[out, in]` (unpacked into a new tensor when stored packed).
    pub(super) fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(weight) => Ok(weight.clone()),
            LinearWeight::Packed { packed, unpacked } => match unpacked.get() {
                Some(weight) => Ok(weight.clone()),
                None => unpack(packed),
            },
        }
    }

    /// [`Self::weight`], kept from the first call on where the weight is stored packed (see
    /// [`LinearWeight::Packed`]).
    fn weight_for_backward(&self) -> Result<Tensor> {
        match &self.weight {
            // `weight()` returns the kept copy once there is one.
            LinearWeight::Packed { unpacked, .. } => {
                let weight = self.weight()?;
                Ok(unpacked.get_or_init(|| weight).clone())
            }
            LinearWeight::Dense(weight) => Ok(weight.clone()),
        }
    }

    /// Whether the layer's weight is `tensor` itself (not a copy): a tied weight.
    pub(super) fn has_dense_weight(&self, tensor: &Tensor) -> bool {
        matches!(&self.weight, LinearWeight::Dense(weight) if weight.id() == tensor.id())
    }

    /// Whether the layer's weight is `packed` itself (not a copy): a tied weight.
    pub(super) fn has_packed_weight(&self, packed: &Arc<PackedWeight>) -> bool {
        matches!(&self.weight, LinearWeight::Packed { packed: own, .. } if Arc::ptr_eq(own, packed))
    }

    /// Output features.
    fn out_features(&self) -> Result<usize> {
        Ok(match &self.weight {
            LinearWeight::Dense(weight) => weight.dim(0)?,
            LinearWeight::Packed { packed, .. } => packed.out_features(),
        })
    }

    /// Applies the layer, then `act` if given, to the last dimension of `x`.
    pub(super) fn forward(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, d_in))?;
        let on_cpu_kernels = cpu::kernels_on(x.device(), x.dtype());
        // Whether the matmul added the bias itself (cuBLASLt's epilogue), and whether it also
        // applied `act` (the packed matmul's epilogue does both, each task on its own part).
        let (mut bias_added, mut act_applied) = (false, false);
        let y = match &self.weight {
            LinearWeight::Packed { packed, .. } if on_cpu_kernels => {
                let (x, bias) = (x.contiguous()?, self.bias.contiguous()?);
                let (xs, bias) = (cpu::view(&x)?, cpu::view(&bias)?);
                (bias_added, act_applied) = (true, true);
                cpu::tensor(
                    packed.matmul_bias_act(xs.slice(), rows, bias.slice(), act),
                    &[rows, packed.out_features()],
                )?
            }
            // Forced portable ops (tests) on a packed model.
            LinearWeight::Packed { .. } => x.matmul(&self.weight()?.t()?)?,
            LinearWeight::Dense(weight) if rows <= kernels::FEW_ROWS && on_cpu_kernels => {
                let (x, n) = (x.contiguous()?, weight.dim(0)?);
                let (xs, ws) = (cpu::view(&x)?, cpu::view(weight)?);
                cpu::tensor(
                    kernels::few_rows_matmul(xs.slice(), rows, ws.slice(), n, d_in),
                    &[rows, n],
                )?
            }
            LinearWeight::Dense(weight) if cuda::kernels_on(&x) => {
                match cuda::linear(&x, weight, &self.bias)? {
                    Some(y) => {
                        bias_added = true;
                        y
                    }
                    None => x.matmul(&weight.t()?)?,
                }
            }
            LinearWeight::Dense(weight) => x.matmul(&weight.t()?)?,
        };
        let y = if act_applied {
            y
        } else if cpu::kernels_on(y.device(), y.dtype()) {
            // The matmul result is ours alone: add the bias (and activate) in place, one pass.
            cpu::bias_act_inplace(&y, &self.bias, act)?;
            y
        } else if cuda::kernels_on(&y) {
            cuda::bias_act_inplace(&y, (!bias_added).then_some(&self.bias), act)?;
            y
        } else {
            let y = y.broadcast_add(&self.bias)?;
            match act {
                Some(act) => apply_act(act, &y)?,
                None => y,
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap_or(&mut 0) = self.out_features()?;
        Ok(y.reshape(out_dims)?)
    }
}

impl Linear {
    /// The gradient to the input from the gradient `dy` of the output (before any activation):
    /// `dx = dy W`. Weight gradients are not computed (see [`HookedBert::backward`]).
    pub(super) fn backward(&self, dy: &Tensor) -> Result<Tensor> {
        let dims = dy.dims().to_vec();
        let d_out = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let weight = self.weight_for_backward()?;
        let dx = dy.reshape((rows, d_out))?.matmul(&weight)?;
        let mut in_dims = dims;
        *in_dims.last_mut().unwrap_or(&mut 0) = weight.dim(1)?;
        Ok(dx.reshape(in_dims)?)
    }
}

/// `weight` (`[out, in]`, float32 on the CPU) packed for [`PackedWeight::matmul`].
pub(super) fn pack(weight: &Tensor) -> Result<PackedWeight> {
    let (n, k) = weight.dims2()?;
    Ok(PackedWeight::pack(
        cpu::view(&weight.contiguous()?)?.slice(),
        n,
        k,
    ))
}

/// A packed weight back in its `[out, in]` layout, as a new tensor.
pub(super) fn unpack(packed: &PackedWeight) -> Result<Tensor> {
    cpu::tensor(
        packed.unpack(),
        &[packed.out_features(), packed.in_features()],
    )
}
