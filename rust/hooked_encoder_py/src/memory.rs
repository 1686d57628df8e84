//! Keeping freed memory for reuse.
//!
//! A `run_with_cache` of every hook keeps about a gigabyte of activations for BERT-base at 8x128.
//! By default glibc gives large freed blocks back to the kernel at once, so the next call takes
//! all that memory afresh, one zero-filled 4 KiB page fault at a time: a quarter of the call's
//! time (measured: 1250 ms instead of 1020 ms, 198 000 page faults per call). At import we ask
//! glibc to serve blocks up to 32 MiB from its heap and to keep freed heap memory for reuse. The
//! cost: the process's resident memory stays near its peak instead of shrinking after it. Set
//! `HOOKED_ENCODER_RETURN_MEMORY=1` before importing to keep glibc's defaults.

/// Applies the settings above, unless the user opted out. Only on glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("HOOKED_ENCODER_RETURN_MEMORY").is_some_and(|v| v != "0") {
            return;
        }
        // SAFETY: mallopt only changes allocator parameters; both values are in the documented
        // ranges (the mmap threshold's maximum on 64-bit is 32 MiB).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
