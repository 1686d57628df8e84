//! The thread pool the model computes on.
//!
//! By default that is rayon's global pool (one thread per core, or `RAYON_NUM_THREADS`), set up
//! when the module is imported (see [`configure_global_pool`]). `set_num_threads(n)` swaps in a
//! pool of `n` threads for later forward passes; Candle's matmuls and our kernels both run inside
//! it, because rayon work started within `install` stays in the installing pool.
//!
//! When a pool has one thread per CPU the process may run on, each thread is pinned to its own
//! CPU. Unpinned, after the process has been idle for a while (a server between requests, or a
//! benchmark alternating with other programs), Linux tends to wake the pool's threads onto the
//! same CPU for a whole pass. On a 2-core AMD EPYC Zen 4 (KVM), bert-base's encoder at 1x16
//! took 22.5 ms back to back but 40-49 ms after a 200 ms pause: as slow as one thread, every
//! block alike, with 28 times more CPU migrations (`perf stat`); waking the threads first did not
//! help. From Python, unpinned: 23-29 ms back to back, 48-54 ms after the pause; pinned: 24-27
//! and 28-32 ms, and level at 1x128 and 8x128. Set `HOOKED_ENCODER_PIN_THREADS=0` before
//! importing to leave placement to the kernel.

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

/// Rayon's builder with our thread names (`hooked-pool-N`: Linux keeps 15 characters).
fn builder() -> ThreadPoolBuilder {
    ThreadPoolBuilder::new().thread_name(|i| format!("hooked-pool-{i}"))
}

/// Sets up rayon's global pool (called at import, before anything else in this module uses
/// rayon), with rayon's own number of threads. If something already did, that pool stays as
/// it is.
pub fn configure_global_pool() {
    if builder().build_global().is_ok() {
        if let Some(cpus) = pinning::cpus_for(rayon::current_num_threads()) {
            rayon::broadcast(|thread| pinning::pin_current_thread(cpus[thread.index()]));
        }
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
    let pool = builder()
        .num_threads(n)
        .build()
        .map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))?;
    if let Some(cpus) = pinning::cpus_for(n) {
        pool.broadcast(|thread| pinning::pin_current_thread(cpus[thread.index()]));
    }
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

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod pinning {
    /// The CPUs to pin a pool of `threads` threads to, one each: those this process may run on,
    /// if there are exactly `threads` of them and the user did not opt out; else `None`.
    pub fn cpus_for(threads: usize) -> Option<Vec<usize>> {
        if std::env::var_os("HOOKED_ENCODER_PIN_THREADS").is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: `set` is a plain bit mask that sched_getaffinity fills; CPU_ISSET reads it
        // within CPU_SETSIZE.
        let cpus: Vec<usize> = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
                .collect()
        };
        (cpus.len() == threads).then_some(cpus)
    }

    /// Pins the calling thread to `cpu` (a failure leaves it unpinned).
    pub fn pin_current_thread(cpu: usize) {
        // SAFETY: as above; pid 0 is the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod pinning {
    pub fn cpus_for(_threads: usize) -> Option<Vec<usize>> {
        None
    }

    pub fn pin_current_thread(_cpu: usize) {}
}
