//! The backward pass: gradients of a metric with respect to every activation (hook point),
//! written op by op beside each op's forward (`linear.rs`, `layer_norm.rs`, `attention.rs`,
//! `rotary.rs`, `mlp.rs`, `block.rs`, `embed.rs`, `heads.rs`, `activation.rs`), the way llm.c
//! writes GPT-2's.
//!
//! [`HookedBert::run_for_backward`] runs the forward pass keeping only what the backward needs
//! (q, k (rotated, with rotary positions), v, the attention pattern, the MLP pre-activations
//! and the LayerNorms' scales and normalized values, all of them hook points) in a [`Tape`]; [`HookedBert::backward`] then
//! walks the model in reverse from `d metric / d output`, freeing each block's saved
//! activations as it passes it. Weight gradients are not computed: this is not a training
//! library.

use std::collections::HashMap;

use super::*;
use crate::hooks::HookSet;

/// An activation the backward needs, as computed (`before` the caller's forward hook) and as
/// used downstream (`after` it). Without an editing hook both are the same tensor.
pub(super) struct Saved {
    pub(super) before: Tensor,
    pub(super) after: Tensor,
}

/// What a forward pass kept for its backward pass ([`HookedBert::run_for_backward`]).
pub struct Tape {
    saved: HashMap<HookPoint, Saved>,
    /// The blocks that ran, `first..stop`.
    first: usize,
    stop: usize,
    output: Output,
    from_tokens: bool,
    pub(super) pos: usize,
    /// The residual stream entering the MLM head (its dense layer is recomputed).
    pub(super) head_input: Option<Tensor>,
    /// Whether the pass ran a pre-LN model's final norm.
    final_norm: bool,
    /// The gradient at `hook_rel_pos_bias` summed over the blocks passed so far.
    pub(super) d_relative_bias: Option<Tensor>,
    output_dims: Vec<usize>,
}

impl Tape {
    /// Removes and returns what was saved at `point`.
    pub(super) fn take(&mut self, point: HookPoint) -> Result<Saved> {
        self.saved
            .remove(&point)
            .ok_or_else(|| missing_saved(&point.name()))
    }

    /// The shape of the forward's output, which the gradient fed to the backward must have.
    pub fn output_dims(&self) -> &[usize] {
        &self.output_dims
    }
}

pub(super) fn missing_saved(what: &str) -> Error {
    Error::Input(format!(
        "the backward pass found no saved activation for {what}; was this tape made by \
         run_for_backward on this model?"
    ))
}

/// Wraps the caller's hooks during a forward pass to save, in addition, what the backward
/// needs.
struct Saver<'a> {
    inner: &'a mut dyn Hooks,
    save: HookSet,
    saved: HashMap<HookPoint, Saved>,
}

impl Hooks for Saver<'_> {
    fn wants(&self, point: HookPoint) -> bool {
        self.save.contains(point) || self.inner.wants(point)
    }

    fn call(&mut self, point: HookPoint, activation: Tensor) -> Result<Tensor> {
        let before = self.save.contains(point).then(|| activation.clone());
        let after = if self.inner.wants(point) {
            self.inner.call(point, activation)?
        } else {
            activation
        };
        if let Some(before) = before {
            let saved = Saved {
                before,
                after: after.clone(),
            };
            self.saved.insert(point, saved);
        }
        Ok(after)
    }

    fn interrupted(&self) -> bool {
        self.inner.interrupted()
    }
}

impl HookedBert {
    /// [`Self::run`], keeping what [`Self::backward`] needs. Returns the output and the tape.
    /// Float32 only (on any device): the backward refuses half precision rather than lose
    /// the gradients' precision silently.
    pub fn run_for_backward(
        &self,
        start: Start<'_>,
        stop_at_layer: Option<usize>,
        output: Output,
        hooks: &mut dyn Hooks,
    ) -> Result<(Tensor, Tape)> {
        if self.dtype != DType::F32 {
            return Err(Error::Input(format!(
                "gradients are computed in float32 only, and this model is {:?}; \
                 use a float32 copy of it",
                self.dtype
            )));
        }
        let stop = stop_at_layer
            .unwrap_or(self.cfg.n_layers)
            .min(self.cfg.n_layers);
        let output = if stop_at_layer.is_some() {
            Output::Residual
        } else {
            output
        };
        let (first, from_tokens, pos, start_residual) = match &start {
            Start::Tokens(input) => (0, true, input.pos, None),
            Start::Residual { x, layer, .. } => (*layer, false, x.dim(1).unwrap_or(0), Some(x)),
        };
        let mut save = HookSet::new(self.cfg.n_layers);
        if from_tokens {
            save.insert(HookPoint::EmbedLnScale);
            save.insert(HookPoint::EmbedLnNormalized);
        }
        let rotary = matches!(self.cfg.positions, Positions::Rotary { .. });
        // The scores' inputs: q and k as rotated, where positions are rotary.
        let [q, k] = if rotary {
            [BlockHook::RotQ, BlockHook::RotK]
        } else {
            [BlockHook::Q, BlockHook::K]
        };
        for layer in first..stop.max(first) {
            let mut kinds = vec![
                q,
                k,
                BlockHook::V,
                BlockHook::Pattern,
                BlockHook::MlpPre,
                BlockHook::Ln2Scale,
                BlockHook::Ln2Normalized,
            ];
            if self.cfg.family.has_attention_norm(layer) {
                kinds.extend([BlockHook::Ln1Scale, BlockHook::Ln1Normalized]);
            }
            if self.cfg.family.gated_mlp() {
                kinds.push(BlockHook::MlpPreLinear);
            }
            for kind in kinds {
                save.insert(HookPoint::Block(layer, kind));
            }
        }
        // The final norm runs unless the pass stops early.
        let final_norm = self.ln_final.is_some() && stop_at_layer.is_none();
        if final_norm {
            save.insert(HookPoint::LnFinalScale);
            save.insert(HookPoint::LnFinalNormalized);
        }
        // The heads' input, from which their first layer is recomputed: the last block's
        // output (post-LN) or the final norm's (pre-LN, rebuilt from its normalised input).
        let last_block_output = (output == Output::Logits && stop > first && !final_norm)
            .then(|| HookPoint::Block(stop - 1, BlockHook::NormalizedResidPost));
        match output {
            Output::Logits => {
                save.insert(HookPoint::MlmLnScale);
                save.insert(HookPoint::MlmLnNormalized);
                if let Some(point) = last_block_output {
                    save.insert(point);
                }
            }
            Output::NextSentence => save.insert(HookPoint::PoolerOut),
            Output::Residual => {}
        }
        let start_residual = match start_residual {
            Some(x) if output == Output::Logits && stop <= first && !final_norm => {
                Some(self.own(x)?)
            }
            _ => None,
        };
        let mut saver = Saver {
            inner: hooks,
            save,
            saved: HashMap::new(),
        };
        let out = self.run(start, stop_at_layer, output, &mut saver)?;
        let mut saved = saver.saved;
        let head_input = match (last_block_output, &self.ln_final) {
            (Some(point), _) => saved.remove(&point).map(|s| s.after),
            (None, Some(ln)) if final_norm && output == Output::Logits => {
                let normalized = saved
                    .get(&HookPoint::LnFinalNormalized)
                    .ok_or_else(|| missing_saved("ln_final.hook_normalized"))?;
                Some(
                    normalized
                        .after
                        .broadcast_mul(&ln.weight)?
                        .broadcast_add(&ln.bias)?,
                )
            }
            _ => start_residual,
        };
        let tape = Tape {
            saved,
            first,
            stop: stop.max(first),
            output,
            from_tokens,
            pos,
            head_input,
            final_norm,
            d_relative_bias: None,
            output_dims: out.dims().to_vec(),
        };
        Ok((out, tape))
    }

    /// The backward pass: from `grad_output` (d metric / d output, the output's shape), the
    /// gradient at every hook point, each shown to `hooks` ([`Hooks::wants_grad`],
    /// [`Hooks::call_grad`]) in reverse firing order; a replacement flows on backwards.
    /// Consumes `tape`, freeing each block's saved activations as it passes the block.
    ///
    /// Returns the gradient with respect to where the forward started: the summed
    /// embeddings (`hook_embed`'s gradient) from tokens, the residual stream from
    /// `start_at_layer`. Gradients are with respect to activations only, never weights.
    ///
    /// A forward hook that replaced an activation counts as the identity here: the
    /// replacement is what flows forward, and the gradient at that point passes it unchanged
    /// (a caller that can differentiate its hook, as the Python package does with torch,
    /// applies that in [`Hooks::call_grad`]).
    pub fn backward(
        &self,
        mut tape: Tape,
        grad_output: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        if grad_output.dims() != tape.output_dims.as_slice() || !grad_output.dtype().is_float() {
            return Err(Error::Input(format!(
                "grad_output must have the output's shape {:?} and a floating-point dtype, \
                 got {:?} {:?}",
                tape.output_dims,
                grad_output.dims(),
                grad_output.dtype()
            )));
        }
        let d_out = self.own(grad_output)?;
        let mut d = self.head_backward(tape.output, d_out, &mut tape, hooks)?;
        if let (Some(ln), true) = (&self.ln_final, tape.final_norm) {
            d = self.layer_norm_backward(
                &d,
                ln,
                HookPoint::LnFinalScale,
                HookPoint::LnFinalNormalized,
                &mut tape,
                hooks,
            )?;
        }
        for layer in (tape.first..tape.stop).rev() {
            if hooks.interrupted() {
                return Err(Error::Interrupted);
            }
            d = self.block_backward(layer, &self.blocks[layer], d, &mut tape, hooks)?;
        }
        // The bias depends on positions only: its gradient ends at its hook point.
        if let Some(d_bias) = tape.d_relative_bias.take() {
            grad_hook(hooks, HookPoint::RelPosBias, d_bias)?;
        }
        if tape.from_tokens {
            d = self.embed_backward(d, &mut tape, hooks)?;
        }
        Ok(d)
    }
}
