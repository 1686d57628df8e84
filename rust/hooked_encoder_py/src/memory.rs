//! Keeping freed memory for reuse: the extension's allocator.
//!
//! A forward pass allocates its activations afresh at every step (BERT-base at 8x128: 12 MiB for
//! each MLP's hidden layer, 9 MiB for each query-key-value projection; at 32x128 four times as
//! much), and a `run_with_cache` of every hook keeps about a gigabyte of them. glibc's `malloc`
//! serves blocks that large with `mmap` and unmaps them on `free`, so every step took its memory
//! afresh from the kernel, one zero-filled page fault at a time.
//!
//! The extension's Rust code therefore allocates through mimalloc, which keeps freed memory
//! mapped for reuse and gives it back to the kernel once it has been unused for a second
//! (mimalloc's `purge_delay`; `MIMALLOC_PURGE_DELAY=0` in the environment gives it back at once).
//! Only this extension's allocations are affected: NumPy's, PyTorch's and Python's own go through
//! the process's `malloc` as before. (An earlier version instead raised glibc's thresholds for the
//! whole process with `mallopt`, which kept its resident memory at its peak for good.)

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives freed memory back to the kernel now. mimalloc purges only when it next allocates or
/// frees after the delay, so without this a model loaded and then left alone would keep the
/// checkpoint's bytes (read whole, as large as the model) resident until its first call.
pub fn release_freed() {
    // SAFETY: `mi_collect` only walks mimalloc's own structures; `force` also purges memory
    // whose delay has not run out.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
