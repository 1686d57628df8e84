//! What this CPU can do at best, to read the matmul figures against: the float32 FMA
//! throughput of all rayon threads (AVX2 + FMA, 8-lane vectors, 12 independent chains each) and
//! the memory read bandwidth (a parallel sum over 512 MiB, far larger than any cache). A
//! bert-base forward at few rows reads its 340 MB of block weights once, so it cannot run faster
//! than their size over the bandwidth; at many rows it cannot beat its FLOPs over the peak.
//! Run with `RAYON_NUM_THREADS=2 cargo run --release --example cpu_peak`.

use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        let steps = 200_000_000u64;
        let best = (0..5)
            .map(|_| {
                let start = Instant::now();
                let sink: f32 = (0..threads)
                    .into_par_iter()
                    // SAFETY: AVX2 and FMA were detected above.
                    .map(|t| unsafe { fma_chains(steps / threads as u64, t as f32) })
                    .sum();
                std::hint::black_box(sink);
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        // 12 chains x 8 lanes x 2 flops per step.
        let gflops = (steps / threads as u64 * threads as u64) as f64 * 12.0 * 16.0 / best / 1e9;
        println!("FMA peak, {threads} threads: {gflops:.1} GFLOP/s (float32, AVX2)");
    }
    let floats = 128 << 20; // 512 MiB
    let data: Vec<f32> = (0..floats)
        .into_par_iter()
        .map(|i| (i % 7) as f32)
        .collect();
    let best = (0..5)
        .map(|_| {
            let start = Instant::now();
            let sum: f32 = data.par_chunks(1 << 16).map(lane_sum).sum();
            std::hint::black_box(sum);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "memory read, {threads} threads: {:.1} GB/s",
        (floats * 4) as f64 / best / 1e9
    );
}

/// The sum of `values` in 32 lanes: independent accumulators that LLVM keeps in vector
/// registers, so that the loop waits on memory, not on one chain of additions.
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 32];
    for chunk in values.chunks_exact(32) {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += value;
        }
    }
    lanes.iter().sum()
}

/// `steps` steps of 12 independent FMA chains (enough to cover the FMA units' latency).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains(steps: u64, seed: f32) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(seed * 1e-3); 12];
    for _ in 0..steps {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, b, c);
        }
    }
    let mut lanes = [0.0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}
