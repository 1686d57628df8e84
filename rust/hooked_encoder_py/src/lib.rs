//! `hooked_encoder._core`: the private extension module. It only translates between Python and
//! the pure-Rust core (`hooked_encoder_core`); the public API lives in the Python package.

mod convert;
mod dlpack;
mod errors;
mod hooks;
mod interrupt;
mod memory;
mod model;
mod threads;

use pyo3::prelude::*;

/// Rust core of hooked_encoder (private: use the `hooked_encoder` package).
#[pymodule]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::convert::TensorBuffer;
    #[pymodule_export]
    use crate::dlpack::DeviceTensor;
    #[pymodule_export]
    use crate::errors::{CheckpointError, HookedEncoderError};
    #[pymodule_export]
    use crate::memory::allocator_purge_delay_ms;
    #[pymodule_export]
    use crate::model::{GradTape, Model};
    #[pymodule_export]
    use crate::threads::{get_num_threads, restart_after_fork, set_num_threads};

    /// Whether this build can run models on NVIDIA GPUs (the `cuda` Cargo feature).
    #[pyfunction]
    fn cuda_available() -> bool {
        candle_core::utils::cuda_is_available()
    }

    /// The hand-written CPU kernels this process runs: `"avx512"`, `"avx2"` or `"portable"`
    /// (the widest this CPU has, at most `HOOKED_ENCODER_MAX_SIMD`).
    #[pyfunction]
    fn cpu_kernels() -> &'static str {
        hooked_encoder_core::simd::Simd::selected().name()
    }

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        // The kernel level is fixed here, at import, as the README says (a cap set in
        // `os.environ` later changes nothing), and a cap that names no level is refused rather
        // than ignored in silence.
        hooked_encoder_core::simd::max_from_env()
            .map_err(pyo3::exceptions::PyValueError::new_err)?;
        hooked_encoder_core::simd::Simd::selected();
        crate::memory::keep_freed_memory();
        crate::threads::start_pool();
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}

// `Python` is used by the generated module code.
#[allow(unused_imports)]
use pyo3::Python as _;
