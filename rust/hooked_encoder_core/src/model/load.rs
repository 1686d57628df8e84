//! Building a [`HookedBert`] from a checkpoint's tensors: the [`Loader`] that finds each weight
//! under its family's name and checks its shape, [`HookedBert::load`], and the packing of the
//! weights that the CPU matmul reads.

use super::*;

/// Tensor names that checkpoints carry but that are not weights.
const KNOWN_BUFFERS: [&str; 2] = ["embeddings.position_ids", "embeddings.token_type_ids"];

/// Looks up weights by their canonical (BERT) names in a [`TensorSource`] that names them as
/// the config's [`Family`] does, checking every shape, and remembers what it used so that
/// leftovers can be reported.
struct Loader<'a> {
    source: &'a dyn TensorSource,
    family: Family,
    /// Whether encoder weights carry the family's prefix (`bert.`/`roberta.`, as in
    /// `...ForMaskedLM` checkpoints) or none (`BertModel`/`RobertaModel`).
    prefixed: bool,
    device: &'a Device,
    used: BTreeSet<String>,
}

impl<'a> Loader<'a> {
    fn new(source: &'a dyn TensorSource, family: Family, device: &'a Device) -> Result<Self> {
        let prefixed_word = family
            .checkpoint_name("bert.embeddings.word_embeddings.weight")
            .unwrap_or_default();
        let word = prefixed_word
            .strip_prefix(family.encoder_prefix())
            .unwrap_or(&prefixed_word)
            .to_string();
        let prefixed = if source.contains(&prefixed_word) {
            true
        } else if source.contains(&word) {
            false
        } else {
            let names = source.names();
            let sample: Vec<&String> = names.iter().take(5).collect();
            return Err(Error::Checkpoint(format!(
                "{} holds no {} weights: expected {word:?} (optionally as {prefixed_word:?}), \
                 found {} tensors such as {sample:?}",
                source.describe(),
                family.name(),
                names.len()
            )));
        };
        Ok(Self {
            source,
            family,
            prefixed,
            device,
            used: BTreeSet::new(),
        })
    }

    /// The checkpoint's name for a canonical top-level (head) weight, if the family has it.
    fn head_name(&self, canonical: &str) -> Option<String> {
        self.family.checkpoint_name(canonical)
    }

    /// Whether the checkpoint holds the canonical top-level (head) weight.
    fn has_head(&self, canonical: &str) -> bool {
        self.head_name(canonical)
            .is_some_and(|name| self.source.contains(&name))
    }

    /// The checkpoint's name for a canonical encoder weight (given without `bert.`).
    fn encoder_name(&self, name: &str) -> String {
        let Some(full) = self.family.checkpoint_name(&format!("bert.{name}")) else {
            return name.to_string(); // the family has no such weight: report the BERT name
        };
        if self.prefixed {
            full
        } else {
            full.strip_prefix(self.family.encoder_prefix())
                .map_or(full.clone(), str::to_string)
        }
    }

    /// Loads the first of `names` that exists, checking its shape.
    fn first_of(&mut self, names: &[String], shape: &[usize]) -> Result<Tensor> {
        let Some(name) = names.iter().find(|n| self.source.contains(n)) else {
            return Err(Error::Checkpoint(format!(
                "{} is missing tensor {:?}",
                self.source.describe(),
                names[0]
            )));
        };
        let found = self.source.shape(name).unwrap_or_default();
        if found != shape {
            return Err(Error::Checkpoint(format!(
                "tensor {name:?} in {} has shape {found:?}, but the config needs {shape:?}",
                self.source.describe()
            )));
        }
        self.used.insert(name.clone());
        self.source.load_f32(name, self.device)
    }

    /// An encoder weight (under the checkpoint's prefix).
    fn encoder(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.first_of(&[self.encoder_name(name)], shape)
    }

    /// The checkpoint's name for a weight: an encoder weight (without `bert.`) or, with
    /// `top_level`, a head weight (canonical name).
    fn name(&self, name: &str, top_level: bool) -> String {
        if top_level {
            self.head_name(name).unwrap_or_else(|| name.to_string())
        } else {
            self.encoder_name(name)
        }
    }

    /// Whether the family names the weight at all (ModernBERT names no bias but the
    /// decoder's).
    fn family_has(&self, name: &str, top_level: bool) -> bool {
        let canonical = if top_level {
            name.to_string()
        } else {
            format!("bert.{name}")
        };
        self.family.checkpoint_name(&canonical).is_some()
    }

    fn linear(&mut self, name: &str, d_out: usize, d_in: usize, top_level: bool) -> Result<Linear> {
        let weight = self.name(&format!("{name}.weight"), top_level);
        Ok(Linear::new(
            self.first_of(&[weight], &[d_out, d_in])?,
            self.bias(&format!("{name}.bias"), &[], d_out, top_level)?,
        ))
    }

    /// The bias `name` (or the first of `other_names` present), or zeros where the family has
    /// no such bias: a bias-free layer is the layer with a zero bias, which keeps one code
    /// path (and TransformerLens shows bias-free models' `b_Q` as zeros too).
    fn bias(
        &mut self,
        name: &str,
        other_names: &[&str],
        d: usize,
        top_level: bool,
    ) -> Result<Tensor> {
        if !self.family_has(name, top_level) {
            return Ok(Tensor::zeros(d, DType::F32, self.device)?);
        }
        let names: Vec<String> = std::iter::once(name)
            .chain(other_names.iter().copied())
            .map(|n| self.name(n, top_level))
            .collect();
        self.first_of(&names, &[d])
    }

    /// A LayerNorm, under its current (`weight`/`bias`) or original TensorFlow
    /// (`gamma`/`beta`) names.
    fn layer_norm(&mut self, name: &str, d: usize, top_level: bool) -> Result<LayerNorm> {
        let [weight, gamma] =
            ["weight", "gamma"].map(|part| self.name(&format!("{name}.{part}"), top_level));
        Ok(LayerNorm {
            weight: self.first_of(&[weight, gamma], &[d])?,
            bias: self.bias(
                &format!("{name}.bias"),
                &[&format!("{name}.beta")],
                d,
                top_level,
            )?,
        })
    }

    /// Tensors in the source that no part of the model used, buffers aside.
    fn unused(&self) -> Vec<String> {
        self.source
            .names()
            .into_iter()
            .filter(|n| !self.used.contains(n))
            .filter(|n| !KNOWN_BUFFERS.iter().any(|b| n.ends_with(b)))
            .collect()
    }
}

impl HookedBert {
    /// Builds the model from Hugging Face BERT weights (`BertForPreTraining`, `BertForMaskedLM`
    /// or `BertModel`, with or without the `bert.` prefix). A checkpoint without an MLM head
    /// loads as an encoder only. Returns the model and the names of tensors it did not use.
    pub fn load(
        cfg: BertConfig,
        source: &dyn TensorSource,
        device: &Device,
    ) -> Result<(Self, Vec<String>)> {
        cfg.validate()?;
        let mut loader = Loader::new(source, cfg.family, device)?;
        let (d, a, m, e) = (cfg.d_model, cfg.d_attn(), cfg.d_mlp, cfg.embed_width());
        // Hugging Face ties the MLM decoder to the word embeddings and then often omits it on
        // save. A tied table is packed for the decoder here, before the blocks load, so that
        // the unpacked table it replaces is freed before load's peak memory (see
        // [`WordEmbeddings::tied`]).
        let has_mlm_head = loader.has_head("cls.predictions.transform.dense.weight");
        let has_own_decoder = loader.has_head("cls.predictions.decoder.weight");
        let word_embeddings = WordEmbeddings::tied(
            loader.encoder("embeddings.word_embeddings.weight", &[cfg.d_vocab, e])?,
            has_mlm_head && !has_own_decoder,
        )?;
        let position_embeddings = (cfg.position_rows() > 0)
            .then(|| {
                loader.encoder(
                    "embeddings.position_embeddings.weight",
                    &[cfg.position_rows(), e],
                )
            })
            .transpose()?;
        let token_type_embeddings = (cfg.n_token_types > 0)
            .then(|| {
                loader.encoder(
                    "embeddings.token_type_embeddings.weight",
                    &[cfg.n_token_types, e],
                )
            })
            .transpose()?;
        let embed_ln = loader.layer_norm("embeddings.LayerNorm", e, false)?;
        let embed_proj = cfg
            .projects_embeddings()
            .then(|| loader.linear("embeddings_project", d, e, false))
            .transpose()?;
        let relative_attention_bias = cfg
            .relative_attention_buckets
            .map(|rows| {
                loader.encoder(
                    "encoder.relative_attention_bias.weight",
                    &[rows, cfg.n_heads],
                )
            })
            .transpose()?;

        let family = cfg.family;
        // A gated MLP's first layer holds both halves.
        let mlp_rows = if family.gated_mlp() { 2 * m } else { m };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("encoder.layer.{l}");
            let qkv = if family.fused_qkv() {
                loader.linear(&format!("{p}.attention.self.qkv"), 3 * a, d, false)?
            } else {
                let q = loader.linear(&format!("{p}.attention.self.query"), a, d, false)?;
                let k = loader.linear(&format!("{p}.attention.self.key"), a, d, false)?;
                let v = loader.linear(&format!("{p}.attention.self.value"), a, d, false)?;
                Linear::new(
                    Tensor::cat(&[&q.weight()?, &k.weight()?, &v.weight()?], 0)?,
                    Tensor::cat(&[&q.bias, &k.bias, &v.bias], 0)?,
                )
            };
            let attn_out = loader.linear(&format!("{p}.attention.output.dense"), d, a, false)?;
            let heads = (cfg.use_split_qkv_input || cfg.use_attn_result)
                .then(|| head_weights(&cfg, &qkv, &attn_out))
                .transpose()?;
            let ln1 = family
                .has_attention_norm(l)
                .then(|| loader.layer_norm(&format!("{p}.attention.output.LayerNorm"), d, false))
                .transpose()?;
            blocks.push(Block {
                qkv,
                attn_out,
                ln1,
                mlp_in: loader.linear(&format!("{p}.intermediate.dense"), mlp_rows, d, false)?,
                mlp_out: loader.linear(&format!("{p}.output.dense"), d, m, false)?,
                ln2: loader.layer_norm(&format!("{p}.output.LayerNorm"), d, false)?,
                heads,
            });
        }
        let ln_final = family
            .pre_layer_norm()
            .then(|| loader.layer_norm("final_norm", d, false))
            .transpose()?;

        let mlm_head = if has_mlm_head {
            // The head maps the residual stream back to the embeddings' width to unembed.
            let dense = loader.linear("cls.predictions.transform.dense", e, d, true)?;
            let ln = loader.layer_norm("cls.predictions.transform.LayerNorm", e, true)?;
            let bias_names = ["cls.predictions.decoder.bias", "cls.predictions.bias"];
            let bias = loader.bias(bias_names[0], &bias_names[1..], cfg.d_vocab, true)?;
            // Both bias names hold the same tied parameter when both are present.
            let used = bias_names.map(|name| loader.name(name, true));
            loader.used.extend(used);
            let decoder = if has_own_decoder {
                let name = loader.name("cls.predictions.decoder.weight", true);
                Linear::new(loader.first_of(&[name], &[cfg.d_vocab, e])?, bias)
            } else {
                word_embeddings.as_decoder(bias)
            };
            Some(MlmHead { dense, ln, decoder })
        } else {
            None
        };
        let pooler = source
            .contains(&loader.encoder_name("pooler.dense.weight"))
            .then(|| loader.linear("pooler.dense", d, d, false))
            .transpose()?;
        let nsp_head = loader
            .has_head("cls.seq_relationship.weight")
            .then(|| loader.linear("cls.seq_relationship", 2, d, true))
            .transpose()?;
        let discriminator = loader
            .has_head("discriminator_predictions.dense.weight")
            .then(|| -> Result<Discriminator> {
                Ok(Discriminator {
                    dense: loader.linear("discriminator_predictions.dense", d, d, true)?,
                    prediction: loader.linear(
                        "discriminator_predictions.dense_prediction",
                        1,
                        d,
                        true,
                    )?,
                })
            })
            .transpose()?;
        let unused = loader.unused();
        let model = Self {
            cfg,
            device: device.clone(),
            dtype: DType::F32,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embed_ln,
            blocks,
            ln_final,
            mlm_head,
            pooler,
            nsp_head,
            relative_attention_bias,
            embed_proj,
            discriminator,
        };
        Ok((model.with_packed_weights()?, unused))
    }

    /// The model with the encoder blocks' weights and the MLM decoder packed for the CPU matmul
    /// kernel where they are float32 CPU tensors (see `Linear::packed`); elsewhere unchanged.
    /// A decoder tied to the word embeddings is packed with them (see [`WordEmbeddings::tied`]);
    /// one of its own is packed here.
    pub(super) fn with_packed_weights(mut self) -> Result<Self> {
        if let Some(head) = &mut self.mlm_head {
            head.decoder = head.decoder.clone().packed()?;
        }
        for block in &mut self.blocks {
            for layer in [
                &mut block.qkv,
                &mut block.attn_out,
                &mut block.mlp_in,
                &mut block.mlp_out,
            ] {
                *layer = layer.clone().packed()?;
            }
        }
        Ok(self)
    }
}
