//! The heads after the last block (MLM head, unembedding, pooler, NSP head, ELECTRA's
//! discriminator): forward and backward.

use super::*;

pub(super) struct MlmHead {
    pub(super) dense: Linear,
    pub(super) ln: LayerNorm,
    /// The unembedding `[d_vocab, d_model]` and its bias.
    pub(super) decoder: Linear,
}

/// An ELECTRA discriminator's replaced-token head: `dense`, the config's activation, then one
/// logit per token.
pub(super) struct Discriminator {
    pub(super) dense: Linear,
    /// `[1, d_model]`.
    pub(super) prediction: Linear,
}

impl HookedBert {
    /// The activation inside the MLM head (the family's; see [`Family::mlm_head_act`]).
    fn mlm_head_act(&self) -> Activation {
        self.cfg.family.mlm_head_act(self.cfg.act_fn)
    }

    /// Runs one head on its own input (TransformerLens's `model.mlm_head(x)`, `model.unembed(x)`,
    /// `model.pooler(x)`, `model.nsp_head(x)`), with its hooks.
    pub fn apply(&self, part: Part, x: Tensor, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let (needs, rank, width) = match part {
            Part::MlmHead | Part::Discriminator => (Output::Logits, 3, self.cfg.d_model),
            // The unembedding reads the MLM head's output, as wide as the embeddings.
            Part::Unembed => (Output::Logits, 3, self.cfg.embed_width()),
            Part::Pooler => (Output::NextSentence, 3, self.cfg.d_model),
            Part::NspHead => (Output::NextSentence, 2, self.cfg.d_model),
        };
        self.check_head(needs)?;
        let has = match part {
            Part::MlmHead | Part::Unembed => self.mlm_head.is_some(),
            Part::Discriminator => self.discriminator.is_some(),
            Part::Pooler | Part::NspHead => true, // check_head refused what is missing
        };
        if !has {
            return Err(Error::MissingHead(format!(
                "this checkpoint has no {part:?} head"
            )));
        }
        if x.rank() != rank || x.dims().last() != Some(&width) || !x.dtype().is_float() {
            let what = if rank == 2 {
                format!("[batch, {width}]")
            } else {
                format!("[batch, pos, {width}]")
            };
            return Err(Error::Input(format!(
                "{part:?} takes a floating-point {what} input, got {:?} {:?}",
                x.dims(),
                x.dtype()
            )));
        }
        let x = self.own(&x)?;
        match (part, &self.mlm_head, &self.pooler, &self.nsp_head) {
            (Part::MlmHead, Some(head), _, _) => {
                let x = head.dense.forward(&x, Some(self.mlm_head_act()))?;
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
            (Part::Discriminator, ..) => {
                let head = self
                    .discriminator
                    .as_ref()
                    .ok_or_else(missing_head_weights)?;
                let hidden = head.dense.forward(&x, Some(self.cfg.act_fn))?;
                let logits = head.prediction.forward(&hidden, None)?.squeeze(D::Minus1)?;
                hook(hooks, HookPoint::DiscriminatorOut, logits)
            }
            _ => Err(missing_head_weights()),
        }
    }
}

impl HookedBert {
    /// The gradient to a head's input (the residual stream saved in the tape) through its first
    /// layer, `act(dense(x))`, from the gradient `d_out` of that layer's output. The
    /// pre-activation has no hook point: it is recomputed (one matmul) rather than kept.
    fn dense_act_backward(
        dense: &Linear,
        act: Activation,
        d_out: &Tensor,
        tape: &mut Tape,
    ) -> Result<Tensor> {
        let x = tape
            .head_input
            .take()
            .ok_or_else(|| missing_saved("the head input"))?;
        let pre = dense.forward(&x, None)?;
        dense.backward(&act_backward(act, &pre, d_out)?)
    }

    /// The gradient to the last residual stream (the heads' input, `[batch, pos, d_model]`)
    /// from the gradient `d_out` of `output`.
    pub(super) fn head_backward(
        &self,
        output: Output,
        d_out: Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        match (output, &self.mlm_head, &self.pooler, &self.nsp_head) {
            (Output::Residual, _, _, _) => Ok(d_out),
            (Output::Logits, None, _, _) => {
                let head = self
                    .discriminator
                    .as_ref()
                    .ok_or_else(missing_head_weights)?;
                let d_logits = grad_hook(hooks, HookPoint::DiscriminatorOut, d_out)?;
                // logits = hidden · w + b per token: d_hidden = d_logits w.
                let d_hidden = head.prediction.backward(&d_logits.unsqueeze(D::Minus1)?)?;
                Self::dense_act_backward(&head.dense, self.cfg.act_fn, &d_hidden, tape)
            }
            (Output::Logits, Some(head), _, _) => {
                let d_logits = grad_hook(hooks, HookPoint::UnembedOut, d_out)?;
                let d_in = grad_hook(
                    hooks,
                    HookPoint::UnembedIn,
                    head.decoder.backward(&d_logits)?,
                )?;
                let d_act = self.layer_norm_backward(
                    &d_in,
                    &head.ln,
                    HookPoint::MlmLnScale,
                    HookPoint::MlmLnNormalized,
                    tape,
                    hooks,
                )?;
                Self::dense_act_backward(&head.dense, self.mlm_head_act(), &d_act, tape)
            }
            (Output::NextSentence, _, Some(pooler), Some(nsp_head)) => {
                let d_logits = grad_hook(hooks, HookPoint::NspOut, d_out)?;
                let d_pooled =
                    grad_hook(hooks, HookPoint::PoolerOut, nsp_head.backward(&d_logits)?)?;
                // pooled = tanh(dense(x[:, 0])): tanh' = 1 - tanh².
                let pooled = tape.take(HookPoint::PoolerOut)?.before;
                let d_first = pooler.backward(&(d_pooled * (1.0 - pooled.sqr()?)?)?)?;
                let (b, d) = d_first.dims2()?;
                let p = tape.pos;
                let d_first = d_first.unsqueeze(1)?;
                if p == 1 {
                    return Ok(d_first);
                }
                let rest = Tensor::zeros((b, p - 1, d), d_first.dtype(), d_first.device())?;
                Ok(Tensor::cat(&[&d_first, &rest], 1)?)
            }
            _ => Err(missing_head_weights()),
        }
    }
}
