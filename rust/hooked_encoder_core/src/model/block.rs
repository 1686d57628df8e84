//! One post-LN BERT block (attention, then MLP): forward and backward.

use super::*;

pub(super) struct Block {
    /// Query, key and value projections stacked: weight `[3 * n_heads * d_head, d_model]`.
    pub(super) qkv: Linear,
    pub(super) attn_out: Linear,
    pub(super) ln1: LayerNorm,
    pub(super) mlp_in: Linear,
    pub(super) mlp_out: Linear,
    pub(super) ln2: LayerNorm,
    pub(super) heads: Option<HeadWeights>,
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
    /// One post-LN block, as TransformerLens's `BertBlock`.
    pub(super) fn block(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let resid_pre = hook(hooks, at(BlockHook::ResidPre), x)?;
        let attn_out = self.attention(layer, block, &resid_pre, mask, hooks)?;
        let attn_out = hook(hooks, at(BlockHook::AttnOut), attn_out)?;
        let resid_mid = hook(hooks, at(BlockHook::ResidMid), add(&resid_pre, &attn_out)?)?;
        let mlp_in = if self.cfg.use_hook_mlp_in {
            hook(hooks, at(BlockHook::MlpIn), resid_mid)?
        } else {
            resid_mid
        };
        let normalized_mid = self.layer_norm(
            &mlp_in,
            &block.ln1,
            at(BlockHook::Ln1Scale),
            at(BlockHook::Ln1Normalized),
            hooks,
        )?;
        let post = if wants(hooks, at(BlockHook::MlpPre)) {
            let pre = block.mlp_in.forward(&normalized_mid, None)?;
            let pre = hook(hooks, at(BlockHook::MlpPre), pre)?;
            apply_act(self.cfg.act_fn, &pre)?
        } else {
            block
                .mlp_in
                .forward(&normalized_mid, Some(self.cfg.act_fn))?
        };
        let post = hook(hooks, at(BlockHook::MlpPost), post)?;
        let mlp_out = block.mlp_out.forward(&post, None)?;
        let mlp_out = hook(hooks, at(BlockHook::MlpOut), mlp_out)?;
        let resid_post = hook(
            hooks,
            at(BlockHook::ResidPost),
            add(&normalized_mid, &mlp_out)?,
        )?;
        let normalized = self.layer_norm(
            &resid_post,
            &block.ln2,
            at(BlockHook::Ln2Scale),
            at(BlockHook::Ln2Normalized),
            hooks,
        )?;
        hook(hooks, at(BlockHook::NormalizedResidPost), normalized)
    }
}

impl HookedBert {
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
        let d_post = grad_hook(
            hooks,
            at(BlockHook::MlpPost),
            block.mlp_out.backward(&d_mlp_out)?,
        )?;
        let pre = tape.take(at(BlockHook::MlpPre))?.after;
        let d_pre = act_backward(self.cfg.act_fn, &pre, &d_post)?;
        drop(pre);
        let d_pre = grad_hook(hooks, at(BlockHook::MlpPre), d_pre)?;
        let d_normalized_mid = (d_resid_post + block.mlp_in.backward(&d_pre)?)?;
        let d_mlp_in = self.layer_norm_backward(
            &d_normalized_mid,
            &block.ln1,
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
}
