//! TransformerLens's LayerNorm with its `hook_scale` and `hook_normalized`: forward and
//! backward.

use super::*;

pub(super) struct LayerNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
}

impl HookedBert {
    /// TransformerLens's `LayerNorm`: centre, divide by `sqrt(mean(x²) + eps)` (hooked as
    /// `hook_scale`), hook the result as `hook_normalized`, then apply the affine map. Two
    /// passes over the data, so near-constant rows do not lose precision.
    pub(super) fn layer_norm(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let hooked = wants(hooks, scale_point) || wants(hooks, normalized_point);
        if !self.uses_cpu_kernels() {
            if cuda::kernels_on(x) && !hooked {
                if let Some(out) = cuda::layer_norm(x, None, &ln.weight, &ln.bias, self.cfg.eps)? {
                    return Ok(out);
                }
            }
            if cuda::kernels_on(x) {
                if let Some((scale, normalized)) = cuda::layer_norm_parts(x, self.cfg.eps)? {
                    let original_scale = scale.id();
                    let scale = hook(hooks, scale_point, scale)?;
                    let normalized = if scale.id() == original_scale {
                        normalized
                    } else {
                        // A hook replaced the scale: divide by the new one.
                        let x = x.to_dtype(DType::F32)?;
                        x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
                            .broadcast_div(&scale.to_dtype(DType::F32)?)?
                            .to_dtype(self.dtype)?
                    };
                    let normalized = hook(hooks, normalized_point, normalized)?;
                    return cuda::scale_shift(&normalized, &ln.weight, &ln.bias);
                }
            }
            return self.layer_norm_generic(x, ln, scale_point, normalized_point, hooks);
        }
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let (weight, bias) = (cpu::view(&ln.weight)?, cpu::view(&ln.bias)?);
        let eps = self.cfg.eps as f32;
        if !hooked {
            let out =
                kernels::layer_norm(cpu::view(&x)?.slice(), weight.slice(), bias.slice(), eps);
            return cpu::tensor(out, &dims);
        }
        let (scale, normalized) =
            kernels::layer_norm_parts(cpu::view(&x)?.slice(), ln.weight.dim(0)?, eps);
        let mut scale_dims = dims.clone();
        *scale_dims.last_mut().unwrap_or(&mut 0) = 1;
        let scale = cpu::tensor(scale, &scale_dims)?;
        let original_scale = scale.id();
        let scale = hook(hooks, scale_point, scale)?;
        let normalized = if scale.id() == original_scale {
            cpu::tensor(normalized, &dims)?
        } else {
            // A hook replaced the scale: divide by the new one.
            x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
                .broadcast_div(&scale)?
        };
        let normalized = hook(hooks, normalized_point, normalized)?.contiguous()?;
        let out = kernels::affine(
            cpu::view(&normalized)?.slice(),
            weight.slice(),
            bias.slice(),
        );
        cpu::tensor(out, &dims)
    }

    /// `layer_norm(residual + x)` with the sum passed through `sum_points` first (the residual
    /// stream's hook points between the add and the norm), the norm's own points being its
    /// scale and normalized values. When none of those points is wanted, the add and the norm
    /// run as one kernel (CPU or GPU).
    pub(super) fn add_layer_norm(
        &self,
        residual: &Tensor,
        x: &Tensor,
        sum_points: &[HookPoint],
        ln: &LayerNorm,
        [scale_point, normalized_point]: [HookPoint; 2],
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let hooked = [scale_point, normalized_point]
            .iter()
            .chain(sum_points)
            .any(|point| wants(hooks, *point));
        if !hooked && self.uses_cpu_kernels() && residual.dims() == x.dims() {
            let (residual, x) = (residual.contiguous()?, x.contiguous()?);
            let (weight, bias) = (cpu::view(&ln.weight)?, cpu::view(&ln.bias)?);
            let out = kernels::add_layer_norm(
                cpu::view(&residual)?.slice(),
                cpu::view(&x)?.slice(),
                weight.slice(),
                bias.slice(),
                self.cfg.eps as f32,
            );
            return cpu::tensor(out, x.dims());
        }
        if !hooked && cuda::kernels_on(x) && residual.dims() == x.dims() {
            let fused = cuda::layer_norm(residual, Some(x), &ln.weight, &ln.bias, self.cfg.eps)?;
            if let Some(out) = fused {
                return Ok(out);
            }
        }
        let mut sum = block::add(residual, x)?;
        for point in sum_points {
            sum = hook(hooks, *point, sum)?;
        }
        self.layer_norm(&sum, ln, scale_point, normalized_point, hooks)
    }

    /// [`Self::layer_norm`] in plain Candle ops, for devices without our kernels.
    pub(super) fn layer_norm_generic(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        // Statistics in float32 whatever the model's dtype (PyTorch's LayerNorm does the same
        // for half precision); the hooked values are stored in the model's dtype.
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let scale = centred
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, self.cfg.eps)?
            .sqrt()?;
        let scale = hook(hooks, scale_point, scale.to_dtype(self.dtype)?)?;
        let normalized = centred.broadcast_div(&scale.to_dtype(DType::F32)?)?;
        let normalized = hook(hooks, normalized_point, normalized.to_dtype(self.dtype)?)?;
        Ok(normalized
            .broadcast_mul(&ln.weight)?
            .broadcast_add(&ln.bias)?)
    }
}

impl HookedBert {
    /// The gradient to the input of [`Self::layer_norm`] from the gradient `dy` of its output,
    /// showing the gradients at its two hook points to `hooks` on the way.
    ///
    /// With `n = c / s` (`c` the centred input, `s = sqrt(mean(c²) + eps)` the scale, both
    /// possibly replaced by forward hooks): `ds = -Σ dn·n / s`, `dc = dn / s + ds · c / (d s)`,
    /// `dx = dc - mean(dc)`.
    pub(super) fn layer_norm_backward(
        &self,
        dy: &Tensor,
        ln: &LayerNorm,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let scale = tape.take(scale_point)?;
        let normalized = tape.take(normalized_point)?;
        // The scale the normalisation divided by (after any forward hook), and the one it
        // computed from the data (before).
        let (computed_scale, used_scale) = (&scale.before, &scale.after);
        let n = &normalized.before;
        let dn = grad_hook(hooks, normalized_point, dy.broadcast_mul(&ln.weight)?)?;
        let d_scale = ((&dn * n)?.sum_keepdim(D::Minus1)?.neg()? / used_scale)?;
        let d_scale = grad_hook(hooks, scale_point, d_scale)?;
        let centred = n.broadcast_mul(used_scale)?;
        // The normalised width: d_model, or d_embed for ELECTRA's embedding and head norms.
        let d = ln.weight.dim(0)? as f64;
        let d_centred = (dn.broadcast_div(used_scale)?
            + centred.broadcast_mul(&(d_scale / (computed_scale * d)?)?)?)?;
        Ok(d_centred.broadcast_sub(&d_centred.mean_keepdim(D::Minus1)?)?)
    }
}
