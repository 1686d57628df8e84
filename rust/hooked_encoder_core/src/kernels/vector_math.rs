//! `exp` and the erf GELU over whole rows, written on SIMD vectors (AVX2 and AVX-512) with
//! several vectors in flight.
//!
//! The scalar [`super::exp`] and [`super::activate`] vectorise, but LLVM keeps one vector per
//! loop iteration, and one GELU is a dependency chain of about 40 instructions (~60 cycles): the
//! core's out-of-order window holds too few iterations to hide that, so GELU ran at ~30 cycles per
//! 8 floats against ~11 for its arithmetic (4.6% of an all-MiniLM-L6-v2 `encode` in `perf`, Zen
//! 4). Here each step of the formula is issued for [`Vector`]s of several registers at once, so
//! independent chains interleave.
//!
//! Measured on AMD EPYC Zen 4, 2 threads: on one core, a row of 1536 in L1, 1.03 ns per float
//! before, 0.73 with two AVX2 vectors in flight (four: the same), 0.51 with two AVX-512 ones (a
//! reciprocal estimate plus a Newton step instead of the division: the same); as the packed
//! matmul's epilogue of a 768 x 1536 layer, 0.59 ms before, 0.25 after. The whole forward,
//! alternated call by call in one process against the previous build: all-MiniLM-L6-v2 on the
//! `encode` benchmark's batches 0.973x the time, bert-base 1x16 0.99x, 1x128 0.98-0.99x, 8x128
//! 0.99x, 32x128 0.98-0.99x. Softmax's `exp` here instead of the scalar loop: level, within
//! the noise. An AVX2-only CPU has not run this.
//!
//! The operations are the scalar ones in the same order (fused where the scalar code fuses), so
//! both give the same bits: which elements a row's tail leaves to the scalar code cannot change
//! a result (the tests `vector_and_scalar_*_agree_bit_for_bit`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::activate;
use crate::simd::Simd;
use crate::Activation;

/// What is added to each float of a row before the function is applied.
#[derive(Clone, Copy)]
pub(crate) enum Addend<'a> {
    Nothing,
    /// One value per float (a bias, as long as the row).
    Each(&'a [f32]),
    /// One value for all (softmax's `-max`).
    All(f32),
}

/// The erf GELU of `row + addend`, in place.
pub(crate) fn gelu_row(row: &mut [f32], addend: Addend<'_>) {
    map_row::<Gelu>(row, addend)
}

/// `e^(row + addend)`, in place.
pub(crate) fn exp_row(row: &mut [f32], addend: Addend<'_>) {
    map_row::<Exp>(row, addend)
}

/// A function mapped over rows, in its scalar form and on `N` vectors by the same steps.
trait RowFn {
    fn scalar(x: f32) -> f32;
    /// # Safety
    /// As [`Vector`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn vectors<V: Vector, const N: usize>(x: [V; N]) -> [V; N];
}

struct Gelu;
struct Exp;

impl RowFn for Gelu {
    #[inline(always)]
    fn scalar(x: f32) -> f32 {
        activate(Activation::Gelu, x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn vectors<V: Vector, const N: usize>(x: [V; N]) -> [V; N] {
        // SAFETY: the caller's.
        unsafe { gelu(x) }
    }
}

impl RowFn for Exp {
    #[inline(always)]
    fn scalar(x: f32) -> f32 {
        super::exp(x)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn vectors<V: Vector, const N: usize>(x: [V; N]) -> [V; N] {
        // SAFETY: the caller's.
        unsafe { exp(x) }
    }
}

/// `F` of `row + addend`, in place, on the vectors of [`Simd::selected`].
fn map_row<F: RowFn>(row: &mut [f32], addend: Addend<'_>) {
    if let Addend::Each(values) = addend {
        assert_eq!(
            row.len(),
            values.len(),
            "{} values to add to a row of {}",
            values.len(),
            row.len()
        );
    }
    match Simd::selected() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the selected level is one this CPU has; `addend` was checked.
        Simd::Avx512 => unsafe { avx512::map_row::<F>(row, addend) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Simd::Avx2 => unsafe { avx2::map_row::<F>(row, addend) },
        _ => map_scalars::<F>(row, addend),
    }
}

/// [`map_row`] one float at a time: other CPUs, and the floats a row's vectors leave over.
fn map_scalars<F: RowFn>(row: &mut [f32], addend: Addend<'_>) {
    match addend {
        Addend::Nothing => row.iter_mut().for_each(|x| *x = F::scalar(*x)),
        Addend::Each(values) => row
            .iter_mut()
            .zip(values)
            .for_each(|(x, v)| *x = F::scalar(*x + v)),
        Addend::All(value) => row.iter_mut().for_each(|x| *x = F::scalar(*x + value)),
    }
}

/// One SIMD register of `f32` lanes, with the operations `exp` and GELU use. Every method is an
/// instruction or two of the CPU feature its implementation names.
///
/// # Safety
/// The CPU must have that feature; `load` and `store` touch `LANES` floats from `p`.
#[cfg(target_arch = "x86_64")]
trait Vector: Copy {
    const LANES: usize;
    unsafe fn splat(value: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, other: Self) -> Self;
    unsafe fn mul(self, other: Self) -> Self;
    unsafe fn div(self, other: Self) -> Self;
    /// `self * b + c`, rounded once (`f32::mul_add`).
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// `c - self * b`, rounded once (`(-self).mul_add(b, c)`).
    unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self;
    /// `self.clamp(low, high)`: NaN stays NaN.
    unsafe fn clamp(self, low: f32, high: f32) -> Self;
    /// To the nearest integer, ties to even (`f32::round_ties_even`).
    unsafe fn round(self) -> Self;
    /// `2^self` for integral `self` in `-126..=127`.
    unsafe fn exp2_integer(self) -> Self;
    /// `self` where `x >= limit` or `x` is NaN, else 0.
    unsafe fn zero_where_below(self, x: Self, limit: f32) -> Self;
    unsafe fn abs(self) -> Self;
    unsafe fn neg(self) -> Self;
    /// `f32::copysign`.
    unsafe fn copysign(self, sign: Self) -> Self;
}

/// `[body(0), .., body(N - 1)]`: one step of the formula for all of a block's vectors.
///
/// A macro, not a function taking a closure: LLVM does not always inline closures, and an
/// intrinsic called from a function without its target features is a call, not an instruction
/// (3.4 ns per GELU instead of 0.5).
#[cfg(target_arch = "x86_64")]
macro_rules! each {
    ($n:expr, |$i:ident| $body:expr) => {{
        let $i = 0;
        let mut out = [$body; $n];
        for $i in 1..$n {
            out[$i] = $body;
        }
        out
    }};
}

/// [`super::exp`] of `N` vectors, step by step.
///
/// # Safety
/// As [`Vector`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp<V: Vector, const N: usize>(x: [V; N]) -> [V; N] {
    // SAFETY (every block below): the caller's CPU runs `V`.
    unsafe {
        let clamped: [V; N] = each!(N, |i| x[i].clamp(-87.3, 88.3));
        let n: [V; N] = each!(N, |i| clamped[i]
            .mul(V::splat(std::f32::consts::LOG2_E))
            .round());
        let r: [V; N] = each!(N, |i| {
            n[i].neg_mul_add(
                V::splat(super::LN2_LO),
                n[i].neg_mul_add(V::splat(super::LN2_HI), clamped[i]),
            )
        });
        let mut p: [V; N] = [V::splat(super::EXP_POLY[0]); N];
        for &coefficient in &super::EXP_POLY[1..] {
            p = each!(N, |i| p[i].mul_add(r[i], V::splat(coefficient)));
        }
        let y: [V; N] = each!(N, |i| p[i].mul_add(r[i].mul(r[i]), r[i]).add(V::splat(1.0)));
        each!(N, |i| y[i]
            .mul(n[i].exp2_integer())
            .zero_where_below(x[i], -87.3))
    }
}

/// GELU, `0.5 x (1 + erf(x / √2))` with [`super::erf`]'s formula, of `N` vectors.
///
/// # Safety
/// As [`Vector`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu<V: Vector, const N: usize>(x: [V; N]) -> [V; N] {
    // SAFETY (every block below): the caller's CPU runs `V`.
    unsafe {
        let u: [V; N] = each!(N, |i| x[i].mul(V::splat(std::f32::consts::FRAC_1_SQRT_2)));
        let a: [V; N] = each!(N, |i| u[i].abs());
        let t: [V; N] = each!(N, |i| V::splat(1.0)
            .div(V::splat(super::ERF_P).mul_add(a[i], V::splat(1.0))));
        let mut p: [V; N] = [V::splat(super::ERF_POLY[0]); N];
        for &coefficient in &super::ERF_POLY[1..] {
            p = each!(N, |i| p[i].mul_add(t[i], V::splat(coefficient)));
        }
        let e = exp::<V, N>(each!(N, |i| a[i].neg().mul(a[i])));
        let erf: [V; N] = each!(N, |i| p[i]
            .mul(t[i])
            .neg_mul_add(e[i], V::splat(1.0))
            .copysign(u[i]));
        each!(N, |i| V::splat(0.5)
            .mul(x[i])
            .mul(V::splat(1.0).add(erf[i])))
    }
}

/// `row[at..at + LANES] + addend` (a function, not a closure: see [`each`]).
///
/// # Safety
/// As [`Vector::load`], for `row` and an [`Addend::Each`]'s values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load<V: Vector>(row: *const f32, addend: Addend<'_>, at: usize) -> V {
    // SAFETY: the caller's.
    unsafe {
        match addend {
            Addend::Nothing => V::load(row.add(at)),
            Addend::Each(values) => V::load(row.add(at)).add(V::load(values.as_ptr().add(at))),
            Addend::All(value) => V::load(row.add(at)).add(V::splat(value)),
        }
    }
}

/// [`map_row`] with `V`, `N` vectors at a time, then single vectors, then scalars.
///
/// # Safety
/// As [`Vector`]; an [`Addend::Each`] is as long as `row`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn map_row_with<F: RowFn, V: Vector, const N: usize>(row: &mut [f32], addend: Addend<'_>) {
    let (len, out) = (row.len(), row.as_mut_ptr());
    // SAFETY: every load and store below is of `LANES` floats starting below `done`, which
    // stays at most `len`, in `row` (and the addend's values, as long); the CPU runs `V`
    // (caller).
    let done = unsafe {
        let mut done = 0;
        while done + N * V::LANES <= len {
            let y = F::vectors::<V, N>(each!(N, |i| load(out, addend, done + i * V::LANES)));
            for (i, y) in y.into_iter().enumerate() {
                y.store(out.add(done + i * V::LANES));
            }
            done += N * V::LANES;
        }
        while done + V::LANES <= len {
            F::vectors::<V, 1>([load(out, addend, done)])[0].store(out.add(done));
            done += V::LANES;
        }
        done
    };
    let rest = match addend {
        Addend::Each(values) => Addend::Each(&values[done..]),
        other => other,
    };
    map_scalars::<F>(&mut row[done..], rest);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    impl Vector for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            unsafe { _mm256_set1_ps(value) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            unsafe { _mm256_add_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn mul(self, other: Self) -> Self {
            unsafe { _mm256_mul_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn div(self, other: Self) -> Self {
            unsafe { _mm256_div_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
            unsafe { _mm256_fnmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn clamp(self, low: f32, high: f32) -> Self {
            // `max`/`min` return their second operand when either is NaN.
            unsafe {
                _mm256_min_ps(
                    _mm256_set1_ps(high),
                    _mm256_max_ps(_mm256_set1_ps(low), self),
                )
            }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self) }
        }
        #[inline(always)]
        unsafe fn exp2_integer(self) -> Self {
            unsafe {
                let biased = _mm256_add_epi32(_mm256_cvtps_epi32(self), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased))
            }
        }
        #[inline(always)]
        unsafe fn zero_where_below(self, x: Self, limit: f32) -> Self {
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(limit));
                _mm256_and_ps(keep, self)
            }
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self) }
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            unsafe { _mm256_xor_ps(_mm256_set1_ps(-0.0), self) }
        }
        #[inline(always)]
        unsafe fn copysign(self, sign: Self) -> Self {
            unsafe {
                let sign_bit = _mm256_set1_ps(-0.0);
                _mm256_or_ps(
                    _mm256_andnot_ps(sign_bit, self),
                    _mm256_and_ps(sign_bit, sign),
                )
            }
        }
    }

    /// [`super::map_row`] on AVX2 and FMA: two vectors in flight (four measured the same).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; an [`Addend::Each`] is as long as `row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn map_row<F: RowFn>(row: &mut [f32], addend: Addend<'_>) {
        unsafe { map_row_with::<F, __m256, 2>(row, addend) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// The bit pattern of `v`, for AVX-512F's integer logic (its float `and`/`or` need DQ).
    #[inline(always)]
    unsafe fn bits(v: __m512) -> __m512i {
        unsafe { _mm512_castps_si512(v) }
    }

    impl Vector for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn splat(value: f32) -> Self {
            unsafe { _mm512_set1_ps(value) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self) }
        }
        #[inline(always)]
        unsafe fn add(self, other: Self) -> Self {
            unsafe { _mm512_add_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn mul(self, other: Self) -> Self {
            unsafe { _mm512_mul_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn div(self, other: Self) -> Self {
            unsafe { _mm512_div_ps(self, other) }
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn neg_mul_add(self, b: Self, c: Self) -> Self {
            unsafe { _mm512_fnmadd_ps(self, b, c) }
        }
        #[inline(always)]
        unsafe fn clamp(self, low: f32, high: f32) -> Self {
            // `max`/`min` return their second operand when either is NaN.
            unsafe {
                _mm512_min_ps(
                    _mm512_set1_ps(high),
                    _mm512_max_ps(_mm512_set1_ps(low), self),
                )
            }
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            unsafe {
                _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self)
            }
        }
        #[inline(always)]
        unsafe fn exp2_integer(self) -> Self {
            unsafe {
                let biased = _mm512_add_epi32(_mm512_cvtps_epi32(self), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(biased))
            }
        }
        #[inline(always)]
        unsafe fn zero_where_below(self, x: Self, limit: f32) -> Self {
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(limit));
                _mm512_maskz_mov_ps(keep, self)
            }
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            unsafe { _mm512_castsi512_ps(_mm512_andnot_si512(bits(Self::splat(-0.0)), bits(self))) }
        }
        #[inline(always)]
        unsafe fn neg(self) -> Self {
            unsafe { _mm512_castsi512_ps(_mm512_xor_si512(bits(Self::splat(-0.0)), bits(self))) }
        }
        #[inline(always)]
        unsafe fn copysign(self, sign: Self) -> Self {
            unsafe {
                let sign_bit = bits(Self::splat(-0.0));
                _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_andnot_si512(sign_bit, bits(self)),
                    _mm512_and_si512(sign_bit, bits(sign)),
                ))
            }
        }
    }

    /// [`super::map_row`] on AVX-512F: two 16-lane vectors in flight.
    ///
    /// # Safety
    /// The CPU has AVX-512F; an [`Addend::Each`] is as long as `row`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn map_row<F: RowFn>(row: &mut [f32], addend: Addend<'_>) {
        unsafe { map_row_with::<F, __m512, 2>(row, addend) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep through GELU's whole shape, the edges of `exp`'s clamp, and the special values.
    fn inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (-13_000..13_000).map(|i| i as f32 * 1e-3).collect();
        x.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE / 4.0,
            13.2,
            -13.2,
            130.0,
            -130.0,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        x
    }

    fn same_bits(expected: &[f32], got: &[f32]) {
        for (i, (e, g)) in expected.iter().zip(got).enumerate() {
            assert!(
                e.to_bits() == g.to_bits() || (e.is_nan() && g.is_nan()),
                "element {i}: scalar {e:e}, vector {g:e}"
            );
        }
    }

    /// `F` on every row length up to a few blocks (so that each loop, blocks, vectors and
    /// scalars, ends a row) and on the whole sweep, with each kind of addend: the dispatched
    /// kernel and every SIMD kernel this CPU runs give the scalar code's bits.
    fn agrees_bit_for_bit<F: RowFn>() {
        let x = inputs();
        let values: Vec<f32> = (0..x.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        #[cfg(target_arch = "x86_64")]
        let kernels: Vec<unsafe fn(&mut [f32], Addend<'_>)> = [
            (Simd::Avx512.runs_here(), avx512::map_row::<F> as _),
            (Simd::Avx2.runs_here(), avx2::map_row::<F> as _),
        ]
        .into_iter()
        .filter_map(|(runs, kernel)| runs.then_some(kernel))
        .collect();
        #[cfg(not(target_arch = "x86_64"))]
        let kernels: Vec<unsafe fn(&mut [f32], Addend<'_>)> = Vec::new();
        for len in (0..80).chain([x.len()]) {
            for addend in [
                Addend::Nothing,
                Addend::Each(&values[..len]),
                Addend::All(-1.5),
            ] {
                let mut expected = x[..len].to_vec();
                map_scalars::<F>(&mut expected, addend);
                let mut dispatched = x[..len].to_vec();
                map_row::<F>(&mut dispatched, addend);
                same_bits(&expected, &dispatched);
                for kernel in &kernels {
                    let mut got = x[..len].to_vec();
                    // SAFETY: only kernels this CPU runs; an `Each` addend is `len` long.
                    unsafe { kernel(&mut got, addend) };
                    same_bits(&expected, &got);
                }
            }
        }
    }

    #[test]
    fn vector_and_scalar_gelu_agree_bit_for_bit() {
        agrees_bit_for_bit::<Gelu>();
    }

    #[test]
    fn vector_and_scalar_exp_agree_bit_for_bit() {
        agrees_bit_for_bit::<Exp>();
    }

    #[test]
    fn gelu_handles_the_special_values() {
        let mut x = vec![
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            40.0,
            -40.0,
        ];
        x.resize(64, 1.0);
        gelu_row(&mut x, Addend::Nothing);
        // PyTorch gives NaN for both infinities (`inf * (1 + erf)`); the formula here keeps +inf.
        assert_eq!(x[0], f32::INFINITY);
        assert!(x[1].is_nan() && x[2].is_nan());
        assert!(x[3] == 0.0 && x[4] == 0.0);
        assert_eq!((x[5], x[6]), (40.0, 0.0));
    }
}
