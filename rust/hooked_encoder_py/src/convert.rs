//! Moving activations between Candle tensors and NumPy arrays.
//!
//! Out of Rust: one copy into a `Vec` (which also brings GPU tensors to the host), whose buffer
//! NumPy then adopts without another copy. Into Rust: one copy out of a float32 array.

use candle_core::{Device, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

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
            data: tensor.flatten_all()?.to_vec1()?,
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
