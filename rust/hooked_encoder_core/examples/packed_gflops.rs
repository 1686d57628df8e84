//! Candle's matmul (`gemm`, which packs the weight on every call) against [`PackedWeight`]
//! (packed once) on bert-base's projection shapes and on its unembedding (28996 columns, 89 MB
//! of weights, more than L3 holds: every block of rows re-reads it from memory). Run with
//! `RAYON_NUM_THREADS=2 cargo run --release --example packed_gflops [ROWS...]`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use hooked_encoder_core::packed_matmul::PackedWeight;

fn best_of(repeats: usize, mut call: impl FnMut()) -> f64 {
    call();
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            call();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> candle_core::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = if rows.is_empty() {
        vec![128, 1024]
    } else {
        rows
    };
    for m in rows {
        for (name, k, n) in [
            ("qkv", 768, 3 * 768),
            ("attn out", 768, 768),
            ("mlp in", 768, 3072),
            ("mlp out", 3072, 768),
            ("unembed", 768, 28996),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let packed = PackedWeight::pack(&w.flatten_all()?.to_vec1::<f32>()?, n, k);
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let repeats = (2_000_000_000 / (2 * m * n * k)).clamp(5, 200);
            let gemm = best_of(repeats, || {
                x.matmul(&w.t().unwrap()).unwrap();
            });
            let ours = best_of(repeats, || {
                packed.matmul(&xs, m);
            });
            let expected = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let got = packed.matmul(&xs, m);
            let diff = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let gflop = 2.0 * (m * n * k) as f64 / 1e9;
            println!(
                "{name:>9} {m:>5}x{k}x{n}: gemm {:6.1} GFLOP/s, packed {:6.1} GFLOP/s ({:.2}x), max diff {diff:.1e}",
                gflop / gemm,
                gflop / ours,
                gemm / ours
            );
        }
    }
    Ok(())
}
