//! CUDA builds only: compiles `cuda/fused.cu` to PTX with nvcc (from `PATH`, or
//! `$CUDA_ROOT/bin`; `scripts/cuda_toolkit.sh` provides both), for the same compute capability
//! as Candle's own kernels (`CUDA_COMPUTE_CAP`, default 8.0: Ampere and newer, JIT-compiled by
//! the driver for later GPUs).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cuda/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{compute_cap}"))
        .arg("cuda/fused.cu")
        .arg("-o")
        .arg(out.join("fused.ptx"))
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {nvcc:?} ({e}); source scripts/cuda_toolkit.sh for a CUDA build")
        });
    assert!(status.success(), "nvcc failed to compile cuda/fused.cu");
}
