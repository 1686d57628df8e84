//! CUDA builds only: record the driver library (`libcuda.so.1`) as a dependency of the
//! extension even when the link step saw only an empty stub of it.
//!
//! Machines without a GPU link against a stub `libcuda.so` (see `scripts/cuda_toolkit.sh`): the
//! driver is not part of any CUDA wheel. An empty stub defines no symbols, so `--as-needed`
//! would drop it and leave the `cu*` driver calls unresolved when Python imports the module.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        println!("cargo:rustc-link-arg-cdylib=-Wl,--no-as-needed,-lcuda,--as-needed");
    }
}
