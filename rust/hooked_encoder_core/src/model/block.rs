//! One transformer block (attention, then MLP), forward and backward: BERT's post-LN block,
//! which normalises each sub-block's output (TransformerLens's `BertBlock`), or a pre-LN block,
//! which normalises each sub-block's input (`HookedTransformer`'s `TransformerBlock`;
//! ModernBERT). The family says which ([`Family::pre_layer_norm`]).

use super::*;

pub(super) struct Block {
    /// Query, key and value projections stacked: weight `[3 * n_heads * d_head, d_model]`.
    pub(super) qkv: Linear,
    pub(super) attn_out: Linear,
    /// `ln1`: post-LN, the norm after attention; pre-LN, the norm before it (absent from
    /// ModernBERT's first layer, whose input is the normalised embedding).
    pub(super) ln1: Option<LayerNorm>,
    /// `[d_mlp, d_model]`, or for a gated MLP `[2 d_mlp, d_model]` (the activated half first).
    pub(super) mlp_in: Linear,
    pub(super) mlp_out: Linear,
    /// `ln2`: post-LN, the norm after the MLP; pre-LN, the norm before it.
    pub(super) ln2: LayerNorm,
    pub(super) heads: Option<HeadWeights>,
}

impl Block {
    /// `ln1` of a post-LN block, which always has one.
    fn post_attention_norm(&self) -> Result<&LayerNorm> {
        self.ln1
            .as_ref()
            .ok_or_else(|| Error::Config("a post-LN block lacks its attention norm".into()))
    }
}

/// `x` (`[batch, pos, ...]`) at `position` only (`[batch, 1, ...]`), or all of it.
pub(super) fn at_position(x: &Tensor, position: Option<usize>) -> Result<Tensor> {
    Ok(match position {
        Some(m) => x.narrow(1, m, 1)?.contiguous()?,
        None => x.clone(),
    })
}

/// `a + b` for tensors of one shape.
pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu::kernels_on(a.device(), a.dtype()) && a.dims() == b.dims() {
        let (a_c, b_c) = (a.contiguous()?, b.contiguous()?);
        let sum = kernels::add(cpu::view(&a_c)?.slice(), cpu::view(&b_c)?.slice());
        return cpu::tensor(sum, a.dims());
    }
    Ok((a + b)?)
}

impl HookedBert {
    /// Block `layer` on its input `x`, every activation through its hook point. With
    /// `position`, everything after attention is computed at that position alone and the
    /// output is `[batch, 1, d_model]` (attention still reads every position): for a caller
    /// that reads one position of the last block's output.
    pub(super) fn block(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        mask: &Mask,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        if self.cfg.family.pre_layer_norm() {
            self.pre_ln_block(layer, block, x, mask, position, hooks)
        } else {
            self.post_ln_block(layer, block, x, mask, position, hooks)
        }
    }

    /// The gradient to block `layer`'s input from the gradient `d_out` of its output, in the
    /// reverse order of [`Self::block`], every hook point's gradient going through `hooks`.
    /// Takes (and so frees) the block's saved activations from `tape`.
    pub(super) fn block_backward(
        &self,
        layer: usize,
        block: &Block,
        d_out: Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        if self.cfg.family.pre_layer_norm() {
            self.pre_ln_block_backward(layer, block, d_out, tape, hooks)
        } else {
            self.post_ln_block_backward(layer, block, d_out, tape, hooks)
        }
    }

    /// One post-LN block, as TransformerLens's `BertBlock`.
    fn post_ln_block(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        mask: &Mask,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let resid_pre = hook(hooks, at(BlockHook::ResidPre), x)?;
        let attn_out = self.attention(layer, block, &resid_pre, mask, position, hooks)?;
        let resid_pre = at_position(&resid_pre, position)?;
        let attn_out = hook(hooks, at(BlockHook::AttnOut), attn_out)?;
        let mid_points: &[HookPoint] = if self.cfg.use_hook_mlp_in {
            &[at(BlockHook::ResidMid), at(BlockHook::MlpIn)]
        } else {
            &[at(BlockHook::ResidMid)]
        };
        let normalized_mid = self.add_layer_norm(
            &resid_pre,
            &attn_out,
            mid_points,
            block.post_attention_norm()?,
            [at(BlockHook::Ln1Scale), at(BlockHook::Ln1Normalized)],
            hooks,
        )?;
        let mlp_out = self.mlp(layer, block, &normalized_mid, hooks)?;
        let mlp_out = hook(hooks, at(BlockHook::MlpOut), mlp_out)?;
        let normalized = self.add_layer_norm(
            &normalized_mid,
            &mlp_out,
            &[at(BlockHook::ResidPost)],
            &block.ln2,
            [at(BlockHook::Ln2Scale), at(BlockHook::Ln2Normalized)],
            hooks,
        )?;
        hook(hooks, at(BlockHook::NormalizedResidPost), normalized)
    }

    fn post_ln_block_backward(
        &self,
        layer: usize,
        block: &Block,
        d_out: Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let d_normalized = grad_hook(hooks, at(BlockHook::NormalizedResidPost), d_out)?;
        let d_resid_post = self.layer_norm_backward(
            &d_normalized,
            &block.ln2,
            at(BlockHook::Ln2Scale),
            at(BlockHook::Ln2Normalized),
            tape,
            hooks,
        )?;
        let d_resid_post = grad_hook(hooks, at(BlockHook::ResidPost), d_resid_post)?;
        // resid_post = normalized_mid + mlp_out: both get d_resid_post.
        let d_mlp_out = grad_hook(hooks, at(BlockHook::MlpOut), d_resid_post.clone())?;
        let d_through_mlp = self.mlp_backward(layer, block, &d_mlp_out, tape, hooks)?;
        let d_normalized_mid = (d_resid_post + d_through_mlp)?;
        let d_mlp_in = self.layer_norm_backward(
            &d_normalized_mid,
            block.post_attention_norm()?,
            at(BlockHook::Ln1Scale),
            at(BlockHook::Ln1Normalized),
            tape,
            hooks,
        )?;
        let d_resid_mid = if self.cfg.use_hook_mlp_in {
            grad_hook(hooks, at(BlockHook::MlpIn), d_mlp_in)?
        } else {
            d_mlp_in
        };
        let d_resid_mid = grad_hook(hooks, at(BlockHook::ResidMid), d_resid_mid)?;
        // resid_mid = resid_pre + attn_out.
        let d_attn_out = grad_hook(hooks, at(BlockHook::AttnOut), d_resid_mid.clone())?;
        let d_through_attention =
            self.attention_backward(layer, block, &d_attn_out, tape, hooks)?;
        grad_hook(
            hooks,
            at(BlockHook::ResidPre),
            (d_resid_mid + d_through_attention)?,
        )
    }

    /// One pre-LN block, as `HookedTransformer`'s `TransformerBlock`: `ln1` (where the block
    /// has it) before attention, `ln2` before the MLP, and the residual stream never
    /// normalised.
    fn pre_ln_block(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        mask: &Mask,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let resid_pre = hook(hooks, at(BlockHook::ResidPre), x)?;
        let attn_in = match &block.ln1 {
            Some(ln) => self.layer_norm(
                &resid_pre,
                ln,
                at(BlockHook::Ln1Scale),
                at(BlockHook::Ln1Normalized),
                hooks,
            )?,
            None => resid_pre.clone(),
        };
        let attn_out = self.attention(layer, block, &attn_in, mask, position, hooks)?;
        drop(attn_in);
        let resid_pre = at_position(&resid_pre, position)?;
        let attn_out = hook(hooks, at(BlockHook::AttnOut), attn_out)?;
        let resid_mid = hook(hooks, at(BlockHook::ResidMid), add(&resid_pre, &attn_out)?)?;
        // As in TransformerLens, an edit at hook_mlp_in reaches the MLP, not the residual.
        let mlp_in = if self.cfg.use_hook_mlp_in {
            hook(hooks, at(BlockHook::MlpIn), resid_mid.clone())?
        } else {
            resid_mid.clone()
        };
        let normalized = self.layer_norm(
            &mlp_in,
            &block.ln2,
            at(BlockHook::Ln2Scale),
            at(BlockHook::Ln2Normalized),
            hooks,
        )?;
        let mlp_out = self.mlp(layer, block, &normalized, hooks)?;
        let mlp_out = hook(hooks, at(BlockHook::MlpOut), mlp_out)?;
        hook(hooks, at(BlockHook::ResidPost), add(&resid_mid, &mlp_out)?)
    }

    fn pre_ln_block_backward(
        &self,
        layer: usize,
        block: &Block,
        d_out: Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        // resid_post = resid_mid + mlp_out: both get its gradient.
        let d_resid_post = grad_hook(hooks, at(BlockHook::ResidPost), d_out)?;
        let d_mlp_out = grad_hook(hooks, at(BlockHook::MlpOut), d_resid_post.clone())?;
        let d_normalized = self.mlp_backward(layer, block, &d_mlp_out, tape, hooks)?;
        let d_mlp_in = self.layer_norm_backward(
            &d_normalized,
            &block.ln2,
            at(BlockHook::Ln2Scale),
            at(BlockHook::Ln2Normalized),
            tape,
            hooks,
        )?;
        let d_mlp_in = if self.cfg.use_hook_mlp_in {
            grad_hook(hooks, at(BlockHook::MlpIn), d_mlp_in)?
        } else {
            d_mlp_in
        };
        let d_resid_mid = grad_hook(hooks, at(BlockHook::ResidMid), (d_resid_post + d_mlp_in)?)?;
        // resid_mid = resid_pre + attn_out.
        let d_attn_out = grad_hook(hooks, at(BlockHook::AttnOut), d_resid_mid.clone())?;
        let d_attn_in = self.attention_backward(layer, block, &d_attn_out, tape, hooks)?;
        let d_through_attention = match &block.ln1 {
            Some(ln) => self.layer_norm_backward(
                &d_attn_in,
                ln,
                at(BlockHook::Ln1Scale),
                at(BlockHook::Ln1Normalized),
                tape,
                hooks,
            )?,
            None => d_attn_in,
        };
        grad_hook(
            hooks,
            at(BlockHook::ResidPre),
            (d_resid_mid + d_through_attention)?,
        )
    }
}
