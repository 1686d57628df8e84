//! Rotary position embedding (ModernBERT): every head's query and key vectors are turned by
//! angles that grow with their position, so that scores depend on the distance between query
//! and key. Forward (`attn.hook_rot_q`, `attn.hook_rot_k`, after `hook_q`/`hook_k`, as in
//! TransformerLens's `HookedTransformer`) and backward (the turn the other way).

use super::*;

/// `cos` and `sin` of every position's angles, `[pos, d_head / 2]` each, float32.
pub(super) struct RotaryTables {
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

impl RotaryTables {
    /// The angles of `transformers`' default RoPE for positions `0..pos` (padding included):
    /// `position * base^(-2i / d_head)` for pair `i`. Computed in float32 step by step as
    /// `ModernBertRotaryEmbedding` computes them, so that long positions round alike.
    pub(super) fn new(base: f64, d_head: usize, pos: usize) -> Self {
        let half = d_head / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / d_head as f32))
            .collect();
        let angles = (0..pos).flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f));
        let (cos, sin) = angles.map(|a| (a.cos(), a.sin())).unzip();
        Self { cos, sin }
    }

    /// The same angles negated: the rotation that undoes this one, which is also its
    /// transpose (the backward of a rotation).
    pub(super) fn inverse(mut self) -> Self {
        self.sin.iter_mut().for_each(|s| *s = -*s);
        self
    }
}

impl HookedBert {
    /// The rotary tables of block `layer` (its attention type's base), for models with rotary
    /// positions.
    pub(super) fn rotary_tables(&self, layer: usize, pos: usize) -> Option<RotaryTables> {
        let base = self.cfg.rotary_base(layer)?;
        Some(RotaryTables::new(base, self.cfg.d_head, pos))
    }

    /// `x` (`[batch, pos, heads, d_head]`) with each head's halves `(x₁, x₂)` turned to
    /// `(x₁ cos - x₂ sin, x₂ cos + x₁ sin)` (`transformers`' `x * cos + rotate_half(x) * sin`),
    /// computed in float32 whatever the model's dtype, as `transformers` does.
    pub(super) fn rotate(&self, x: &Tensor, tables: &RotaryTables) -> Result<Tensor> {
        let (b, p, h, dh) = x.dims4()?;
        if cpu::kernels_on(x.device(), x.dtype()) {
            let mut data = cpu::view(&x.contiguous()?)?.slice().to_vec();
            kernels::rotary_inplace(&mut data, h * dh, (0, h, dh), p, (&tables.cos, &tables.sin));
            return cpu::tensor(data, &[b, p, h, dh]);
        }
        let half = dh / 2;
        let table = |values: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(values, (1, p, 1, half), x.device())?)
        };
        let (cos, sin) = (table(&tables.cos)?, table(&tables.sin)?);
        let x32 = x.to_dtype(DType::F32)?;
        let (x1, x2) = (x32.narrow(3, 0, half)?, x32.narrow(3, half, half)?);
        let first = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let second = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[first, second], 3)?.to_dtype(x.dtype())?)
    }
}
