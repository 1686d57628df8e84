//! `Model`: the core `HookedBert` as a Python object.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use hooked_encoder_core::{
    BertConfig, Edit, EditOp, ForwardInput, HookPoint, HookSet, HookedBert, Output, Part, Start,
    Tape, WeightFiles, WeightMap,
};
use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;

use crate::convert::{export, tensor_from_numpy, tensor_to_numpy};
use crate::dlpack::{device_name, dtype_name};
use crate::errors::to_py_err;
use crate::hooks::PyHooks;

/// A declarative edit as Python resolves it: `(hook name, mask (uint8, broadcast against the
/// activation), op ("set", "scale", "add" or "from_rows"), value (float32; for "from_rows"
/// the source row of each row))`.
type EditSpec<'py> = (
    String,
    PyReadonlyArrayDyn<'py, u8>,
    String,
    PyReadonlyArrayDyn<'py, f32>,
);

/// `forward`'s result: the output array and the recorded `(name, array)` pairs.
type ForwardResult<'py> = (Bound<'py, PyAny>, Vec<(String, Bound<'py, PyAny>)>);

/// What a forward pass kept for one backward pass (`Model.forward(..., tape=GradTape())`,
/// then `Model.backward(tape, ...)`), freed as the backward passes each block.
#[pyclass(module = "hooked_encoder._core", frozen)]
pub struct GradTape {
    inner: Arc<Mutex<Option<Tape>>>,
}

#[pymethods]
impl GradTape {
    #[new]
    fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(None)),
        }
    }
}

/// A BERT encoder with hook points (the engine behind `hooked_encoder.HookedEncoder`).
#[pyclass(module = "hooked_encoder._core", frozen)]
pub struct Model {
    inner: Arc<HookedBert>,
}

/// What `mps()` / `device="mps"` answers: Candle's Metal backend exists, but this package has
/// never been built or tested with it (it needs macOS and Apple's Metal framework, and our build
/// and test machines are Linux), so it refuses rather than claim a device it was not checked on.
const NO_METAL_BUILD: &str = "has no Apple GPU (Metal) support: Candle's Metal backend needs \
    macOS and Apple's Metal framework, and hooked_encoder has not been built or tested with it; \
    use the CPU (the default) or an NVIDIA GPU with a CUDA build";

fn parse_device(device: &str) -> PyResult<Device> {
    let cuda_index = match device {
        "cpu" => return Ok(Device::Cpu),
        other if other == "mps" || other.starts_with("mps:") => {
            return Err(PyValueError::new_err(format!(
                "device {other:?}: hooked_encoder {NO_METAL_BUILD}"
            )))
        }
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "unknown device {other:?}: use \"cpu\", \"cuda\" or \"cuda:N\""
                ))
            })?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(PyValueError::new_err(format!(
            "device {device:?} needs a CUDA build of hooked_encoder, and this one is CPU-only; \
             build one with MATURIN_PEP517_ARGS=\"--features cuda\" pip install ."
        )));
    }
    hooked_encoder_core::open_cuda_device(cuda_index)
        .map_err(|e| PyValueError::new_err(format!("cannot open {device}: {e}")))
}

fn parse_dtype(dtype: &str) -> PyResult<DType> {
    match dtype {
        "float32" => Ok(DType::F32),
        "float16" => Ok(DType::F16),
        "bfloat16" => Ok(DType::BF16),
        other => Err(PyValueError::new_err(format!(
            "unsupported dtype {other:?}: use \"float32\", \"float16\" or \"bfloat16\""
        ))),
    }
}

fn parse_config(config_json: &str) -> PyResult<BertConfig> {
    BertConfig::from_json(config_json).map_err(to_py_err)
}

/// Borrows a `[batch, pos]` int64 array as a row-major vector (copied: the GIL is released
/// while the model runs, and the caller's array must not change under us).
fn rows(array: &PyReadonlyArray2<'_, i64>) -> Vec<i64> {
    array.as_array().iter().copied().collect()
}

impl From<HookedBert> for Model {
    fn from(model: HookedBert) -> Self {
        Self {
            inner: Arc::new(model),
        }
    }
}

impl Model {
    fn hook_set(&self, names: &[String]) -> PyResult<HookSet> {
        let cfg = self.inner.config();
        let mut set = HookSet::new(cfg.n_layers);
        for name in names {
            let point = HookPoint::parse(name, cfg)
                .ok_or_else(|| PyKeyError::new_err(format!("unknown hook point {name:?}")))?;
            set.insert(point);
        }
        Ok(set)
    }
}

/// Runs a model load (see `threads::compute`), then gives back the memory it freed (tensors'
/// bytes as read, the unpacked copies of the weights it packs), which the allocator would
/// otherwise keep until the model's first call (see `memory::release_freed`).
fn load<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> hooked_encoder_core::Result<T> + Send,
) -> PyResult<T> {
    let loaded = crate::threads::compute(py, work);
    crate::memory::release_freed();
    loaded.map_err(to_py_err)
}

#[pymethods]
impl Model {
    /// Loads Hugging Face BERT safetensors files. Returns the model and the names of the
    /// tensors it did not use.
    #[staticmethod]
    fn load(
        py: Python<'_>,
        config_json: &str,
        paths: Vec<PathBuf>,
        device: &str,
    ) -> PyResult<(Self, Vec<String>)> {
        let cfg = parse_config(config_json)?;
        let device = parse_device(device)?;
        let (model, unused) = load(py, || {
            let files = WeightFiles::open(&paths)?;
            HookedBert::load(cfg, &files, &device)
        })?;
        Ok((model.into(), unused))
    }

    /// A model with fresh weights: N(0, 0.02²) matrices, zero biases, unit LayerNorms.
    #[staticmethod]
    fn random(py: Python<'_>, config_json: &str, seed: u64, device: &str) -> PyResult<Self> {
        let cfg = parse_config(config_json)?;
        let device = parse_device(device)?;
        let model = load(py, || {
            let weights = WeightMap::random(&cfg, seed, &device)?;
            HookedBert::load(cfg, &weights, &device).map(|(m, _)| m)
        })?;
        Ok(model.into())
    }

    /// Builds the model from float32 arrays named as a Hugging Face BERT state dict. Returns
    /// the model and the names of the arrays it did not use.
    #[staticmethod]
    fn from_arrays(
        py: Python<'_>,
        config_json: &str,
        arrays: HashMap<String, PyReadonlyArrayDyn<'_, f32>>,
        device: &str,
    ) -> PyResult<(Self, Vec<String>)> {
        let cfg = parse_config(config_json)?;
        let device = parse_device(device)?;
        let mut weights = WeightMap::new();
        for (name, array) in &arrays {
            weights.insert(
                name.clone(),
                tensor_from_numpy(array, &device).map_err(|e| to_py_err(e.into()))?,
            );
        }
        // `move`: the copies are freed inside, before `load` gives freed memory back.
        let (model, unused) = load(py, move || HookedBert::load(cfg, &weights, &device))?;
        Ok((model.into(), unused))
    }

    /// Builds the model from one safetensors blob (what `pickle` carries; see
    /// `HookedEncoder.__reduce__`). Returns the model and the names of the tensors it did not
    /// use.
    #[staticmethod]
    fn from_safetensors_bytes(
        py: Python<'_>,
        config_json: &str,
        data: &[u8],
        device: &str,
    ) -> PyResult<(Self, Vec<String>)> {
        let cfg = parse_config(config_json)?;
        let device = parse_device(device)?;
        let (model, unused) = load(py, || {
            let tensors = candle_core::safetensors::load_buffer(data, &device).map_err(|e| {
                hooked_encoder_core::Error::Checkpoint(format!("not a valid safetensors blob: {e}"))
            })?;
            let mut weights = WeightMap::new();
            for (name, tensor) in tensors {
                weights.insert(name, tensor.to_dtype(candle_core::DType::F32)?);
            }
            HookedBert::load(cfg, &weights, &device)
        })?;
        Ok((model.into(), unused))
    }

    /// Every weight as `(name, array)`, laid out as in Hugging Face and named as in a
    /// `BertForPreTraining` checkpoint whatever the family (the names the TransformerLens
    /// conversion reads), or with `checkpoint=True` as a checkpoint of the model's family
    /// names it (what `load` reads back). The arrays share the model's memory.
    #[pyo3(signature = (checkpoint = false))]
    fn named_weights<'py>(
        &self,
        py: Python<'py>,
        checkpoint: bool,
    ) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        // Unpacking packed weights is a computation like any other (`threads::compute`).
        let weights = crate::threads::compute(py, || {
            if checkpoint {
                self.inner.checkpoint_weights()
            } else {
                self.inner.named_weights()
            }
        });
        weights
            .map_err(to_py_err)?
            .into_iter()
            .map(|(name, tensor)| Ok((name, tensor_to_numpy(py, tensor)?)))
            .collect()
    }

    /// Every hook point of this model, in firing order.
    fn hook_names(&self) -> Vec<String> {
        HookPoint::all(self.inner.config())
            .into_iter()
            .map(HookPoint::name)
            .collect()
    }

    /// Whether the checkpoint has an MLM head (and so can produce vocabulary logits).
    #[getter]
    fn has_mlm_head(&self) -> bool {
        self.inner.has_mlm_head()
    }

    /// Whether the checkpoint has an ELECTRA discriminator head (replaced-token logits).
    #[getter]
    fn has_discriminator(&self) -> bool {
        self.inner.has_discriminator()
    }

    /// The device the weights live on, e.g. "cpu".
    #[getter]
    fn device(&self) -> String {
        device_name(self.inner.device())
    }

    /// The dtype of the weights and activations: "float32", "float16" or "bfloat16".
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.inner.dtype())
    }

    /// Runs the model.
    ///
    /// From `tokens` (`[batch, pos]`, with optional token types and mask), or, with
    /// `start_layer`, from `residual` (`[batch, pos, d_model]`) entering that block; up to the
    /// input of block `stop_layer`, or through every block and the head `output` names:
    /// "logits" (MLM head), "residual" (none) or "next_sentence" (pooler and NSP head).
    /// `record` names the hook points whose activations come back (in firing order);
    /// `dispatch` names those whose activations go through `dispatcher(name, array)`, which
    /// returns the activation to continue with.
    /// With `tape`, the pass also keeps what `backward` needs, in `tape`.
    /// `edits` are applied at their points, in order, before Python hooks (see [`EditSpec`]).
    /// With `position` (output "residual", no `stop_layer`, no `tape`), only that position of
    /// the output is computed after the last block's attention, `[batch, 1, d_model]`.
    #[pyo3(signature = (tokens, residual, token_type_ids, attention_mask, start_layer, stop_layer, output, record, dispatch, dispatcher, tape=None, edits=None, position=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: Option<PyReadonlyArray2<'py, i64>>,
        residual: Option<PyReadonlyArrayDyn<'py, f32>>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        start_layer: usize,
        stop_layer: Option<usize>,
        output: &str,
        record: Vec<String>,
        dispatch: Vec<String>,
        dispatcher: Option<Py<PyAny>>,
        tape: Option<PyRef<'py, GradTape>>,
        edits: Option<Vec<EditSpec<'py>>>,
        position: Option<usize>,
    ) -> PyResult<ForwardResult<'py>> {
        let output = match output {
            "logits" => Output::Logits,
            "residual" => Output::Residual,
            "next_sentence" => Output::NextSentence,
            other => return Err(PyValueError::new_err(format!("unknown output {other:?}"))),
        };
        if position.is_some()
            && (output != Output::Residual || stop_layer.is_some() || tape.is_some())
        {
            return Err(PyValueError::new_err(
                "position= is for the residual stream after the last block, without a tape",
            ));
        }
        let tape = tape.map(|t| Arc::clone(&t.inner));
        // Runs the model, keeping a tape when one was asked for.
        let run = move |model: &HookedBert,
                        start: Start<'_>,
                        hooks: &mut PyHooks|
              -> hooked_encoder_core::Result<Tensor> {
            match &tape {
                None => match position {
                    Some(position) => model.run_to_position(start, position, hooks),
                    None => model.run(start, stop_layer, output, hooks),
                },
                Some(slot) => {
                    let (out, kept) = model.run_for_backward(start, stop_layer, output, hooks)?;
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
                    Ok(out)
                }
            }
        };
        let attention_mask = attention_mask.as_ref().map(rows);
        let hooks = self.hooks(&record, &dispatch, dispatcher)?;
        let hooks = match edits {
            Some(specs) if !specs.is_empty() => {
                let (edits, edited) = self.edits(specs)?;
                hooks.with_edits(edits, edited)
            }
            _ => hooks,
        };
        match (tokens, residual) {
            (Some(tokens), None) => {
                let [batch, pos] = [tokens.shape()[0], tokens.shape()[1]];
                if let Some(types) = &token_type_ids {
                    if types.shape() != tokens.shape() {
                        return Err(PyValueError::new_err(format!(
                            "token_type_ids has shape {:?}, but tokens have shape {:?}",
                            types.shape(),
                            tokens.shape()
                        )));
                    }
                }
                let tokens = rows(&tokens);
                let token_type_ids = token_type_ids.as_ref().map(rows);
                self.run_hooked(py, hooks, batch * pos, move |model, hooks| {
                    let input = ForwardInput {
                        batch,
                        pos,
                        tokens: &tokens,
                        token_type_ids: token_type_ids.as_deref(),
                        attention_mask: attention_mask.as_deref(),
                    };
                    run(model, Start::Tokens(input), hooks)
                })
            }
            (None, Some(residual)) => {
                let x =
                    tensor_from_numpy(&residual, &Device::Cpu).map_err(|e| to_py_err(e.into()))?;
                let positions = residual.shape().iter().rev().skip(1).product();
                self.run_hooked(py, hooks, positions, move |model, hooks| {
                    let x = x.to_device(model.device())?;
                    let start = Start::Residual {
                        x,
                        layer: start_layer,
                        attention_mask: attention_mask.as_deref(),
                    };
                    run(model, start, hooks)
                })
            }
            _ => Err(PyValueError::new_err(
                "give either tokens or a residual-stream input",
            )),
        }
    }

    /// The backward pass of the forward pass that filled `tape`, from `grad_output` (d metric /
    /// d output). `record` names the hook points whose gradients come back (in backward
    /// order); `dispatch` those whose gradients go through `dispatcher(name, grad)`. Returns
    /// the gradient where the forward started (the summed embeddings, or the residual stream
    /// entering `start_layer`) and the recorded `(name, gradient)` pairs.
    /// `edits` are those the forward pass applied: their gradients are taken at their points.
    #[pyo3(signature = (tape, grad_output, record, dispatch, dispatcher, edits=None))]
    #[allow(clippy::too_many_arguments)]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        tape: PyRef<'py, GradTape>,
        grad_output: PyReadonlyArrayDyn<'py, f32>,
        record: Vec<String>,
        dispatch: Vec<String>,
        dispatcher: Option<Py<PyAny>>,
        edits: Option<Vec<EditSpec<'py>>>,
    ) -> PyResult<ForwardResult<'py>> {
        let kept = tape
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                PyValueError::new_err(
                    "this tape holds no forward pass (or its backward already ran)",
                )
            })?;
        let grad =
            tensor_from_numpy(&grad_output, &Device::Cpu).map_err(|e| to_py_err(e.into()))?;
        let hooks = PyHooks::for_backward(
            self.hook_set(&record)?,
            self.hook_set(&dispatch)?,
            dispatcher,
        );
        let hooks = match edits {
            Some(specs) if !specs.is_empty() => {
                let (edits, edited) = self.edits(specs)?;
                hooks.with_edits(edits, edited)
            }
            _ => hooks,
        };
        let positions = grad_output.shape().iter().take(2).product();
        self.run_hooked(py, hooks, positions, move |model, hooks| {
            let grad = grad.to_device(model.device())?;
            model.backward(kept, &grad, hooks)
        })
    }

    /// Runs one head ("mlm_head", "unembed", "pooler" or "nsp_head") on `x`.
    #[pyo3(signature = (part, x, record, dispatch, dispatcher))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        part: &str,
        x: PyReadonlyArrayDyn<'py, f32>,
        record: Vec<String>,
        dispatch: Vec<String>,
        dispatcher: Option<Py<PyAny>>,
    ) -> PyResult<ForwardResult<'py>> {
        let part = match part {
            "mlm_head" => Part::MlmHead,
            "unembed" => Part::Unembed,
            "pooler" => Part::Pooler,
            "nsp_head" => Part::NspHead,
            "discriminator" => Part::Discriminator,
            other => return Err(PyValueError::new_err(format!("unknown head {other:?}"))),
        };
        let x = tensor_from_numpy(&x, &Device::Cpu).map_err(|e| to_py_err(e.into()))?;
        let hooks = self.hooks(&record, &dispatch, dispatcher)?;
        // One head: short, never worth watching for Ctrl-C.
        self.run_hooked(py, hooks, 0, move |model, hooks| {
            model.apply(part, x, hooks)
        })
    }

    /// Runs block `layer`'s attention on separate query, key and value inputs.
    #[pyo3(signature = (layer, query, key, value, attention_mask, record, dispatch, dispatcher))]
    #[allow(clippy::too_many_arguments)]
    fn attention<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        query: PyReadonlyArrayDyn<'py, f32>,
        key: PyReadonlyArrayDyn<'py, f32>,
        value: PyReadonlyArrayDyn<'py, f32>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        record: Vec<String>,
        dispatch: Vec<String>,
        dispatcher: Option<Py<PyAny>>,
    ) -> PyResult<ForwardResult<'py>> {
        let convert = |a: &PyReadonlyArrayDyn<'py, f32>| {
            tensor_from_numpy(a, &Device::Cpu).map_err(|e| to_py_err(e.into()))
        };
        let inputs = [convert(&query)?, convert(&key)?, convert(&value)?];
        let attention_mask = attention_mask.as_ref().map(rows);
        let hooks = self.hooks(&record, &dispatch, dispatcher)?;
        self.run_hooked(py, hooks, 0, move |model, hooks| {
            model.attention_component(layer, inputs, attention_mask.as_deref(), hooks)
        })
    }

    /// A copy of the model on `device` ("cpu", "cuda", "cuda:N") in `dtype` ("float32",
    /// "float16", "bfloat16").
    fn to(&self, py: Python<'_>, device: &str, dtype: &str) -> PyResult<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype)?;
        let model =
            crate::threads::compute(py, || self.inner.to(&device, dtype)).map_err(to_py_err)?;
        Ok(model.into())
    }
}

impl Model {
    /// The core's edits from their Python form, with the set of their points.
    fn edits(&self, specs: Vec<EditSpec<'_>>) -> PyResult<(Vec<Edit>, HookSet)> {
        let cfg = self.inner.config();
        let mut edited = HookSet::new(cfg.n_layers);
        let mut edits = Vec::with_capacity(specs.len());
        let tensor = |array: &PyReadonlyArrayDyn<'_, f32>| {
            tensor_from_numpy(array, &Device::Cpu).map_err(|e| to_py_err(e.into()))
        };
        for (name, mask, op, value) in specs {
            let point = HookPoint::parse(&name, cfg)
                .ok_or_else(|| PyKeyError::new_err(format!("unknown hook point {name:?}")))?;
            let mask_values: Vec<u8> = mask.as_array().iter().copied().collect();
            let mask = Tensor::from_vec(mask_values, mask.shape(), &Device::Cpu)
                .map_err(|e| to_py_err(e.into()))?;
            let op = match op.as_str() {
                "set" => EditOp::Set(tensor(&value)?),
                "scale" => EditOp::Scale(tensor(&value)?),
                "add" => EditOp::Add(tensor(&value)?),
                "from_rows" => {
                    EditOp::FromRows(value.as_array().iter().map(|r| *r as u32).collect())
                }
                other => return Err(PyValueError::new_err(format!("unknown edit op {other:?}"))),
            };
            edited.insert(point);
            edits.push(Edit { point, mask, op });
        }
        Ok((edits, edited))
    }

    fn hooks(
        &self,
        record: &[String],
        dispatch: &[String],
        dispatcher: Option<Py<PyAny>>,
    ) -> PyResult<PyHooks> {
        Ok(PyHooks::new(
            self.hook_set(record)?,
            self.hook_set(dispatch)?,
            dispatcher,
        ))
    }

    /// Runs `work` on the model with the GIL released (Python hooks take it back while they
    /// run), then hands the output and the recorded activations to Python (see [`export`]).
    ///
    /// `positions` (batch x pos through the blocks) sizes the pass: a long CPU pass started
    /// from Python's main thread runs so that Ctrl-C can stop it
    /// (see [`crate::interrupt`]).
    fn run_hooked<'py>(
        &self,
        py: Python<'py>,
        mut hooks: PyHooks,
        positions: usize,
        work: impl FnOnce(&HookedBert, &mut PyHooks) -> hooked_encoder_core::Result<Tensor>
            + Send
            + 'static,
    ) -> PyResult<ForwardResult<'py>> {
        let model = Arc::clone(&self.inner);
        // Python runs signal handlers only on the main thread, so only there is there anything
        // to watch for, and only a long pass is worth the helper thread (~80 µs a call). A GPU
        // pass is short, and CUDA state is best kept on the caller's thread.
        let watch = model.device().is_cpu() && is_long(model.config(), positions);
        let (output, mut hooks) = if watch && on_main_thread(py)? {
            crate::interrupt::run_watching_signals(py, model, hooks, work)?
        } else {
            let output = crate::threads::compute(py, || work(&model, &mut hooks));
            (output, hooks)
        };
        let output = output.map_err(to_py_err)?;
        let records = std::mem::take(&mut hooks.records)
            .into_iter()
            .map(|(point, tensor)| Ok((point.name(), export(py, tensor)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok((export(py, output)?, records))
    }
}

/// Whether a pass over `positions` token positions takes long enough (more than a few
/// milliseconds) that waiting for it to end before handling Ctrl-C would be noticeable.
fn is_long(cfg: &BertConfig, positions: usize) -> bool {
    const LONG_FLOPS: f64 = 2e8; // ~2 ms at the ~100 GFLOP/s a 2-core CPU reaches
    let per_position = 2.0 * (4 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.d_mlp) as f64;
    positions as f64 * cfg.n_layers as f64 * per_position > LONG_FLOPS
}

fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    let threading = py.import("threading")?;
    let current = threading.call_method0("current_thread")?;
    Ok(current.is(&threading.call_method0("main_thread")?))
}
