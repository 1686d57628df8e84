//! Linear layers on NVIDIA GPUs as one cuBLASLt matmul whose epilogue adds the bias, as
//! PyTorch's `addmm` does: Candle's matmul (cuBLAS) followed by our bias kernel read and wrote
//! every output a second time, a quarter of the bfloat16 bert-base forward on an H200.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::rc::Rc;

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::cublaslt::{result, sys};
use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

use crate::{Error, Result};

/// cuBLASLt's scratch space per thread and GPU (split-K and similar algorithms use it).
const WORKSPACE_BYTES: usize = 4 << 20;

/// `x @ wᵀ + bias` for `x: [rows, in]`, `w: [out, in]`, `bias: [out]`, all of one dtype on one
/// GPU: `[rows, out]`. `None` where cuBLASLt cannot take them as they are (not contiguous, or
/// not 16-byte aligned); the caller then runs Candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    let (rows, d_in) = x.dims2()?;
    let (d_out, w_in) = w.dims2()?;
    let dtype = x.dtype();
    let data_type = match dtype {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
        _ => return Ok(None),
    };
    if w_in != d_in
        || bias.dims() != [d_out]
        || w.dtype() != dtype
        || bias.dtype() != dtype
        || rows == 0
        || [rows, d_in, d_out]
            .iter()
            .any(|&n| i32::try_from(n).is_err())
    {
        return Ok(None);
    }
    let element = dtype.size_in_bytes();
    let (x_guard, x_layout) = x.storage_and_layout();
    let (w_guard, w_layout) = w.storage_and_layout();
    let (b_guard, b_layout) = bias.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(ws), Storage::Cuda(bs)) =
        (&*x_guard, &*w_guard, &*b_guard)
    else {
        return Ok(None);
    };
    let aligned = |layout: &candle_core::Layout| {
        layout.is_contiguous() && (layout.start_offset() * element).is_multiple_of(16)
    };
    if !(aligned(x_layout) && aligned(w_layout) && aligned(b_layout)) {
        return Ok(None);
    }
    let device = xs.device().clone();
    let shape = Product {
        rows,
        d_in,
        d_out,
        data_type,
        compute: match (dtype, candle_core::cuda::gemm_reduced_precision_f32()) {
            // Candle's float32 matmuls use TF32 only when asked to; so does this.
            (DType::F32, true) => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        },
    };
    let operands = [
        (xs, x_layout.start_offset()),
        (ws, w_layout.start_offset()),
        (bs, b_layout.start_offset()),
    ];
    let out = match dtype {
        DType::F32 => shape.run::<f32>(&device, operands)?,
        DType::F16 => shape.run::<half::f16>(&device, operands)?,
        _ => shape.run::<half::bf16>(&device, operands)?,
    };
    drop((x_guard, w_guard, b_guard));
    Ok(Some(Tensor::from_storage(
        Storage::Cuda(out),
        (rows, d_out),
        BackpropOp::none(),
        false,
    )))
}

/// One product's shape and types: the key of the algorithm cache.
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct Product {
    rows: usize,
    d_in: usize,
    d_out: usize,
    data_type: sys::cudaDataType_t,
    compute: sys::cublasComputeType_t,
}

/// A cuBLASLt handle with its workspace and the algorithms its heuristic chose, one per thread
/// and GPU (see [`context`]).
struct Context {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algorithms: RefCell<HashMap<Product, sys::cublasLtMatmulAlgo_t>>,
}

/// The calling thread's [`Context`] for `device`'s GPU and stream, made on first use.
///
/// Candle runs a GPU's work on CUDA's per-thread default stream: one handle value in every
/// thread, but a different stream in each, so two threads' kernels may overlap. A workspace
/// shared between them could be written by both at once, so each thread has its own (kernels
/// on one stream never overlap), one per GPU (CUDA context), freed when the thread ends.
fn context(device: &CudaDevice) -> Result<Rc<Context>> {
    thread_local! {
        static CONTEXTS: RefCell<HashMap<(usize, usize), Rc<Context>>> = Default::default();
    }
    let stream = device.cuda_stream();
    let key = (
        stream.context().cu_ctx() as usize,
        stream.cu_stream() as usize,
    );
    if let Some(context) = CONTEXTS.with_borrow(|contexts| contexts.get(&key).cloned()) {
        return Ok(context);
    }
    let handle = result::create_handle().map_err(lt_error)?;
    // SAFETY: cuBLASLt only ever writes the workspace before reading it.
    let workspace = match unsafe { device.alloc::<u8>(WORKSPACE_BYTES) } {
        Ok(workspace) => workspace,
        Err(e) => {
            // SAFETY: created just above, used by no one.
            let _ = unsafe { result::destroy_handle(handle) };
            return Err(e.into());
        }
    };
    let context = Rc::new(Context {
        handle,
        workspace,
        algorithms: RefCell::new(HashMap::new()),
    });
    CONTEXTS.with_borrow_mut(|contexts| contexts.insert(key, context.clone()));
    Ok(context)
}

impl Drop for Context {
    fn drop(&mut self) {
        // Work queued earlier may still use the handle and workspace; the handle is destroyed
        // only after it finished (the workspace's own drop frees it in stream order).
        let _ = self.workspace.stream().synchronize();
        // SAFETY: the handle was created once, in `context`, and nothing else holds it.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

fn lt_error(e: result::CublasError) -> Error {
    Error::Input(format!("cuBLASLt matmul failed: {e:?}"))
}

/// cuBLASLt descriptors, destroyed when dropped.
struct Descriptors {
    matmul: sys::cublasLtMatmulDesc_t,
    /// A (the weight), B (x), C = D (the output).
    layouts: [sys::cublasLtMatrixLayout_t; 3],
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once, in `Product::descriptors`, and is destroyed once here.
        unsafe {
            let _ = result::destroy_matmul_desc(self.matmul);
            for layout in self.layouts {
                let _ = result::destroy_matrix_layout(layout);
            }
        }
    }
}

impl Product {
    /// Column-major, as cuBLASLt sees row-major data: outᵀ (d_out x rows) = w (read
    /// transposed from its `[d_out, d_in]` rows) · xᵀ, plus the bias down each column.
    fn descriptors(&self, bias: u64) -> Result<Descriptors> {
        let matmul = result::create_matmul_desc(self.compute, sys::cudaDataType_t::CUDA_R_32F)
            .map_err(lt_error)?;
        let layout = |rows: usize, cols: usize| {
            result::create_matrix_layout(self.data_type, rows as u64, cols as u64, rows as i64)
        };
        // Built one by one so that whatever was created is destroyed if a later step fails.
        let mut descriptors = Descriptors {
            matmul,
            layouts: [std::ptr::null_mut(); 3],
        };
        let shapes = [
            (self.d_in, self.d_out),
            (self.d_in, self.rows),
            (self.d_out, self.rows),
        ];
        for (slot, (rows, cols)) in descriptors.layouts.iter_mut().zip(shapes) {
            *slot = layout(rows, cols).map_err(lt_error)?;
        }
        let transpose_a: i32 = 1;
        let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
        let attributes: [(sys::cublasLtMatmulDescAttributes_t, *const c_void, usize); 3] = [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose_a as *const i32).cast(),
                std::mem::size_of::<i32>(),
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of::<sys::cublasLtEpilogue_t>(),
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&bias as *const u64).cast(),
                std::mem::size_of::<u64>(),
            ),
        ];
        for (attribute, value, size) in attributes {
            // SAFETY: `matmul` is live; each value is the type and size the attribute takes.
            unsafe { result::set_matmul_desc_attribute(matmul, attribute, value, size) }
                .map_err(lt_error)?;
        }
        Ok(descriptors)
    }

    /// The fastest algorithm by cuBLASLt's heuristic, asked once per product.
    fn algorithm(
        &self,
        context: &Context,
        descriptors: &Descriptors,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let mut cache = context.algorithms.borrow_mut();
        if let Some(algorithm) = cache.get(self) {
            return Ok(*algorithm);
        }
        let preference = result::create_matmul_pref().map_err(lt_error)?;
        let [a, b, c] = descriptors.layouts;
        // SAFETY: every descriptor is live; the preference is destroyed right after use.
        let heuristic = unsafe {
            let found = result::set_matmul_pref_attribute(
                preference,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&WORKSPACE_BYTES as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
            .and_then(|()| {
                result::get_matmul_algo_heuristic(
                    context.handle,
                    descriptors.matmul,
                    a,
                    b,
                    c,
                    c,
                    preference,
                )
            });
            let _ = result::destroy_matmul_pref(preference);
            found.map_err(lt_error)?
        };
        cache.insert(*self, heuristic.algo);
        Ok(heuristic.algo)
    }

    /// Runs the product on `device`'s stream: operands `[x, w, bias]` with their start offsets
    /// (in elements); returns the output's storage.
    fn run<T: candle_core::cuda::CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(
        &self,
        device: &CudaDevice,
        operands: [(&CudaStorage, usize); 3],
    ) -> Result<CudaStorage> {
        let context = context(device)?;
        let stream = device.cuda_stream();
        let element = std::mem::size_of::<T>() as u64;
        let [(x, x_offset), (w, w_offset), (bias, bias_offset)] = operands;
        let (x, w, bias) = (
            x.as_cuda_slice::<T>()?,
            w.as_cuda_slice::<T>()?,
            bias.as_cuda_slice::<T>()?,
        );
        // SAFETY: the matmul writes every element of the output before anyone reads it.
        let mut out = unsafe { device.alloc::<T>(self.rows * self.d_out) }?;
        {
            let (x_ptr, _x_sync) = x.device_ptr(&stream);
            let (w_ptr, _w_sync) = w.device_ptr(&stream);
            let (bias_ptr, _bias_sync) = bias.device_ptr(&stream);
            let (out_ptr, _out_sync) = out.device_ptr_mut(&stream);
            let (workspace, _workspace_sync) = context.workspace.device_ptr(&stream);
            let descriptors = self.descriptors(bias_ptr + bias_offset as u64 * element)?;
            let algorithm = self.algorithm(&context, &descriptors)?;
            let [a_layout, b_layout, c_layout] = descriptors.layouts;
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: `linear` checked the shapes: x holds rows x d_in elements from its
            // offset, w d_out x d_in, the bias d_out, all contiguous and 16-byte aligned; the
            // output holds rows x d_out; the workspace WORKSPACE_BYTES, used by this thread's
            // stream alone. The pointers stay valid while the guards above live.
            unsafe {
                result::matmul(
                    context.handle,
                    descriptors.matmul,
                    (&alpha as *const f32).cast(),
                    (&beta as *const f32).cast(),
                    (w_ptr + w_offset as u64 * element) as *const c_void,
                    a_layout,
                    (x_ptr + x_offset as u64 * element) as *const c_void,
                    b_layout,
                    out_ptr as *const c_void,
                    c_layout,
                    out_ptr as *mut c_void,
                    c_layout,
                    &algorithm,
                    workspace as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as _,
                )
            }
            .map_err(lt_error)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, device.clone()))
    }
}
