//! The thread pool the model computes on.
//!
//! A pool of our own (one thread per core, or `RAYON_NUM_THREADS`), started when the module is
//! imported ([`start_pool`]); rayon's global pool is never used, and every computing entry of the
//! binding runs inside [`install`], so Candle's matmuls and our kernels both run in our pool
//! (rayon work started within `install` stays in the installing pool). `set_num_threads(n)`
//! swaps in a pool of `n` threads for later calls.
//!
//! A pool's threads do not survive `fork()`: a child forked from a process that had imported the
//! package would hand its work to threads that do not exist and wait forever. So the package
//! registers [`restart_after_fork`] with `os.register_at_fork`, which gives the child a new pool
//! of as many threads (rayon's global pool could not be replaced; hence none of it).
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

/// Runs `work` without the GIL, on the pool: how every computation of the binding runs.
pub fn compute<R: Send>(py: Python<'_>, work: impl FnOnce() -> R + Send) -> R {
    py.detach(|| install(work))
}

/// Rayon's builder with our thread names (`hooked-pool-N`: Linux keeps 15 characters).
fn builder() -> ThreadPoolBuilder {
    ThreadPoolBuilder::new().thread_name(|i| format!("hooked-pool-{i}"))
}

/// A pool of `threads` threads (0: `RAYON_NUM_THREADS`, else one per CPU), pinned as the
/// module documentation says.
fn start(threads: usize) -> Result<ThreadPool, rayon::ThreadPoolBuildError> {
    let pool = builder().num_threads(threads).build()?;
    if let Some(cpus) = pinning::cpus_for(pool.current_num_threads()) {
        pool.broadcast(|thread| pinning::pin_current_thread(cpus[thread.index()]));
    }
    Ok(pool)
}

/// Makes `pool` the one later calls run on; returns the one it replaces.
fn replace(pool: ThreadPool) -> Option<Arc<ThreadPool>> {
    POOL.lock()
        .ok()
        .and_then(|mut slot| slot.replace(Arc::new(pool)))
}

/// Starts the pool (called at import). If no thread can be started, calls run on rayon's
/// global pool instead, which starts its own when first used.
pub fn start_pool() {
    if let Ok(pool) = start(0) {
        replace(pool);
    }
}

/// In the child of a `fork()`: the pool's threads stayed behind in the parent, so start a new
/// pool of as many threads. The old one is leaked, not dropped: its threads cannot be told to
/// stop, and its memory is the parent's copy.
#[pyfunction]
pub fn restart_after_fork() {
    let threads = get_num_threads();
    if let Ok(pool) = start(threads) {
        if let Some(old) = replace(pool) {
            std::mem::forget(old);
        }
    }
    crate::interrupt::restart_after_fork();
}

/// Sets how many threads later forward passes use (at least 1).
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(PyValueError::new_err(
            "the number of threads must be at least 1",
        ));
    }
    let pool =
        start(n).map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}")))?;
    replace(pool);
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
