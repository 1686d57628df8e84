//! Hook points: the names of activations, and the interface through which a caller sees them.
//!
//! Names and meanings are TransformerLens's (`HookedEncoder`, 3.x; for ModernBERT's pre-LN
//! blocks, rotary attention and gated MLP, `HookedTransformer`'s). Firing order is the order of
//! [`HookPoint::all`], which is also the order of a TransformerLens activation cache.

use candle_core::Tensor;

use crate::{BertConfig, Family, Positions, Result};

/// A hook point inside one transformer block, in a post-LN block's firing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // Each variant is documented by its name (see `suffix`).
pub enum BlockHook {
    ResidPre,
    QInput,
    KInput,
    VInput,
    Q,
    K,
    V,
    RotQ,
    RotK,
    AttnScores,
    Pattern,
    Z,
    Result,
    AttnOut,
    ResidMid,
    MlpIn,
    Ln1Scale,
    Ln1Normalized,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    MlpOut,
    ResidPost,
    Ln2Scale,
    Ln2Normalized,
    NormalizedResidPost,
}

impl BlockHook {
    /// Every block hook, in a post-LN block's firing order (`ln1` after attention, `ln2` after
    /// the MLP).
    pub const ALL: [BlockHook; 26] = [
        Self::ResidPre,
        Self::QInput,
        Self::KInput,
        Self::VInput,
        Self::Q,
        Self::K,
        Self::V,
        Self::RotQ,
        Self::RotK,
        Self::AttnScores,
        Self::Pattern,
        Self::Z,
        Self::Result,
        Self::AttnOut,
        Self::ResidMid,
        Self::MlpIn,
        Self::Ln1Scale,
        Self::Ln1Normalized,
        Self::MlpPre,
        Self::MlpPreLinear,
        Self::MlpPost,
        Self::MlpOut,
        Self::ResidPost,
        Self::Ln2Scale,
        Self::Ln2Normalized,
        Self::NormalizedResidPost,
    ];

    /// Every block hook a pre-LN block has, in its firing order (`HookedTransformer`'s
    /// `TransformerBlock`: `ln1` before attention, `ln2` before the MLP).
    pub const PRE_LN: [BlockHook; 25] = [
        Self::ResidPre,
        Self::QInput,
        Self::KInput,
        Self::VInput,
        Self::Ln1Scale,
        Self::Ln1Normalized,
        Self::Q,
        Self::K,
        Self::V,
        Self::RotQ,
        Self::RotK,
        Self::AttnScores,
        Self::Pattern,
        Self::Z,
        Self::Result,
        Self::AttnOut,
        Self::ResidMid,
        Self::MlpIn,
        Self::Ln2Scale,
        Self::Ln2Normalized,
        Self::MlpPre,
        Self::MlpPreLinear,
        Self::MlpPost,
        Self::MlpOut,
        Self::ResidPost,
    ];

    /// The block hooks of a model with config `cfg`, in firing order.
    fn firing_order(cfg: &BertConfig) -> &'static [BlockHook] {
        if cfg.family.pre_layer_norm() {
            &Self::PRE_LN
        } else {
            &Self::ALL
        }
    }

    /// The name below `blocks.{layer}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::ResidPre => "hook_resid_pre",
            Self::QInput => "hook_q_input",
            Self::KInput => "hook_k_input",
            Self::VInput => "hook_v_input",
            Self::Q => "attn.hook_q",
            Self::K => "attn.hook_k",
            Self::V => "attn.hook_v",
            Self::RotQ => "attn.hook_rot_q",
            Self::RotK => "attn.hook_rot_k",
            Self::AttnScores => "attn.hook_attn_scores",
            Self::Pattern => "attn.hook_pattern",
            Self::Z => "attn.hook_z",
            Self::Result => "attn.hook_result",
            Self::AttnOut => "hook_attn_out",
            Self::ResidMid => "hook_resid_mid",
            Self::MlpIn => "hook_mlp_in",
            Self::Ln1Scale => "ln1.hook_scale",
            Self::Ln1Normalized => "ln1.hook_normalized",
            Self::MlpPre => "mlp.hook_pre",
            Self::MlpPreLinear => "mlp.hook_pre_linear",
            Self::MlpPost => "mlp.hook_post",
            Self::MlpOut => "hook_mlp_out",
            Self::ResidPost => "hook_resid_post",
            Self::Ln2Scale => "ln2.hook_scale",
            Self::Ln2Normalized => "ln2.hook_normalized",
            Self::NormalizedResidPost => "hook_normalized_resid_post",
        }
    }

    /// Whether block `layer` of a model with config `cfg` has this hook point: five are opt-in,
    /// as in TransformerLens; the rotated q and k exist with rotary positions, `hook_pre_linear`
    /// with a gated MLP, `hook_normalized_resid_post` in post-LN blocks, and `ln1`'s points
    /// where the block has that norm (not ModernBERT's layer 0).
    fn exists_at(self, layer: usize, cfg: &BertConfig) -> bool {
        match self {
            Self::QInput | Self::KInput | Self::VInput => cfg.use_split_qkv_input,
            Self::Result => cfg.use_attn_result,
            Self::MlpIn => cfg.use_hook_mlp_in,
            Self::RotQ | Self::RotK => matches!(cfg.positions, Positions::Rotary { .. }),
            Self::MlpPreLinear => cfg.family.gated_mlp(),
            Self::NormalizedResidPost => !cfg.family.pre_layer_norm(),
            Self::Ln1Scale | Self::Ln1Normalized => cfg.family.has_attention_norm(layer),
            _ => true,
        }
    }
}

/// One named activation of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// `embed.hook_embed`: token embeddings `W_E[tokens]`, `[batch, pos, d_model]`.
    Embed,
    /// `embed.hook_pos_embed`: position embeddings, `[batch, pos, d_model]`.
    PosEmbed,
    /// `embed.hook_token_type_embed`: token-type embeddings, `[batch, pos, d_model]`.
    TokenTypeEmbed,
    /// `hook_embed_proj`: the embeddings projected into the residual stream, `[batch, pos,
    /// d_model]` (ELECTRA with `d_embed` apart from `d_model`; then it, not `hook_full_embed`,
    /// is `blocks.0.hook_resid_pre`).
    EmbedProj,
    /// `hook_rel_pos_bias`: MPNet's relative position bias, `[batch, head, query, key]`,
    /// added to every block's attention scores (models with one only).
    RelPosBias,
    /// `embed.ln.hook_scale`: the embedding LayerNorm's `sqrt(var + eps)`, `[batch, pos, 1]`.
    EmbedLnScale,
    /// `embed.ln.hook_normalized`: centred and scaled, before the affine map.
    EmbedLnNormalized,
    /// `hook_full_embed`: the embedding LayerNorm's output, the input of block 0.
    FullEmbed,
    /// A hook point inside block `layer`.
    Block(usize, BlockHook),
    /// `ln_final.hook_scale`: the final LayerNorm's scale (pre-LN models only).
    LnFinalScale,
    /// `ln_final.hook_normalized`: the final LayerNorm's normalised input (pre-LN models only);
    /// after its affine map it is the encoder's output.
    LnFinalNormalized,
    /// `mlm_head.ln.hook_scale`.
    MlmLnScale,
    /// `mlm_head.ln.hook_normalized`.
    MlmLnNormalized,
    /// `unembed.hook_in`: the MLM head's output, `[batch, pos, d_model]`.
    UnembedIn,
    /// `unembed.hook_out`: the logits, `[batch, pos, d_vocab]`.
    UnembedOut,
    /// `pooler.hook_pooler_out`: `tanh(dense(x[:, 0]))`, `[batch, d_model]` (next-sentence
    /// prediction only).
    PoolerOut,
    /// `nsp_head.hook_nsp_out`: next-sentence logits, `[batch, 2]` (next-sentence prediction
    /// only).
    NspOut,
    /// `discriminator.hook_out`: an ELECTRA discriminator's replaced-token logits, `[batch,
    /// pos]` (ELECTRA only).
    DiscriminatorOut,
}

const EMBED_POINTS: [HookPoint; 8] = [
    HookPoint::Embed,
    HookPoint::PosEmbed,
    HookPoint::TokenTypeEmbed,
    HookPoint::EmbedLnScale,
    HookPoint::EmbedLnNormalized,
    HookPoint::FullEmbed,
    HookPoint::EmbedProj,
    HookPoint::RelPosBias,
];

const HEAD_POINTS: [HookPoint; 9] = [
    HookPoint::LnFinalScale,
    HookPoint::LnFinalNormalized,
    HookPoint::MlmLnScale,
    HookPoint::MlmLnNormalized,
    HookPoint::UnembedIn,
    HookPoint::UnembedOut,
    HookPoint::DiscriminatorOut,
    HookPoint::PoolerOut,
    HookPoint::NspOut,
];

impl HookPoint {
    /// Every hook point the config enables, in firing order: the MLM forward's, then the two
    /// that only next-sentence prediction fires.
    pub fn all(cfg: &BertConfig) -> Vec<HookPoint> {
        let blocks = (0..cfg.n_layers).flat_map(|layer| {
            BlockHook::firing_order(cfg)
                .iter()
                .filter(move |kind| kind.exists_at(layer, cfg))
                .map(move |kind| HookPoint::Block(layer, *kind))
        });
        EMBED_POINTS
            .into_iter()
            .chain(blocks)
            .chain(HEAD_POINTS)
            .filter(|point| point.exists_in(cfg))
            .collect()
    }

    /// Whether a model with config `cfg` has this embedding or head point: no
    /// `hook_token_type_embed` without token types, no `hook_pos_embed` without a position
    /// table, `ln_final` in pre-LN models only, no next-sentence points outside BERT.
    fn exists_in(self, cfg: &BertConfig) -> bool {
        match self {
            Self::PosEmbed => cfg.position_rows() > 0,
            Self::LnFinalScale | Self::LnFinalNormalized => cfg.family.pre_layer_norm(),
            Self::TokenTypeEmbed => cfg.n_token_types > 0,
            Self::RelPosBias => cfg.relative_attention_buckets.is_some(),
            Self::EmbedProj => cfg.projects_embeddings(),
            Self::DiscriminatorOut => cfg.family == Family::Electra,
            Self::PoolerOut | Self::NspOut => cfg.family == Family::Bert,
            _ => true,
        }
    }

    /// The full TransformerLens name, e.g. `blocks.0.attn.hook_pattern`.
    pub fn name(self) -> String {
        match self {
            Self::Embed => "embed.hook_embed".into(),
            Self::PosEmbed => "embed.hook_pos_embed".into(),
            Self::TokenTypeEmbed => "embed.hook_token_type_embed".into(),
            Self::RelPosBias => "hook_rel_pos_bias".into(),
            Self::EmbedProj => "hook_embed_proj".into(),
            Self::DiscriminatorOut => "discriminator.hook_out".into(),
            Self::EmbedLnScale => "embed.ln.hook_scale".into(),
            Self::EmbedLnNormalized => "embed.ln.hook_normalized".into(),
            Self::FullEmbed => "hook_full_embed".into(),
            Self::Block(layer, kind) => format!("blocks.{layer}.{}", kind.suffix()),
            Self::LnFinalScale => "ln_final.hook_scale".into(),
            Self::LnFinalNormalized => "ln_final.hook_normalized".into(),
            Self::MlmLnScale => "mlm_head.ln.hook_scale".into(),
            Self::MlmLnNormalized => "mlm_head.ln.hook_normalized".into(),
            Self::UnembedIn => "unembed.hook_in".into(),
            Self::UnembedOut => "unembed.hook_out".into(),
            Self::PoolerOut => "pooler.hook_pooler_out".into(),
            Self::NspOut => "nsp_head.hook_nsp_out".into(),
        }
    }

    /// The hook point called `name` in a model with config `cfg`, if there is one.
    pub fn parse(name: &str, cfg: &BertConfig) -> Option<HookPoint> {
        if let Some(rest) = name.strip_prefix("blocks.") {
            let (layer, suffix) = rest.split_once('.')?;
            // Only canonical decimal layer numbers: "01" or "+1" would alias another name.
            if layer.is_empty() || (layer.len() > 1 && layer.starts_with('0')) {
                return None;
            }
            let layer: usize = layer.parse().ok()?;
            let kind = BlockHook::ALL.into_iter().find(|k| k.suffix() == suffix)?;
            return (layer < cfg.n_layers && kind.exists_at(layer, cfg))
                .then_some(HookPoint::Block(layer, kind));
        }
        EMBED_POINTS
            .into_iter()
            .chain(HEAD_POINTS)
            .find(|point| point.name() == name && point.exists_in(cfg))
    }

    /// Dense index of this point among all possible points of a model with `n_layers` blocks
    /// (optional points included), for bit sets.
    fn index(self, n_layers: usize) -> usize {
        let per_block = BlockHook::ALL.len();
        let first_head = EMBED_POINTS.len() + n_layers * per_block;
        match self {
            Self::Block(layer, kind) => {
                let kind = BlockHook::ALL.iter().position(|k| *k == kind).unwrap_or(0);
                EMBED_POINTS.len() + layer * per_block + kind
            }
            point => match EMBED_POINTS.iter().position(|p| *p == point) {
                Some(i) => i,
                None => first_head + HEAD_POINTS.iter().position(|p| *p == point).unwrap_or(0),
            },
        }
    }
}

/// A set of hook points, stored as bits: membership costs one shift and one mask.
#[derive(Debug, Clone)]
pub struct HookSet {
    n_layers: usize,
    bits: Vec<u64>,
}

impl HookSet {
    /// The empty set for a model with `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        let len = EMBED_POINTS.len() + n_layers * BlockHook::ALL.len() + HEAD_POINTS.len();
        Self {
            n_layers,
            bits: vec![0; len.div_ceil(64)],
        }
    }

    /// Adds `point`.
    pub fn insert(&mut self, point: HookPoint) {
        let i = point.index(self.n_layers);
        self.bits[i / 64] |= 1 << (i % 64);
    }

    /// Whether `point` is in the set.
    #[inline]
    pub fn contains(&self, point: HookPoint) -> bool {
        let i = point.index(self.n_layers);
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }
}

/// What the forward pass does at each hook point.
///
/// At every point the model first asks [`Hooks::wants`]; only when it answers `true` is the
/// activation handed to [`Hooks::call`], which returns it unchanged (to observe it) or returns a
/// replacement of the same shape and dtype that then flows on through the rest of the model.
pub trait Hooks {
    /// Whether this caller wants to see `point`.
    fn wants(&self, point: HookPoint) -> bool;

    /// Sees the activation at `point`; returns it, or a replacement.
    fn call(&mut self, point: HookPoint, activation: Tensor) -> Result<Tensor>;

    /// Asked between blocks: `true` stops the pass with [`crate::Error::Interrupted`].
    #[inline]
    fn interrupted(&self) -> bool {
        false
    }

    /// Whether this caller wants to see the gradient at `point` in a backward pass
    /// ([`crate::HookedBert::backward`]). Unrequested points cost one call, as in the forward.
    #[inline]
    fn wants_grad(&self, _point: HookPoint) -> bool {
        false
    }

    /// Sees the gradient flowing into `point` (d metric / d activation, the activation's shape);
    /// returns it, or a replacement that then flows on backwards (TransformerLens's
    /// `add_hook(name, fn, dir="bwd")`).
    fn call_grad(&mut self, _point: HookPoint, grad: Tensor) -> Result<Tensor> {
        Ok(grad)
    }
}

/// No hooks at all: the plain forward pass.
pub struct NoHooks;

impl Hooks for NoHooks {
    #[inline]
    fn wants(&self, _: HookPoint) -> bool {
        false
    }

    fn call(&mut self, _: HookPoint, activation: Tensor) -> Result<Tensor> {
        Ok(activation)
    }
}

/// Records the activations at a set of points, in firing order, without copying them (a
/// recorded [`Tensor`] shares its storage with the forward pass).
pub struct RecordingHooks {
    points: HookSet,
    /// The recorded activations, in firing order.
    pub records: Vec<(HookPoint, Tensor)>,
}

impl RecordingHooks {
    /// Records every point in `points`.
    pub fn new(points: HookSet) -> Self {
        Self {
            points,
            records: Vec::new(),
        }
    }
}

impl Hooks for RecordingHooks {
    fn wants(&self, point: HookPoint) -> bool {
        self.points.contains(point)
    }

    fn call(&mut self, point: HookPoint, activation: Tensor) -> Result<Tensor> {
        self.records.push((point, activation.clone()));
        Ok(activation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_matches_transformer_lens_counts_and_order() {
        let cfg = BertConfig::tiny(2);
        let names: Vec<String> = HookPoint::all(&cfg)
            .into_iter()
            .map(HookPoint::name)
            .collect();
        // TransformerLens fills 10 + 18 * n_layers cache entries by default; the pooler's and
        // the NSP head's points come on top.
        assert_eq!(names.len(), 10 + 18 * 2 + 2);
        assert_eq!(
            names[..7],
            [
                "embed.hook_embed",
                "embed.hook_pos_embed",
                "embed.hook_token_type_embed",
                "embed.ln.hook_scale",
                "embed.ln.hook_normalized",
                "hook_full_embed",
                "blocks.0.hook_resid_pre",
            ]
        );
        assert_eq!(
            names[names.len() - 3..],
            [
                "unembed.hook_out",
                "pooler.hook_pooler_out",
                "nsp_head.hook_nsp_out"
            ]
        );
    }

    #[test]
    fn optional_points_follow_their_flags() {
        let mut cfg = BertConfig::tiny(1);
        assert!(HookPoint::parse("blocks.0.attn.hook_result", &cfg).is_none());
        cfg.use_attn_result = true;
        cfg.use_split_qkv_input = true;
        cfg.use_hook_mlp_in = true;
        assert_eq!(HookPoint::all(&cfg).len(), 10 + 23 + 2);
        assert_eq!(
            HookPoint::parse("blocks.0.attn.hook_result", &cfg),
            Some(HookPoint::Block(0, BlockHook::Result))
        );
    }

    #[test]
    fn names_round_trip_and_bad_names_do_not_parse() {
        let mut cfg = BertConfig::tiny(3);
        cfg.use_attn_result = true;
        for point in HookPoint::all(&cfg) {
            assert_eq!(HookPoint::parse(&point.name(), &cfg), Some(point));
        }
        for bad in [
            "blocks.3.hook_resid_pre",
            "blocks.01.hook_resid_pre",
            "blocks.-1.hook_resid_pre",
            "blocks..hook_resid_pre",
            "hook_embed",
            "blocks.0.hook_nope",
            "",
        ] {
            assert_eq!(HookPoint::parse(bad, &cfg), None, "{bad}");
        }
    }

    #[test]
    fn pre_ln_blocks_fire_their_norms_before_what_they_normalise() {
        let mut cfg = BertConfig::modernbert_base();
        cfg.n_layers = 2;
        cfg.attn_types = cfg.attn_types.map(|types| types[..2].to_vec());
        let names: Vec<String> = HookPoint::all(&cfg)
            .into_iter()
            .map(HookPoint::name)
            .collect();
        let block = |layer: usize| -> Vec<&str> {
            let prefix = format!("blocks.{layer}.");
            names
                .iter()
                .filter_map(|n| n.strip_prefix(&prefix))
                .collect()
        };
        // Layer 0 has no attention norm (its input is the normalised embedding).
        assert_eq!(block(0)[..2], ["hook_resid_pre", "attn.hook_q"]);
        assert_eq!(
            block(1),
            [
                "hook_resid_pre",
                "ln1.hook_scale",
                "ln1.hook_normalized",
                "attn.hook_q",
                "attn.hook_k",
                "attn.hook_v",
                "attn.hook_rot_q",
                "attn.hook_rot_k",
                "attn.hook_attn_scores",
                "attn.hook_pattern",
                "attn.hook_z",
                "hook_attn_out",
                "hook_resid_mid",
                "ln2.hook_scale",
                "ln2.hook_normalized",
                "mlp.hook_pre",
                "mlp.hook_pre_linear",
                "mlp.hook_post",
                "hook_mlp_out",
                "hook_resid_post",
            ]
        );
        assert_eq!(
            names[..4],
            [
                "embed.hook_embed",
                "embed.ln.hook_scale",
                "embed.ln.hook_normalized",
                "hook_full_embed"
            ]
        );
        assert_eq!(
            names[names.len() - 6..],
            [
                "ln_final.hook_scale",
                "ln_final.hook_normalized",
                "mlm_head.ln.hook_scale",
                "mlm_head.ln.hook_normalized",
                "unembed.hook_in",
                "unembed.hook_out",
            ]
        );
        assert!(HookPoint::parse("blocks.0.ln1.hook_scale", &cfg).is_none());
        assert!(HookPoint::parse("blocks.1.hook_normalized_resid_post", &cfg).is_none());
        for point in HookPoint::all(&cfg) {
            assert_eq!(HookPoint::parse(&point.name(), &cfg), Some(point));
        }
    }

    #[test]
    fn hook_set_membership_is_exact() {
        let cfg = BertConfig::tiny(4);
        let all = HookPoint::all(&cfg);
        let mut set = HookSet::new(cfg.n_layers);
        assert!(set.is_empty());
        for point in all.iter().step_by(3) {
            set.insert(*point);
        }
        for (i, point) in all.iter().enumerate() {
            assert_eq!(set.contains(*point), i % 3 == 0, "{}", point.name());
        }
    }
}
