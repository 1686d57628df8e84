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

/// The gradient through `act` at pre-activation `pre`: `d_post * act'(pre)`, in Candle ops.
pub(super) fn act_backward(act: Activation, pre: &Tensor, d_post: &Tensor) -> Result<Tensor> {
    let slope = match act {
        Activation::Gelu => {
            // gelu(x) = x Φ(x), so gelu'(x) = Φ(x) + x φ(x).
            let cdf = ((pre / std::f64::consts::SQRT_2)?.erf()? + 1.0)? * 0.5;
            let pdf = ((pre.sqr()? * -0.5)?.exp()?
                * (0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2))?;
            (cdf? + (pre * pdf)?)?
        }
        Activation::GeluTanh => {
            // gelu(x) = x (1 + tanh(u)) / 2 with u = c (x + 0.044715 x³), c = sqrt(2 / π).
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = ((pre + (pre.powf(3.0)? * 0.044715)?)? * c)?;
            let t = u.tanh()?;
            let du = ((pre.sqr()? * (3.0 * 0.044715))? + 1.0)? * c;
            let one_minus_t2 = (1.0 - t.sqr()?)?;
            (((t + 1.0)? * 0.5)? + (((pre * one_minus_t2)? * du?)? * 0.5)?)?
        }
        Activation::Relu => pre.gt(0.0)?.to_dtype(pre.dtype())?,
    };
    Ok((d_post * slope)?)
}
