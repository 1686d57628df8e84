use super::*;
use crate::hooks::{HookSet, NoHooks, RecordingHooks};
use crate::WeightMap;

fn config(n_layers: usize) -> BertConfig {
    BertConfig::tiny(n_layers)
}

/// Two layers with every optional hook point on (`hook_result`, the split q/k/v inputs,
/// `hook_mlp_in`).
fn all_optional_config() -> BertConfig {
    BertConfig {
        use_attn_result: true,
        use_split_qkv_input: true,
        use_hook_mlp_in: true,
        ..config(2)
    }
}

/// Two layers in which each position attends only to itself and earlier ones.
fn causal_config() -> BertConfig {
    BertConfig {
        attention_dir: AttentionDir::Causal,
        ..config(2)
    }
}

/// An attention mask whose second row is padding throughout (a row that attends to nothing).
const SECOND_ROW_MASKED: [i64; 8] = [1, 1, 1, 0, 0, 0, 0, 0];

/// A two-layer MPNet: relative position bias, positions from the token ids.
fn mpnet_config() -> BertConfig {
    BertConfig {
        family: Family::Mpnet,
        positions: Positions::FromIds { padding_idx: 1 },
        relative_attention_buckets: Some(32),
        n_token_types: 0,
        ..config(2)
    }
}

fn model(cfg: BertConfig) -> HookedBert {
    // A larger init than BERT's 0.02 so that every part of the network moves the output.
    scaled_model(cfg, 20.0)
}

fn scaled_model(cfg: BertConfig, scale: f64) -> HookedBert {
    let mut weights = WeightMap::random(&cfg, 3, &Device::Cpu).unwrap();
    for name in weights.names() {
        let t = weights.load_f32(&name, &Device::Cpu).unwrap();
        weights.insert(name, (t * scale).unwrap());
    }
    let (model, unused) = HookedBert::load(cfg, &weights, &Device::Cpu).unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    model
}

const TOKENS: [i64; 8] = [1, 5, 7, 2, 3, 12, 0, 0];
const MASK: [i64; 8] = [1, 1, 1, 1, 1, 1, 0, 0];

fn input() -> ForwardInput<'static> {
    ForwardInput {
        batch: 2,
        pos: 4,
        tokens: &TOKENS,
        token_type_ids: None,
        attention_mask: Some(&MASK),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    values(a)
        .iter()
        .zip(values(b))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn record_all(model: &HookedBert, input: &ForwardInput<'_>) -> (Tensor, Vec<(HookPoint, Tensor)>) {
    let mut set = HookSet::new(model.config().n_layers);
    HookPoint::all(model.config())
        .into_iter()
        .for_each(|p| set.insert(p));
    let mut hooks = RecordingHooks::new(set);
    let logits = model.forward(input, Output::Logits, &mut hooks).unwrap();
    (logits, hooks.records)
}

fn get(records: &[(HookPoint, Tensor)], point: HookPoint) -> Tensor {
    records.iter().find(|(p, _)| *p == point).unwrap().1.clone()
}

/// A hook that replaces one point's activation through a closure.
struct Replace<F: FnMut(Tensor) -> Tensor>(HookPoint, F);

impl<F: FnMut(Tensor) -> Tensor> Hooks for Replace<F> {
    fn wants(&self, point: HookPoint) -> bool {
        point == self.0
    }
    fn call(&mut self, _: HookPoint, activation: Tensor) -> Result<Tensor> {
        Ok((self.1)(activation))
    }
}

#[test]
fn recording_every_hook_fires_each_once_in_order_and_changes_nothing() {
    let model = model(config(2));
    let plain = model
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    let (logits, records) = record_all(&model, &input());
    assert_eq!(max_abs_diff(&plain, &logits), 0.0);
    let fired: Vec<HookPoint> = records.iter().map(|(p, _)| *p).collect();
    let mlm_points: Vec<HookPoint> = HookPoint::all(model.config())
        .into_iter()
        .filter(|p| !matches!(p, HookPoint::PoolerOut | HookPoint::NspOut))
        .collect();
    assert_eq!(fired, mlm_points);
    assert_eq!(logits.dims(), [2, 4, 13]);
}

#[test]
fn cached_activations_satisfy_the_reference_identities() {
    let model = model(config(2));
    let (_, r) = record_all(&model, &input());
    let block = |l, k| HookPoint::Block(l, k);
    assert_eq!(
        max_abs_diff(
            &get(&r, HookPoint::FullEmbed),
            &get(&r, block(0, BlockHook::ResidPre))
        ),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &get(&r, block(0, BlockHook::NormalizedResidPost)),
            &get(&r, block(1, BlockHook::ResidPre))
        ),
        0.0
    );
    assert_eq!(get(&r, block(1, BlockHook::Pattern)).dims(), [2, 2, 4, 4]);
    assert_eq!(get(&r, block(1, BlockHook::Ln1Scale)).dims(), [2, 4, 1]);
    // Pattern rows sum to one, and padded keys get exactly zero weight.
    let pattern = values(&get(&r, block(0, BlockHook::Pattern)));
    for row in pattern.chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    for row in pattern[pattern.len() / 2..].chunks(4) {
        assert_eq!(&row[2..], [0.0, 0.0]);
    }
    // Scores hold -inf exactly at masked keys.
    let scores = values(&get(&r, block(0, BlockHook::AttnScores)));
    let second_row = &scores[scores.len() / 2..];
    assert!(second_row
        .chunks(4)
        .all(|row| row[2] == f32::NEG_INFINITY && row[3].is_infinite() && row[0].is_finite()));
}

#[test]
fn layer_norm_hooks_hold_the_documented_formula() {
    let model = model(config(1));
    let (_, r) = record_all(&model, &input());
    let x = values(&get(&r, HookPoint::Block(0, BlockHook::ResidMid)));
    let scale = values(&get(&r, HookPoint::Block(0, BlockHook::Ln1Scale)));
    let normalized = values(&get(&r, HookPoint::Block(0, BlockHook::Ln1Normalized)));
    for (row, (s, n)) in x.chunks(8).zip(scale.iter().zip(normalized.chunks(8))) {
        let row: Vec<f64> = row.iter().map(|v| *v as f64).collect();
        let mean = row.iter().sum::<f64>() / 8.0;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0;
        let expected_scale = (var + 1e-12).sqrt();
        assert!((*s as f64 - expected_scale).abs() <= 1e-5 * expected_scale);
        for (v, got) in row.iter().zip(n) {
            assert!(((v - mean) / expected_scale - *got as f64).abs() < 1e-5);
        }
    }
}

#[test]
fn a_replacement_flows_downstream() {
    let model = model(config(2));
    let plain = model
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    let point = HookPoint::Block(0, BlockHook::Pattern);
    let mut same = Replace(point, |t: Tensor| t);
    let unchanged = model.forward(&input(), Output::Logits, &mut same).unwrap();
    assert_eq!(max_abs_diff(&plain, &unchanged), 0.0);
    let mut zero = Replace(point, |t: Tensor| t.zeros_like().unwrap());
    let edited = model.forward(&input(), Output::Logits, &mut zero).unwrap();
    assert!(max_abs_diff(&plain, &edited) > 1e-3);
}

#[test]
fn a_misshaped_replacement_is_refused_with_the_hook_name() {
    let model = model(config(1));
    let mut bad = Replace(HookPoint::Block(0, BlockHook::V), |t: Tensor| {
        t.narrow(1, 0, 1).unwrap()
    });
    let err = model
        .forward(&input(), Output::Logits, &mut bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocks.0.attn.hook_v") && err.contains("[2, 4, 2, 4]"),
        "{err}"
    );
}

#[test]
fn a_fully_masked_row_attends_to_nothing_and_stays_finite() {
    let model = model(config(1));
    let mask = [1, 1, 1, 1, 0, 0, 0, 0];
    let input = ForwardInput {
        attention_mask: Some(&mask),
        ..input()
    };
    let (logits, r) = record_all(&model, &input);
    let pattern = values(&get(&r, HookPoint::Block(0, BlockHook::Pattern)));
    assert!(pattern[pattern.len() / 2..].iter().all(|v| *v == 0.0));
    assert!(values(&logits).iter().all(|v| v.is_finite()));
}

#[test]
fn the_optional_paths_compute_the_same_function() {
    let plain = model(config(2))
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    let mut cfg = config(2);
    cfg.use_attn_result = true;
    cfg.use_split_qkv_input = true;
    cfg.use_hook_mlp_in = true;
    let model = model(cfg);
    let (logits, r) = record_all(&model, &input());
    let diff = max_abs_diff(&plain, &logits);
    assert!(diff < 1e-4, "{diff} {:?}", values(&plain)[..4].to_vec());
    // The per-head results plus b_O add up to the attention output.
    let result = get(&r, HookPoint::Block(1, BlockHook::Result));
    assert_eq!(result.dims(), [2, 4, 2, 8]);
    let attn_out = get(&r, HookPoint::Block(1, BlockHook::AttnOut));
    let b_o = &model.blocks[1].attn_out.bias;
    assert!(
        max_abs_diff(
            &result.sum(2).unwrap().broadcast_add(b_o).unwrap(),
            &attn_out
        ) < 1e-6
    );
    // Editing one head's query input changes only that head's queries.
    let point = HookPoint::Block(0, BlockHook::QInput);
    let mut edit = Replace(point, |t: Tensor| {
        let head0 = t.narrow(2, 0, 1).unwrap();
        let head1 = (t.narrow(2, 1, 1).unwrap() * 0.0).unwrap();
        Tensor::cat(&[head0, head1], 2).unwrap()
    });
    let mut recorder = RecordingHooks::new({
        let mut s = HookSet::new(2);
        s.insert(HookPoint::Block(0, BlockHook::Q));
        s
    });
    struct Both<'a, A: Hooks, B: Hooks>(&'a mut A, &'a mut B);
    impl<A: Hooks, B: Hooks> Hooks for Both<'_, A, B> {
        fn wants(&self, p: HookPoint) -> bool {
            self.0.wants(p) || self.1.wants(p)
        }
        fn call(&mut self, p: HookPoint, t: Tensor) -> Result<Tensor> {
            let t = if self.0.wants(p) {
                self.0.call(p, t)?
            } else {
                t
            };
            if self.1.wants(p) {
                self.1.call(p, t)
            } else {
                Ok(t)
            }
        }
    }
    model
        .forward(
            &input(),
            Output::Logits,
            &mut Both(&mut edit, &mut recorder),
        )
        .unwrap();
    let q_edited = &recorder.records[0].1;
    let q_plain = get(&r, HookPoint::Block(0, BlockHook::Q));
    let head = |t: &Tensor, h| t.narrow(2, h, 1).unwrap();
    assert_eq!(max_abs_diff(&head(q_edited, 0), &head(&q_plain, 0)), 0.0);
    // With a zero input, head 1's queries are just its bias, which is zero in this model.
    assert!(values(&head(q_edited, 1)).iter().all(|v| *v == 0.0));
}

#[test]
fn a_causal_model_never_attends_forward() {
    let mut cfg = config(1);
    cfg.attention_dir = AttentionDir::Causal;
    let (_, r) = record_all(&model(cfg), &input());
    let pattern = values(&get(&r, HookPoint::Block(0, BlockHook::Pattern)));
    for (i, v) in pattern.iter().enumerate() {
        let (q, k) = ((i / 4) % 4, i % 4);
        if k > q {
            assert_eq!(*v, 0.0);
        }
    }
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let model = model(config(1));
    let run = |input: ForwardInput<'_>| {
        model
            .forward(&input, Output::Logits, &mut NoHooks)
            .unwrap_err()
            .to_string()
    };
    let too_big = [1, 2, 13, 1];
    assert!(run(ForwardInput {
        batch: 1,
        pos: 4,
        tokens: &too_big,
        token_type_ids: None,
        attention_mask: None
    })
    .contains("tokens[0, 2] = 13 is out of range [0, 13)"));
    let negative = [1, -1, 2, 1];
    assert!(run(ForwardInput {
        batch: 1,
        pos: 4,
        tokens: &negative,
        token_type_ids: None,
        attention_mask: None
    })
    .contains("= -1"));
    let long = [1; 7];
    assert!(run(ForwardInput {
        batch: 1,
        pos: 7,
        tokens: &long,
        token_type_ids: None,
        attention_mask: None
    })
    .contains("n_ctx"));
    let short_mask = [1, 1];
    assert!(run(ForwardInput {
        attention_mask: Some(&short_mask),
        ..input()
    })
    .contains("one_zero_attention_mask has 2"));
    let types = [0, 1, 2, 0, 0, 0, 0, 0];
    assert!(run(ForwardInput {
        token_type_ids: Some(&types),
        ..input()
    })
    .contains("token_type_ids[0, 2] = 2"));
}

#[test]
fn an_encoder_only_checkpoint_refuses_logits_but_gives_hidden_states() {
    let cfg = config(1);
    let full = WeightMap::random(&cfg, 1, &Device::Cpu).unwrap();
    let mut encoder_only = WeightMap::new();
    for name in full.names().into_iter().filter(|n| n.starts_with("bert.")) {
        let stripped = name.trim_start_matches("bert.").to_string();
        encoder_only.insert(stripped, full.load_f32(&name, &Device::Cpu).unwrap());
    }
    let (model, _) = HookedBert::load(cfg, &encoder_only, &Device::Cpu).unwrap();
    assert!(!model.has_mlm_head());
    let err = model
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap_err();
    assert!(matches!(err, Error::MissingHead(_)));
    let hidden = model
        .forward(&input(), Output::Residual, &mut NoHooks)
        .unwrap();
    assert_eq!(hidden.dims(), [2, 4, 8]);
}

#[test]
fn missing_and_misshaped_weights_are_named() {
    let cfg = config(1);
    let full = WeightMap::random(&cfg, 1, &Device::Cpu).unwrap();
    let mut broken = WeightMap::new();
    for name in full.names() {
        if name != "bert.encoder.layer.0.output.dense.bias" {
            broken.insert(name.clone(), full.load_f32(&name, &Device::Cpu).unwrap());
        }
    }
    let err = HookedBert::load(cfg.clone(), &broken, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("missing tensor \"bert.encoder.layer.0.output.dense.bias\""),
        "{err}"
    );
    let mut wrong = cfg.clone();
    wrong.d_mlp = 32;
    let err = HookedBert::load(wrong, &full, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("intermediate.dense.weight")
            && err.contains("[16, 8]")
            && err.contains("[32, 8]"),
        "{err}"
    );
}

/// Loading `weights` with `cfg` uses every tensor and gives `original`'s logits exactly.
fn assert_rebuilds(original: &HookedBert, cfg: BertConfig, weights: &WeightMap) {
    let (rebuilt, unused) = HookedBert::load(cfg, weights, &Device::Cpu).unwrap();
    assert!(unused.is_empty(), "{unused:?}");
    let a = original
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    let b = rebuilt
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

#[test]
fn named_weights_rebuild_the_same_model() {
    let original = model(config(2));
    let mut weights = WeightMap::new();
    for (name, tensor) in original.named_weights().unwrap() {
        weights.insert(name, tensor);
    }
    assert_rebuilds(&original, config(2), &weights);
    let names: Vec<String> = weights.names();
    assert!(names.contains(&"bert.pooler.dense.weight".to_string()));
    assert!(names.contains(&"cls.seq_relationship.bias".to_string()));
    assert!(names.contains(&"bert.encoder.layer.1.attention.self.key.weight".to_string()));
}

#[test]
fn a_tied_decoder_shares_one_table_with_the_embeddings_and_an_untied_one_does_not() {
    let original = model(config(1));
    let decoder = |m: &HookedBert| m.mlm_head.as_ref().unwrap().decoder.clone();
    assert!(original.word_embeddings.is_tied_to(&decoder(&original)));
    // Where packing pays, the lookup reads the decoder's packed weight: one copy of the table.
    assert_eq!(
        matches!(original.word_embeddings, WordEmbeddings::Packed(_)),
        crate::packed_matmul::pays_on_this_cpu()
    );
    let copy = original.to(&Device::Cpu, DType::F32).unwrap();
    assert!(copy.word_embeddings.is_tied_to(&decoder(&copy)));
    let named: std::collections::HashMap<String, Tensor> =
        original.named_weights().unwrap().into_iter().collect();
    let table = &named["bert.embeddings.word_embeddings.weight"];
    assert_eq!(
        max_abs_diff(table, &named["cls.predictions.decoder.weight"]),
        0.0
    );

    // A decoder of its own (twice the table): the lookup still reads the table, and the
    // logits are 2 (logits - bias) + bias.
    let mut weights = WeightMap::new();
    for (name, tensor) in &named {
        weights.insert(name.clone(), tensor.clone());
    }
    weights.insert(
        "cls.predictions.decoder.weight".to_string(),
        (table * 2.0).unwrap(),
    );
    let (untied, _) = HookedBert::load(config(1), &weights, &Device::Cpu).unwrap();
    assert!(!untied.word_embeddings.is_tied_to(&decoder(&untied)));
    let (logits, records) = record_all(&original, &input());
    let (untied_logits, untied_records) = record_all(&untied, &input());
    assert_eq!(
        max_abs_diff(
            &get(&records, HookPoint::Embed),
            &get(&untied_records, HookPoint::Embed)
        ),
        0.0
    );
    let bias = &decoder(&original).bias;
    let expected = ((logits.broadcast_sub(bias).unwrap() * 2.0).unwrap())
        .broadcast_add(bias)
        .unwrap();
    assert!(
        max_abs_diff(&untied_logits, &expected)
            < 1e-3 * (1.0 + values(&logits).iter().fold(0f32, |m, v| m.max(v.abs())))
    );
}

#[test]
fn next_sentence_prediction_pools_the_first_token() {
    let model = model(config(1));
    let (_, r) = record_all(&model, &input());
    let mut set = HookSet::new(1);
    set.insert(HookPoint::PoolerOut);
    set.insert(HookPoint::Block(0, BlockHook::NormalizedResidPost));
    let mut hooks = RecordingHooks::new(set);
    let logits = model
        .forward(&input(), Output::NextSentence, &mut hooks)
        .unwrap();
    assert_eq!(logits.dims(), [2, 2]);
    let last = get(&r, HookPoint::Block(0, BlockHook::NormalizedResidPost));
    let pooled = &hooks.records[1].1;
    assert_eq!(pooled.dims(), [2, 8]);
    // pooled = tanh(W x[:, 0] + b), checked by hand for row 1.
    let pooler = model.pooler.as_ref().unwrap();
    let x0 = values(&last.narrow(0, 1, 1).unwrap().narrow(1, 0, 1).unwrap());
    let (w, b) = (values(&pooler.weight().unwrap()), values(&pooler.bias));
    for (j, got) in values(&pooled.narrow(0, 1, 1).unwrap()).iter().enumerate() {
        let z: f32 = (0..8).map(|k| w[j * 8 + k] * x0[k]).sum::<f32>() + b[j];
        assert!((z.tanh() - got).abs() < 1e-5);
    }
}

#[test]
fn the_portable_ops_a_gpu_runs_match_the_cpu_kernels() {
    // A GPU runs plain Candle ops instead of our CPU kernels; force that path here so it is
    // checked on every machine: same logits and same value at every hook point, including a
    // fully masked row, a causal model, and the MLM head's GELU.
    let masked = ForwardInput {
        attention_mask: Some(&SECOND_ROW_MASKED),
        ..input()
    };
    // Padding without an empty row: the portable path skips its NaN clean-up there.
    let padding = [1, 1, 1, 0, 1, 1, 0, 0];
    let padded = ForwardInput {
        attention_mask: Some(&padding),
        ..input()
    };
    let cases = [
        (config(2), input()),
        (config(2), masked),
        (config(2), padded),
        (causal_config(), input()),
        (causal_config(), masked),
    ];
    for (cfg, input) in cases {
        let model = model(cfg);
        // Unhooked first: nothing on the scores, so only the mask decides the clean-up.
        let plain = model.forward(&input, Output::Logits, &mut NoHooks).unwrap();
        let portable_plain = cpu::portable_ops::with(|| {
            model.forward(&input, Output::Logits, &mut NoHooks).unwrap()
        });
        assert!(values(&portable_plain).iter().all(|v| v.is_finite()));
        assert!(max_abs_diff(&plain, &portable_plain) < 1e-4);
        let (logits, records) = record_all(&model, &input);
        let (portable_logits, portable_records) =
            cpu::portable_ops::with(|| record_all(&model, &input));
        assert!(max_abs_diff(&logits, &portable_logits) < 1e-4);
        assert_eq!(records.len(), portable_records.len());
        for ((point, fast), (portable_point, portable)) in records.iter().zip(&portable_records) {
            assert_eq!(point, portable_point);
            let (fast, portable) = (values(fast), values(portable));
            for (a, b) in fast.iter().zip(&portable) {
                // -inf (masked scores) must match exactly; everything else closely.
                assert!(
                    a == b || (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{}: {a} vs {b}",
                    point.name()
                );
            }
        }
    }
}

#[test]
fn an_interrupted_pass_stops_between_blocks() {
    // Asks to stop once block 1 has started: block 1 finishes, block 2 never runs.
    struct StopAfterBlock1 {
        started: Vec<usize>,
    }
    impl Hooks for StopAfterBlock1 {
        fn wants(&self, point: HookPoint) -> bool {
            matches!(point, HookPoint::Block(_, BlockHook::ResidPre))
        }
        fn call(&mut self, point: HookPoint, activation: Tensor) -> Result<Tensor> {
            if let HookPoint::Block(layer, _) = point {
                self.started.push(layer);
            }
            Ok(activation)
        }
        fn interrupted(&self) -> bool {
            self.started.contains(&1)
        }
    }
    let model = model(config(3));
    let mut hooks = StopAfterBlock1 { started: vec![] };
    let result = model.forward(&input(), Output::Logits, &mut hooks);
    assert!(matches!(result, Err(Error::Interrupted)), "{result:?}");
    assert_eq!(hooks.started, [0, 1]);
    // The model itself is untouched.
    assert!(model
        .forward(&input(), Output::Logits, &mut NoHooks)
        .is_ok());
}

/// Deterministic values in [-1, 1) of the given shape (a fixed linear congruential sequence).
fn pseudo_random(dims: &[usize], seed: u64) -> Tensor {
    let n: usize = dims.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// Records the gradient at every hook point; zeroes the one at `zero`, if any.
#[derive(Default)]
struct GradRecorder {
    grads: Vec<(HookPoint, Tensor)>,
    zero: Option<HookPoint>,
}

impl Hooks for GradRecorder {
    fn wants(&self, _: HookPoint) -> bool {
        false
    }
    fn call(&mut self, _: HookPoint, activation: Tensor) -> Result<Tensor> {
        Ok(activation)
    }
    fn wants_grad(&self, _: HookPoint) -> bool {
        true
    }
    fn call_grad(&mut self, point: HookPoint, grad: Tensor) -> Result<Tensor> {
        self.grads.push((point, grad.clone()));
        if self.zero == Some(point) {
            return Ok(grad.zeros_like()?);
        }
        Ok(grad)
    }
}

const TYPES: [i64; 8] = [0, 0, 1, 1, 0, 1, 1, 0];

fn typed_input() -> ForwardInput<'static> {
    ForwardInput {
        token_type_ids: Some(&TYPES),
        ..input()
    }
}

/// `Σ output ⊙ r` in float64, with `delta` added to the activation at `point`.
fn projected(
    model: &HookedBert,
    input: &ForwardInput<'_>,
    output: Output,
    r: &Tensor,
    point: HookPoint,
    delta: &Tensor,
) -> f64 {
    let delta = delta.clone();
    let mut hooks = Replace(point, move |a: Tensor| (a + &delta).unwrap());
    let out = model.forward(input, output, &mut hooks).unwrap();
    values(&out)
        .iter()
        .zip(values(r))
        .map(|(o, r)| *o as f64 * r as f64)
        .sum()
}

/// Checks every recorded gradient `d Σ output ⊙ r / d activation` against central differences
/// along a pseudo-random direction, at steps h and h/2 combined (Richardson) to cancel the h²
/// error term: the scaled-up weights make the model strongly curved.
fn assert_matches_finite_differences(
    model: &HookedBert,
    input: &ForwardInput<'_>,
    output: Output,
    r: &Tensor,
    grads: &[(HookPoint, Tensor)],
) {
    for (i, (point, grad)) in grads.iter().enumerate() {
        let u = pseudo_random(grad.dims(), 100 + i as u64);
        let central = |h: f64| {
            let step = (&u * h).unwrap();
            let plus = projected(model, input, output, r, *point, &step);
            let minus = projected(model, input, output, r, *point, &step.neg().unwrap());
            (plus - minus) / (2.0 * h)
        };
        let numeric = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
        let analytic: f64 = values(grad)
            .iter()
            .zip(values(&u))
            .map(|(g, u)| *g as f64 * u as f64)
            .sum();
        let tol = 2e-3 * (1.0 + analytic.abs().max(numeric.abs()));
        assert!(
            (numeric - analytic).abs() <= tol,
            "{output:?} {}: finite difference {numeric}, backward {analytic}",
            point.name()
        );
    }
}

#[test]
fn every_hook_points_gradient_matches_finite_differences() {
    for cfg in [config(2), all_optional_config()] {
        // Weights 5x BERT's init: every part matters, yet the model is smooth enough for
        // finite differences in float32.
        let model = scaled_model(cfg.clone(), 5.0);
        for output in [Output::Logits, Output::NextSentence, Output::Residual] {
            let (out, tape) = model
                .run_for_backward(Start::Tokens(typed_input()), None, output, &mut NoHooks)
                .unwrap();
            let r = pseudo_random(out.dims(), 7);
            let mut recorder = GradRecorder::default();
            model.backward(tape, &r, &mut recorder).unwrap();
            // Every hook point this output fires reports one gradient.
            let (_, records) = record_all(&model, &typed_input());
            let fired = records
                .iter()
                .filter(|(p, _)| match output {
                    Output::Logits => !matches!(p, HookPoint::PoolerOut | HookPoint::NspOut),
                    Output::NextSentence => !matches!(
                        p,
                        HookPoint::MlmLnScale
                            | HookPoint::MlmLnNormalized
                            | HookPoint::UnembedIn
                            | HookPoint::UnembedOut
                    ),
                    Output::Residual => !matches!(
                        p,
                        HookPoint::MlmLnScale
                            | HookPoint::MlmLnNormalized
                            | HookPoint::UnembedIn
                            | HookPoint::UnembedOut
                            | HookPoint::PoolerOut
                            | HookPoint::NspOut
                    ),
                })
                .count()
                + usize::from(output == Output::NextSentence) * 2;
            assert_eq!(recorder.grads.len(), fired, "{output:?}");
            assert_matches_finite_differences(&model, &typed_input(), output, &r, &recorder.grads);
        }
    }
}

#[test]
fn a_backward_hook_replacement_flows_upstream() {
    let model = model(config(1));
    let run = |zero: Option<HookPoint>| {
        let (out, tape) = model
            .run_for_backward(Start::Tokens(input()), None, Output::Logits, &mut NoHooks)
            .unwrap();
        let mut recorder = GradRecorder {
            zero,
            ..Default::default()
        };
        model
            .backward(tape, &pseudo_random(out.dims(), 3), &mut recorder)
            .unwrap();
        recorder.grads
    };
    let z = HookPoint::Block(0, BlockHook::Z);
    let grads = run(Some(z));
    // With no gradient through z, attention passes nothing back: the block input's gradient is
    // the residual connection's alone.
    let resid_mid = get(&grads, HookPoint::Block(0, BlockHook::ResidMid));
    let resid_pre = get(&grads, HookPoint::Block(0, BlockHook::ResidPre));
    assert!(max_abs_diff(&resid_mid, &resid_pre) == 0.0);
    let unhooked = get(&run(None), HookPoint::Block(0, BlockHook::ResidPre));
    assert!(max_abs_diff(&unhooked, &resid_pre) > 1e-3);
}

#[test]
fn backward_refuses_a_misshaped_gradient_and_half_precision() {
    let model = model(config(1));
    let (_, tape) = model
        .run_for_backward(Start::Tokens(input()), None, Output::Logits, &mut NoHooks)
        .unwrap();
    let err = model
        .backward(tape, &pseudo_random(&[2, 4], 1), &mut NoHooks)
        .unwrap_err();
    assert!(err.to_string().contains("grad_output"), "{err}");
    let half = model.to(&Device::Cpu, DType::F16).unwrap();
    let err = half
        .run_for_backward(Start::Tokens(input()), None, Output::Logits, &mut NoHooks)
        .err()
        .unwrap();
    assert!(err.to_string().contains("float32"), "{err}");
}

#[test]
fn backward_from_a_middle_layer_gives_the_residual_gradient() {
    let model = model(config(2));
    let (_, records) = record_all(&model, &input());
    let x = get(&records, HookPoint::Block(1, BlockHook::ResidPre));
    let start = Start::Residual {
        x,
        layer: 1,
        attention_mask: Some(&MASK),
    };
    let (out, tape) = model
        .run_for_backward(start, None, Output::Logits, &mut NoHooks)
        .unwrap();
    let r = pseudo_random(out.dims(), 5);
    let mut from_middle = GradRecorder::default();
    let d_start = model.backward(tape, &r, &mut from_middle).unwrap();
    let (_, tape) = model
        .run_for_backward(Start::Tokens(input()), None, Output::Logits, &mut NoHooks)
        .unwrap();
    let mut full = GradRecorder::default();
    model.backward(tape, &r, &mut full).unwrap();
    let point = HookPoint::Block(1, BlockHook::ResidPre);
    assert!(max_abs_diff(&d_start, &get(&full.grads, point)) < 1e-6);
    assert!(from_middle
        .grads
        .iter()
        .all(|(p, _)| !matches!(p, HookPoint::Block(0, _) | HookPoint::Embed)));
}

/// A tiny ModernBERT: pre-LN, rotary, gated MLP, no biases; layers global, local, local with
/// a window of 1 (so that the 4-position input is wider than a local layer sees).
fn modern_config() -> BertConfig {
    BertConfig {
        n_token_types: 0,
        eps: 1e-5,
        family: Family::ModernBert,
        positions: Positions::Rotary {
            base: 10_000.0,
            local_base: 100.0,
        },
        attn_types: Some(vec![
            crate::AttnType::Global,
            crate::AttnType::Local,
            crate::AttnType::Local,
        ]),
        window_size: Some(1),
        ..config(3)
    }
}

#[test]
fn modernbert_weights_round_trip_and_have_no_biases_but_the_decoders() {
    let original = model(modern_config());
    let mut weights = WeightMap::new();
    for (name, tensor) in original.checkpoint_weights().unwrap() {
        weights.insert(name, tensor);
    }
    let names = weights.names();
    assert!(names.contains(&"model.layers.1.attn.Wqkv.weight".to_string()));
    assert!(names.contains(&"model.final_norm.weight".to_string()));
    assert!(!names.contains(&"model.layers.0.attn_norm.weight".to_string()));
    let biases: Vec<&String> = names.iter().filter(|n| n.ends_with(".bias")).collect();
    assert_eq!(biases, ["decoder.bias"]);
    assert_rebuilds(&original, modern_config(), &weights);
}

#[test]
fn modernbert_local_layers_see_their_window_and_rotary_keeps_norms() {
    let model = model(modern_config());
    let (_, records) = record_all(&model, &input());
    for layer in 0..3 {
        let scores = values(&get(
            &records,
            HookPoint::Block(layer, BlockHook::AttnScores),
        ));
        for (i, score) in scores.iter().enumerate() {
            let (query, key) = ((i / 4) % 4, i % 4);
            let padded = key >= 2 && i / 32 == 1; // row 1's last two keys are padding
            let outside = layer > 0 && query.abs_diff(key) > 1;
            assert_eq!(
                score.is_finite(),
                !padded && !outside,
                "{layer} {query} {key}"
            );
        }
        // A rotation keeps every head vector's length, and turns position 0 by nothing.
        let q = get(&records, HookPoint::Block(layer, BlockHook::Q));
        let rot = get(&records, HookPoint::Block(layer, BlockHook::RotQ));
        let norms = |t: &Tensor| values(&t.sqr().unwrap().sum(D::Minus1).unwrap());
        for (a, b) in norms(&q).iter().zip(norms(&rot)) {
            assert!((a - b).abs() <= 1e-4 * a.max(1.0), "{a} {b}");
        }
        let first = |t: &Tensor| t.narrow(1, 0, 1).unwrap();
        assert_eq!(max_abs_diff(&first(&q), &first(&rot)), 0.0);
        assert!(max_abs_diff(&q, &rot) > 1e-3);
    }
    // Layer 0's attention reads the embedding itself: it has no ln1.
    assert!(records
        .iter()
        .all(|(p, _)| *p != HookPoint::Block(0, BlockHook::Ln1Scale)));
}

#[test]
fn modernbert_portable_ops_and_kernels_agree_and_hooks_change_nothing() {
    let model = model(modern_config());
    let plain = model
        .forward(&input(), Output::Logits, &mut NoHooks)
        .unwrap();
    let (logits, records) = record_all(&model, &input());
    assert_eq!(max_abs_diff(&plain, &logits), 0.0);
    let (portable_logits, portable_records) =
        cpu::portable_ops::with(|| record_all(&model, &input()));
    assert!(max_abs_diff(&logits, &portable_logits) < 1e-4);
    for ((point, fast), (_, portable)) in records.iter().zip(&portable_records) {
        for (a, b) in values(fast).iter().zip(values(portable)) {
            assert!(
                *a == b || (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                "{}: {a} vs {b}",
                point.name()
            );
        }
    }
}

#[test]
fn modernbert_gradients_match_finite_differences() {
    let model = scaled_model(modern_config(), 5.0);
    for output in [Output::Logits, Output::Residual] {
        let (out, tape) = model
            .run_for_backward(Start::Tokens(input()), None, output, &mut NoHooks)
            .unwrap();
        let r = pseudo_random(out.dims(), 7);
        let mut recorder = GradRecorder::default();
        model.backward(tape, &r, &mut recorder).unwrap();
        let fired: Vec<HookPoint> = record_all(&model, &input())
            .1
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| {
                output == Output::Logits
                    || !matches!(
                        p,
                        HookPoint::MlmLnScale
                            | HookPoint::MlmLnNormalized
                            | HookPoint::UnembedIn
                            | HookPoint::UnembedOut
                    )
            })
            .collect();
        let mut reported: Vec<HookPoint> = recorder.grads.iter().map(|(p, _)| *p).collect();
        reported.reverse();
        assert_eq!(
            reported, fired,
            "{output:?}: gradients come in reverse firing order"
        );
        assert_matches_finite_differences(&model, &input(), output, &r, &recorder.grads);
    }
}

/// The gradient at every hook point (in the order the backward reports them) and at the
/// embedding, for `Σ output ⊙ r`.
fn all_gradients(
    model: &HookedBert,
    input: &ForwardInput<'_>,
    output: Output,
) -> Vec<(HookPoint, Tensor)> {
    let (out, tape) = model
        .run_for_backward(Start::Tokens(*input), None, output, &mut NoHooks)
        .unwrap();
    let mut recorder = GradRecorder::default();
    let d_embed = model
        .backward(tape, &pseudo_random(out.dims(), 11), &mut recorder)
        .unwrap();
    recorder.grads.push((HookPoint::Embed, d_embed));
    recorder.grads
}

#[test]
fn the_portable_ops_backward_a_gpu_runs_matches_the_cpu_kernels() {
    // A GPU's backward runs the forward on plain Candle ops (no CPU kernels) and then the same
    // op-by-op backward; forced here, it must give every gradient the kernel path gives, for
    // each family's structure: BERT with token types and padding (a fully masked row too),
    // causal, the optional split hooks, MPNet's relative bias, ModernBERT's pre-LN, rotary,
    // windowed and gated layers.
    let fully_masked = ForwardInput {
        attention_mask: Some(&SECOND_ROW_MASKED),
        ..typed_input()
    };
    let cases = [
        (config(2), typed_input(), Output::Logits),
        (config(2), fully_masked, Output::NextSentence),
        (causal_config(), input(), Output::Logits),
        (all_optional_config(), typed_input(), Output::Residual),
        (mpnet_config(), input(), Output::Logits),
        (modern_config(), input(), Output::Logits),
    ];
    for (cfg, input, output) in cases {
        let family = cfg.family;
        let model = scaled_model(cfg, 5.0);
        let fast = all_gradients(&model, &input, output);
        let portable = cpu::portable_ops::with(|| all_gradients(&model, &input, output));
        assert_eq!(fast.len(), portable.len(), "{family:?}");
        for ((point, fast), (portable_point, portable)) in fast.iter().zip(&portable) {
            assert_eq!(point, portable_point);
            let scale = values(fast).iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in values(fast).iter().zip(values(portable)) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + scale),
                    "{family:?} {output:?} {}: {a} vs {b}",
                    point.name()
                );
            }
        }
    }
}

#[test]
fn running_to_one_position_equals_the_whole_output_at_that_position() {
    // The last block computes everything after attention at one position: the same values as
    // the whole pass there, for post-LN and pre-LN blocks, the optional split hooks, MPNet's
    // relative bias, from a middle layer, from after the last block, and when a hook in the
    // last block makes it run whole.
    for cfg in [
        config(2),
        all_optional_config(),
        mpnet_config(),
        modern_config(),
    ] {
        let family = cfg.family;
        let n_layers = cfg.n_layers;
        let model = model(cfg);
        let (whole, records) = {
            let out = model
                .run(Start::Tokens(input()), None, Output::Residual, &mut NoHooks)
                .unwrap();
            (out, record_all(&model, &input()).1)
        };
        for position in 0..4 {
            let expected = whole.narrow(1, position, 1).unwrap();
            let at = model
                .run_to_position(Start::Tokens(input()), position, &mut NoHooks)
                .unwrap();
            assert_eq!(at.dims(), &[2, 1, whole.dim(2).unwrap()]);
            assert!(max_abs_diff(&at, &expected) < 1e-5, "{family:?} {position}");
            for layer in [n_layers - 1, n_layers] {
                let x = if layer < n_layers {
                    get(&records, HookPoint::Block(layer, BlockHook::ResidPre))
                } else {
                    model
                        .run(
                            Start::Tokens(input()),
                            Some(n_layers),
                            Output::Residual,
                            &mut NoHooks,
                        )
                        .unwrap()
                };
                let start = Start::Residual {
                    x,
                    layer,
                    attention_mask: Some(&MASK),
                };
                let from = model
                    .run_to_position(start, position, &mut NoHooks)
                    .unwrap();
                assert!(
                    max_abs_diff(&from, &expected) < 1e-5,
                    "{family:?} from {layer}"
                );
            }
        }
        // A hook in the last block sees it whole.
        let mlp_out = HookPoint::Block(n_layers - 1, BlockHook::MlpOut);
        let mut seen = Vec::new();
        let mut hooks = Replace(mlp_out, |a: Tensor| {
            seen.push(a.dims().to_vec());
            a
        });
        let at = model
            .run_to_position(Start::Tokens(input()), 2, &mut hooks)
            .unwrap();
        assert_eq!(seen, [vec![2, 4, whole.dim(2).unwrap()]]);
        assert!(max_abs_diff(&at, &whole.narrow(1, 2, 1).unwrap()) < 1e-5);
        let err = model
            .run_to_position(Start::Tokens(input()), 4, &mut NoHooks)
            .unwrap_err();
        assert!(err.to_string().contains("position 4"), "{err}");
    }
}
