//! The embeddings (token, position, token type; each family has the ones it has) and their
//! LayerNorm: forward and backward.
//! Which position row each token uses is the family's ([`Positions`]).

use std::sync::Arc;

use super::*;
use crate::packed_matmul::PackedWeight;

/// The token embedding table, `[d_vocab, d_embed]`.
#[derive(Clone)]
pub(super) enum WordEmbeddings {
    Table(Tensor),
    /// The MLM decoder's packed weight, where the decoder is tied to the table (Hugging Face's
    /// default) and stored packed (CPU, float32): one copy serves the lookup and the
    /// unembedding. Packing the decoder cut its time at 16 rows from 8.1 to 5.7 ms and at 128
    /// rows from 34-38 to 29 ms (bert-base, AMD EPYC Zen 4, 2 threads); a second, packed copy
    /// of the table would have cost 89 MB there.
    Packed(Arc<PackedWeight>),
}

impl WordEmbeddings {
    /// The table as loaded: packed where the MLM decoder is tied to it (`tied_to_decoder`) and
    /// packing pays ([`Linear::packing_pays`]). Packed as soon as it is loaded, so that the
    /// unpacked table is freed before the rest of the model loads: packing it at the end of
    /// the load raised bert-base's peak memory while loading by 70 MB.
    pub(super) fn tied(table: Tensor, tied_to_decoder: bool) -> Result<Self> {
        Ok(if tied_to_decoder && Linear::packing_pays(&table) {
            Self::Packed(Arc::new(linear::pack(&table)?))
        } else {
            Self::Table(table)
        })
    }

    /// The MLM decoder tied to this table, with `bias`.
    pub(super) fn as_decoder(&self, bias: Tensor) -> Linear {
        match self {
            Self::Table(table) => Linear::new(table.clone(), bias),
            Self::Packed(packed) => Linear::from_packed(packed.clone(), bias),
        }
    }

    /// Rows `ids` of the table, `[ids.len(), d_embed]`, on `device`.
    fn lookup(&self, ids: Vec<u32>, device: &Device) -> Result<Tensor> {
        let n = ids.len();
        match self {
            Self::Table(table) => Ok(table.index_select(&Tensor::from_vec(ids, n, device)?, 0)?),
            Self::Packed(packed) => {
                cpu::tensor(packed.gather_rows(&ids), &[n, packed.in_features()])
            }
        }
    }

    /// The table as a tensor (unpacked into a new one where it is stored packed).
    pub(super) fn table(&self) -> Result<Tensor> {
        match self {
            Self::Table(table) => Ok(table.clone()),
            Self::Packed(packed) => linear::unpack(packed),
        }
    }

    /// Whether `decoder`'s weight is this table itself.
    pub(super) fn is_tied_to(&self, decoder: &Linear) -> bool {
        match self {
            Self::Table(table) => decoder.has_dense_weight(table),
            Self::Packed(packed) => decoder.has_packed_weight(packed),
        }
    }

    /// The table on `device` in `dtype`: still shared with the decoder where it stays a packed
    /// float32 CPU table (as [`Linear::to`] keeps the decoder's).
    pub(super) fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        match self {
            Self::Packed(_) if device.is_cpu() && dtype == DType::F32 => Ok(self.clone()),
            _ => Ok(Self::Table(
                self.table()?.to_dtype(dtype)?.to_device(device)?,
            )),
        }
    }
}

impl HookedBert {
    pub(super) fn embed(&self, input: &ForwardInput<'_>, hooks: &mut dyn Hooks) -> Result<Tensor> {
        // The embeddings' width: d_model, or ELECTRA's narrower d_embed (projected below).
        let (b, p, d) = (input.batch, input.pos, self.cfg.embed_width());
        let ids = |values: &[i64]| -> Vec<u32> { values.iter().map(|&v| v as u32).collect() };
        let embed = self
            .word_embeddings
            .lookup(ids(input.tokens), &self.device)?
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
                Some(types) => table
                    .index_select(&Tensor::from_vec(ids(types), b * p, &self.device)?, 0)?
                    .reshape((b, p, d))?,
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
