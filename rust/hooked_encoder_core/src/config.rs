//! Model configuration, with TransformerLens's field names.

use serde::{Deserialize, Serialize};

use crate::{Error, Family, Positions, Result};

/// The activation function of the MLP (and of the MLM head's transform, as in Hugging Face).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x * Φ(x)` with the error function: BERT's `gelu`.
    Gelu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh` in Hugging Face).
    GeluTanh,
    /// `max(x, 0)`.
    Relu,
}

/// Which keys a query may attend to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionDir {
    /// Every position sees every (unmasked) position: BERT.
    Bidirectional,
    /// Position `i` sees positions `0..=i` only.
    Causal,
}

/// Whether a layer's queries see every key, or only those within a window (TransformerLens's
/// `attn_types`, as in Gemma 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnType {
    /// Every (unmasked) key.
    Global,
    /// Keys at most [`BertConfig::window_size`] positions from the query, either side.
    Local,
}

/// The architecture of a BERT-style encoder.
///
/// Field names follow TransformerLens's `HookedTransformerConfig`; the Python package converts a
/// Hugging Face `config.json` into this form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of one attention head.
    pub d_head: usize,
    /// Number of attention heads per layer.
    pub n_heads: usize,
    /// Width of the MLP hidden layer.
    pub d_mlp: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Maximum sequence length. The position-embedding table has
    /// [`BertConfig::position_rows`] rows (more than `n_ctx` for RoBERTa's offset positions).
    pub n_ctx: usize,
    /// Vocabulary size.
    pub d_vocab: usize,
    /// Number of token types (segment ids); 2 for BERT, 0 for a model without token-type
    /// embeddings (DistilBERT), which then has no `hook_token_type_embed`.
    pub n_token_types: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act_fn: Activation,
    /// Attention direction.
    pub attention_dir: AttentionDir,
    /// Expose per-head attention outputs as `attn.hook_result`.
    #[serde(default)]
    pub use_attn_result: bool,
    /// Give every head its own copy of the attention input (`hook_q_input` ...).
    #[serde(default)]
    pub use_split_qkv_input: bool,
    /// Expose the MLP sub-block input as `hook_mlp_in`.
    #[serde(default)]
    pub use_hook_mlp_in: bool,
    /// Which encoder family the weights come from (how they are named; see [`Family`]).
    #[serde(default)]
    pub family: Family,
    /// How each token's position-embedding row is chosen.
    #[serde(default)]
    pub positions: Positions,
    /// Width of the embeddings when it differs from `d_model` (ELECTRA's `embedding_size`):
    /// the embeddings and their LayerNorm are this wide, a projection (`hook_embed_proj`) maps
    /// them into the residual stream, and the MLM head maps back to it before unembedding.
    #[serde(default)]
    pub d_embed: Option<usize>,
    /// Rows of MPNet's relative position bias table (`relative_attention_num_buckets`), for a
    /// model with one; at least 32, the buckets `transformers` uses.
    #[serde(default)]
    pub relative_attention_buckets: Option<usize>,
    /// Each layer's attention type, for models that alternate global and windowed attention
    /// (ModernBERT); `None`: every layer is global.
    #[serde(default)]
    pub attn_types: Option<Vec<AttnType>>,
    /// How far a local layer's queries see, either side: query `i` attends to key `j` only if
    /// `|i - j| <= window_size` (Hugging Face ModernBERT's `sliding_window`, half its
    /// `local_attention`).
    #[serde(default)]
    pub window_size: Option<usize>,
}

/// Sizes above this are refused as nonsense rather than attempted (a config from an untrusted
/// source must not be able to ask for petabytes).
const MAX_DIM: usize = 1 << 24;

impl BertConfig {
    /// Parses a config from JSON and validates it.
    pub fn from_json(json: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(json).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks that every size is positive and plausible, and that the parts agree.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("d_model", self.d_model),
            ("d_head", self.d_head),
            ("n_heads", self.n_heads),
            ("d_mlp", self.d_mlp),
            ("n_layers", self.n_layers),
            ("n_ctx", self.n_ctx),
            ("d_vocab", self.d_vocab),
        ];
        for (name, value) in sizes {
            if value == 0 || value > MAX_DIM {
                return Err(Error::Config(format!(
                    "{name} must be between 1 and {MAX_DIM}, got {value}"
                )));
            }
        }
        if !self.family.has_token_types() && self.n_token_types != 0 {
            return Err(Error::Config(format!(
                "{} has no token-type embeddings: n_token_types must be 0, got {}",
                self.family.name(),
                self.n_token_types
            )));
        }
        if (self.family == Family::Mpnet) != self.relative_attention_buckets.is_some() {
            return Err(Error::Config(
                "relative_attention_buckets is for MPNet, and MPNet needs it".into(),
            ));
        }
        if let Some(rows) = self.relative_attention_buckets {
            let needed = crate::model::RELATIVE_BIAS_ROWS;
            if !(needed..=MAX_DIM).contains(&rows) {
                return Err(Error::Config(format!(
                    "relative_attention_num_buckets must be between {needed} (the buckets \
                     relative positions fall into) and {MAX_DIM}, got {rows}"
                )));
            }
        }
        self.validate_pre_layer_norm()?;
        if let Some(width) = self.d_embed {
            if self.family != Family::Electra {
                return Err(Error::Config(format!(
                    "d_embed (an embedding width apart from d_model) is ELECTRA's; {} has none",
                    self.family.name()
                )));
            }
            if width == 0 || width > MAX_DIM {
                return Err(Error::Config(format!(
                    "d_embed must be between 1 and {MAX_DIM}, got {width}"
                )));
            }
        }
        if self.n_token_types > MAX_DIM {
            return Err(Error::Config(format!(
                "n_token_types must be at most {MAX_DIM}, got {}",
                self.n_token_types
            )));
        }
        if self.d_head * self.n_heads > MAX_DIM {
            return Err(Error::Config(format!(
                "n_heads * d_head = {} is too large",
                self.d_head * self.n_heads
            )));
        }
        if let Positions::FromIds { padding_idx } = self.positions {
            if padding_idx >= self.d_vocab {
                return Err(Error::Config(format!(
                    "padding_idx {padding_idx} is not a token id (d_vocab is {})",
                    self.d_vocab
                )));
            }
            if self.position_rows() > MAX_DIM {
                return Err(Error::Config("n_ctx + padding_idx is too large".into()));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::Config(format!(
                "eps must be a positive finite number, got {}",
                self.eps
            )));
        }
        Ok(())
    }

    /// The parts only ModernBERT has: rotary positions, attention types and their window.
    fn validate_pre_layer_norm(&self) -> Result<()> {
        let modern = self.family == Family::ModernBert;
        let rotary = matches!(self.positions, Positions::Rotary { .. });
        if modern != rotary {
            return Err(Error::Config(
                "rotary positions are ModernBERT's, and ModernBERT needs them".into(),
            ));
        }
        if let Positions::Rotary { base, local_base } = self.positions {
            if !(base.is_finite() && base > 1.0 && local_base.is_finite() && local_base > 1.0) {
                return Err(Error::Config(format!(
                    "rotary bases must be finite and above 1, got {base} and {local_base}"
                )));
            }
            if !self.d_head.is_multiple_of(2) {
                return Err(Error::Config(format!(
                    "rotary positions rotate pairs of a head's dimensions: d_head must be \
                     even, got {}",
                    self.d_head
                )));
            }
        }
        if !modern && (self.attn_types.is_some() || self.window_size.is_some()) {
            return Err(Error::Config(format!(
                "attn_types and window_size are ModernBERT's; {} has neither",
                self.family.name()
            )));
        }
        if let Some(types) = &self.attn_types {
            if types.len() != self.n_layers {
                return Err(Error::Config(format!(
                    "attn_types has {} entries for {} layers",
                    types.len(),
                    self.n_layers
                )));
            }
            if types.contains(&AttnType::Local) && self.window_size.is_none() {
                return Err(Error::Config(
                    "local attention layers need a window_size".into(),
                ));
            }
        }
        if self.family.pre_layer_norm() && self.use_split_qkv_input {
            return Err(Error::Config(format!(
                "use_split_qkv_input is not supported for {} (pre-LayerNorm blocks)",
                self.family.name()
            )));
        }
        Ok(())
    }

    /// How far block `layer`'s queries see either side, or `None` when they see every key.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        match self.attn_types.as_ref()?.get(layer)? {
            AttnType::Local => self.window_size,
            AttnType::Global => None,
        }
    }

    /// The rotary frequency base of block `layer`, for models with rotary positions.
    pub fn rotary_base(&self, layer: usize) -> Option<f64> {
        match self.positions {
            Positions::Rotary { base, local_base } => {
                Some(if self.attention_window(layer).is_some() {
                    local_base
                } else {
                    base
                })
            }
            _ => None,
        }
    }

    /// The architecture of BERT-base (cased): 12 layers, width 768, 12 heads.
    pub fn bert_base() -> Self {
        Self {
            d_model: 768,
            d_head: 64,
            n_heads: 12,
            d_mlp: 3072,
            n_layers: 12,
            n_ctx: 512,
            d_vocab: 28996,
            n_token_types: 2,
            eps: 1e-12,
            act_fn: Activation::Gelu,
            attention_dir: AttentionDir::Bidirectional,
            use_attn_result: false,
            use_split_qkv_input: false,
            use_hook_mlp_in: false,
            family: Family::Bert,
            positions: Positions::Absolute,
            relative_attention_buckets: None,
            d_embed: None,
            attn_types: None,
            window_size: None,
        }
    }

    /// The architecture of ModernBERT-base: 22 pre-LN layers of width 768 with 12 heads, a
    /// gated MLP of 1152, every third layer global and the others within 64 positions.
    pub fn modernbert_base() -> Self {
        let n_layers = 22;
        Self {
            d_mlp: 1152,
            n_layers,
            n_ctx: 8192,
            d_vocab: 50368,
            n_token_types: 0,
            eps: 1e-5,
            family: Family::ModernBert,
            positions: Positions::Rotary {
                base: 160_000.0,
                local_base: 10_000.0,
            },
            attn_types: Some(
                (0..n_layers)
                    .map(|l| {
                        if l % 3 == 0 {
                            AttnType::Global
                        } else {
                            AttnType::Local
                        }
                    })
                    .collect(),
            ),
            window_size: Some(64),
            ..Self::bert_base()
        }
    }

    /// A tiny model for tests: width 8, two heads of 4, vocabulary 13, context 6.
    #[cfg(test)]
    pub(crate) fn tiny(n_layers: usize) -> Self {
        Self {
            d_model: 8,
            d_head: 4,
            n_heads: 2,
            d_mlp: 16,
            n_layers,
            n_ctx: 6,
            d_vocab: 13,
            ..Self::bert_base()
        }
    }

    /// Width of the embeddings: `d_embed`, or `d_model` without one.
    pub fn embed_width(&self) -> usize {
        self.d_embed.unwrap_or(self.d_model)
    }

    /// Whether the embeddings are projected into the residual stream (ELECTRA with an
    /// embedding width apart from `d_model`).
    pub fn projects_embeddings(&self) -> bool {
        self.embed_width() != self.d_model
    }

    /// Rows of the position-embedding table.
    pub fn position_rows(&self) -> usize {
        self.positions.table_rows(self.n_ctx)
    }

    /// Width of all heads side by side, `n_heads * d_head`.
    pub fn d_attn(&self) -> usize {
        self.n_heads * self.d_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(extra: &str) -> String {
        format!(
            r#"{{"d_model": 8, "d_head": 4, "n_heads": 2, "d_mlp": 16, "n_layers": 1,
               "n_ctx": 5, "d_vocab": 11, "n_token_types": 2, "eps": 1e-12,
               "act_fn": "gelu", "attention_dir": "bidirectional"{extra}}}"#
        )
    }

    #[test]
    fn parses_a_valid_config() {
        let cfg = BertConfig::from_json(&json("")).unwrap();
        assert_eq!(cfg.d_attn(), 8);
        assert!(!cfg.use_attn_result);
    }

    #[test]
    fn refuses_zero_and_absurd_sizes_and_bad_eps() {
        let zero = json("").replace(r#""n_layers": 1"#, r#""n_layers": 0"#);
        assert!(
            matches!(BertConfig::from_json(&zero), Err(Error::Config(m)) if m.contains("n_layers"))
        );
        let huge = json("").replace(r#""d_mlp": 16"#, r#""d_mlp": 99999999999"#);
        assert!(
            matches!(BertConfig::from_json(&huge), Err(Error::Config(m)) if m.contains("d_mlp"))
        );
        let eps = json("").replace("1e-12", "-1.0");
        assert!(matches!(BertConfig::from_json(&eps), Err(Error::Config(m)) if m.contains("eps")));
    }

    #[test]
    fn refuses_unknown_fields_and_wrong_types() {
        assert!(BertConfig::from_json(&json(r#", "d_modle": 3"#)).is_err());
        let wrong = json("").replace(r#""d_model": 8"#, r#""d_model": "8""#);
        assert!(matches!(
            BertConfig::from_json(&wrong),
            Err(Error::Config(_))
        ));
    }
}
