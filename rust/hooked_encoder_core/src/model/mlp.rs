//! The MLP of a block: `act(x W_in + b_in) W_out + b_out` (BERT), or gated,
//! `(act(x W_gate) * (x W_in)) W_out` (ModernBERT, TransformerLens's `GatedMLP`): forward and
//! backward.

use super::*;

impl HookedBert {
    /// The MLP on its (normalised) input `x`, through `mlp.hook_pre` (the activation's input;
    /// gated: `x W_gate`), `mlp.hook_pre_linear` (gated only: `x W_in`) and `mlp.hook_post`.
    /// Returns the output, before `hook_mlp_out`.
    pub(super) fn mlp(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let act = self.cfg.act_fn;
        let hooked =
            wants(hooks, at(BlockHook::MlpPre)) || wants(hooks, at(BlockHook::MlpPreLinear));
        let post = if self.cfg.family.gated_mlp() {
            // One matmul for both halves: `[.., 2 d_mlp]`, the activated half first.
            let both = block.mlp_in.forward(x, None)?;
            let m = self.cfg.d_mlp;
            let half = |i: usize| -> Result<Tensor> {
                Ok(both.narrow(D::Minus1, i * m, m)?.contiguous()?)
            };
            if hooked || !cpu::kernels_on(both.device(), both.dtype()) {
                let pre = hook(hooks, at(BlockHook::MlpPre), half(0)?)?;
                let linear = hook(hooks, at(BlockHook::MlpPreLinear), half(1)?)?;
                (apply_act(act, &pre)? * linear)?
            } else {
                let both = both.contiguous()?;
                let mut dims = both.dims().to_vec();
                *dims.last_mut().unwrap_or(&mut 0) = m;
                let gated = kernels::gated_activation(cpu::view(&both)?.slice(), m, act);
                cpu::tensor(gated, &dims)?
            }
        } else if hooked {
            let pre = block.mlp_in.forward(x, None)?;
            apply_act(act, &hook(hooks, at(BlockHook::MlpPre), pre)?)?
        } else {
            // The bias and the activation in the matmul's pass over its result.
            block.mlp_in.forward(x, Some(act))?
        };
        let post = hook(hooks, at(BlockHook::MlpPost), post)?;
        block.mlp_out.forward(&post, None)
    }

    /// The gradient to the MLP's input from the gradient `d_out` of its output (that of
    /// `hook_mlp_out`), through the gradients at `hook_post`, `hook_pre_linear` and `hook_pre`.
    pub(super) fn mlp_backward(
        &self,
        layer: usize,
        block: &Block,
        d_out: &Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let act = self.cfg.act_fn;
        let d_post = grad_hook(
            hooks,
            at(BlockHook::MlpPost),
            block.mlp_out.backward(d_out)?,
        )?;
        let pre = tape.take(at(BlockHook::MlpPre))?.after;
        if !self.cfg.family.gated_mlp() {
            let d_pre = act_backward(act, &pre, &d_post)?;
            let d_pre = grad_hook(hooks, at(BlockHook::MlpPre), d_pre)?;
            return block.mlp_in.backward(&d_pre);
        }
        // post = act(pre) * linear
        let linear = tape.take(at(BlockHook::MlpPreLinear))?.after;
        let d_linear = (apply_act(act, &pre)? * &d_post)?;
        let d_pre = act_backward(act, &pre, &(d_post * linear)?)?;
        drop(pre);
        let d_linear = grad_hook(hooks, at(BlockHook::MlpPreLinear), d_linear)?;
        let d_pre = grad_hook(hooks, at(BlockHook::MlpPre), d_pre)?;
        block
            .mlp_in
            .backward(&Tensor::cat(&[d_pre, d_linear], D::Minus1)?)
    }
}
