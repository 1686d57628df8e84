//! Activations that live on a GPU, handed to Python without leaving it.
//!
//! On a CUDA model, results and cached activations stay in device memory as a [`DeviceTensor`],
//! which implements the DLPack protocol (`__dlpack__`, `__dlpack_device__`): `torch.from_dlpack`
//! (or CuPy, JAX, ...) wraps the same memory with no copy. `numpy()` is the one device-to-host
//! copy for users who want NumPy.
//!
//! The way back: a hook on a CUDA model may return a GPU tensor of any DLPack producer (torch,
//! CuPy, ...); [`tensor_from_dlpack`] copies it device to device into a new tensor of the model
//! with no trip through the host.
//!
//! The DLPack structs are the stable C ABI of DLPack 0.8 (the "legacy" unversioned capsule
//! every consumer accepts), written out here because they are a dozen lines.

use std::ffi::{c_void, CStr};

use candle_core::{DType, Device, Tensor};
use pyo3::exceptions::{PyBufferError, PyRuntimeError};
use pyo3::prelude::*;

use crate::convert::tensor_to_numpy;

/// A float32, float16 or bfloat16 tensor on a GPU, exported to Python through DLPack (and, by
/// copy, to NumPy as float32).
#[pyclass(module = "hooked_encoder._core", frozen)]
pub struct DeviceTensor {
    /// Contiguous, on a CUDA device.
    tensor: Tensor,
}

impl DeviceTensor {
    pub fn new(tensor: Tensor) -> candle_core::Result<Self> {
        Ok(Self {
            tensor: tensor.contiguous()?,
        })
    }
}

fn runtime_err(e: candle_core::Error) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

#[pymethods]
impl DeviceTensor {
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.tensor.dims().to_vec()
    }

    /// "cuda:N".
    #[getter]
    fn device(&self) -> String {
        device_name(self.tensor.device())
    }

    /// "float32", "float16" or "bfloat16".
    #[getter]
    fn dtype(&self) -> &'static str {
        dtype_name(self.tensor.dtype())
    }

    /// A NumPy copy on the host, in float32 (NumPy has no bfloat16; the widening is exact).
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        tensor_to_numpy(py, self.tensor.clone())
    }

    fn __dlpack_device__(&self) -> PyResult<(i32, i32)> {
        match self.tensor.device() {
            Device::Cuda(_) => Ok((K_DL_CUDA, cuda_ordinal(self.tensor.device()))),
            _ => Err(PyBufferError::new_err(
                "DeviceTensor holds only GPU tensors",
            )),
        }
    }

    /// A DLPack capsule over this tensor's memory. The work that produced it is finished before
    /// the capsule is returned, so it is safe to read on any stream (`stream` is accepted, as
    /// the protocol requires, and needs no event).
    #[pyo3(signature = (stream = None))]
    fn __dlpack__(&self, py: Python<'_>, stream: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let _ = stream;
        self.tensor.device().synchronize().map_err(runtime_err)?;
        let data = device_pointer(&self.tensor).map_err(runtime_err)?;
        let dtype = dl_dtype(self.tensor.dtype()).map_err(runtime_err)?;
        let managed = ManagedContext::export(self.tensor.clone(), data, dtype);
        // SAFETY: `managed` is a valid, leaked DLManagedTensor; the capsule's destructor frees it
        // unless a consumer took ownership (and renamed the capsule to "used_dltensor").
        unsafe {
            let capsule = pyo3::ffi::PyCapsule_New(
                managed.cast::<c_void>(),
                DLTENSOR.as_ptr(),
                Some(capsule_destructor),
            );
            if capsule.is_null() {
                drop_managed(managed);
                return Err(PyErr::fetch(py));
            }
            Ok(Bound::from_owned_ptr(py, capsule).unbind())
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceTensor(shape={:?}, device={:?})",
            self.tensor.dims(),
            self.device()
        )
    }
}

/// A dtype as Python and torch spell it (the model's dtypes: float32, float16, bfloat16).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// A device as Python and torch spell it: "cpu" or "cuda:N".
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("mps:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".into(),
    }
}

fn cuda_ordinal(device: &Device) -> i32 {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id as i32,
        _ => 0,
    }
}

/// DLPack's name for a dtype.
fn dl_dtype(dtype: DType) -> candle_core::Result<DLDataType> {
    let code = match dtype {
        DType::F32 | DType::F16 => K_DL_FLOAT,
        DType::BF16 => K_DL_BFLOAT,
        other => candle_core::bail!("cannot export a {other:?} tensor"),
    };
    Ok(DLDataType {
        code,
        bits: (dtype.size_in_bytes() * 8) as u8,
        lanes: 1,
    })
}

/// The address of the first element of a contiguous CUDA tensor.
#[cfg(feature = "cuda")]
fn device_pointer(tensor: &Tensor) -> candle_core::Result<u64> {
    use candle_core::cuda::cudarc::driver::DevicePtr;
    use candle_core::Storage;
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("not a CUDA tensor");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("not a contiguous tensor");
    };
    let stream = storage.device.cuda_stream();
    let base = match tensor.dtype() {
        DType::F32 => storage.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::F16 => storage.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::BF16 => storage.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        other => candle_core::bail!("cannot export a {other:?} tensor"),
    };
    Ok(base + (start * tensor.dtype().size_in_bytes()) as u64)
}

#[cfg(not(feature = "cuda"))]
fn device_pointer(_tensor: &Tensor) -> candle_core::Result<u64> {
    candle_core::bail!("this build of hooked_encoder has no CUDA support")
}

/// A copy, on `device`, of the GPU tensor that `obj` exports through DLPack: row-major
/// contiguous, float32, float16 or bfloat16, on the same GPU. The producer's work on it must be
/// finished (the Python side synchronises torch's stream first); the copy runs on the model's
/// stream, which is synchronised before the producer's memory is let go.
#[cfg(feature = "cuda")]
pub fn tensor_from_dlpack(obj: &Bound<'_, PyAny>, device: &Device) -> Result<Tensor, String> {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda::cudarc::driver::result;
    use candle_core::op::BackpropOp;
    use candle_core::Storage;

    let Device::Cuda(cuda) = device else {
        return Err("a GPU tensor cannot replace an activation on the CPU".into());
    };
    let (device_type, device_id): (i32, i32) = obj
        .call_method0("__dlpack_device__")
        .and_then(|d| d.extract())
        .map_err(|e| e.to_string())?;
    if device_type != K_DL_CUDA || device_id != cuda_ordinal(device) {
        return Err(format!(
            "a tensor on DLPack device ({device_type}, {device_id}), not on {}",
            device_name(device)
        ));
    }
    let capsule = obj.call_method0("__dlpack__").map_err(|e| e.to_string())?;
    // SAFETY: a live "dltensor" capsule holds a valid DLManagedTensor, which its producer keeps
    // alive until the capsule is destroyed; `capsule` lives to the end of this function.
    let tensor: &DLTensor = unsafe {
        let managed = pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), DLTENSOR.as_ptr())
            .cast::<DLManagedTensor>();
        if managed.is_null() {
            return Err("__dlpack__ did not return a DLPack tensor capsule".into());
        }
        &(*managed).dl_tensor
    };
    let dims: Vec<usize> = if tensor.ndim == 0 {
        Vec::new()
    } else {
        // SAFETY: `shape` points to `ndim` sizes.
        unsafe { std::slice::from_raw_parts(tensor.shape, tensor.ndim as usize) }
            .iter()
            .map(|&d| d as usize)
            .collect()
    };
    if !tensor.strides.is_null() {
        // SAFETY: non-null `strides` points to `ndim` strides.
        let strides = unsafe { std::slice::from_raw_parts(tensor.strides, dims.len()) };
        let mut expected = 1i64;
        for (&stride, &dim) in strides.iter().zip(&dims).rev() {
            if dim != 1 && stride != expected {
                return Err("a non-contiguous GPU tensor (call .contiguous() first)".into());
            }
            expected *= dim as i64;
        }
    }
    let dtype = match (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) {
        (K_DL_FLOAT, 32, 1) => DType::F32,
        (K_DL_FLOAT, 16, 1) => DType::F16,
        (K_DL_BFLOAT, 16, 1) => DType::BF16,
        (code, bits, lanes) => {
            return Err(format!(
                "a GPU tensor of DLPack dtype (code {code}, {bits} bits, {lanes} lanes), not \
                 float32, float16 or bfloat16"
            ))
        }
    };
    let bytes = dims.iter().product::<usize>() * dtype.size_in_bytes();
    // SAFETY: the copy below fills every byte before the tensor is used.
    let storage =
        unsafe { cuda.alloc_uninit(&dims.as_slice().into(), dtype) }.map_err(|e| e.to_string())?;
    let copy = Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false);
    let destination = device_pointer(&copy).map_err(|e| e.to_string())?;
    let stream = cuda.cuda_stream();
    // SAFETY: the source holds `bytes` bytes of the producer's tensor (contiguous, checked),
    // alive while `capsule` is; `destination` is a fresh allocation of as many bytes; both are
    // on this GPU, in the context torch and Candle share (the device's primary context).
    unsafe {
        result::memcpy_dtod_async(
            destination,
            tensor.data as u64 + tensor.byte_offset,
            bytes,
            stream.cu_stream(),
        )
    }
    .map_err(|e| format!("device-to-device copy failed: {e}"))?;
    // The producer may free its memory once `capsule` goes: the copy must be done by then.
    stream.synchronize().map_err(|e| e.to_string())?;
    drop(capsule);
    Ok(copy)
}

#[cfg(not(feature = "cuda"))]
pub fn tensor_from_dlpack(_obj: &Bound<'_, PyAny>, _device: &Device) -> Result<Tensor, String> {
    Err("this build of hooked_encoder has no CUDA support".into())
}

// --- DLPack 0.8 ABI -------------------------------------------------------------------------

const DLTENSOR: &CStr = c"dltensor";
const K_DL_CUDA: i32 = 2;
const K_DL_FLOAT: u8 = 2;
const K_DL_BFLOAT: u8 = 4;

#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What a DLPack consumer borrows: the tensor (keeping the GPU memory alive) and the shape
/// array the `DLTensor` points into.
struct ManagedContext {
    _tensor: Tensor,
    shape: Vec<i64>,
}

impl ManagedContext {
    fn export(tensor: Tensor, data: u64, dtype: DLDataType) -> *mut DLManagedTensor {
        let device_id = cuda_ordinal(tensor.device());
        let mut context = Box::new(ManagedContext {
            shape: tensor.dims().iter().map(|&d| d as i64).collect(),
            _tensor: tensor,
        });
        let managed = DLManagedTensor {
            dl_tensor: DLTensor {
                data: data as *mut c_void,
                device: DLDevice {
                    device_type: K_DL_CUDA,
                    device_id,
                },
                ndim: context.shape.len() as i32,
                dtype,
                shape: context.shape.as_mut_ptr(),
                // Null strides mean row-major contiguous.
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: Box::into_raw(context).cast::<c_void>(),
            deleter: Some(deleter),
        };
        Box::into_raw(Box::new(managed))
    }
}

/// Called by the consumer (or by our capsule destructor) when the memory is no longer needed.
unsafe extern "C" fn deleter(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` came from `ManagedContext::export` and is freed exactly once: either
    // by the consumer through this deleter or by the capsule destructor, never both.
    unsafe { drop_managed(managed) }
}

unsafe fn drop_managed(managed: *mut DLManagedTensor) {
    if managed.is_null() {
        return;
    }
    // SAFETY: see `deleter`; both boxes were made by `Box::into_raw` in `export`.
    unsafe {
        let managed = Box::from_raw(managed);
        drop(Box::from_raw(managed.manager_ctx.cast::<ManagedContext>()));
    }
}

/// Frees the tensor if no consumer took the capsule (a consumer renames it "used_dltensor").
unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by Python with a live capsule object.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, DLTENSOR.as_ptr()) == 1 {
            let managed = pyo3::ffi::PyCapsule_GetPointer(capsule, DLTENSOR.as_ptr());
            drop_managed(managed.cast::<DLManagedTensor>());
        }
    }
}
