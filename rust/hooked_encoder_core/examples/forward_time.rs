//! Times the plain forward pass (no hooks requested) of a BERT-base-shaped model, to measure
//! what the hook machinery costs when nothing is hooked. Compare the two builds:
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example forward_time -- 8 128 20
//! RAYON_NUM_THREADS=2 cargo run --release --features hookless --example forward_time -- 8 128 20
//! ```
//!
//! Arguments: batch, positions, repeats, and `encoder` to stop after the last block (Hugging
//! Face's `last_hidden_state`) instead of computing the logits. Prints the median and the
//! minimum in milliseconds.
//! `HOOKED_ENCODER_MAX_SIMD=avx2` (or `portable`) times narrower kernels than this CPU's widest.
//! `GEMM_RHS_PACKING_THRESHOLD=n` sets `gemm`'s threshold for packing the weights (on x86 it
//! packs a `W^T` operand only above `n * 16` rows; its default `n` is 128), for experiments.

use std::time::Instant;

use candle_core::Device;
use hooked_encoder_core::{BertConfig, ForwardInput, HookedBert, NoHooks, Output, WeightMap};

// The Python extension's allocator: with glibc's, every large activation is a fresh `mmap`
// whose pages fault one by one, and the times would not be the package's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> hooked_encoder_core::Result<()> {
    // As the Python package does at import: no Candle elementwise pool beside rayon's (its
    // worker spins after each op, taking a core from the forward being timed).
    // SAFETY: no other thread exists yet to read the environment meanwhile.
    unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (batch, pos, repeats) = (
        args.first().copied().unwrap_or(8),
        args.get(1).copied().unwrap_or(128),
        args.get(2).copied().unwrap_or(10),
    );
    let output = if std::env::args().any(|a| a == "encoder") {
        Output::Residual
    } else {
        Output::Logits
    };
    if let Some(n) = std::env::var("GEMM_RHS_PACKING_THRESHOLD")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        gemm::set_rhs_packing_threshold(n);
    }
    let cfg = BertConfig::bert_base();
    let weights = WeightMap::random(&cfg, 0, &Device::Cpu)?;
    let (model, _) = HookedBert::load(cfg, &weights, &Device::Cpu)?;
    let tokens: Vec<i64> = (0..batch * pos)
        .map(|i| (i * 7919 % 28000) as i64 + 1)
        .collect();
    let input = ForwardInput {
        batch,
        pos,
        tokens: &tokens,
        token_type_ids: None,
        attention_mask: None,
    };
    model.forward(&input, output, &mut NoHooks)?; // warm-up
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            model
                .forward(&input, output, &mut NoHooks)
                .map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<hooked_encoder_core::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let hookless = if cfg!(feature = "hookless") {
        "compiled out"
    } else {
        "present"
    };
    println!(
        "{batch}x{pos} {output:?}, hooks {hookless}, {} kernels: median {:.1} ms, min {:.1} ms over {repeats} runs",
        hooked_encoder_core::simd::Simd::selected().name(),
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}
