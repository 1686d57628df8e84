//! Moving activations between Candle tensors and NumPy arrays.
//!
//! Results and cached activations leave Rust without a copy: the NumPy array points into the
//! tensor's own buffer and keeps the tensor alive (see [`tensor_to_numpy`]). Activations handed
//! to a Python hook are copied ([`HostArray`]), because the hook may edit them in place. Into
//! Rust: one copy out of a float32 array.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use numpy::ndarray::{ArrayD, ArrayViewD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::dlpack::DeviceTensor;

/// Keeps a tensor alive for as long as NumPy arrays viewing its buffer exist (it is their
/// `base`).
#[pyclass(module = "hooked_encoder._core", frozen)]
pub struct TensorBuffer {
    _tensor: Tensor,
}

/// A NumPy array over `tensor`'s elements, sharing its memory. Tensors on another device, not
/// contiguous, or in half precision (NumPy has no bfloat16; both half formats widen to float32
/// exactly) are first copied to a contiguous float32 host tensor.
pub fn tensor_to_numpy(py: Python<'_>, tensor: Tensor) -> PyResult<Bound<'_, PyAny>> {
    let tensor = tensor
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.contiguous())
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    let dims = tensor.dims().to_vec();
    let data = {
        let (storage, layout) = tensor.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(values)), Some((start, _))) => values[start..].as_ptr(),
            _ => {
                return Err(PyRuntimeError::new_err(
                    "activation is not a contiguous float32 tensor",
                ))
            }
        }
    };
    let owner = Bound::new(py, TensorBuffer { _tensor: tensor })?;
    // SAFETY: `data` points at `dims.product()` contiguous f32 values inside the tensor's CPU
    // storage. `owner` holds that tensor (and so the storage's Arc) and becomes the array's base,
    // so the buffer outlives the array. Nothing reallocates a storage `Vec` after creation, and
    // the model never writes into a tensor once a hook or the caller has seen it.
    unsafe {
        let view = ArrayViewD::from_shape_ptr(IxDyn(&dims), data);
        Ok(PyArrayDyn::<f32>::borrow_from_array(&view, owner.into_any()).into_any())
    }
}

/// A result or cached activation for Python: a NumPy array on the CPU (sharing the tensor's
/// memory in float32), a [`DeviceTensor`] (DLPack, no copy, in the model's dtype) on a GPU.
pub fn export(py: Python<'_>, tensor: Tensor) -> PyResult<Bound<'_, PyAny>> {
    if tensor.device().is_cpu() {
        tensor_to_numpy(py, tensor)
    } else {
        let tensor =
            DeviceTensor::new(tensor).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Bound::new(py, tensor)?.into_any())
    }
}

/// A tensor's values on the host, ready to become a NumPy array.
pub struct HostArray {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostArray {
    /// Copies `tensor` to the host (no GIL needed).
    pub fn from_tensor(tensor: &Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            dims: tensor.dims().to_vec(),
            data: tensor.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// Hands the buffer to NumPy (no copy).
    pub fn into_numpy(self, py: Python<'_>) -> Bound<'_, PyArrayDyn<f32>> {
        let array = ArrayD::from_shape_vec(IxDyn(&self.dims), self.data)
            .expect("a tensor's element count always matches its dims");
        array.into_pyarray(py)
    }
}

/// Copies a float32 NumPy array into a tensor on `device`.
pub fn tensor_from_numpy(
    array: &PyReadonlyArrayDyn<'_, f32>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let dims = array.shape().to_vec();
    match array.as_slice() {
        Ok(values) => Tensor::from_slice(values, dims, device),
        // Not C-contiguous: gather it in logical order first.
        Err(_) => {
            let values: Vec<f32> = array.as_array().iter().copied().collect();
            Tensor::from_vec(values, dims, device)
        }
    }
}
