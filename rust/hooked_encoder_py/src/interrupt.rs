//! Letting Ctrl-C stop a long forward pass.
//!
//! Python runs signal handlers only on its main thread, between bytecodes, so a pass computed on
//! the main thread would hold off Ctrl-C until it ends. Instead, a long pass started from the
//! main thread is computed on one long-lived worker thread while the main thread, with the GIL
//! released, wakes every few milliseconds to run the signal handlers. If one raises
//! (Ctrl-C raises `KeyboardInterrupt`), the pass is asked to stop at the next block boundary
//! (`Hooks::interrupted`) and that very exception is returned.
//!
//! The worker is one thread for the life of the process, not one per call: the allocator gives
//! each thread memory of its own, and a fresh thread per call took its activations from fresh
//! memory (with glibc's arenas, about three times as many page faults per `run_with_cache`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use candle_core::Tensor;
use hooked_encoder_core::HookedBert;
use pyo3::panic::PanicException;
use pyo3::prelude::*;

use crate::hooks::PyHooks;

/// How often the waiting main thread runs Python's signal handlers.
const POLL: Duration = Duration::from_millis(20);

type Job = Box<dyn FnOnce() + Send>;
type Outcome = (hooked_encoder_core::Result<Tensor>, PyHooks);

/// The worker's job queue (the worker is started on first use).
static QUEUE: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts a worker thread and returns its queue; if no thread can be started, a queue whose
/// receiver is gone, so that every send fails and callers say so.
fn start_worker() -> Sender<Job> {
    let (sender, jobs) = mpsc::channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("hooked-encoder-main".into())
        .spawn(move || {
            for job in jobs {
                // A panicking job drops its reply channel (the caller sees that); the worker
                // lives on for the next one.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        });
    match spawned {
        Ok(_) => sender,
        Err(_) => mpsc::channel::<Job>().0,
    }
}

fn worker() -> PyResult<Sender<Job>> {
    QUEUE
        .get_or_init(|| Mutex::new(start_worker()))
        .lock()
        .map(|sender| sender.clone())
        .map_err(|_| PanicException::new_err("the hooked_encoder worker thread is unusable"))
}

/// In the child of a `fork()`, where the worker thread does not exist: a new one, if the parent
/// had started one.
pub fn restart_after_fork() {
    if let Some(queue) = QUEUE.get() {
        if let Ok(mut sender) = queue.lock() {
            *sender = start_worker();
        }
    }
}

/// Runs `work(model, hooks)` on the worker thread while this (main) thread watches for signals;
/// returns the pass's result and the hooks (holding what they recorded), or the exception a
/// signal handler raised.
pub fn run_watching_signals<W>(
    py: Python<'_>,
    model: Arc<HookedBert>,
    mut hooks: PyHooks,
    work: W,
) -> PyResult<Outcome>
where
    W: FnOnce(&HookedBert, &mut PyHooks) -> hooked_encoder_core::Result<Tensor> + Send + 'static,
{
    let interrupt = Arc::clone(&hooks.interrupt);
    let (reply, outcome) = mpsc::channel::<Outcome>();
    let job: Job = Box::new(move || {
        let result = crate::threads::install(|| work(&model, &mut hooks));
        let _ = reply.send((result, hooks));
    });
    worker()?
        .send(job)
        .map_err(|_| PanicException::new_err("the hooked_encoder worker thread is not running"))?;
    let (outcome, raised) = py.detach(move || {
        let mut raised: Option<PyErr> = None;
        loop {
            match outcome.recv_timeout(POLL) {
                Ok(outcome) => return (Ok(outcome), raised),
                Err(RecvTimeoutError::Timeout) => {
                    if raised.is_none() {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            interrupt.store(true, Ordering::Relaxed);
                            raised = Some(e);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let panicked = PanicException::new_err(
                        "the forward pass panicked (a bug in hooked_encoder; please report it)",
                    );
                    return (Err(panicked), raised);
                }
            }
        }
    });
    let outcome = outcome?;
    match raised {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}
