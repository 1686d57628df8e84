//! The thread pool the model computes on.
//!
//! By default that is rayon's global pool (one thread per core, or `RAYON_NUM_THREADS`).
//! `set_num_threads(n)` swaps in a pool of `n` threads for later forward passes; Candle's matmuls
//! and our kernels both run inside it, because rayon work started within `install` stays in the
//! installing pool.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

fn current() -> Option<Arc<ThreadPool>> {
    POOL.lock().map(|pool| pool.clone()).unwrap_or(None)
}

/// Runs `work` on the configured pool (or rayon's global one).
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match current() {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

/// Sets how many threads later forward passes use (at least 1).
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "the number of threads must be at least 1",
        ));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("hooked-encoder-{i}"))
        .build()
        .map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))?;
    if let Ok(mut slot) = POOL.lock() {
        *slot = Some(Arc::new(pool));
    }
    Ok(())
}

/// How many threads a forward pass uses.
#[pyfunction]
pub fn get_num_threads() -> usize {
    current().map_or_else(rayon::current_num_threads, |pool| {
        pool.current_num_threads()
    })
}
