//! Matmuls of a few rows against weights as they lie (Hugging Face's `[n, k]`), without
//! packing them: the layers the model does not pack (the MLM head's dense layer, poolers and
//! classifier heads) at up to [`FEW_ROWS`] rows.

use rayon::prelude::*;

use super::SharedOut;
use crate::simd::Simd;

/// The most rows [`few_rows_matmul`] is meant for: beyond this, `gemm`'s packed kernels win.
pub const FEW_ROWS: usize = 48;

/// `out[r, j] = Σₖ x[r, k] · w[j, k]` for a few rows of `x` (`[m, k]`) and Hugging Face's
/// `[n, k]` weight layout, without packing the weights.
///
/// At a few rows a layer's weights are read once from memory and each is used only `m` times,
/// so `gemm` spends most of its time packing them (41% of a 1x16 forward in `perf`) before its
/// microkernels run. Here each weight row is read as it lies and multiplied into 3 rows of `x` ×
/// 4 weight rows of accumulators at a time (16 AVX2 registers), so reading and computing
/// overlap. Splits the weight rows across the rayon pool.
pub fn few_rows_matmul(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    few_rows_matmul_with(x, m, w, n, k, Simd::selected())
}

/// [`few_rows_matmul`] with the kernel of `level` (the tests run every level this CPU has).
fn few_rows_matmul_with(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    level: Simd,
) -> Vec<f32> {
    debug_assert!(x.len() == m * k && w.len() == n * k);
    let columns = few_rows_kernel(level);
    let mut out = vec![0.0f32; m * n];
    let shared = SharedOut(out.as_mut_ptr());
    const COLUMNS_PER_TASK: usize = 64;
    (0..n.div_ceil(COLUMNS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let first = task * COLUMNS_PER_TASK;
            let last = (first + COLUMNS_PER_TASK).min(n);
            // SAFETY: tasks write disjoint column ranges `first..last` of `out`, and
            // `few_rows_kernel` chose a kernel this CPU can run.
            unsafe { columns(x, m, w, k, first..last, n, shared) };
        });
    out
}

/// Writes columns `columns` of an `[m, n]` output (see [`few_rows_matmul`]).
///
/// # Safety
/// `out` must point at an `[m, n]` buffer whose columns `columns` no one else writes meanwhile.
type ColumnsKernel =
    unsafe fn(&[f32], usize, &[f32], usize, std::ops::Range<usize>, usize, SharedOut);

/// The AVX2 kernel at `level` AVX2 and wider (there is no AVX-512 one) where the CPU has AVX2
/// and FMA, else the portable loop.
fn few_rows_kernel(level: Simd) -> ColumnsKernel {
    #[cfg(target_arch = "x86_64")]
    if level >= Simd::Avx2 && Simd::Avx2.runs_here() {
        return avx2::columns;
    }
    let _ = level;
    portable_columns
}

/// The portable [`ColumnsKernel`]: one dot product per output element.
///
/// # Safety
/// As [`ColumnsKernel`].
unsafe fn portable_columns(
    x: &[f32],
    m: usize,
    w: &[f32],
    k: usize,
    columns: std::ops::Range<usize>,
    n: usize,
    out: SharedOut,
) {
    for j in columns {
        let w_row = &w[j * k..(j + 1) * k];
        for r in 0..m {
            let dot: f32 = x[r * k..(r + 1) * k]
                .iter()
                .zip(w_row)
                .map(|(a, b)| a * b)
                .sum();
            // SAFETY: `r < m`, `j < n`, and column `j` is ours.
            unsafe { *out.at(r * n + j) = dot };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::SharedOut;

    /// The AVX2 [`super::ColumnsKernel`].
    ///
    /// # Safety
    /// As [`super::ColumnsKernel`], and the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn columns(
        x: &[f32],
        m: usize,
        w: &[f32],
        k: usize,
        columns: std::ops::Range<usize>,
        n: usize,
        out: SharedOut,
    ) {
        let mut j = columns.start;
        while j < columns.end {
            let width = (columns.end - j).min(4);
            let mut r = 0;
            while r < m {
                let height = (m - r).min(3);
                // SAFETY: rows `r..r + height` of x and `j..j + width` of w exist; the output
                // cells are in our columns.
                unsafe {
                    match (height, width) {
                        (3, 4) => tile::<3, 4>(x, w, k, r, j, n, out),
                        (2, 4) => tile::<2, 4>(x, w, k, r, j, n, out),
                        (1, 4) => tile::<1, 4>(x, w, k, r, j, n, out),
                        (3, _) => tile::<3, 1>(x, w, k, r, j, n, out),
                        (2, _) => tile::<2, 1>(x, w, k, r, j, n, out),
                        _ => tile::<1, 1>(x, w, k, r, j, n, out),
                    }
                }
                r += height;
            }
            j += if width == 4 { 4 } else { 1 };
        }
    }

    /// `out[r + a, j + b] = x[r + a, :] · w[j + b, :]` for `a < R`, `b < J`.
    // Index loops mirror the R x J register tile; iterators would hide which register is which.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const R: usize, const J: usize>(
        x: &[f32],
        w: &[f32],
        k: usize,
        r: usize,
        j: usize,
        n: usize,
        out: SharedOut,
    ) {
        let xp = x[r * k..(r + R) * k].as_ptr();
        let wp = w[j * k..(j + J) * k].as_ptr();
        let mut acc = [[_mm256_setzero_ps(); J]; R];
        let vector_end = k - k % 8;
        let mut i = 0;
        while i < vector_end {
            // SAFETY: `i + 8 <= k`, inside every row of both tiles.
            unsafe {
                let mut xv = [_mm256_setzero_ps(); R];
                for (a, v) in xv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(xp.add(a * k + i));
                }
                for b in 0..J {
                    let wv = _mm256_loadu_ps(wp.add(b * k + i));
                    for a in 0..R {
                        acc[a][b] = _mm256_fmadd_ps(xv[a], wv, acc[a][b]);
                    }
                }
            }
            i += 8;
        }
        for a in 0..R {
            for b in 0..J {
                let mut lanes = [0.0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[a][b]) };
                let mut dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for t in vector_end..k {
                    dot += x[(r + a) * k + t] * w[(j + b) * k + t];
                }
                // SAFETY: the caller's contract: this cell is in our columns.
                unsafe { *out.at((r + a) * n + j + b) = dot };
            }
        }
    }
}

/// Measures [`few_rows_matmul`] against Candle's matmul (`gemm`) on weights read from memory,
/// as in a forward pass (enough copies to overflow the caches). A measurement, run by hand:
/// `ROWS=16 RAYON_NUM_THREADS=2 cargo test --release -p hooked_encoder_core few_rows_against_gemm
/// -- --ignored --nocapture`; it was used to pick [`FEW_ROWS`].
#[cfg(test)]
mod few_rows_measurement {
    use candle_core::{Device, Tensor};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn few_rows_against_gemm() {
        let m: usize = std::env::var("ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        for (d_in, d_out) in [
            (768usize, 2304usize),
            (768, 3072),
            (3072, 768),
            (768, 28996),
        ] {
            let copies = (256 << 20) / (4 * d_in * d_out) + 1;
            let weights: Vec<Tensor> = (0..copies)
                .map(|_| Tensor::randn(0f32, 1.0, (d_out, d_in), &Device::Cpu).unwrap())
                .collect();
            let flat: Vec<Vec<f32>> = weights.iter().map(values).collect();
            let x = Tensor::randn(0f32, 1.0, (m, d_in), &Device::Cpu).unwrap();
            let xs = values(&x);
            let repeats = copies.max(10);
            let time = |f: &dyn Fn(usize)| {
                let start = std::time::Instant::now();
                (0..repeats).for_each(f);
                start.elapsed().as_secs_f64() * 1e3 / repeats as f64
            };
            let gemm_ms = time(&|i| {
                x.matmul(&weights[i % copies].t().unwrap()).unwrap();
            });
            let few_ms = time(&|i| {
                super::few_rows_matmul(&xs, m, &flat[i % copies], d_out, d_in);
            });
            println!(
                "{m}x{d_in} @ [{d_out}, {d_in}]ᵀ: gemm {gemm_ms:.3} ms, few rows {few_ms:.3} ms"
            );
        }
    }
}

#[cfg(test)]
mod few_rows_tests {
    use crate::simd::Simd;

    #[test]
    fn few_rows_matmul_equals_the_definition_on_every_edge() {
        // Row counts that are not multiples of the 3-row tiles, column counts that are not
        // multiples of the 4-column tiles or of a task's 64, and a k with a scalar tail.
        for (m, n, k) in [
            (1, 1, 1),
            (1, 5, 7),
            (2, 67, 13),
            (3, 4, 8),
            (7, 130, 33),
            (48, 9, 24),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 19) as f32 - 9.0) / 7.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 53 % 23) as f32 - 11.0) / 5.0)
                .collect();
            for level in Simd::ALL.into_iter().filter(|level| level.runs_here()) {
                let out = super::few_rows_matmul_with(&x, m, &w, n, k, level);
                for r in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|t| x[r * k + t] as f64 * w[j * k + t] as f64)
                            .sum();
                        let got = out[r * n + j] as f64;
                        let close = (got - exact).abs() <= 1e-5 * (1.0 + exact.abs());
                        assert!(close, "{m}x{n}x{k}, {level:?}");
                    }
                }
            }
        }
    }
}
