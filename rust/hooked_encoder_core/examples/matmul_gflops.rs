//! Measures Candle's CPU matmul throughput on BERT-base's projection shapes, to compare against
//! the machine's peak and against PyTorch. Run with
//! `RAYON_NUM_THREADS=2 cargo run --release --example matmul_gflops`.

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let rows = 1024; // 8 sequences of 128 tokens
    for (name, d_in, d_out) in [
        ("qkv", 768, 3 * 768),
        ("attn out", 768, 768),
        ("mlp in", 768, 3072),
        ("mlp out", 3072, 768),
        ("unembed", 768, 28996),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, d_in), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (d_out, d_in), &Device::Cpu)?;
        let wt = w.t()?;
        x.matmul(&wt)?; // warm-up
        let repeats = 5;
        let start = Instant::now();
        for _ in 0..repeats {
            x.matmul(&wt)?;
        }
        let seconds = start.elapsed().as_secs_f64() / repeats as f64;
        let gflops = 2.0 * (rows * d_in * d_out) as f64 / seconds / 1e9;
        println!(
            "{name:>9} [{rows}x{d_in}] @ [{d_in}x{d_out}]: {:7.2} ms, {gflops:6.1} GFLOP/s",
            seconds * 1e3
        );
    }
    Ok(())
}
