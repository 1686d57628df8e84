//! Measures Candle's CPU matmul throughput on BERT-base's projection shapes, to compare against
//! the machine's peak and against PyTorch. Run with
//! `RAYON_NUM_THREADS=2 cargo run --release --example matmul_gflops [ROWS]` (default 1024 rows,
//! 8 sequences of 128 tokens; 16 rows is the 1x16 forward, where the weights' memory traffic
//! rather than arithmetic sets the pace, so GB/s of weights read is printed too).

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    for (name, d_in, d_out) in [
        ("qkv", 768, 3 * 768),
        ("attn out", 768, 768),
        ("mlp in", 768, 3072),
        ("mlp out", 3072, 768),
        ("unembed", 768, 28996),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, d_in), &Device::Cpu)?;
        // Enough distinct copies of the weights to overflow the caches (a forward pass reads
        // each weight once, from memory), used in turn.
        let copies = (256 << 20) / (4 * d_in * d_out) + 1;
        let weights = (0..copies)
            .map(|_| Tensor::randn(0f32, 1.0, (d_out, d_in), &Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Hugging Face's layout ([out, in], used transposed) and the same weights stored
        // transposed ([in, out]).
        for layout in ["[out, in].t()", "[in, out]"] {
            let stored = weights
                .iter()
                .map(|w| match layout {
                    "[in, out]" => w.t()?.contiguous(),
                    _ => w.t(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            x.matmul(&stored[0])?; // warm-up
            let repeats = copies.max(10);
            let start = Instant::now();
            for i in 0..repeats {
                x.matmul(&stored[i % copies])?;
            }
            let seconds = start.elapsed().as_secs_f64() / repeats as f64;
            let gflops = 2.0 * (rows * d_in * d_out) as f64 / seconds / 1e9;
            let weight_gbs = (4 * d_in * d_out) as f64 / seconds / 1e9;
            println!(
                "{name:>9} [{rows}x{d_in}] @ [{d_in}x{d_out}] {layout:>13}: {:7.2} ms, \
                 {gflops:6.1} GFLOP/s, weights read at {weight_gbs:5.1} GB/s",
                seconds * 1e3
            );
        }
    }
    Ok(())
}
