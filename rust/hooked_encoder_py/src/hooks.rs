//! The core's `Hooks` interface, served from Python: declarative edits (applied in Rust, no
//! Python call), a set of points to record (done in Rust, no Python call) and a set of points
//! whose activation goes through a Python dispatcher.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use hooked_encoder_core::{Edit, Error, HookPoint, HookSet, Hooks};
use numpy::{PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::convert::{tensor_from_numpy, HostArray};
use crate::dlpack::{tensor_from_dlpack, DeviceTensor};

/// An activation on its way to a Python hook.
enum HandedOver {
    Host(HostArray),
    Device(DeviceTensor),
}

impl HandedOver {
    fn into_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        match self {
            Self::Host(array) => Ok(array.into_numpy(py).into_any()),
            Self::Device(tensor) => Ok(Bound::new(py, tensor)?.into_any()),
        }
    }
}

pub struct PyHooks {
    /// Set by the waiting Python thread when a signal handler raised (Ctrl-C).
    pub interrupt: Arc<AtomicBool>,
    record: HookSet,
    python: HookSet,
    /// `dispatcher(name, activation) -> float32 array` runs the user's hook functions for
    /// `name` in order and returns the final activation (see `HookedEncoder._dispatch`).
    dispatcher: Option<Py<PyAny>>,
    pub records: Vec<(HookPoint, Tensor)>,
    /// Declarative edits (`hooked_encoder.interventions`), applied in list order at their
    /// points before any Python hook; `edited` holds their points.
    edits: Vec<Edit>,
    edited: HookSet,
    /// Whether these hooks serve a backward pass: then `record` and `python` name the points
    /// whose *gradients* are recorded or dispatched, and no activation is.
    backward: bool,
}

impl PyHooks {
    pub fn new(record: HookSet, python: HookSet, dispatcher: Option<Py<PyAny>>) -> Self {
        Self {
            interrupt: Arc::new(AtomicBool::new(false)),
            record,
            python,
            dispatcher,
            records: Vec::new(),
            edits: Vec::new(),
            edited: HookSet::new(0),
            backward: false,
        }
    }

    /// These hooks with `edits` at their points: applied before the Python hooks there in a
    /// forward pass; in a backward pass, their gradients taken after the Python hooks' (the
    /// reverse order). `edited` is the set of their points.
    pub fn with_edits(mut self, edits: Vec<Edit>, edited: HookSet) -> Self {
        self.edits = edits;
        self.edited = edited;
        self
    }

    /// Hooks for a backward pass: gradients at `record` come back, and those at `python` go
    /// through `dispatcher(name, grad)`, which returns the gradient to continue with.
    pub fn for_backward(record: HookSet, python: HookSet, dispatcher: Option<Py<PyAny>>) -> Self {
        Self {
            backward: true,
            ..Self::new(record, python, dispatcher)
        }
    }

    /// Dispatches `value` at `point` to Python if asked to, then records it if asked to.
    fn pass(&mut self, point: HookPoint, value: Tensor) -> hooked_encoder_core::Result<Tensor> {
        // Forward: user hooks run first, so a cache records what the rest of the model actually
        // sees (TransformerLens adds its caching hooks after the user's). Backward: a cache
        // records the gradient arriving at the point (torch hands every backward hook the
        // same grad_output), before a user's hook replaces it.
        if self.backward && self.record.contains(point) {
            self.records.push((point, value.clone()));
        }
        let mut value = value;
        if !self.backward && self.edited.contains(point) {
            for edit in self.edits.iter().filter(|edit| edit.point == point) {
                value = edit.apply(value)?;
            }
        }
        let mut value = if self.python.contains(point) {
            self.dispatch(point, value)?
        } else {
            value
        };
        if self.backward && self.edited.contains(point) {
            for edit in self.edits.iter().rev().filter(|edit| edit.point == point) {
                value = edit.backward(value)?;
            }
        }
        if !self.backward && self.record.contains(point) {
            self.records.push((point, value.clone()));
        }
        Ok(value)
    }

    fn dispatch(
        &self,
        point: HookPoint,
        activation: Tensor,
    ) -> hooked_encoder_core::Result<Tensor> {
        let Some(dispatcher) = &self.dispatcher else {
            return Ok(activation);
        };
        let name = point.name();
        // The hook gets its own copy (it may edit it in place): on the host as NumPy, or, on a
        // GPU, a device copy it reads through DLPack.
        let handed_over = if activation.device().is_cpu() {
            HandedOver::Host(HostArray::from_tensor(&activation)?)
        } else {
            HandedOver::Device(DeviceTensor::new(activation.copy()?)?)
        };
        let device = activation.device().clone();
        let failed = |source: PyErr| Error::Hook {
            name: name.clone(),
            source: Box::new(source),
        };
        Python::attach(|py| {
            let returned = dispatcher
                .call1(
                    py,
                    (name.as_str(), handed_over.into_py(py).map_err(failed)?),
                )
                .map_err(failed)?;
            let returned = returned.bind(py);
            let replacement = match returned.cast::<numpy::PyArrayDyn<f32>>() {
                Ok(array) => {
                    let array: PyReadonlyArrayDyn<'_, f32> =
                        array.try_readonly().map_err(|e| failed(e.into()))?;
                    tensor_from_numpy(&array, &device)?
                }
                Err(_) if device.is_cpu() => {
                    return Err(Error::HookReplacement {
                        name: name.clone(),
                        expected: "a float32 array".into(),
                        got: returned.get_type().to_string(),
                    })
                }
                // On a GPU, a GPU tensor (torch's, through DLPack), copied device to device.
                Err(_) => {
                    tensor_from_dlpack(returned, &device).map_err(|got| Error::HookReplacement {
                        name: name.clone(),
                        expected: format!(
                            "a float32 array or a contiguous GPU tensor on {:?}",
                            device.location()
                        ),
                        got,
                    })?
                }
            };
            if replacement.dims() != activation.dims() {
                return Err(Error::HookReplacement {
                    name: name.clone(),
                    expected: format!("shape {:?}", activation.dims()),
                    got: format!("shape {:?}", replacement.dims()),
                });
            }
            // A float32 array, or a GPU tensor in the model's dtype or float32: exact for a
            // half-precision activation the hook left alone, rounded like any other value
            // otherwise.
            Ok(replacement.to_dtype(activation.dtype())?)
        })
    }
}

impl Hooks for PyHooks {
    #[inline]
    fn wants(&self, point: HookPoint) -> bool {
        !self.backward
            && (self.record.contains(point)
                || self.python.contains(point)
                || self.edited.contains(point))
    }

    fn call(
        &mut self,
        point: HookPoint,
        activation: Tensor,
    ) -> hooked_encoder_core::Result<Tensor> {
        self.pass(point, activation)
    }

    fn interrupted(&self) -> bool {
        self.interrupt.load(Ordering::Relaxed)
    }

    #[inline]
    fn wants_grad(&self, point: HookPoint) -> bool {
        self.backward
            && (self.record.contains(point)
                || self.python.contains(point)
                || self.edited.contains(point))
    }

    fn call_grad(&mut self, point: HookPoint, grad: Tensor) -> hooked_encoder_core::Result<Tensor> {
        self.pass(point, grad)
    }
}
