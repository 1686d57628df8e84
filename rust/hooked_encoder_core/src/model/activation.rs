//! Elementwise activation functions: forward and backward.

use super::*;

pub(super) fn apply_act(act: Activation, x: &Tensor) -> Result<Tensor> {
    if cpu::kernels_on(x.device(), x.dtype()) {
        let x = x.contiguous()?;
        return cpu::tensor(kernels::activation(cpu::view(&x)?.slice(), act), x.dims());
    }
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
}
