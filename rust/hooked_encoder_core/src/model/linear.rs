//! A dense layer `y = x Wᵀ + b`: its forward, and its backward (the gradient to its input).

use super::*;

/// A dense layer `y = x Wᵀ + b` with `W` stored `[out, in]` as in Hugging Face.
pub(super) struct Linear {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
}

impl Linear {
    /// Applies the layer, then `act` if given, to the last dimension of `x`.
    pub(super) fn forward(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, d_in))?;
        let y = if rows <= kernels::FEW_ROWS && cpu::kernels_on(x.device(), x.dtype()) {
            let (x, n) = (x.contiguous()?, self.weight.dim(0)?);
            let (xs, ws) = (cpu::view(&x)?, cpu::view(&self.weight)?);
            cpu::tensor(
                kernels::few_rows_matmul(xs.slice(), rows, ws.slice(), n, d_in),
                &[rows, n],
            )?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        let y = if cpu::kernels_on(y.device(), y.dtype()) {
            // The matmul result is ours alone: add the bias (and activate) in place, one pass.
            cpu::bias_act_inplace(&y, &self.bias, act)?;
            y
        } else if cuda::kernels_on(&y) {
            cuda::bias_act_inplace(&y, &self.bias, act)?;
            y
        } else {
            let y = y.broadcast_add(&self.bias)?;
            match act {
                Some(act) => apply_act(act, &y)?,
                None => y,
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap_or(&mut 0) = self.weight.dim(0)?;
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
        let dx = dy.reshape((rows, d_out))?.matmul(&self.weight)?;
        let mut in_dims = dims;
        *in_dims.last_mut().unwrap_or(&mut 0) = self.weight.dim(1)?;
        Ok(dx.reshape(in_dims)?)
    }
}
