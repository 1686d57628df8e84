//! The encoder families the core runs, and everything that tells one family from another.
//!
//! The model is written once, with BERT's names for its weights ("canonical" names, e.g.
//! `bert.encoder.layer.0.attention.self.query.weight`). A family says:
//! * how its checkpoints name those weights ([`Family::checkpoint_name`]);
//! * how position ids are found ([`Positions`]);
//! * which activation its MLM head uses ([`Family::mlm_head_act`]).
//!
//! | family    | Hugging Face `model_type`            | positions            | MLM head        |
//! |-----------|--------------------------------------|----------------------|-----------------|
//! | `Bert`    | `bert`                               | `0..pos`             | `cls.predictions` |
//! | `Roberta` | `roberta`, `xlm-roberta`, `camembert`| from ids, after pad  | `lm_head`, exact GELU |
//! | `Distilbert` | `distilbert`                      | `0..pos`             | `vocab_*` layers |
//! | `Mpnet`   | `mpnet`                              | from ids, after pad  | `lm_head`, exact GELU |
//! | `Electra` | `electra`                            | `0..pos`             | `generator_*`, exact GELU; or the discriminator |
//! | `ModernBert` | `modernbert`                      | rotary               | `head`, `decoder` |
//!
//! DistilBERT also has no token types (`n_token_types` 0: no `hook_token_type_embed`) and no
//! pooler. MPNet has no token types either, and adds a relative position bias shared by all
//! layers (`model/relative_bias.rs`, `hook_rel_pos_bias`). ELECTRA may have embeddings
//! narrower than the residual stream (`d_embed`, projected by `embeddings_project`), and its
//! discriminator checkpoints carry a replaced-token head (one logit per token) instead of an
//! MLM head (`model/heads.rs`).
//!
//! ModernBERT is the one pre-LayerNorm family ([`Family::pre_layer_norm`]): each block
//! normalises its input before attention (`ln1`; layer 0 has no such norm) and before the MLP
//! (`ln2`), and a final norm (`ln_final`) follows the last block. Its positions are rotary
//! (`model/rotary.rs`), its MLP is gated (`model/mlp.rs`), its query, key and value weights are
//! stored fused (`Wqkv`), some layers attend within a window only
//! ([`crate::BertConfig::attn_types`]), and it has no biases except the decoder's: the family
//! names no bias, and the loader fills zeros for each (as TransformerLens shows `b_Q` of
//! bias-free models).

use serde::{Deserialize, Serialize};

use crate::Activation;

/// A family of encoders: BERT's post-LayerNorm block with renamed weights, or (ModernBERT) a
/// pre-LayerNorm block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT (`BertForPreTraining`, `BertForMaskedLM`, `BertModel`).
    #[default]
    Bert,
    /// RoBERTa, XLM-RoBERTa and CamemBERT: BERT's layers under `roberta.*`, an `lm_head.*`
    /// MLM head and no next-sentence head.
    Roberta,
    /// DistilBERT: BERT's post-LayerNorm block under other names (`q_lin`, `sa_layer_norm`,
    /// `ffn.lin1`, ...), no token types, no pooler and no next-sentence head.
    Distilbert,
    /// MPNet: RoBERTa's positions and `lm_head`, no token types, attention weights named
    /// `attention.attn.{q,k,v,o}`, and a relative position bias in every layer's scores.
    Mpnet,
    /// ELECTRA (discriminator and generator): BERT's blocks under `electra.*`, an optional
    /// embedding projection, no pooler; a generator's MLM head (`generator_predictions`,
    /// `generator_lm_head`) or a discriminator's replaced-token head
    /// (`discriminator_predictions`).
    Electra,
    /// ModernBERT: pre-LayerNorm blocks with rotary positions, a gated MLP, alternating global
    /// and windowed attention and no biases, under `model.*`, with `head.*` and `decoder.*`.
    ModernBert,
}

/// How the row of the position-embedding table is chosen for each token.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Positions {
    /// Position `i` uses row `i`, whatever the token: BERT.
    #[default]
    Absolute,
    /// RoBERTa's `create_position_ids_from_input_ids`: the non-padding tokens of a row are
    /// numbered `padding_idx + 1, padding_idx + 2, ...` in order, and every padding token (id
    /// `padding_idx`, wherever it sits) uses row `padding_idx`. The table therefore has
    /// `n_ctx + padding_idx + 1` rows.
    FromIds {
        /// The padding token's id, which is also the padding row of the table.
        padding_idx: usize,
    },
    /// No position table: queries and keys are rotated by their position (`0..pos`, padding
    /// included) in every layer, as `transformers`' `apply_rotary_pos_emb` (`model/rotary.rs`).
    Rotary {
        /// The frequency base (`rope_theta`) of global-attention layers.
        base: f64,
        /// The base of windowed (local) layers.
        local_base: f64,
    },
}

impl Positions {
    /// Rows of the position-embedding table for a context of `n_ctx` tokens.
    pub fn table_rows(self, n_ctx: usize) -> usize {
        match self {
            Positions::Absolute => n_ctx,
            Positions::FromIds { padding_idx } => n_ctx + padding_idx + 1,
            Positions::Rotary { .. } => 0,
        }
    }

    /// The table row of every token of `tokens` (`[batch, pos]`, row-major).
    pub fn ids(self, tokens: &[i64], pos: usize) -> Vec<u32> {
        match self {
            Positions::Absolute | Positions::Rotary { .. } => {
                (0..tokens.len()).map(|i| (i % pos) as u32).collect()
            }
            Positions::FromIds { padding_idx } => {
                let pad = padding_idx as i64;
                let mut out = Vec::with_capacity(tokens.len());
                for row in tokens.chunks(pos) {
                    let mut seen = 0;
                    for &token in row {
                        if token == pad {
                            out.push(padding_idx as u32);
                        } else {
                            seen += 1;
                            out.push((padding_idx + seen) as u32);
                        }
                    }
                }
                out
            }
        }
    }
}

impl Family {
    /// The family's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "BERT",
            Family::Roberta => "RoBERTa",
            Family::Distilbert => "DistilBERT",
            Family::Mpnet => "MPNet",
            Family::Electra => "ELECTRA",
            Family::ModernBert => "ModernBERT",
        }
    }

    /// Whether the family's models have token-type (segment) embeddings.
    pub fn has_token_types(self) -> bool {
        matches!(self, Family::Bert | Family::Roberta | Family::Electra)
    }

    /// The prefix of encoder weights in the family's `...ForMaskedLM` checkpoints; base-model
    /// checkpoints (`BertModel`, ...) name them without it.
    pub fn encoder_prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert.",
            Family::Roberta => "roberta.",
            Family::Distilbert => "distilbert.",
            Family::Mpnet => "mpnet.",
            Family::Electra => "electra.",
            Family::ModernBert => "model.",
        }
    }

    /// The name a checkpoint of this family gives the weight that BERT calls `canonical`, or
    /// `None` when the family has no such weight (RoBERTa has no next-sentence head).
    pub fn checkpoint_name(self, canonical: &str) -> Option<String> {
        match self {
            Family::Bert => (!canonical.starts_with("discriminator_predictions.")
                && !canonical.starts_with("bert.embeddings_project."))
            .then(|| canonical.to_string()),
            // Any other canonical name is a head these families lack (`cls.seq_relationship`,
            // ELECTRA's discriminator).
            Family::Roberta | Family::Mpnet => match canonical.strip_prefix("bert.") {
                Some(rest) if self == Family::Mpnet => mpnet_encoder_name(rest),
                Some(rest) => Some(format!("roberta.{rest}")),
                None => rename(canonical, &LM_HEAD, ""),
            },
            Family::Distilbert => distilbert_name(canonical),
            Family::Electra => electra_name(canonical),
            Family::ModernBert => modernbert_name(canonical),
        }
    }

    /// The MLM head's weights as a checkpoint names them, for messages.
    pub fn mlm_head_weights(self) -> &'static str {
        match self {
            Family::Bert => "cls.predictions.*",
            Family::Roberta | Family::Mpnet => "lm_head.*",
            Family::Distilbert => "vocab_transform.*, vocab_layer_norm.*, vocab_projector.*",
            Family::Electra => "generator_predictions.*, generator_lm_head.*",
            Family::ModernBert => "head.*, decoder.*",
        }
    }

    /// The activation between the MLM head's dense layer and its LayerNorm: BERT and
    /// DistilBERT use the config's `hidden_act` (ModernBERT its `classifier_activation`, which
    /// the Python package requires to equal `hidden_activation`); the heads of the others
    /// (`lm_head`, ELECTRA's generator) always apply exact GELU.
    pub fn mlm_head_act(self, act_fn: Activation) -> Activation {
        match self {
            Family::Bert | Family::Distilbert | Family::ModernBert => act_fn,
            Family::Roberta | Family::Mpnet | Family::Electra => Activation::Gelu,
        }
    }
}

impl Family {
    /// Whether blocks normalise their inputs (pre-LN: `ln1` before attention, `ln2` before the
    /// MLP, `ln_final` after the last block) rather than their outputs (BERT's post-LN).
    pub fn pre_layer_norm(self) -> bool {
        self == Family::ModernBert
    }

    /// Whether the MLP is gated: `act(x W_gate) * (x W_in)` (`mlp.hook_pre`,
    /// `mlp.hook_pre_linear`), with both halves stacked in one `[2 d_mlp, d_model]` weight.
    pub fn gated_mlp(self) -> bool {
        self == Family::ModernBert
    }

    /// Whether block `layer` normalises the input of its attention: every layer of a pre-LN
    /// family but ModernBERT's first, whose embeddings come already normalised.
    pub fn has_attention_norm(self, layer: usize) -> bool {
        !self.pre_layer_norm() || layer > 0
    }

    /// Whether checkpoints store each layer's query, key and value weights stacked in one
    /// tensor (canonical name `...attention.self.qkv.weight`), not as three.
    pub fn fused_qkv(self) -> bool {
        self == Family::ModernBert
    }
}

/// RoBERTa's and MPNet's MLM head, `lm_head.*`, by canonical name prefix.
const LM_HEAD: [(&str, &str); 4] = [
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    (
        "cls.predictions.transform.LayerNorm.",
        "lm_head.layer_norm.",
    ),
    ("cls.predictions.decoder.", "lm_head.decoder."),
    ("cls.predictions.bias", "lm_head.bias"),
];

/// `name` with the first of `table`'s `(from, to)` prefixes it starts with replaced by `to`,
/// after `prefix`; `None` when it starts with none of them. Every family's renaming is a few
/// such tables.
fn rename(name: &str, table: &[(&str, &str)], prefix: &str) -> Option<String> {
    table.iter().find_map(|(from, to)| {
        name.strip_prefix(from)
            .map(|rest| format!("{prefix}{to}{rest}"))
    })
}

/// ELECTRA's name for a canonical weight (see [`Family::checkpoint_name`]). The
/// discriminator's head has no BERT counterpart: its canonical names are ELECTRA's own.
fn electra_name(canonical: &str) -> Option<String> {
    const GENERATOR_HEAD: [(&str, &str); 3] = [
        (
            "cls.predictions.transform.dense.",
            "generator_predictions.dense.",
        ),
        (
            "cls.predictions.transform.LayerNorm.",
            "generator_predictions.LayerNorm.",
        ),
        ("cls.predictions.decoder.", "generator_lm_head."),
    ];
    if canonical.starts_with("bert.pooler.") {
        return None;
    }
    if let Some(rest) = canonical.strip_prefix("bert.") {
        return Some(format!("electra.{rest}"));
    }
    if canonical.starts_with("discriminator_predictions.") {
        return Some(canonical.to_string());
    }
    // The decoder's bias is the only output bias: `cls.predictions.bias` matches nothing.
    rename(canonical, &GENERATOR_HEAD, "")
}

/// MPNet's name for a canonical encoder weight given without `bert.`.
fn mpnet_encoder_name(rest: &str) -> Option<String> {
    if rest.starts_with("embeddings.token_type_embeddings.") {
        return None;
    }
    const ATTENTION: [(&str, &str); 5] = [
        ("attention.self.query.", "attention.attn.q."),
        ("attention.self.key.", "attention.attn.k."),
        ("attention.self.value.", "attention.attn.v."),
        ("attention.output.dense.", "attention.attn.o."),
        ("attention.output.LayerNorm.", "attention.LayerNorm."),
    ];
    if let Some(layer_rest) = rest.strip_prefix("encoder.layer.") {
        let (layer, name) = layer_rest.split_once('.')?;
        let renamed = rename(name, &ATTENTION, &format!("mpnet.encoder.layer.{layer}."));
        if renamed.is_some() {
            return renamed;
        }
    }
    Some(format!("mpnet.{rest}"))
}

/// ModernBERT's name for a canonical weight (see [`Family::checkpoint_name`]): `None` for
/// every bias but the decoder's (the loader fills zeros), for the separate query, key and value
/// (stored fused), position and token-type tables, and the pooler and NSP head. Two canonical
/// names are pre-LN models' own: `bert.encoder.layer.{l}.attention.self.qkv.weight` and
/// `bert.final_norm.weight`.
fn modernbert_name(canonical: &str) -> Option<String> {
    const EMBEDDINGS: [(&str, &str); 2] = [
        ("word_embeddings.weight", "tok_embeddings.weight"),
        ("LayerNorm.weight", "norm.weight"),
    ];
    const LAYER: [(&str, &str); 6] = [
        ("attention.self.qkv.weight", "attn.Wqkv.weight"),
        ("attention.output.dense.weight", "attn.Wo.weight"),
        ("attention.output.LayerNorm.weight", "attn_norm.weight"),
        ("intermediate.dense.weight", "mlp.Wi.weight"),
        ("output.dense.weight", "mlp.Wo.weight"),
        ("output.LayerNorm.weight", "mlp_norm.weight"),
    ];
    const HEAD: [(&str, &str); 4] = [
        (
            "cls.predictions.transform.dense.weight",
            "head.dense.weight",
        ),
        (
            "cls.predictions.transform.LayerNorm.weight",
            "head.norm.weight",
        ),
        ("cls.predictions.decoder.weight", "decoder.weight"),
        ("cls.predictions.decoder.bias", "decoder.bias"),
    ];
    if let Some(rest) = canonical.strip_prefix("bert.embeddings.") {
        return rename(rest, &EMBEDDINGS, "model.embeddings.");
    }
    if let Some(rest) = canonical.strip_prefix("bert.encoder.layer.") {
        let (layer, rest) = rest.split_once('.')?;
        return rename(rest, &LAYER, &format!("model.layers.{layer}."));
    }
    if canonical == "bert.final_norm.weight" {
        return Some("model.final_norm.weight".into());
    }
    rename(canonical, &HEAD, "")
}

/// DistilBERT's name for a canonical weight (see [`Family::checkpoint_name`]).
fn distilbert_name(canonical: &str) -> Option<String> {
    const EMBEDDINGS: [(&str, &str); 3] = [
        ("word_embeddings.", "word_embeddings."),
        ("position_embeddings.", "position_embeddings."),
        ("LayerNorm.", "LayerNorm."),
    ];
    const LAYER: [(&str, &str); 8] = [
        ("attention.self.query.", "attention.q_lin."),
        ("attention.self.key.", "attention.k_lin."),
        ("attention.self.value.", "attention.v_lin."),
        ("attention.output.dense.", "attention.out_lin."),
        ("attention.output.LayerNorm.", "sa_layer_norm."),
        ("intermediate.dense.", "ffn.lin1."),
        ("output.dense.", "ffn.lin2."),
        ("output.LayerNorm.", "output_layer_norm."),
    ];
    const HEAD: [(&str, &str); 3] = [
        ("cls.predictions.transform.dense.", "vocab_transform."),
        ("cls.predictions.transform.LayerNorm.", "vocab_layer_norm."),
        ("cls.predictions.decoder.", "vocab_projector."),
    ];
    if let Some(rest) = canonical.strip_prefix("bert.embeddings.") {
        return rename(rest, &EMBEDDINGS, "distilbert.embeddings.");
    }
    if let Some(rest) = canonical.strip_prefix("bert.encoder.layer.") {
        let (layer, rest) = rest.split_once('.')?;
        return rename(
            rest,
            &LAYER,
            &format!("distilbert.transformer.layer.{layer}."),
        );
    }
    // No pooler, no next-sentence head; the decoder's bias is its only output bias.
    rename(canonical, &HEAD, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roberta_positions_count_non_padding_tokens_after_the_padding_row() {
        // Two rows of 5 with padding id 1: right padding, and a pad in the middle, which
        // Hugging Face also skips when numbering.
        let tokens = [0, 7, 8, 2, 1, 0, 1, 9, 2, 1];
        let ids = Positions::FromIds { padding_idx: 1 }.ids(&tokens, 5);
        assert_eq!(ids, [2, 3, 4, 5, 1, 2, 1, 3, 4, 1]);
        assert_eq!(
            Positions::Absolute.ids(&tokens, 5),
            [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
        );
        assert_eq!(Positions::FromIds { padding_idx: 1 }.table_rows(512), 514);
    }

    #[test]
    fn roberta_names_its_weights_as_hugging_face_does() {
        let name = |n: &str| Family::Roberta.checkpoint_name(n);
        assert_eq!(
            name("bert.encoder.layer.3.attention.self.query.weight").as_deref(),
            Some("roberta.encoder.layer.3.attention.self.query.weight")
        );
        assert_eq!(
            name("cls.predictions.transform.LayerNorm.weight").as_deref(),
            Some("lm_head.layer_norm.weight")
        );
        assert_eq!(
            name("cls.predictions.bias").as_deref(),
            Some("lm_head.bias")
        );
        assert_eq!(name("cls.seq_relationship.weight"), None);
        assert_eq!(
            Family::Bert
                .checkpoint_name("cls.predictions.bias")
                .as_deref(),
            Some("cls.predictions.bias")
        );
    }

    #[test]
    fn distilbert_names_its_weights_as_hugging_face_does() {
        let name = |n: &str| Family::Distilbert.checkpoint_name(n);
        assert_eq!(
            name("bert.encoder.layer.11.output.LayerNorm.weight").as_deref(),
            Some("distilbert.transformer.layer.11.output_layer_norm.weight")
        );
        assert_eq!(
            name("bert.encoder.layer.0.attention.output.dense.bias").as_deref(),
            Some("distilbert.transformer.layer.0.attention.out_lin.bias")
        );
        assert_eq!(
            name("bert.encoder.layer.2.output.dense.weight").as_deref(),
            Some("distilbert.transformer.layer.2.ffn.lin2.weight")
        );
        assert_eq!(
            name("bert.embeddings.LayerNorm.bias").as_deref(),
            Some("distilbert.embeddings.LayerNorm.bias")
        );
        assert_eq!(
            name("cls.predictions.decoder.bias").as_deref(),
            Some("vocab_projector.bias")
        );
        for absent in [
            "bert.embeddings.token_type_embeddings.weight",
            "bert.pooler.dense.weight",
            "cls.predictions.bias",
            "cls.seq_relationship.weight",
        ] {
            assert_eq!(name(absent), None, "{absent}");
        }
    }

    #[test]
    fn mpnet_names_its_weights_as_hugging_face_does() {
        let name = |n: &str| Family::Mpnet.checkpoint_name(n);
        assert_eq!(
            name("bert.encoder.layer.4.attention.self.value.bias").as_deref(),
            Some("mpnet.encoder.layer.4.attention.attn.v.bias")
        );
        assert_eq!(
            name("bert.encoder.layer.0.attention.output.LayerNorm.weight").as_deref(),
            Some("mpnet.encoder.layer.0.attention.LayerNorm.weight")
        );
        assert_eq!(
            name("bert.encoder.layer.0.output.LayerNorm.weight").as_deref(),
            Some("mpnet.encoder.layer.0.output.LayerNorm.weight")
        );
        assert_eq!(
            name("bert.encoder.relative_attention_bias.weight").as_deref(),
            Some("mpnet.encoder.relative_attention_bias.weight")
        );
        assert_eq!(
            name("cls.predictions.bias").as_deref(),
            Some("lm_head.bias")
        );
        assert_eq!(name("bert.embeddings.token_type_embeddings.weight"), None);
    }

    #[test]
    fn modernbert_names_its_weights_as_hugging_face_does() {
        let name = |n: &str| Family::ModernBert.checkpoint_name(n);
        for (canonical, hf) in [
            (
                "bert.embeddings.word_embeddings.weight",
                "model.embeddings.tok_embeddings.weight",
            ),
            (
                "bert.embeddings.LayerNorm.weight",
                "model.embeddings.norm.weight",
            ),
            (
                "bert.encoder.layer.2.attention.self.qkv.weight",
                "model.layers.2.attn.Wqkv.weight",
            ),
            (
                "bert.encoder.layer.1.attention.output.LayerNorm.weight",
                "model.layers.1.attn_norm.weight",
            ),
            (
                "bert.encoder.layer.0.output.LayerNorm.weight",
                "model.layers.0.mlp_norm.weight",
            ),
            (
                "bert.encoder.layer.0.intermediate.dense.weight",
                "model.layers.0.mlp.Wi.weight",
            ),
            ("bert.final_norm.weight", "model.final_norm.weight"),
            (
                "cls.predictions.transform.LayerNorm.weight",
                "head.norm.weight",
            ),
            ("cls.predictions.decoder.bias", "decoder.bias"),
        ] {
            assert_eq!(name(canonical).as_deref(), Some(hf), "{canonical}");
        }
        for absent in [
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.LayerNorm.bias",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.0.attention.output.dense.bias",
            "bert.encoder.layer.0.output.LayerNorm.bias",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.bias",
            "bert.pooler.dense.weight",
        ] {
            assert_eq!(name(absent), None, "{absent}");
        }
    }

    #[test]
    fn electra_names_its_weights_as_hugging_face_does() {
        let name = |n: &str| Family::Electra.checkpoint_name(n);
        assert_eq!(
            name("bert.embeddings_project.weight").as_deref(),
            Some("electra.embeddings_project.weight")
        );
        assert_eq!(
            name("bert.encoder.layer.1.attention.self.key.bias").as_deref(),
            Some("electra.encoder.layer.1.attention.self.key.bias")
        );
        assert_eq!(
            name("cls.predictions.transform.LayerNorm.weight").as_deref(),
            Some("generator_predictions.LayerNorm.weight")
        );
        assert_eq!(
            name("cls.predictions.decoder.weight").as_deref(),
            Some("generator_lm_head.weight")
        );
        assert_eq!(
            name("discriminator_predictions.dense_prediction.bias").as_deref(),
            Some("discriminator_predictions.dense_prediction.bias")
        );
        for absent in [
            "bert.pooler.dense.weight",
            "cls.predictions.bias",
            "cls.seq_relationship.bias",
        ] {
            assert_eq!(name(absent), None, "{absent}");
        }
        assert_eq!(
            Family::Bert.checkpoint_name("discriminator_predictions.dense.weight"),
            None
        );
    }
}
