//! Keeping freed memory for reuse: the extension's allocator.
//!
//! A forward pass allocates its activations afresh at every step (BERT-base at 8x128: 12 MiB for
//! each MLP's hidden layer, 9 MiB for each query-key-value projection; at 32x128 four times as
//! much), and a `run_with_cache` of every hook keeps about a gigabyte of them. glibc's `malloc`
//! serves blocks that large with `mmap` and unmaps them on `free`, so every step took its memory
//! afresh from the kernel, one zero-filled page fault at a time.
//!
//! The extension's Rust code therefore allocates through mimalloc, which keeps freed memory
//! mapped for reuse and gives it back to the kernel ("purges" it) once it has lain unused for
//! [`PURGE_DELAY_MS`]. Only this extension's allocations are affected: NumPy's, PyTorch's and
//! Python's own go through the process's `malloc` as before. (An earlier version instead raised
//! glibc's thresholds for the whole process with `mallopt`, which kept its resident memory at its
//! peak for good.)

use std::ffi::c_long;

use libmimalloc_sys::{mi_collect, mi_option_get, mi_option_set, mi_option_t};
use pyo3::prelude::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t`, which the sys crate does not name.
/// mimalloc never renumbers its options (retired ones keep their places as `deprecated_*`), and
/// a test reads the option back through the environment variable that mimalloc parses into it.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// How long freed memory is kept for reuse. mimalloc's own default is one second, but it purges
/// only when it next allocates or frees, so the delay decides whether a call made after a pause
/// reuses the previous call's memory or faults it in again, not how soon an idle process shrinks
/// (it does not, until its next call). With one second, `run_with_cache` at 8x128 (bert-base,
/// Zen 4) took 1.19x the forward's time when its calls were a few seconds apart (the interleaved
/// benchmark), 1.03x with ten.
const PURGE_DELAY_MS: c_long = 10_000;

/// Sets the purge delay, unless the user set mimalloc's `MIMALLOC_PURGE_DELAY` (which mimalloc
/// reads when the extension loads; `0` gives freed memory back at once).
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's documented options to a valid value; called once, at
        // import, before this extension starts any thread of its own.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// Gives freed memory back to the kernel now. Without this a model loaded and then left alone
/// would keep what its load freed (tensors' bytes as read, unpacked copies of the weights it
/// packs) resident until its first call (see [`PURGE_DELAY_MS`]).
pub fn release_freed() {
    // SAFETY: `mi_collect` only walks mimalloc's own structures; `force` also purges memory
    // whose delay has not run out.
    unsafe { mi_collect(true) }
}

/// The allocator's purge delay in milliseconds (for the tests).
#[pyfunction]
pub fn allocator_purge_delay_ms() -> c_long {
    // SAFETY: reads one of mimalloc's options.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) }
}
