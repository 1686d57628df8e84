//! The heads after the last block (MLM head, unembedding, pooler, NSP head): forward and
//! backward.

use super::*;

pub(super) struct MlmHead {
    pub(super) dense: Linear,
    pub(super) ln: LayerNorm,
    /// The unembedding `[d_vocab, d_model]` and its bias.
    pub(super) decoder: Linear,
}

impl HookedBert {
    /// Runs one head on its own input (TransformerLens's `model.mlm_head(x)`, `model.unembed(x)`,
    /// `model.pooler(x)`, `model.nsp_head(x)`), with its hooks.
    pub fn apply(&self, part: Part, x: Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let (needs, what) = match part {
            Part::MlmHead | Part::Unembed => (Output::Logits, "[batch, pos, d_model]"),
            Part::Pooler => (Output::NextSentence, "[batch, pos, d_model]"),
            Part::NspHead => (Output::NextSentence, "[batch, d_model]"),
        };
        self.check_head(needs)?;
        let rank = if part == Part::NspHead { 2 } else { 3 };
        if x.rank() != rank || x.dims().last() != Some(&self.cfg.d_model) || !x.dtype().is_float() {
            return Err(Error::Input(format!(
                "{part:?} takes a floating-point {what} input, got {:?} {:?}",
                x.dims(),
                x.dtype()
            )));
        }
        let x = self.own(&x)?;
        match (part, &self.mlm_head, &self.pooler, &self.nsp_head) {
            (Part::MlmHead, Some(head), _, _) => {
                let x = head.dense.forward(&x, Some(self.cfg.act_fn))?;
                self.layer_norm(
                    &x,
                    &head.ln,
                    HookPoint::MlmLnScale,
                    HookPoint::MlmLnNormalized,
                    hooks,
                )
            }
            (Part::Unembed, Some(head), _, _) => {
                let x = hook(hooks, HookPoint::UnembedIn, x)?;
                let logits = head.decoder.forward(&x, None)?;
                hook(hooks, HookPoint::UnembedOut, logits)
            }
            (Part::Pooler, _, Some(pooler), _) => {
                let first = x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
                hook(
                    hooks,
                    HookPoint::PoolerOut,
                    pooler.forward(&first, None)?.tanh()?,
                )
            }
            (Part::NspHead, _, _, Some(nsp_head)) => hook(
                hooks,
                HookPoint::NspOut,
                nsp_head.forward(&x.contiguous()?, None)?,
            ),
            _ => Err(missing_head_weights()),
        }
    }
}
