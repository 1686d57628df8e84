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
use crate::{cpu, cuda, Activation, AttentionDir, BertConfig, Error, Result, TensorSource};

/// How far the forward pass goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Through the MLM head and unembedding: logits `[batch, pos, d_vocab]`.
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

/// A dense layer `y = x Wᵀ + b` with `W` stored `[out, in]` as in Hugging Face.
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Applies the layer, then `act` if given, to the last dimension of `x`.
    fn forward(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, d_in))?;
        let y = if rows <= kernels::FEW_ROWS && cpu::kernels_on(x.device(), x.dtype()) {
            let (x, n) = (x.contiguous()?, self.weight.dim(0)?);
            let (xs, ws) = (cpu::view(&x)?, cpu::view(&self.weight)?);
            cpu::tensor(
                kernels::few_rows_matmul(xs.slice(), rows, ws.slice(), n, d_in),
                &[rows, n],
            )?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        let y = if cpu::kernels_on(y.device(), y.dtype()) {
            // The matmul result is ours alone: add the bias (and activate) in place, one pass.
            cpu::bias_act_inplace(&y, &self.bias, act)?;
            y
        } else if cuda::kernels_on(&y) {
            cuda::bias_act_inplace(&y, &self.bias, act)?;
            y
        } else {
            let y = y.broadcast_add(&self.bias)?;
            match act {
                Some(act) => apply_act(act, &y)?,
                None => y,
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap_or(&mut 0) = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

/// Per-head projection weights, needed only by `use_split_qkv_input` (where every head has its
/// own input) and `use_attn_result` (where every head's output is exposed).
struct HeadWeights {
    /// `[n_heads, d_model, d_head]` each, TransformerLens's `W_Q`/`W_K`/`W_V` layout.
    w_qkv: [Tensor; 3],
    /// `[n_heads, d_head]` each.
    b_qkv: [Tensor; 3],
    /// `[n_heads, d_head, d_model]`, TransformerLens's `W_O` layout.
    w_o: Tensor,
}

struct Block {
    /// Query, key and value projections stacked: weight `[3 * n_heads * d_head, d_model]`.
    qkv: Linear,
    attn_out: Linear,
    ln1: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    ln2: LayerNorm,
    heads: Option<HeadWeights>,
}

struct MlmHead {
    dense: Linear,
    ln: LayerNorm,
    /// The unembedding `[d_vocab, d_model]` and its bias.
    decoder: Linear,
}

/// A BERT encoder with hook points.
pub struct HookedBert {
    cfg: BertConfig,
    device: Device,
    /// What the weights and activations are stored in: float32 (the default, and the only
    /// dtype of the fused CPU kernels), or float16/bfloat16 (portable ops; see [`Self::to`]).
    dtype: DType,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embed_ln: LayerNorm,
    blocks: Vec<Block>,
    mlm_head: Option<MlmHead>,
    /// `tanh(dense(x[:, 0]))`, for next-sentence prediction; absent from many checkpoints.
    pooler: Option<Linear>,
    /// Next-sentence prediction logits from the pooled output, `[2, d_model]`.
    nsp_head: Option<Linear>,
}

/// Tensor names that checkpoints carry but that are not weights.
const KNOWN_BUFFERS: [&str; 2] = ["embeddings.position_ids", "embeddings.token_type_ids"];

/// Looks up Hugging Face names in a [`TensorSource`], checking every shape, and remembers what
/// it used so that leftovers can be reported.
struct Loader<'a> {
    source: &'a dyn TensorSource,
    /// `"bert."` for `BertForPreTraining`/`BertForMaskedLM` checkpoints, `""` for `BertModel`.
    prefix: &'static str,
    device: &'a Device,
    used: BTreeSet<String>,
}

impl<'a> Loader<'a> {
    fn new(source: &'a dyn TensorSource, device: &'a Device) -> Result<Self> {
        let prefix = if source.contains("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else if source.contains("embeddings.word_embeddings.weight") {
            ""
        } else {
            let names = source.names();
            let sample: Vec<&String> = names.iter().take(5).collect();
            return Err(Error::Checkpoint(format!(
                "{} holds no BERT weights: expected \"embeddings.word_embeddings.weight\" \
                 (optionally under \"bert.\"), found {} tensors such as {sample:?}",
                source.describe(),
                names.len()
            )));
        };
        Ok(Self {
            source,
            prefix,
            device,
            used: BTreeSet::new(),
        })
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
        self.first_of(&[format!("{}{name}", self.prefix)], shape)
    }

    fn linear(&mut self, name: &str, d_out: usize, d_in: usize, top_level: bool) -> Result<Linear> {
        let full = |suffix: &str| {
            if top_level {
                format!("{name}.{suffix}")
            } else {
                format!("{}{name}.{suffix}", self.prefix)
            }
        };
        let (w, b) = (full("weight"), full("bias"));
        Ok(Linear {
            weight: self.first_of(&[w], &[d_out, d_in])?,
            bias: self.first_of(&[b], &[d_out])?,
        })
    }

    /// A LayerNorm, under its current (`weight`/`bias`) or original TensorFlow
    /// (`gamma`/`beta`) names.
    fn layer_norm(&mut self, name: &str, d: usize, top_level: bool) -> Result<LayerNorm> {
        let prefix = if top_level { "" } else { self.prefix };
        let names =
            |a: &str, b: &str| [format!("{prefix}{name}.{a}"), format!("{prefix}{name}.{b}")];
        Ok(LayerNorm {
            weight: self.first_of(&names("weight", "gamma"), &[d])?,
            bias: self.first_of(&names("bias", "beta"), &[d])?,
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
        let mut loader = Loader::new(source, device)?;
        let (d, a, m) = (cfg.d_model, cfg.d_attn(), cfg.d_mlp);
        let word_embeddings =
            loader.encoder("embeddings.word_embeddings.weight", &[cfg.d_vocab, d])?;
        let position_embeddings =
            loader.encoder("embeddings.position_embeddings.weight", &[cfg.n_ctx, d])?;
        let token_type_embeddings = loader.encoder(
            "embeddings.token_type_embeddings.weight",
            &[cfg.n_token_types, d],
        )?;
        let embed_ln = loader.layer_norm("embeddings.LayerNorm", d, false)?;

        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = format!("encoder.layer.{l}");
            let q = loader.linear(&format!("{p}.attention.self.query"), a, d, false)?;
            let k = loader.linear(&format!("{p}.attention.self.key"), a, d, false)?;
            let v = loader.linear(&format!("{p}.attention.self.value"), a, d, false)?;
            let attn_out = loader.linear(&format!("{p}.attention.output.dense"), d, a, false)?;
            let heads = (cfg.use_split_qkv_input || cfg.use_attn_result)
                .then(|| head_weights(&cfg, [&q, &k, &v], &attn_out))
                .transpose()?;
            blocks.push(Block {
                qkv: Linear {
                    weight: Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
                    bias: Tensor::cat(&[&q.bias, &k.bias, &v.bias], 0)?,
                },
                attn_out,
                ln1: loader.layer_norm(&format!("{p}.attention.output.LayerNorm"), d, false)?,
                mlp_in: loader.linear(&format!("{p}.intermediate.dense"), m, d, false)?,
                mlp_out: loader.linear(&format!("{p}.output.dense"), d, m, false)?,
                ln2: loader.layer_norm(&format!("{p}.output.LayerNorm"), d, false)?,
                heads,
            });
        }

        let mlm_head = if source.contains("cls.predictions.transform.dense.weight") {
            let dense = loader.linear("cls.predictions.transform.dense", d, d, true)?;
            let ln = loader.layer_norm("cls.predictions.transform.LayerNorm", d, true)?;
            // Hugging Face ties the decoder to the word embeddings and often omits it on save.
            let weight = if source.contains("cls.predictions.decoder.weight") {
                loader.first_of(
                    &["cls.predictions.decoder.weight".into()],
                    &[cfg.d_vocab, d],
                )?
            } else {
                word_embeddings.clone()
            };
            let bias = loader.first_of(
                &[
                    "cls.predictions.decoder.bias".into(),
                    "cls.predictions.bias".into(),
                ],
                &[cfg.d_vocab],
            )?;
            // Both bias names hold the same tied parameter when both are present.
            loader.used.insert("cls.predictions.bias".into());
            loader.used.insert("cls.predictions.decoder.bias".into());
            Some(MlmHead {
                dense,
                ln,
                decoder: Linear { weight, bias },
            })
        } else {
            None
        };
        let pooler_name = format!("{}pooler.dense.weight", loader.prefix);
        let pooler = source
            .contains(&pooler_name)
            .then(|| loader.linear("pooler.dense", d, d, false))
            .transpose()?;
        let nsp_head = source
            .contains("cls.seq_relationship.weight")
            .then(|| loader.linear("cls.seq_relationship", 2, d, true))
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
            mlm_head,
            pooler,
            nsp_head,
        };
        Ok((model, unused))
    }

    /// Every weight, under the names of a Hugging Face `BertForPreTraining` checkpoint (the MLM
    /// head, pooler and NSP head only when the model has them), in Hugging Face's layout.
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        let mut linear = |name: String, l: &Linear| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            out.push((format!("{name}.bias"), l.bias.clone()));
        };
        let e = "bert.embeddings";
        let mut tensors = vec![
            (
                format!("{e}.word_embeddings.weight"),
                self.word_embeddings.clone(),
            ),
            (
                format!("{e}.position_embeddings.weight"),
                self.position_embeddings.clone(),
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                self.token_type_embeddings.clone(),
            ),
        ];
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
            for (i, part) in ["query", "key", "value"].iter().enumerate() {
                let weight = block.qkv.weight.narrow(0, i * a, a)?.contiguous()?;
                let bias = block.qkv.bias.narrow(0, i * a, a)?.contiguous()?;
                linear(
                    format!("{p}.attention.self.{part}"),
                    &Linear { weight, bias },
                );
            }
            linear(format!("{p}.attention.output.dense"), &block.attn_out);
            linear(format!("{p}.intermediate.dense"), &block.mlp_in);
            linear(format!("{p}.output.dense"), &block.mlp_out);
            tensors.extend(norm(&format!("{p}.attention.output"), &block.ln1));
            tensors.extend(norm(&format!("{p}.output"), &block.ln2));
        }
        if let Some(head) = &self.mlm_head {
            linear("cls.predictions.transform.dense".into(), &head.dense);
            tensors.extend(norm("cls.predictions.transform", &head.ln));
            linear("cls.predictions.decoder".into(), &head.decoder);
        }
        if let Some(pooler) = &self.pooler {
            linear("bert.pooler.dense".into(), pooler);
        }
        if let Some(nsp) = &self.nsp_head {
            linear("cls.seq_relationship".into(), nsp);
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
        let linear = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                weight: t(&l.weight)?,
                bias: t(&l.bias)?,
            })
        };
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
                    ln1: norm(&b.ln1)?,
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
        Ok(Self {
            cfg: self.cfg.clone(),
            device: device.clone(),
            dtype,
            word_embeddings: t(&self.word_embeddings)?,
            position_embeddings: t(&self.position_embeddings)?,
            token_type_embeddings: t(&self.token_type_embeddings)?,
            embed_ln: norm(&self.embed_ln)?,
            blocks,
            mlm_head,
            pooler: self.pooler.as_ref().map(linear).transpose()?,
            nsp_head: self.nsp_head.as_ref().map(linear).transpose()?,
        })
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

    /// Whether the checkpoint had an MLM head (so [`Output::Logits`] is available).
    pub fn has_mlm_head(&self) -> bool {
        self.mlm_head.is_some()
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
        let (mut x, first, mask) = match start {
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
        for layer in first..stop {
            // Between blocks is where a caller can stop a long pass (Ctrl-C in Python).
            if hooks.interrupted() {
                return Err(Error::Interrupted);
            }
            x = self.block(layer, &self.blocks[layer], x, &mask, hooks)?;
        }
        if hooks.interrupted() {
            return Err(Error::Interrupted);
        }
        match output {
            Output::Residual => Ok(x),
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
        for (i, input) in inputs.iter().enumerate() {
            if input.dims() != inputs[0].dims() {
                return Err(Error::Input(format!(
                    "query, key and value inputs must have one shape, got {:?} and {:?}",
                    inputs[0].dims(),
                    input.dims()
                )));
            }
            let projection = Linear {
                weight: block.qkv.weight.narrow(0, i * a, a)?,
                bias: block.qkv.bias.narrow(0, i * a, a)?,
            };
            let projected = projection.forward(&self.own(input)?, None)?;
            parts.push(projected.reshape((b, p, self.cfg.n_heads, self.cfg.d_head))?);
        }
        let [q, k, v]: [Tensor; 3] = parts.try_into().map_err(|_| missing_head_weights())?;
        let mask = self.mask(b, p, attention_mask)?;
        self.attention_from(layer, block, Qkv::Separate([q, k, v]), &mask, hooks)
    }

    /// Refuses an output whose head the checkpoint lacks.
    fn check_head(&self, output: Output) -> Result<()> {
        let missing = |what: &str| Err(Error::MissingHead(what.into()));
        match output {
            Output::Logits if self.mlm_head.is_none() => missing(
                "this checkpoint has no MLM head (no cls.predictions.* weights), so it cannot \
                 produce logits; use return_type=None or encoder_output() for its hidden states",
            ),
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
        })
    }

    fn embed(&self, input: &ForwardInput<'_>, hooks: &mut dyn Hooks) -> Result<Tensor> {
        let (b, p, d) = (input.batch, input.pos, self.cfg.d_model);
        let ids = |values: &[i64]| -> Result<Tensor> {
            let values: Vec<u32> = values.iter().map(|v| *v as u32).collect();
            Ok(Tensor::from_vec(values, b * p, &self.device)?)
        };
        let embed = self
            .word_embeddings
            .index_select(&ids(input.tokens)?, 0)?
            .reshape((b, p, d))?;
        let embed = hook(hooks, HookPoint::Embed, embed)?;
        // Positions are 0..pos in every row, with no offset for padding (right padding only).
        let pos_embed = self
            .position_embeddings
            .narrow(0, 0, p)?
            .unsqueeze(0)?
            .broadcast_as((b, p, d))?;
        let pos_embed = hook(hooks, HookPoint::PosEmbed, pos_embed)?;
        let token_type_embed = match input.token_type_ids {
            Some(types) => self
                .token_type_embeddings
                .index_select(&ids(types)?, 0)?
                .reshape((b, p, d))?,
            None => self
                .token_type_embeddings
                .narrow(0, 0, 1)?
                .unsqueeze(0)?
                .broadcast_as((b, p, d))?,
        };
        let token_type_embed = hook(hooks, HookPoint::TokenTypeEmbed, token_type_embed)?;
        let sum = ((embed + pos_embed)? + token_type_embed)?;
        let x = self.layer_norm(
            &sum,
            &self.embed_ln,
            HookPoint::EmbedLnScale,
            HookPoint::EmbedLnNormalized,
            hooks,
        )?;
        hook(hooks, HookPoint::FullEmbed, x)
    }

    /// TransformerLens's `LayerNorm`: centre, divide by `sqrt(mean(x²) + eps)` (hooked as
    /// `hook_scale`), hook the result as `hook_normalized`, then apply the affine map. Two
    /// passes over the data, so near-constant rows do not lose precision.
    fn layer_norm(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let hooked = wants(hooks, scale_point) || wants(hooks, normalized_point);
        if !self.uses_cpu_kernels() {
            if cuda::kernels_on(x) && !hooked {
                if let Some(out) = cuda::layer_norm(x, &ln.weight, &ln.bias, self.cfg.eps)? {
                    return Ok(out);
                }
            }
            return self.layer_norm_generic(x, ln, scale_point, normalized_point, hooks);
        }
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let (weight, bias) = (cpu::view(&ln.weight)?, cpu::view(&ln.bias)?);
        let eps = self.cfg.eps as f32;
        if !hooked {
            let out =
                kernels::layer_norm(cpu::view(&x)?.slice(), weight.slice(), bias.slice(), eps);
            return cpu::tensor(out, &dims);
        }
        let (scale, normalized) =
            kernels::layer_norm_parts(cpu::view(&x)?.slice(), self.cfg.d_model, eps);
        let mut scale_dims = dims.clone();
        *scale_dims.last_mut().unwrap_or(&mut 0) = 1;
        let scale = cpu::tensor(scale, &scale_dims)?;
        let original_scale = scale.id();
        let scale = hook(hooks, scale_point, scale)?;
        let normalized = if scale.id() == original_scale {
            cpu::tensor(normalized, &dims)?
        } else {
            // A hook replaced the scale: divide by the new one.
            x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?
                .broadcast_div(&scale)?
        };
        let normalized = hook(hooks, normalized_point, normalized)?.contiguous()?;
        let out = kernels::affine(
            cpu::view(&normalized)?.slice(),
            weight.slice(),
            bias.slice(),
        );
        cpu::tensor(out, &dims)
    }

    /// [`Self::layer_norm`] in plain Candle ops, for devices without our kernels.
    fn layer_norm_generic(
        &self,
        x: &Tensor,
        ln: &LayerNorm,
        scale_point: HookPoint,
        normalized_point: HookPoint,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        // Statistics in float32 whatever the model's dtype (PyTorch's LayerNorm does the same
        // for half precision); the hooked values are stored in the model's dtype.
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let scale = centred
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, self.cfg.eps)?
            .sqrt()?;
        let scale = hook(hooks, scale_point, scale.to_dtype(self.dtype)?)?;
        let normalized = centred.broadcast_div(&scale.to_dtype(DType::F32)?)?;
        let normalized = hook(hooks, normalized_point, normalized.to_dtype(self.dtype)?)?;
        Ok(normalized
            .broadcast_mul(&ln.weight)?
            .broadcast_add(&ln.bias)?)
    }

    /// One post-LN block, as TransformerLens's `BertBlock`.
    fn block(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let resid_pre = hook(hooks, at(BlockHook::ResidPre), x)?;
        let attn_out = self.attention(layer, block, &resid_pre, mask, hooks)?;
        let attn_out = hook(hooks, at(BlockHook::AttnOut), attn_out)?;
        let resid_mid = hook(hooks, at(BlockHook::ResidMid), add(&resid_pre, &attn_out)?)?;
        let mlp_in = if self.cfg.use_hook_mlp_in {
            hook(hooks, at(BlockHook::MlpIn), resid_mid)?
        } else {
            resid_mid
        };
        let normalized_mid = self.layer_norm(
            &mlp_in,
            &block.ln1,
            at(BlockHook::Ln1Scale),
            at(BlockHook::Ln1Normalized),
            hooks,
        )?;
        let post = if wants(hooks, at(BlockHook::MlpPre)) {
            let pre = block.mlp_in.forward(&normalized_mid, None)?;
            let pre = hook(hooks, at(BlockHook::MlpPre), pre)?;
            apply_act(self.cfg.act_fn, &pre)?
        } else {
            block
                .mlp_in
                .forward(&normalized_mid, Some(self.cfg.act_fn))?
        };
        let post = hook(hooks, at(BlockHook::MlpPost), post)?;
        let mlp_out = block.mlp_out.forward(&post, None)?;
        let mlp_out = hook(hooks, at(BlockHook::MlpOut), mlp_out)?;
        let resid_post = hook(
            hooks,
            at(BlockHook::ResidPost),
            add(&normalized_mid, &mlp_out)?,
        )?;
        let normalized = self.layer_norm(
            &resid_post,
            &block.ln2,
            at(BlockHook::Ln2Scale),
            at(BlockHook::Ln2Normalized),
            hooks,
        )?;
        hook(hooks, at(BlockHook::NormalizedResidPost), normalized)
    }

    /// Multi-head attention, as TransformerLens's `AbstractAttention` (with an additive key
    /// mask), on a block's input. Returns the output including `b_O`.
    fn attention(
        &self,
        layer: usize,
        block: &Block,
        resid_pre: &Tensor,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let qkv = if self.cfg.use_split_qkv_input {
            Qkv::Separate(self.split_qkv(layer, block, resid_pre, hooks)?)
        } else {
            Qkv::Fused(block.qkv.forward(resid_pre, None)?)
        };
        self.attention_from(layer, block, qkv, mask, hooks)
    }

    /// With `use_split_qkv_input`: every head gets its own copy of the input (hooked as
    /// `hook_q_input` ...), projected by its own slice of the weights. Returns q, k, v.
    fn split_qkv(
        &self,
        layer: usize,
        block: &Block,
        resid_pre: &Tensor,
        hooks: &mut dyn Hooks,
    ) -> Result<[Tensor; 3]> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p, _) = resid_pre.dims3()?;
        let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
        let per_head =
            resid_pre
                .unsqueeze(2)?
                .broadcast_as((b, p, self.cfg.n_heads, self.cfg.d_model))?;
        let kinds = [BlockHook::QInput, BlockHook::KInput, BlockHook::VInput];
        let mut out = Vec::with_capacity(3);
        for (i, kind) in kinds.into_iter().enumerate() {
            let input = hook(hooks, at(kind), per_head.clone())?;
            out.push(per_head_projection(
                &input,
                &heads.w_qkv[i],
                &heads.b_qkv[i],
            )?);
        }
        let [q, k, v]: [Tensor; 3] = out.try_into().map_err(|_| missing_head_weights())?;
        Ok([q, k, v])
    }

    /// Attention from projected queries, keys and values: hooks on q, k, v, the scores, the
    /// pattern and z, then the output projection.
    fn attention_from(
        &self,
        layer: usize,
        block: &Block,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = (qkv.dims()?.0, qkv.dims()?.1);
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let z = if self.uses_cpu_kernels() {
            self.attention_z_cpu(layer, qkv, mask, hooks)?
        } else {
            self.attention_z_generic(layer, qkv, mask, hooks)?
        };
        let z = hook(hooks, at(BlockHook::Z), z)?;
        if self.cfg.use_attn_result {
            let heads = block.heads.as_ref().ok_or_else(missing_head_weights)?;
            // result[b, p, h] = z[b, p, h] @ W_O[h], without b_O.
            let z_heads = z.permute((2, 0, 1, 3))?.reshape((h, b * p, dh))?;
            let result = z_heads
                .matmul(&heads.w_o)?
                .reshape((h, b, p, self.cfg.d_model))?
                .permute((1, 2, 0, 3))?
                .contiguous()?;
            let result = hook(hooks, at(BlockHook::Result), result)?;
            Ok(result.sum(2)?.broadcast_add(&block.attn_out.bias)?)
        } else {
            block.attn_out.forward(&z.reshape((b, p, h * dh))?, None)
        }
    }

    /// q, k and v as `[batch, pos, heads, d_head]` tensors, each passed through its hook.
    fn hooked_qkv(&self, layer: usize, qkv: Qkv, hooks: &mut dyn Hooks) -> Result<[Tensor; 3]> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = (qkv.dims()?.0, qkv.dims()?.1);
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let parts = match qkv {
            Qkv::Fused(fused) => {
                let a = h * dh;
                let part = |i: usize| -> Result<Tensor> {
                    Ok(fused
                        .narrow(2, i * a, a)?
                        .contiguous()?
                        .reshape((b, p, h, dh))?)
                };
                [part(0)?, part(1)?, part(2)?]
            }
            Qkv::Separate(parts) => parts,
        };
        let [q, k, v] = parts;
        Ok([
            hook(hooks, at(BlockHook::Q), q)?.contiguous()?,
            hook(hooks, at(BlockHook::K), k)?.contiguous()?,
            hook(hooks, at(BlockHook::V), v)?.contiguous()?,
        ])
    }

    /// Attention up to `z` with the CPU kernels. Unhooked, each head runs scores, mask, softmax
    /// and `@ v` in one task without materialising its scores; q, k and v are read straight out
    /// of the fused projection unless a hook wants them as tensors of their own.
    fn attention_z_cpu(
        &self,
        layer: usize,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let (b, p) = (qkv.dims()?.0, qkv.dims()?.1);
        let (h, dh) = (self.cfg.n_heads, self.cfg.d_head);
        let a = h * dh;
        let shape = AttentionShape {
            batch: b,
            pos: p,
            heads: h,
            d_head: dh,
        };
        let scale = 1.0 / (dh as f32).sqrt();
        let key_mask = KeyMask {
            padding: mask.padding.as_deref(),
            causal: mask.causal,
        };
        let kinds = [BlockHook::Q, BlockHook::K, BlockHook::V];
        let sources: Vec<Tensor> = match qkv {
            Qkv::Fused(fused) if !kinds.iter().any(|kind| wants(hooks, at(*kind))) => {
                vec![fused.contiguous()?]
            }
            qkv => self.hooked_qkv(layer, qkv, hooks)?.to_vec(),
        };
        let views = sources.iter().map(cpu::view).collect::<Result<Vec<_>>>()?;
        let [q, k, v]: [Heads<'_>; 3] = match views.as_slice() {
            [fused] => [0, 1, 2].map(|i| Heads {
                data: &fused.slice()[i * a..],
                row_stride: 3 * a,
            }),
            separate => [0, 1, 2].map(|i| Heads {
                data: separate[i].slice(),
                row_stride: a,
            }),
        };

        let z = if wants(hooks, at(BlockHook::AttnScores)) || wants(hooks, at(BlockHook::Pattern)) {
            let scores = kernels::attention_scores(q, k, shape, scale, key_mask);
            let scores = hook(
                hooks,
                at(BlockHook::AttnScores),
                cpu::tensor(scores, &[b, h, p, p])?,
            )?;
            let mut pattern = cpu::view(&scores.contiguous()?)?.slice().to_vec();
            kernels::softmax_rows_inplace(&mut pattern, p);
            let pattern = hook(
                hooks,
                at(BlockHook::Pattern),
                cpu::tensor(pattern, &[b, h, p, p])?,
            )?;
            kernels::attention_z(cpu::view(&pattern.contiguous()?)?.slice(), v, shape)
        } else {
            kernels::attention_fused(q, k, v, shape, scale, key_mask)
        };
        cpu::tensor(z, &[b, p, h, dh])
    }

    /// Attention up to `z` in plain Candle ops (other devices, and `use_split_qkv_input`).
    fn attention_z_generic(
        &self,
        layer: usize,
        qkv: Qkv,
        mask: &Mask,
        hooks: &mut dyn Hooks,
    ) -> Result<Tensor> {
        let at = |kind| HookPoint::Block(layer, kind);
        let p = qkv.dims()?.1;
        let dh = self.cfg.d_head;
        let [q, k, v] = self.hooked_qkv(layer, qkv, hooks)?;
        let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let (q, k, v) = (heads_first(&q)?, heads_first(&k)?, heads_first(&v)?);
        let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        let scores = match &mask.additive {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let scores = hook(hooks, at(BlockHook::AttnScores), scores)?;
        let pattern = if cpu::kernels_on(scores.device(), scores.dtype()) {
            let mut pattern = cpu::view(&scores.contiguous()?)?.slice().to_vec();
            kernels::softmax_rows_inplace(&mut pattern, p);
            cpu::tensor(pattern, scores.dims())?
        } else {
            // In float32 whatever the model's dtype, as PyTorch's softmax computes half inputs.
            let pattern = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?;
            // A row whose every key is masked is all -inf, and its softmax is 0/0.
            // TransformerLens turns those NaNs into 0 (such a query attends to nothing).
            // (A hook on the scores may have masked whole rows itself.)
            let pattern = if mask.may_empty_rows || wants(hooks, at(BlockHook::AttnScores)) {
                pattern
                    .ne(&pattern)?
                    .where_cond(&pattern.zeros_like()?, &pattern)?
            } else {
                pattern
            };
            pattern.to_dtype(scores.dtype())?
        };
        let pattern = hook(hooks, at(BlockHook::Pattern), pattern)?;
        Ok(pattern.matmul(&v)?.transpose(1, 2)?.contiguous()?) // [b, p, h, dh]
    }
}

/// Projected queries, keys and values.
enum Qkv {
    /// One `[batch, pos, 3 * n_heads * d_head]` tensor from the fused projection.
    Fused(Tensor),
    /// q, k and v as `[batch, pos, n_heads, d_head]` tensors.
    Separate([Tensor; 3]),
}

impl Qkv {
    /// `(batch, pos)`.
    fn dims(&self) -> Result<(usize, usize)> {
        let t = match self {
            Qkv::Fused(t) => t,
            Qkv::Separate([q, _, _]) => q,
        };
        Ok((t.dim(0)?, t.dim(1)?))
    }
}

/// The attention mask of one forward pass.
struct Mask {
    /// `[batch, pos]`: 0 for keys that may be attended to, -inf for padding.
    padding: Option<Vec<f32>>,
    /// Whether the model is causal.
    causal: bool,
    /// Padding and causality as one additive tensor `[batch or 1, 1, pos or 1, pos]`, built
    /// only for devices without our CPU kernels.
    additive: Option<Tensor>,
    /// Whether some query may have every key masked (its softmax is then 0/0). False lets the
    /// portable path skip the NaN clean-up, two full passes over the pattern on a GPU.
    may_empty_rows: bool,
}

/// `a + b` for tensors of one shape.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu::kernels_on(a.device(), a.dtype()) && a.dims() == b.dims() {
        let (a_c, b_c) = (a.contiguous()?, b.contiguous()?);
        let sum = kernels::add(cpu::view(&a_c)?.slice(), cpu::view(&b_c)?.slice());
        return cpu::tensor(sum, a.dims());
    }
    Ok((a + b)?)
}

fn missing_head_weights() -> Error {
    Error::Config("per-head weights were not prepared for this config".into())
}

/// Splits the stacked Hugging Face projections into TransformerLens's per-head layout.
fn head_weights(cfg: &BertConfig, qkv: [&Linear; 3], out: &Linear) -> Result<HeadWeights> {
    let (h, dh, d) = (cfg.n_heads, cfg.d_head, cfg.d_model);
    let w = |l: &Linear| -> Result<Tensor> {
        // [h*dh, d] -> [h, dh, d] -> [h, d, dh]
        Ok(l.weight
            .reshape((h, dh, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let b = |l: &Linear| -> Result<Tensor> { Ok(l.bias.reshape((h, dh))?) };
    Ok(HeadWeights {
        w_qkv: [w(qkv[0])?, w(qkv[1])?, w(qkv[2])?],
        b_qkv: [b(qkv[0])?, b(qkv[1])?, b(qkv[2])?],
        // [d, h*dh] -> [d, h, dh] -> [h, dh, d]
        w_o: out
            .weight
            .reshape((d, h, dh))?
            .permute((1, 2, 0))?
            .contiguous()?,
    })
}

/// `x[b, p, h] @ w[h] + bias[h]` for `x: [b, p, h, d_model]`, `w: [h, d_model, d_head]`.
fn per_head_projection(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, p, h, d) = x.dims4()?;
    let dh = w.dim(2)?;
    let x = x
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((h, b * p, d))?;
    let y = x.matmul(w)?.reshape((h, b, p, dh))?.permute((1, 2, 0, 3))?;
    Ok(y.broadcast_add(bias)?.contiguous()?)
}

fn apply_act(act: Activation, x: &Tensor) -> Result<Tensor> {
    if cpu::kernels_on(x.device(), x.dtype()) {
        let x = x.contiguous()?;
        return cpu::tensor(kernels::activation(cpu::view(&x)?.slice(), act), x.dims());
    }
    Ok(match act {
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
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
    if out.shape() != &shape || out.dtype() != dtype || !out.device().same_device(&device) {
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
