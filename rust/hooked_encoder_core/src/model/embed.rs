//! The embeddings (token, position, token type; each family has the ones it has) and their
//! LayerNorm: forward and backward.
//! Which position row each token uses is the family's ([`Positions`]).

use super::*;

impl HookedBert {
    pub(super) fn embed(&self, input: &ForwardInput<'_>, hooks: &mut dyn Hooks) -> Result<Tensor> {
        // The embeddings' width: d_model, or ELECTRA's narrower d_embed (projected below).
        let (b, p, d) = (input.batch, input.pos, self.cfg.embed_width());
        let ids = |values: &[i64]| -> Result<Tensor> {
            let values: Vec<u32> = values.iter().map(|v| *v as u32).collect();
            Ok(Tensor::from_vec(values, b * p, &self.device)?)
        };
        let embed = self
            .word_embeddings
            .index_select(&ids(input.tokens)?, 0)?
            .reshape((b, p, d))?;
        let embed = hook(hooks, HookPoint::Embed, embed)?;
        let mut sum = match &self.position_embeddings {
            Some(table) => {
                let pos_embed = match self.cfg.positions {
                    // Positions are 0..pos in every row, with no offset for padding (right
                    // padding only): one slice of the table, broadcast over the batch.
                    Positions::Absolute => table
                        .narrow(0, 0, p)?
                        .unsqueeze(0)?
                        .broadcast_as((b, p, d))?,
                    positions => {
                        let rows = positions.ids(input.tokens, p);
                        table
                            .index_select(&Tensor::from_vec(rows, b * p, &self.device)?, 0)?
                            .reshape((b, p, d))?
                    }
                };
                let pos_embed = hook(hooks, HookPoint::PosEmbed, pos_embed)?;
                (embed + pos_embed)?
            }
            // Rotary positions enter in every layer's attention instead.
            None => embed,
        };
        if let Some(table) = &self.token_type_embeddings {
            let token_type_embed = match input.token_type_ids {
                Some(types) => table.index_select(&ids(types)?, 0)?.reshape((b, p, d))?,
                None => table
                    .narrow(0, 0, 1)?
                    .unsqueeze(0)?
                    .broadcast_as((b, p, d))?,
            };
            let token_type_embed = hook(hooks, HookPoint::TokenTypeEmbed, token_type_embed)?;
            sum = (sum + token_type_embed)?;
        }
        let x = self.layer_norm(
            &sum,
            &self.embed_ln,
            HookPoint::EmbedLnScale,
            HookPoint::EmbedLnNormalized,
            hooks,
        )?;
        let x = hook(hooks, HookPoint::FullEmbed, x)?;
        match &self.embed_proj {
            Some(proj) => hook(hooks, HookPoint::EmbedProj, proj.forward(&x, None)?),
            None => Ok(x),
        }
    }
}

impl HookedBert {
    /// The gradient to the summed embeddings from the gradient `d_out` of `hook_full_embed`
    /// (of `hook_embed_proj` when the embeddings are projected).
    /// The three embeddings are summed, so `hook_embed`, `hook_pos_embed` and
    /// `hook_token_type_embed` each get that same gradient (a replacement returned by one of
    /// their backward hooks stops there: embedding tables get no gradient here).
    pub(super) fn embed_backward(
        &self,
        d_out: Tensor,
        tape: &mut Tape,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let d_out = match &self.embed_proj {
            Some(proj) => proj.backward(&grad_hook(hooks, HookPoint::EmbedProj, d_out)?)?,
            None => d_out,
        };
        let d_full = grad_hook(hooks, HookPoint::FullEmbed, d_out)?;
        let d_sum = self.layer_norm_backward(
            &d_full,
            &self.embed_ln,
            HookPoint::EmbedLnScale,
            HookPoint::EmbedLnNormalized,
            tape,
            hooks,
        )?;
        if self.token_type_embeddings.is_some() {
            grad_hook(hooks, HookPoint::TokenTypeEmbed, d_sum.clone())?;
        }
        if self.position_embeddings.is_some() {
            grad_hook(hooks, HookPoint::PosEmbed, d_sum.clone())?;
        }
        grad_hook(hooks, HookPoint::Embed, d_sum.clone())?;
        Ok(d_sum)
    }
}
