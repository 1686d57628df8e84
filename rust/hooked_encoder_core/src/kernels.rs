//! CPU kernels for the hot path, on plain `f32` slices.
//!
//! Candle's CPU elementwise ops are serial scalar loops (its GELU calls `libm::erff` per element,
//! its softmax takes five passes): on BERT they cost more than the matmuls. These kernels fuse
//! what the forward pass needs into single passes, split rows across the rayon pool, and keep
//! inner loops branch-free so that LLVM vectorises them (the wheel targets x86-64-v3, so AVX2 and
//! FMA). `exp` and `erf` are polynomial approximations with errors near f32 rounding; the parity
//! tests against PyTorch hold at TransformerLens's tolerance. GELU and softmax's `exp` run on
//! SIMD vectors written out in `vector_math` (where vectorising the scalar code left them
//! latency-bound), with the same bits as the scalar functions here. Attention and the few-rows
//! matmul have modules of their own (`attention`, `few_rows`); the packed matmul of the model's
//! projections is `crate::packed_matmul`.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::Activation;

mod attention;
mod few_rows;
mod vector_math;

pub use attention::{
    attention_fused, attention_scores, attention_z, AttentionShape, Heads, KeyMask,
};
pub use few_rows::{few_rows_matmul, FEW_ROWS};

use vector_math::Addend;

/// Rows per parallel task: enough work (about 16K elements) to amortise scheduling.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// `e^x` to about 1 ulp (Cephes `expf`): range reduction by powers of two, then a degree-6
/// polynomial. Branch-free, so loops over it vectorise. `-inf` gives exactly 0 and NaN stays
/// NaN, as softmax needs.
///
/// `2^n` is built from `n`'s bits by adding 1.5 * 2^23 (which puts the integer `n` in the low
/// mantissa bits) rather than by `n as i32`: Rust's saturating float-to-int cast has no vector
/// instruction on x86, so LLVM scalarised every loop over `exp` lane by lane (GELU and the
/// softmax spent more time in that cast than in the polynomial; `perf annotate`, Zen 4).
/// `vector_math` repeats these steps on SIMD vectors and must give the same bits: change both.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUNDING: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.3);
    let n = (clamped * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, clamped));
    let mut p = EXP_POLY[0];
    for &coefficient in &EXP_POLY[1..] {
        p = p.mul_add(r, coefficient);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    // `n` is an integer in [-126, 127]: the low bits of `n + 1.5 * 2^23` are `n` itself.
    let biased = (n + ROUNDING)
        .to_bits()
        .wrapping_sub(ROUNDING.to_bits())
        .wrapping_add(127);
    let two_n = f32::from_bits(biased << 23);
    let result = y * two_n;
    // Below the clamp the true value is (sub)normal or zero; send it to zero.
    if x < -87.3 {
        0.0
    } else {
        result
    }
}

/// `ln 2` in two parts, so that `x - n ln 2` loses nothing for `|n| <= 127`.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `exp`'s polynomial on `[-ln 2 / 2, ln 2 / 2]`, highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// The error function to about 1.5e-7 absolute (Abramowitz & Stegun 7.1.26, the approximation
/// PyTorch's vectorised CPU `erf` uses). `vector_math` repeats these steps (as [`exp`]'s).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / ERF_P.mul_add(a, 1.0);
    let mut p = ERF_POLY[0];
    for &coefficient in &ERF_POLY[1..] {
        p = p.mul_add(t, coefficient);
    }
    let y = (-(p * t)).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

/// [`erf`]'s `p` and polynomial in `t = 1 / (1 + p |x|)`, highest degree first.
const ERF_P: f32 = 0.327_591_1;
const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152_1,
    1.421_413_7,
    -0.284_496_74,
    0.254_829_6,
];

/// Applies an activation function to one value.
#[inline(always)]
fn activate(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            // tanh(u) = 1 - 2 / (e^{2u} + 1)
            let u = 0.797_884_6 * x * 0.044_715_f32.mul_add(x * x, 1.0);
            let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
            0.5 * x * (1.0 + tanh)
        }
        Activation::Relu => x.max(0.0),
    }
}

/// `row += bias`, then the activation if any, in place (`row` and `bias` of one length; also
/// part of a row, as the packed matmul's epilogue applies it to each task's columns).
#[inline(always)]
pub fn bias_act_row(row: &mut [f32], bias: &[f32], act: Option<Activation>) {
    match act {
        None => row.iter_mut().zip(bias).for_each(|(x, b)| *x += b),
        Some(Activation::Gelu) => vector_math::gelu_row(row, Addend::Each(bias)),
        Some(act) => row
            .iter_mut()
            .zip(bias)
            .for_each(|(x, b)| *x = activate(act, *x + b)),
    }
}

/// The activation of every element of `row`, in place.
#[inline(always)]
pub(crate) fn act_row(row: &mut [f32], act: Activation) {
    match act {
        Activation::Gelu => vector_math::gelu_row(row, Addend::Nothing),
        act => row.iter_mut().for_each(|x| *x = activate(act, *x)),
    }
}

/// `data[r, :] += bias`, then the activation if any, in place, for rows of `bias.len()`.
pub fn bias_act_inplace(data: &mut [f32], bias: &[f32], act: Option<Activation>) {
    let d = bias.len();
    data.par_chunks_mut(d * rows_per_task(d)).for_each(|chunk| {
        for row in chunk.chunks_exact_mut(d) {
            bias_act_row(row, bias, act);
        }
    });
}

/// The activation of every element, into a new buffer.
pub fn activation(src: &[f32], act: Activation) -> Vec<f32> {
    let mut out = src.to_vec();
    out.par_chunks_mut(16_384)
        .for_each(|chunk| act_row(chunk, act));
    out
}

/// `a + b`, elementwise, into a new buffer.
pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = a.to_vec();
    out.par_chunks_mut(16_384)
        .zip(b.par_chunks(16_384))
        .for_each(|(o, b)| o.iter_mut().zip(b).for_each(|(o, b)| *o += b));
    out
}

/// `op` folded over a row in eight independent lanes, then across the lanes and the leftover
/// tail. A serial fold of floats cannot be reordered, so LLVM would not vectorise it; eight
/// lanes vectorise (and, for a sum, round less).
#[inline(always)]
fn fold_in_lanes(row: &[f32], identity: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [identity; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(identity, |a, &x| op(a, x));
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = op(*lane, x);
        }
    }
    op(lanes[1..].iter().fold(lanes[0], |a, &x| op(a, x)), tail)
}

/// Sum of a row (see [`fold_in_lanes`]).
#[inline(always)]
fn sum(row: &[f32]) -> f32 {
    fold_in_lanes(row, 0.0, |a, x| a + x)
}

/// Largest value of a row, NaNs ignored as by `f32::max` (see [`fold_in_lanes`]).
#[inline(always)]
fn max(row: &[f32]) -> f32 {
    fold_in_lanes(row, f32::NEG_INFINITY, f32::max)
}

/// Mean and `sqrt(var + eps)` of one row, in two passes (exact for near-constant rows, where
/// the one-pass `E[x²] - E[x]²` cancels catastrophically).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum(row) / n;
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|x| (x - mean) * (x - mean))
        .sum();
    for chunk in chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane += (x - mean) * (x - mean);
        }
    }
    let var = (lanes.iter().sum::<f32>() + tail) / n;
    (mean, (var + eps).sqrt())
}

/// TransformerLens's LayerNorm of one row, in place: `(x - mean) / scale * w + b`.
#[inline(always)]
fn layer_norm_row(row: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
    let (mean, scale) = row_stats(row, eps);
    let inv = 1.0 / scale;
    for ((x, w), b) in row.iter_mut().zip(weight).zip(bias) {
        *x = ((*x - mean) * inv).mul_add(*w, *b);
    }
}

/// A new `[rows, d]` buffer filled row by row in parallel tasks: `fill(r, out)` gets row `r`
/// uninitialised and returns it written (see [`init_row`]). Nothing zeroes the buffer first: a
/// `vec![0.0; n]` is a serial `memset` of the whole output before the parallel pass (0.4% of
/// the samples at 8x128). Without it here and for attention's `z`: bert-base 1x16 0.99x the
/// time, 1x128 0.99x, 8x128 level (`bench/ab_processes.py`, 3 rounds, Zen 4).
fn rows_filled<F>(rows: usize, d: usize, fill: F) -> Vec<f32>
where
    F: for<'a> Fn(usize, &'a mut [MaybeUninit<f32>]) -> &'a mut [f32] + Sync,
{
    let len = rows * d;
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let per_task = rows_per_task(d);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(d * per_task)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(d).enumerate() {
                let first = row.as_ptr().cast::<f32>();
                let written = fill(task * per_task + i, row);
                assert!(
                    std::ptr::eq(written.as_ptr(), first) && written.len() == d,
                    "a row must come back written in place"
                );
            }
        });
    // SAFETY: every row of the `len` floats came back from `fill` as `&mut [f32]` over its own
    // memory (asserted), so each was initialised.
    unsafe { out.set_len(len) };
    out
}

/// Writes `values` into `out` (as many as it holds) and returns it as written floats.
#[inline(always)]
fn init_row(
    out: &mut [MaybeUninit<f32>],
    values: impl ExactSizeIterator<Item = f32>,
) -> &mut [f32] {
    assert_eq!(values.len(), out.len(), "a row needs one value per element");
    out.iter_mut().zip(values).for_each(|(o, v)| {
        o.write(v);
    });
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// TransformerLens's LayerNorm of rows of `weight.len()`, each normalised in the output row.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    assert!(x.len().is_multiple_of(d.max(1)), "layer_norm: rows of {d}");
    rows_filled(x.len() / d.max(1), d, |r, out| {
        let row = init_row(out, x[r * d..][..d].iter().copied());
        layer_norm_row(row, weight, bias, eps);
        row
    })
}

/// `layer_norm(a + b)` in one pass: each row's sum is formed in its output row and normalised
/// there, so the sum never makes a buffer of its own (BERT's post-LN residual adds, unhooked).
pub fn add_layer_norm(a: &[f32], b: &[f32], weight: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    assert_eq!(
        a.len(),
        b.len(),
        "add_layer_norm: the two inputs differ in length"
    );
    assert!(
        a.len().is_multiple_of(d.max(1)),
        "add_layer_norm: rows of {d}"
    );
    rows_filled(a.len() / d.max(1), d, |r, out| {
        let (a, b) = (&a[r * d..][..d], &b[r * d..][..d]);
        let row = init_row(out, a.iter().zip(b).map(|(a, b)| a + b));
        layer_norm_row(row, weight, bias, eps);
        row
    })
}

/// The hooked halves of a LayerNorm: `scale` (one per row) and `normalized = (x - mean) / scale`.
pub fn layer_norm_parts(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut scale = vec![0f32; x.len() / d];
    let mut normalized = vec![0f32; x.len()];
    let rows = rows_per_task(d);
    normalized
        .par_chunks_mut(d * rows)
        .zip(scale.par_chunks_mut(rows))
        .zip(x.par_chunks(d * rows))
        .for_each(|((normalized, scale), x)| {
            for ((n, s), row) in normalized
                .chunks_exact_mut(d)
                .zip(scale)
                .zip(x.chunks_exact(d))
            {
                let (mean, row_scale) = row_stats(row, eps);
                *s = row_scale;
                let inv = 1.0 / row_scale;
                n.iter_mut()
                    .zip(row)
                    .for_each(|(n, x)| *n = (x - mean) * inv);
            }
        });
    (scale, normalized)
}

/// `normalized * w + b`, rows of `w.len()`.
pub fn affine(normalized: &[f32], weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let d = weight.len();
    assert!(
        normalized.len().is_multiple_of(d.max(1)),
        "affine: rows of {d}"
    );
    rows_filled(normalized.len() / d.max(1), d, |r, out| {
        let row = &normalized[r * d..][..d];
        init_row(
            out,
            row.iter()
                .zip(weight)
                .zip(bias)
                .map(|((x, w), b)| x.mul_add(*w, *b)),
        )
    })
}

/// Softmax of one row in place. A row whose maximum is `-inf` (every key masked) or that holds
/// a NaN becomes all zeros: TransformerLens replaces the NaNs such rows produce with 0.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    let max = max(row);
    // Two loops, not one that also sums: a serial float sum cannot be reordered, so LLVM would
    // not vectorise the exponentials beside it (3x slower on rows of 24; `sum` uses 8 lanes).
    vector_math::exp_row(row, Addend::All(-max));
    let total = sum(row);
    if max == f32::NEG_INFINITY || !total.is_finite() || total == 0.0 {
        row.fill(0.0);
        return;
    }
    let inv = 1.0 / total;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Softmax over the last dimension (`row_len` wide), in place.
pub fn softmax_rows_inplace(data: &mut [f32], row_len: usize) {
    data.par_chunks_mut(row_len * rows_per_task(row_len))
        .for_each(|chunk| chunk.chunks_exact_mut(row_len).for_each(softmax_row));
}

/// A pointer that parallel tasks may share because each writes only its own elements.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to parallel tasks (see callers).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer this pointer was made from.
        unsafe { self.0.add(offset) }
    }
}

/// Rotary position embedding, in place, for the heads of a `[rows, row_stride]` buffer whose
/// row `r` is position `r % pos` and whose heads start at column `offset`: each head's halves
/// `(x₁, x₂)` become `(x₁ cos - x₂ sin, x₂ cos + x₁ sin)`, `transformers`' `x * cos +
/// rotate_half(x) * sin`. `cos` and `sin` are `[pos, d_head / 2]`.
pub fn rotary_inplace(
    data: &mut [f32],
    row_stride: usize,
    (offset, heads, d_head): (usize, usize, usize),
    pos: usize,
    (cos, sin): (&[f32], &[f32]),
) {
    let half = d_head / 2;
    assert!(
        offset + heads * d_head <= row_stride
            && data.len().is_multiple_of(row_stride)
            && cos.len() == pos * half
            && sin.len() == pos * half
    );
    let rows_per = rows_per_task(heads * d_head);
    data.par_chunks_mut(row_stride * rows_per)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(row_stride).enumerate() {
                let at = (task * rows_per + i) % pos;
                let (cos, sin) = (&cos[at * half..][..half], &sin[at * half..][..half]);
                for head in row[offset..offset + heads * d_head].chunks_exact_mut(d_head) {
                    let (x1, x2) = head.split_at_mut(half);
                    for (((a, b), c), s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
                        let (a0, b0) = (*a, *b);
                        *a = a0 * c - b0 * s;
                        *b = b0 * c + a0 * s;
                    }
                }
            }
        });
}

/// A gated MLP's activation, `act(x[:, ..d]) * x[:, d..]` for rows of `2 d` (the activated half
/// first, as ModernBERT's `Wi` stacks them), into a new `[rows, d]` buffer.
pub fn gated_activation(src: &[f32], d: usize, act: Activation) -> Vec<f32> {
    rows_filled(src.len() / (2 * d), d, |r, out| {
        let (pre, linear) = src[2 * d * r..][..2 * d].split_at(d);
        let row = init_row(out, pre.iter().copied());
        act_row(row, act);
        row.iter_mut().zip(linear).for_each(|(o, g)| *o *= g);
        row
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_handles_the_edges() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let rel = ((exp(x) as f64 - (x as f64).exp()) / (x as f64).exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_gelu_match_the_exact_formula() {
        for i in -600..=600 {
            let x = i as f32 * 0.01;
            let exact = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            assert!(
                (activate(Activation::Gelu, x) as f64 - exact).abs() < 5e-7,
                "{x}"
            );
            let tanh = 0.5
                * x as f64
                * (1.0
                    + ((2.0 / std::f64::consts::PI).sqrt()
                        * (x as f64 + 0.044715 * (x as f64).powi(3)))
                    .tanh());
            assert!(
                (activate(Activation::GeluTanh, x) as f64 - tanh).abs() < 5e-7,
                "{x}"
            );
        }
    }

    /// erf in f64 by its Taylor series (|x| < 6 here; enough terms for 1e-12).
    pub(crate) fn libm_erf(x: f64) -> f64 {
        if x.abs() > 5.0 {
            return x.signum();
        }
        let (mut term, mut total, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            total += term / (2.0 * n + 1.0);
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn softmax_zeroes_fully_masked_rows_and_rows_with_nan() {
        let mut data = vec![
            1.0,
            2.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            0.5,
            f32::NAN,
            1.0,
        ];
        softmax_rows_inplace(&mut data, 3);
        let e = (1f32).exp();
        assert!((data[0] - 1.0 / (1.0 + e)).abs() < 1e-7 && data[2] == 0.0);
        assert_eq!(&data[3..], [0.0; 6]);
    }

    #[test]
    fn layer_norm_is_exact_on_near_constant_rows() {
        let row: Vec<f32> = (0..768)
            .map(|i| 1000.0 + if i % 2 == 0 { 1e-3 } else { -1e-3 })
            .collect();
        let (scale, normalized) = layer_norm_parts(&row, 768, 1e-12);
        // One pass (E[x²] - E[x]²) would lose every digit here: x² ~ 1e6 has an ulp of 0.06,
        // while the variance is 1e-6. Two passes are limited only by the f32 mean.
        assert!((scale[0] - 1e-3).abs() < 5e-5, "{}", scale[0]);
        assert!(normalized.iter().all(|v| (v.abs() - 1.0).abs() < 0.1));
    }

    #[test]
    fn add_layer_norm_equals_the_norm_of_the_sum() {
        // Rows of 27 (a tail past the 8-lane chunks), enough rows for several parallel tasks.
        let d = 27;
        let values = |seed: usize| -> Vec<f32> {
            (0..d * 1500)
                .map(|i| ((i * 7919 + seed) % 211) as f32 / 13.0 - 8.0)
                .collect()
        };
        let (a, b) = (values(1), values(5));
        let weight: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / 9.0).collect();
        let bias: Vec<f32> = (0..d).map(|i| i as f32 / 7.0 - 1.0).collect();
        let fused = add_layer_norm(&a, &b, &weight, &bias, 1e-12);
        // The same float operations in the same order, so equal to the bit, not only close.
        assert_eq!(fused, layer_norm(&add(&a, &b), &weight, &bias, 1e-12));
        // And a LayerNorm: each row of the normalised sum has mean ~0 and variance ~1.
        let ones = vec![1.0; d];
        let normalized = add_layer_norm(&a, &b, &ones, &vec![0.0; d], 1e-12);
        for row in normalized.chunks_exact(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / d as f32;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "{mean} {var}"
            );
        }
    }

    #[test]
    fn rotary_turns_each_pair_by_its_angle() {
        // Two rows (positions 0 and 1) of one head of 4 at offset 2 in rows of 7.
        let (pos, d_head) = (2, 4);
        let angles = [[0.0f32, 0.0], [0.5, 0.25]];
        let cos: Vec<f32> = angles.iter().flatten().map(|t| t.cos()).collect();
        let sin: Vec<f32> = angles.iter().flatten().map(|t| t.sin()).collect();
        let mut data: Vec<f32> = (0..14).map(|i| i as f32).collect();
        let before = data.clone();
        rotary_inplace(&mut data, 7, (2, 1, d_head), pos, (&cos, &sin));
        assert_eq!(data[..7], before[..7]); // position 0 turns by 0
        for (c, angle) in [(0, 0.5f32), (1, 0.25)] {
            let (x1, x2) = (before[7 + 2 + c], before[7 + 4 + c]);
            let (got1, got2) = (data[7 + 2 + c], data[7 + 4 + c]);
            assert!((got1 - (x1 * angle.cos() - x2 * angle.sin())).abs() < 1e-5);
            assert!((got2 - (x2 * angle.cos() + x1 * angle.sin())).abs() < 1e-5);
        }
        assert_eq!(data[7..9], before[7..9]); // columns outside the heads stay
    }

    #[test]
    fn gated_activation_multiplies_the_activated_half_by_the_other() {
        let src = [1.0f32, -2.0, 3.0, 4.0, 0.5, -1.0, 2.0, 3.0];
        let out = gated_activation(&src, 2, Activation::Relu);
        assert_eq!(out, [3.0, 0.0, 1.0, -0.0]);
    }
}
