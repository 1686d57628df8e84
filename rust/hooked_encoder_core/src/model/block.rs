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
