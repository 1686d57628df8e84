//! The BERT forward pass, computed as TransformerLens's `HookedEncoder` computes it, with every
//! activation passing through its hook point.
//!
//! Weights are held in Hugging Face's layout (`Linear` weights are `[out, in]`), loaded from
//! Hugging Face names; the query, key and value projections of a layer are fused into one matrix
//! so that a layer does one projection matmul instead of three.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, D};

use crate::hooks::{BlockHook, HookPoint, Hooks};
use crate::kernels::{self, AttentionShape, Heads, KeyMask};
use crate::{
    cpu, cuda, Activation, AttentionDir, BertConfig, Error, Family, Positions, Result, TensorSource,
};

mod activation;
mod attention;
mod backward;
mod block;
mod embed;
mod heads;
mod layer_norm;
mod linear;
mod load;
mod mlp;
mod relative_bias;
mod rotary;

use activation::{act_backward, apply_act};
use attention::{head_weights, missing_head_weights, HeadWeights, Mask, Qkv};
use backward::missing_saved;
pub use backward::Tape;
use block::{at_position, Block};
use embed::WordEmbeddings;
use heads::{Discriminator, MlmHead};
use layer_norm::LayerNorm;
use linear::Linear;
pub(crate) use relative_bias::TABLE_ROWS as RELATIVE_BIAS_ROWS;

/// How far the forward pass goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Through the checkpoint's head: the MLM head and unembedding, logits `[batch, pos,
    /// d_vocab]`, or an ELECTRA discriminator's replaced-token logits `[batch, pos]`.
    Logits,
    /// Stop after the last block: its output `[batch, pos, d_model]` (Hugging Face's
    /// `last_hidden_state`); the MLM head is never computed.
    Residual,
    /// Next-sentence prediction: the pooler and NSP head on the first token, `[batch, 2]`.
    NextSentence,
}

/// Where a forward pass starts.
#[derive(Debug, Clone)]
pub enum Start<'a> {
    /// From token ids: the embeddings, then every block.
    Tokens(ForwardInput<'a>),
    /// From the residual stream entering block `layer` (TransformerLens's `start_at_layer`).
    Residual {
        /// `[batch, pos, d_model]`, float32.
        x: Tensor,
        /// The first block to run.
        layer: usize,
        /// 1 where a position may be attended to, 0 for padding, `[batch, pos]`.
        attention_mask: Option<&'a [i64]>,
    },
}

/// A head that can run on its own input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The MLM head's transform: dense, activation, LayerNorm.
    MlmHead,
    /// The unembedding (MLM decoder) to logits.
    Unembed,
    /// `tanh(dense(x[:, 0]))`.
    Pooler,
    /// Next-sentence logits from the pooled output.
    NspHead,
    /// An ELECTRA discriminator's replaced-token logits, `[batch, pos]`.
    Discriminator,
}

/// One batch of token ids, with optional token types and attention mask, all row-major
/// `[batch, pos]`.
#[derive(Debug, Clone, Copy)]
pub struct ForwardInput<'a> {
    /// Number of rows.
    pub batch: usize,
    /// Number of positions per row.
    pub pos: usize,
    /// Token ids.
    pub tokens: &'a [i64],
    /// Token type (segment) ids; all zeros when absent.
    pub token_type_ids: Option<&'a [i64]>,
    /// 1 where a position may be attended to, 0 for padding; all ones when absent.
    pub attention_mask: Option<&'a [i64]>,
}

/// A BERT encoder with hook points.
pub struct HookedBert {
    cfg: BertConfig,
    device: Device,
    /// What the weights and activations are stored in: float32 (the default, and the only
    /// dtype of the fused CPU kernels), or float16/bfloat16 (portable ops; see [`Self::to`]).
    dtype: DType,
    word_embeddings: WordEmbeddings,
    /// Absent with rotary positions (ModernBERT).
    position_embeddings: Option<Tensor>,
    /// Absent when the model has no token types (`n_token_types` 0: DistilBERT).
    token_type_embeddings: Option<Tensor>,
    embed_ln: LayerNorm,
    blocks: Vec<Block>,
    /// `ln_final`, after the last block of a pre-LN model.
    ln_final: Option<LayerNorm>,
    mlm_head: Option<MlmHead>,
    /// `tanh(dense(x[:, 0]))`, for next-sentence prediction; absent from many checkpoints.
    pooler: Option<Linear>,
    /// Next-sentence prediction logits from the pooled output, `[2, d_model]`.
    nsp_head: Option<Linear>,
    /// MPNet's relative position bias table, `[buckets, n_heads]` (see `relative_bias.rs`).
    relative_attention_bias: Option<Tensor>,
    /// ELECTRA's projection of `d_embed`-wide embeddings into the residual stream.
    embed_proj: Option<Linear>,
    /// An ELECTRA discriminator's replaced-token head (in place of an MLM head).
    discriminator: Option<Discriminator>,
}

impl HookedBert {
    /// Every weight under its name in a checkpoint of the model's family (`roberta.*` and
    /// `lm_head.*` for RoBERTa), in Hugging Face's layout: what [`Self::load`] reads back.
    pub fn checkpoint_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let family = self.cfg.family;
        Ok(self
            .named_weights()?
            .into_iter()
            .filter_map(|(name, t)| family.checkpoint_name(&name).map(|name| (name, t)))
            .collect())
    }

    /// Every weight under its canonical name, that of a Hugging Face `BertForPreTraining`
    /// checkpoint whatever the family (the MLM head, pooler and NSP head only when the model
    /// has them), in Hugging Face's layout. ModernBERT's weights have two names of their own
    /// (see `family.rs`): each layer's stacked `attention.self.qkv` (in place of `query`, `key`
    /// and `value`) and `bert.final_norm`; its zero biases are listed like any other.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut linear = |name: String, l: &Linear| -> Result<()> {
            out.push((format!("{name}.weight"), l.weight()?));
            out.push((format!("{name}.bias"), l.bias.clone()));
            Ok(())
        };
        let e = "bert.embeddings";
        let word_embeddings = self.word_embeddings.table()?;
        let mut tensors = vec![(
            format!("{e}.word_embeddings.weight"),
            word_embeddings.clone(),
        )];
        if let Some(table) = &self.position_embeddings {
            tensors.push((format!("{e}.position_embeddings.weight"), table.clone()));
        }
        if let Some(table) = &self.token_type_embeddings {
            tensors.push((format!("{e}.token_type_embeddings.weight"), table.clone()));
        }
        if let Some(table) = &self.relative_attention_bias {
            tensors.push((
                "bert.encoder.relative_attention_bias.weight".into(),
                table.clone(),
            ));
        }
        if let Some(proj) = &self.embed_proj {
            tensors.push(("bert.embeddings_project.weight".into(), proj.weight()?));
            tensors.push(("bert.embeddings_project.bias".into(), proj.bias.clone()));
        }
        let norm = |name: &str, ln: &LayerNorm| {
            [
                (format!("{name}.LayerNorm.weight"), ln.weight.clone()),
                (format!("{name}.LayerNorm.bias"), ln.bias.clone()),
            ]
        };
        tensors.extend(norm(e, &self.embed_ln));
        let a = self.cfg.d_attn();
        for (l, block) in self.blocks.iter().enumerate() {
            let p = format!("bert.encoder.layer.{l}");
            if self.cfg.family.fused_qkv() {
                linear(format!("{p}.attention.self.qkv"), &block.qkv)?;
            } else {
                for (i, part) in ["query", "key", "value"].iter().enumerate() {
                    let weight = block.qkv.weight()?.narrow(0, i * a, a)?.contiguous()?;
                    let bias = block.qkv.bias.narrow(0, i * a, a)?.contiguous()?;
                    linear(
                        format!("{p}.attention.self.{part}"),
                        &Linear::new(weight, bias),
                    )?;
                }
            }
            linear(format!("{p}.attention.output.dense"), &block.attn_out)?;
            linear(format!("{p}.intermediate.dense"), &block.mlp_in)?;
            linear(format!("{p}.output.dense"), &block.mlp_out)?;
            if let Some(ln) = &block.ln1 {
                tensors.extend(norm(&format!("{p}.attention.output"), ln));
            }
            tensors.extend(norm(&format!("{p}.output"), &block.ln2));
        }
        if let Some(ln) = &self.ln_final {
            tensors.push(("bert.final_norm.weight".into(), ln.weight.clone()));
            tensors.push(("bert.final_norm.bias".into(), ln.bias.clone()));
        }
        if let Some(head) = &self.mlm_head {
            linear("cls.predictions.transform.dense".into(), &head.dense)?;
            tensors.extend(norm("cls.predictions.transform", &head.ln));
            if self.word_embeddings.is_tied_to(&head.decoder) {
                // One table under both names, as the checkpoint had it.
                tensors.push(("cls.predictions.decoder.weight".into(), word_embeddings));
                tensors.push((
                    "cls.predictions.decoder.bias".into(),
                    head.decoder.bias.clone(),
                ));
            } else {
                linear("cls.predictions.decoder".into(), &head.decoder)?;
            }
        }
        if let Some(pooler) = &self.pooler {
            linear("bert.pooler.dense".into(), pooler)?;
        }
        if let Some(nsp) = &self.nsp_head {
            linear("cls.seq_relationship".into(), nsp)?;
        }
        if let Some(head) = &self.discriminator {
            linear("discriminator_predictions.dense".into(), &head.dense)?;
            linear(
                "discriminator_predictions.dense_prediction".into(),
                &head.prediction,
            )?;
        }
        tensors.extend(out);
        Ok(tensors)
    }

    /// A copy of the model with every weight on `device` and stored as `dtype` (float32,
    /// float16 or bfloat16). In half precision, activations are stored in `dtype` too, while
    /// LayerNorm statistics and softmax are computed in float32, as PyTorch's kernels do.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Input(format!(
                "unsupported dtype {dtype:?}: use float32, float16 or bfloat16"
            )));
        }
        let t = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(dtype)?.to_device(device)?) };
        let linear = |l: &Linear| l.to(device, dtype);
        let norm = |l: &LayerNorm| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: t(&l.weight)?,
                bias: t(&l.bias)?,
            })
        };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                let heads = b
                    .heads
                    .as_ref()
                    .map(|h| -> Result<HeadWeights> {
                        let [wq, wk, wv] = &h.w_qkv;
                        let [bq, bk, bv] = &h.b_qkv;
                        Ok(HeadWeights {
                            w_qkv: [t(wq)?, t(wk)?, t(wv)?],
                            b_qkv: [t(bq)?, t(bk)?, t(bv)?],
                            w_o: t(&h.w_o)?,
                        })
                    })
                    .transpose()?;
                Ok(Block {
                    qkv: linear(&b.qkv)?,
                    attn_out: linear(&b.attn_out)?,
                    ln1: b.ln1.as_ref().map(norm).transpose()?,
                    mlp_in: linear(&b.mlp_in)?,
                    mlp_out: linear(&b.mlp_out)?,
                    ln2: norm(&b.ln2)?,
                    heads,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mlm_head = self
            .mlm_head
            .as_ref()
            .map(|h| -> Result<MlmHead> {
                Ok(MlmHead {
                    dense: linear(&h.dense)?,
                    ln: norm(&h.ln)?,
                    decoder: linear(&h.decoder)?,
                })
            })
            .transpose()?;
        Self {
            cfg: self.cfg.clone(),
            device: device.clone(),
            dtype,
            word_embeddings: self.word_embeddings.to(device, dtype)?,
            position_embeddings: self.position_embeddings.as_ref().map(t).transpose()?,
            token_type_embeddings: self.token_type_embeddings.as_ref().map(t).transpose()?,
            embed_ln: norm(&self.embed_ln)?,
            blocks,
            ln_final: self.ln_final.as_ref().map(norm).transpose()?,
            mlm_head,
            pooler: self.pooler.as_ref().map(linear).transpose()?,
            nsp_head: self.nsp_head.as_ref().map(linear).transpose()?,
            relative_attention_bias: self.relative_attention_bias.as_ref().map(t).transpose()?,
            embed_proj: self.embed_proj.as_ref().map(linear).transpose()?,
            discriminator: self
                .discriminator
                .as_ref()
                .map(|h| -> Result<Discriminator> {
                    Ok(Discriminator {
                        dense: linear(&h.dense)?,
                        prediction: linear(&h.prediction)?,
                    })
                })
                .transpose()?,
        }
        .with_packed_weights()
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A caller's activation on this model's device, in its dtype.
    fn own(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// Whether this model runs on our fused CPU kernels (float32 on the CPU).
    fn uses_cpu_kernels(&self) -> bool {
        cpu::kernels_on(&self.device, self.dtype)
    }

    /// Whether the checkpoint had an MLM head (so [`Output::Logits`] are vocabulary logits).
    pub fn has_mlm_head(&self) -> bool {
        self.mlm_head.is_some()
    }

    /// Whether the checkpoint had an ELECTRA discriminator head instead (so
    /// [`Output::Logits`] are its replaced-token logits, `[batch, pos]`).
    pub fn has_discriminator(&self) -> bool {
        self.discriminator.is_some()
    }

    /// Runs the model on `input`, showing each activation to `hooks`.
    pub fn forward(
        &self,
        input: &ForwardInput<'_>,
        output: Output,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        self.run(Start::Tokens(*input), None, output, hooks)
    }

    /// Runs the model from `start` up to the input of block `stop_at_layer` (whose output is
    /// then the residual stream there, with no head), or through every block and `output`'s
    /// head. This is TransformerLens's `start_at_layer` / `stop_at_layer`.
    pub fn run(
        &self,
        start: Start<'_>,
        stop_at_layer: Option<usize>,
        output: Output,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        self.run_through(start, stop_at_layer, output, None, hooks)
    }

    /// Runs the model from `start` through every block and returns the residual stream the
    /// head would read (after a pre-LN model's final norm) at `position` only, `[batch, 1,
    /// d_model]`: [`Output::Residual`] narrowed to one position. The last block's attention
    /// reads every position, but what follows it (the output projection, the MLP, the norms)
    /// runs at `position` alone, about two thirds of a block saved, unless a hook wants one of
    /// that block's points (then it runs whole and its output is narrowed). For a metric that
    /// reads one position, as a patching sweep's logit difference.
    pub fn run_to_position(
        &self,
        start: Start<'_>,
        position: usize,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        self.run_through(start, None, Output::Residual, Some(position), hooks)
    }

    fn run_through(
        &self,
        start: Start<'_>,
        stop_at_layer: Option<usize>,
        output: Output,
        position: Option<usize>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let n_layers = self.cfg.n_layers;
        let stop = stop_at_layer.unwrap_or(n_layers);
        if stop > n_layers {
            return Err(Error::Input(format!(
                "stop_at_layer {stop} is past the last block (the model has {n_layers})"
            )));
        }
        // Stopping anywhere, even after the last block, returns the residual stream there.
        let output = if stop_at_layer.is_some() {
            Output::Residual
        } else {
            output
        };
        self.check_head(output)?;
        let (mut x, first, mut mask) = match start {
            Start::Tokens(input) => {
                self.check_input(&input)?;
                let mask = self.mask(input.batch, input.pos, input.attention_mask)?;
                (self.embed(&input, hooks)?, 0, mask)
            }
            Start::Residual {
                x,
                layer,
                attention_mask,
            } => {
                if layer > stop {
                    return Err(Error::Input(format!(
                        "start_at_layer {layer} is after stop_at_layer {stop}"
                    )));
                }
                let (b, p) = self.check_residual(&x, attention_mask)?;
                (self.own(&x)?, layer, self.mask(b, p, attention_mask)?)
            }
        };
        let p = x.dim(1)?;
        if let Some(m) = position.filter(|m| *m >= p) {
            return Err(Error::Input(format!(
                "position {m} is outside the {p} positions of the input"
            )));
        }
        if first < stop {
            mask.bias = self.relative_position_bias(x.dim(0)?, p, hooks)?;
        }
        // The last block runs at `position` alone where no hook would see the difference.
        let hooked = |layer: usize| {
            BlockHook::ALL
                .iter()
                .any(|kind| hooks.wants(HookPoint::Block(layer, *kind)))
                || hooks.wants(HookPoint::LnFinalScale)
                || hooks.wants(HookPoint::LnFinalNormalized)
        };
        let narrowed_block = position.filter(|_| first < stop && !hooked(stop - 1));
        for layer in first..stop {
            // Between blocks is where a caller can stop a long pass (Ctrl-C in Python).
            if hooks.interrupted() {
                return Err(Error::Interrupted);
            }
            let at = narrowed_block.filter(|_| layer + 1 == stop);
            x = self.block(layer, &self.blocks[layer], x, &mask, at, hooks)?;
        }
        if hooks.interrupted() {
            return Err(Error::Interrupted);
        }
        // A pre-LN model's output is its final norm's; stopping early skips it, as in
        // TransformerLens.
        if let (Some(ln), None) = (&self.ln_final, stop_at_layer) {
            x = self.layer_norm(
                &x,
                ln,
                HookPoint::LnFinalScale,
                HookPoint::LnFinalNormalized,
                hooks,
            )?;
        }
        if narrowed_block.is_none() {
            x = at_position(&x, position)?;
        }
        match output {
            Output::Residual => Ok(x),
            Output::Logits if self.mlm_head.is_none() => self.apply(Part::Discriminator, x, hooks),
            Output::Logits => {
                let x = self.apply(Part::MlmHead, x, hooks)?;
                self.apply(Part::Unembed, x, hooks)
            }
            Output::NextSentence => {
                let pooled = self.apply(Part::Pooler, x, hooks)?;
                self.apply(Part::NspHead, pooled, hooks)
            }
        }
    }

    /// Runs block `layer`'s attention alone on separate query, key and value inputs
    /// (`[batch, pos, d_model]` each; TransformerLens's `model.blocks[layer].attn(q, k, v)`).
    pub fn attention_component(
        &self,
        layer: usize,
        inputs: [Tensor; 3],
        attention_mask: Option<&[i64]>,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let block = self.blocks.get(layer).ok_or_else(|| {
            Error::Input(format!(
                "block {layer} does not exist (the model has {})",
                self.cfg.n_layers
            ))
        })?;
        let (b, p) = self.check_residual(&inputs[0], attention_mask)?;
        let a = self.cfg.d_attn();
        let mut parts = Vec::with_capacity(3);
        let qkv_weight = block.qkv.weight()?;
        for (i, input) in inputs.iter().enumerate() {
            if input.dims() != inputs[0].dims() {
                return Err(Error::Input(format!(
                    "query, key and value inputs must have one shape, got {:?} and {:?}",
                    inputs[0].dims(),
                    input.dims()
                )));
            }
            let projection = Linear::new(
                qkv_weight.narrow(0, i * a, a)?,
                block.qkv.bias.narrow(0, i * a, a)?,
            );
            let projected = projection.forward(&self.own(input)?, None)?;
            parts.push(projected.reshape((b, p, self.cfg.n_heads, self.cfg.d_head))?);
        }
        let [q, k, v]: [Tensor; 3] = parts.try_into().map_err(|_| missing_head_weights())?;
        let mask = self.mask(b, p, attention_mask)?;
        self.attention_from(layer, block, Qkv::Separate([q, k, v]), &mask, None, hooks)
    }

    /// Refuses an output whose head the checkpoint lacks.
    fn check_head(&self, output: Output) -> Result<()> {
        let missing = |what: &str| Err(Error::MissingHead(what.into()));
        let family = self.cfg.family;
        match output {
            Output::Logits if self.mlm_head.is_none() && self.discriminator.is_none() => {
                missing(&format!(
                    "this checkpoint has no MLM head (no {} weights), so it cannot produce \
                     logits; use return_type=None or encoder_output() for its hidden states",
                    family.mlm_head_weights()
                ))
            }
            Output::NextSentence if family != Family::Bert => missing(&format!(
                "{} models have no next-sentence head",
                family.name()
            )),
            Output::NextSentence if self.pooler.is_none() || self.nsp_head.is_none() => missing(
                "this checkpoint has no pooler and NSP head (bert.pooler.dense.*, \
                 cls.seq_relationship.*), so it cannot predict the next sentence; they come \
                 with BertForPreTraining checkpoints",
            ),
            _ => Ok(()),
        }
    }

    /// Checks a residual-stream input `[batch, pos, d_model]` and its optional mask; returns
    /// `(batch, pos)`.
    fn check_residual(&self, x: &Tensor, attention_mask: Option<&[i64]>) -> Result<(usize, usize)> {
        let d = self.cfg.d_model;
        let (b, p) = match x.dims() {
            [b, p, width] if *width == d && *b > 0 && *p > 0 => (*b, *p),
            dims => {
                return Err(Error::Input(format!(
                    "a residual-stream input must be [batch, pos, {d}], got {dims:?}"
                )))
            }
        };
        if !x.dtype().is_float() {
            return Err(Error::Input(format!(
                "a residual-stream input must be floating-point, got {:?}",
                x.dtype()
            )));
        }
        if p > self.cfg.n_ctx {
            return Err(Error::Input(format!(
                "sequence length {p} is longer than the model's n_ctx ({})",
                self.cfg.n_ctx
            )));
        }
        if let Some(mask) = attention_mask {
            if mask.len() != b * p {
                return Err(Error::Input(format!(
                    "one_zero_attention_mask has {} elements, the input has shape [{b}, {p}, {d}]",
                    mask.len()
                )));
            }
            if let Some(v) = mask.iter().find(|v| **v != 0 && **v != 1) {
                return Err(Error::Input(format!(
                    "one_zero_attention_mask holds {v}; use 0 or 1"
                )));
            }
        }
        Ok((b, p))
    }

    fn check_input(&self, input: &ForwardInput<'_>) -> Result<()> {
        let (b, p) = (input.batch, input.pos);
        if b == 0 || p == 0 {
            return Err(Error::Input(format!(
                "tokens must have at least one row and one position, got shape [{b}, {p}]"
            )));
        }
        if p > self.cfg.n_ctx {
            return Err(Error::Input(format!(
                "sequence length {p} is longer than the model's n_ctx ({})",
                self.cfg.n_ctx
            )));
        }
        let n = b * p;
        let check = |what: &str, values: &[i64], limit: i64| -> Result<()> {
            if values.len() != n {
                return Err(Error::Input(format!(
                    "{what} has {} elements, tokens have shape [{b}, {p}]",
                    values.len()
                )));
            }
            if let Some((i, v)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| **v < 0 || **v >= limit)
            {
                return Err(Error::Input(format!(
                    "{what}[{}, {}] = {v} is out of range [0, {limit})",
                    i / p,
                    i % p
                )));
            }
            Ok(())
        };
        check("tokens", input.tokens, self.cfg.d_vocab as i64)?;
        if let Some(types) = input.token_type_ids {
            if self.cfg.n_token_types == 0 {
                return Err(Error::Input(format!(
                    "{} models have no token types; leave token_type_ids out",
                    self.cfg.family.name()
                )));
            }
            check("token_type_ids", types, self.cfg.n_token_types as i64)?;
        }
        if let Some(mask) = input.attention_mask {
            check("one_zero_attention_mask", mask, 2)?;
        }
        Ok(())
    }

    /// Which keys each query may attend to: 0 where it may, -inf where the key is padding
    /// (TransformerLens's convention since v1.7; Hugging Face uses the dtype's minimum instead)
    /// or, in a causal model, in the future.
    fn mask(&self, b: usize, p: usize, attention_mask: Option<&[i64]>) -> Result<Mask> {
        let padding: Option<Vec<f32>> = attention_mask.map(|mask| {
            mask.iter()
                .map(|m| if *m == 1 { 0.0 } else { f32::NEG_INFINITY })
                .collect()
        });
        let causal = self.cfg.attention_dir == AttentionDir::Causal;
        if self.uses_cpu_kernels() {
            // The CPU kernels apply the mask themselves.
            return Ok(Mask {
                padding,
                causal,
                additive: None,
                may_empty_rows: true,
                bias: None,
            });
        }
        let padding_tensor = padding
            .clone()
            .map(|values| Tensor::from_vec(values, (b, 1, 1, p), &self.device))
            .transpose()?;
        let causal_tensor = causal
            .then(|| {
                let values: Vec<f32> = (0..p * p)
                    .map(|i| {
                        if i % p > i / p {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                Tensor::from_vec(values, (1, 1, p, p), &self.device)
            })
            .transpose()?;
        let additive = match (padding_tensor, causal_tensor) {
            (None, None) => None,
            (Some(m), None) | (None, Some(m)) => Some(m),
            (Some(pad), Some(causal)) => Some(pad.broadcast_add(&causal)?),
        }
        .map(|m| m.to_dtype(self.dtype))
        .transpose()?;
        // A query sees no key at all only if its row's mask is all zeros (without causality),
        // or, with causality, if the keys up to it are all padding; cheap to rule out here.
        let may_empty_rows = padding.as_ref().is_some_and(|values| {
            values.chunks(p).any(|row| {
                if causal {
                    row[0] != 0.0
                } else {
                    row.iter().all(|v| *v != 0.0)
                }
            })
        });
        Ok(Mask {
            padding,
            causal,
            additive,
            may_empty_rows,
            bias: None,
        })
    }
}

/// Whether `hooks` want `point`. The `hookless` feature compiles every hook point out, to
/// measure what the hook machinery costs when nothing is hooked (`examples/forward_time.rs`).
#[inline(always)]
fn wants(hooks: &dyn Hooks, point: HookPoint) -> bool {
    !cfg!(feature = "hookless") && hooks.wants(point)
}

/// Shows `activation` to `hooks` if they want `point`, and checks any replacement.
#[inline]
fn hook(hooks: &mut dyn Hooks, point: HookPoint, activation: Tensor) -> Result<Tensor> {
    if !wants(hooks, point) {
        return Ok(activation);
    }
    let (shape, dtype, device) = (
        activation.shape().clone(),
        activation.dtype(),
        activation.device().clone(),
    );
    let out = hooks.call(point, activation)?;
    check_replacement(point, &shape, dtype, &device, out)
}

/// Shows the gradient at `point` to `hooks` if they want it, and checks any replacement: the
/// backward pass's counterpart of [`hook`].
#[inline]
fn grad_hook(hooks: &mut dyn Hooks, point: HookPoint, grad: Tensor) -> Result<Tensor> {
    if !hooks.wants_grad(point) {
        return Ok(grad);
    }
    let (shape, dtype, device) = (grad.shape().clone(), grad.dtype(), grad.device().clone());
    let out = hooks.call_grad(point, grad)?;
    check_replacement(point, &shape, dtype, &device, out)
}

/// Refuses a hook's replacement whose shape, dtype or device differs from the original's.
fn check_replacement(
    point: HookPoint,
    shape: &candle_core::Shape,
    dtype: DType,
    device: &Device,
    out: Tensor,
) -> Result<Tensor> {
    if out.shape() != shape || out.dtype() != dtype || !out.device().same_device(device) {
        return Err(Error::HookReplacement {
            name: point.name(),
            expected: format!("{:?} {dtype:?}", shape.dims()),
            got: format!("{:?} {:?}", out.dims(), out.dtype()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
