//! `Model`: the core `HookedBert` as a Python object.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use hooked_encoder_core::{
    BertConfig, ForwardInput, HookPoint, HookSet, HookedBert, Output, WeightFiles, WeightMap,
};
use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;

use crate::convert::{tensor_from_numpy, tensor_to_numpy};
use crate::errors::to_py_err;
use crate::hooks::PyHooks;

/// `forward`'s result: the output array and the recorded `(name, array)` pairs.
type ForwardResult<'py> = (Bound<'py, PyAny>, Vec<(String, Bound<'py, PyAny>)>);

/// A BERT encoder with hook points (the engine behind `hooked_encoder.HookedEncoder`).
#[pyclass(module = "hooked_encoder._core", frozen)]
pub struct Model {
    inner: Arc<HookedBert>,
}

fn parse_device(device: &str) -> PyResult<Device> {
    let cuda_index = match device {
        "cpu" => return Ok(Device::Cpu),
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
    Device::new_cuda(cuda_index)
        .map_err(|e| PyValueError::new_err(format!("cannot open {device}: {e}")))
}

fn parse_config(config_json: &str) -> PyResult<BertConfig> {
    BertConfig::from_json(config_json).map_err(to_py_err)
}

/// Borrows a `[batch, pos]` int64 array as a row-major vector (copied: the GIL is released
/// while the model runs, and the caller's array must not change under us).
fn rows(array: &PyReadonlyArray2<'_, i64>) -> Vec<i64> {
    array.as_array().iter().copied().collect()
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
        let (model, unused) = py
            .detach(|| {
                let files = WeightFiles::open(&paths)?;
                HookedBert::load(cfg, &files, &device)
            })
            .map_err(to_py_err)?;
        Ok((
            Self {
                inner: Arc::new(model),
            },
            unused,
        ))
    }

    /// A model with fresh weights: N(0, 0.02²) matrices, zero biases, unit LayerNorms.
    #[staticmethod]
    fn random(py: Python<'_>, config_json: &str, seed: u64, device: &str) -> PyResult<Self> {
        let cfg = parse_config(config_json)?;
        let device = parse_device(device)?;
        let model = py
            .detach(|| {
                let weights = WeightMap::random(&cfg, seed, &device)?;
                HookedBert::load(cfg, &weights, &device).map(|(m, _)| m)
            })
            .map_err(to_py_err)?;
        Ok(Self {
            inner: Arc::new(model),
        })
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
        let (model, unused) = py
            .detach(|| HookedBert::load(cfg, &weights, &device))
            .map_err(to_py_err)?;
        Ok((
            Self {
                inner: Arc::new(model),
            },
            unused,
        ))
    }

    /// Every weight as `(name, array)`, named and laid out as in a Hugging Face
    /// `BertForPreTraining` checkpoint. The arrays share the model's memory.
    fn named_weights<'py>(&self, py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        self.inner
            .named_weights()
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

    /// Whether the checkpoint has an MLM head (and so can produce logits).
    #[getter]
    fn has_mlm_head(&self) -> bool {
        self.inner.has_mlm_head()
    }

    /// The device the weights live on, e.g. "cpu".
    #[getter]
    fn device(&self) -> String {
        match self.inner.device() {
            Device::Cpu => "cpu".into(),
            other => format!("{:?}", other.location()).to_lowercase(),
        }
    }

    /// Runs the model.
    ///
    /// `record` names the hook points whose activations come back (in firing order);
    /// `dispatch` names those whose activations go through `dispatcher(name, array)`, which
    /// returns the activation to continue with. `output` is "logits" (through the MLM head),
    /// "residual" (the last block's output; no head) or "next_sentence" (pooler and NSP head).
    #[pyo3(signature = (tokens, token_type_ids, attention_mask, output, record, dispatch, dispatcher))]
    #[allow(clippy::too_many_arguments)]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: PyReadonlyArray2<'py, i64>,
        token_type_ids: Option<PyReadonlyArray2<'py, i64>>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        output: &str,
        record: Vec<String>,
        dispatch: Vec<String>,
        dispatcher: Option<Py<PyAny>>,
    ) -> PyResult<ForwardResult<'py>> {
        let [batch, pos] = [tokens.shape()[0], tokens.shape()[1]];
        for (what, array) in [
            ("token_type_ids", &token_type_ids),
            ("one_zero_attention_mask", &attention_mask),
        ] {
            if let Some(array) = array {
                if array.shape() != tokens.shape() {
                    return Err(PyValueError::new_err(format!(
                        "{what} has shape {:?}, but tokens have shape {:?}",
                        array.shape(),
                        tokens.shape()
                    )));
                }
            }
        }
        let tokens = rows(&tokens);
        let token_type_ids = token_type_ids.as_ref().map(rows);
        let attention_mask = attention_mask.as_ref().map(rows);
        let mut hooks = PyHooks::new(
            self.hook_set(&record)?,
            self.hook_set(&dispatch)?,
            dispatcher,
        );
        let model = Arc::clone(&self.inner);
        let output = match output {
            "logits" => Output::Logits,
            "residual" => Output::Residual,
            "next_sentence" => Output::NextSentence,
            other => return Err(PyValueError::new_err(format!("unknown output {other:?}"))),
        };
        // The GIL is released for the whole pass; Python hooks take it back while they run.
        let output = py
            .detach(|| {
                let input = ForwardInput {
                    batch,
                    pos,
                    tokens: &tokens,
                    token_type_ids: token_type_ids.as_deref(),
                    attention_mask: attention_mask.as_deref(),
                };
                crate::threads::install(|| model.forward(&input, output, &mut hooks))
            })
            .map_err(to_py_err)?;
        let records = std::mem::take(&mut hooks.records)
            .into_iter()
            .map(|(point, tensor)| Ok((point.name(), tensor_to_numpy(py, tensor)?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok((tensor_to_numpy(py, output)?, records))
    }
}
