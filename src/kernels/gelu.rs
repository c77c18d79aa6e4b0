//! Exact (erf-based) GELU and the f32 `erf`/`erfc` it rests on: scalar versions and AVX2 versions of eight lanes.
//!
//! PyTorch's default GELU is `0.5 * x * (1 + erf(x / sqrt(2)))`. Computing `1 + erf` for negative `x` cancels
//! catastrophically, so here GELU is written as `x * Phi(x)` with `Phi(-u) = 0.5 * erfc(u / sqrt(2))` computed
//! directly, which keeps a relative error near 1e-7 over the whole range (PyTorch's own f32 result is no closer than
//! about 1e-7 absolute in the negative tail).
//!
//! `erfc(z)` for `z >= 0` is `t * exp(-z^2 + P(t))` with `t = 1 / (1 + z/2)`: one branch-free formula for every `z`,
//! which vectorises well. `P` is a degree-9 near-minimax polynomial fitted (Chebyshev fit with mpmath, 50 digits) to
//! `log(erfc(z) / t) + z^2` on `t` in `[1/6.5, 1]`, i.e. `z <= 11`, beyond which `erfc` underflows f32 anyway;
//! its error, with coefficients rounded to f32, is below 8e-8. `z^2` is carried as a high and a low part (FMA) so
//! that `exp` of a large argument keeps its relative accuracy.

use rayon::prelude::*;

/// `P(t)` coefficients, highest degree first (Horner order).
const ERFC_P: [f32; 10] = [
    0.1560077,
    -0.74044746,
    1.2951183,
    -0.8774998,
    0.066837765,
    -0.07519892,
    0.05995634,
    0.38148856,
    0.99921304,
    -1.2654755,
];

/// Beyond this `|x|` GELU's `Phi(-|x|)` is far below f32's smallest normal; clamping keeps `x*x` finite.
const GELU_ABS_MAX: f32 = 16.0;
/// Beyond this `z` the fit is not used: `erfc(z)` has underflowed to zero.
const ERFC_Z_MAX: f32 = 11.0;
/// `exp(s)` for `s` below this would be subnormal: flushed to zero.
const EXP_ARG_MIN: f32 = -87.0;
/// Below this `|z|`, `erf` uses its Taylor series (`1 - erfc` would lose relative accuracy near zero).
const ERF_SERIES_MAX: f32 = 0.5;
/// Taylor coefficients of `erf(z) / z` in powers of `z^2`, highest first: `2/sqrt(pi) * (-1)^n / (n! (2n+1))`.
const ERF_SERIES: [f32; 8] = [
    -1.492_565e-5,
    1.205_533_3e-4,
    -8.548_327e-4,
    5.223_977_5e-3,
    -2.686_617_1e-2,
    0.112_837_92,
    -0.376_126_4,
    std::f32::consts::FRAC_2_SQRT_PI,
];
/// `ln 2` split so that `n * LN2_HI` is exact for the exponents that occur.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `exp(r)` for `|r| <= ~0.35`: Taylor polynomial of degree 7 (truncation error below 6e-9).
const EXP_TAYLOR: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

fn horner(coeffs: &[f32], x: f32) -> f32 {
    coeffs.iter().fold(0.0f32, |acc, &c| acc.mul_add(x, c))
}

/// `exp(-hi + low)` where `hi >= 0` may be large and exact, `low` is a moderate correction.
pub(crate) fn exp_neg_split(hi: f32, low: f32) -> f32 {
    let s = low - hi;
    if s < EXP_ARG_MIN || s.is_nan() {
        return 0.0;
    }
    let n = (s * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_HI, -hi);
    let r = (-n).mul_add(LN2_LO, r) + low;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    horner(&EXP_TAYLOR, r) * scale
}

/// `erfc(z)` for `z >= 0` given `z^2 = sq_hi + sq_lo`.
fn erfc_nonneg(z: f32, sq_hi: f32, sq_lo: f32) -> f32 {
    let z = z.min(ERFC_Z_MAX);
    let t = 1.0 / 0.5f32.mul_add(z, 1.0);
    let p = horner(&ERFC_P, t);
    t * exp_neg_split(sq_hi, p - sq_lo)
}

/// Complementary error function in f32, relative error about 2e-7 wherever the result is a normal number.
pub fn erfc_f32(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let z = x.abs().min(ERFC_Z_MAX + 1.0);
    let hi = z * z;
    let lo = z.mul_add(z, -hi);
    let tail = erfc_nonneg(z, hi, lo);
    if x < 0.0 { 2.0 - tail } else { tail }
}

/// Error function in f32, relative error about 2e-7.
pub fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    if z < ERF_SERIES_MAX {
        return x * horner(&ERF_SERIES, x * x);
    }
    let z = z.min(ERFC_Z_MAX + 1.0);
    let hi = z * z;
    let lo = z.mul_add(z, -hi);
    let e = 1.0 - erfc_nonneg(z, hi, lo);
    if x.is_nan() { x } else { e.copysign(x) }
}

/// Exact GELU, `x * Phi(x)`, as PyTorch's `gelu(approximate="none")`; scalar reference.
pub fn gelu_f32(x: f32) -> f32 {
    let u = x.abs().min(GELU_ABS_MAX);
    // z = u / sqrt(2), z^2 = u^2 / 2 exactly as a high and a low part.
    let hi = u * u;
    let lo = u.mul_add(u, -hi);
    let z = u * std::f32::consts::FRAC_1_SQRT_2;
    let phi_neg = 0.5 * erfc_nonneg(z, 0.5 * hi, 0.5 * lo);
    if x >= 0.0 { x * (1.0 - phi_neg) } else { x * phi_neg }
}

/// Values per rayon task in [`gelu_inplace`].
const GELU_CHUNK: usize = 1 << 14;

/// Applies exact GELU in place, with AVX2 when the CPU has it; parallel over chunks.
pub fn gelu_inplace(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        values.par_chunks_mut(GELU_CHUNK).for_each(|chunk| {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { avx2::gelu_slice(chunk) };
        });
        return;
    }
    values.par_chunks_mut(GELU_CHUNK).for_each(gelu_inplace_scalar);
}

/// Scalar reference of [`gelu_inplace`].
pub fn gelu_inplace_scalar(values: &mut [f32]) {
    for v in values {
        *v = gelu_f32(*v);
    }
}

/// Applies `erf` to every value in place, with AVX2 when the CPU has it.
pub fn erf_inplace(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { avx2::erf_slice(values) };
        return;
    }
    for v in values {
        *v = erf_f32(*v);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! Eight-lane versions of the scalar functions above, same formulas and constants.
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horner8(coeffs: &[f32], x: __m256) -> __m256 {
        let mut acc = _mm256_setzero_ps();
        for &c in coeffs {
            acc = _mm256_fmadd_ps(acc, x, _mm256_set1_ps(c));
        }
        acc
    }

    /// Estrin's scheme (pairs, then powers of `x^2`): shorter dependency chains than Horner, for the long
    /// polynomials on the GELU path. `coeffs` highest degree first, as for [`horner`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn estrin8<const N: usize>(coeffs: &[f32; N], x: __m256) -> __m256 {
        // Pairs from the constant term up: c[i] + c[i+1] x.
        let mut terms = [_mm256_setzero_ps(); N];
        let mut count = 0;
        let mut i = N;
        while i >= 2 {
            terms[count] = _mm256_fmadd_ps(_mm256_set1_ps(coeffs[i - 2]), x, _mm256_set1_ps(coeffs[i - 1]));
            count += 1;
            i -= 2;
        }
        if i == 1 {
            terms[count] = _mm256_set1_ps(coeffs[0]);
            count += 1;
        }
        let mut power = _mm256_mul_ps(x, x);
        while count > 1 {
            let mut next = 0;
            let mut j = 0;
            while j < count {
                terms[next] = if j + 1 < count {
                    _mm256_fmadd_ps(terms[j + 1], power, terms[j])
                } else {
                    terms[j]
                };
                next += 1;
                j += 2;
            }
            count = next;
            power = _mm256_mul_ps(power, power);
        }
        terms[0]
    }

    /// `exp(-hi + low)`, lanes below the f32 normal range flushed to zero.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_neg_split8(hi: __m256, low: __m256) -> __m256 {
        let s = _mm256_sub_ps(low, hi);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            s,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let neg_hi = _mm256_sub_ps(_mm256_setzero_ps(), hi);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), neg_hi);
        let r = _mm256_add_ps(_mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r), low);
        let in_range = _mm256_cmp_ps::<_CMP_GE_OQ>(s, _mm256_set1_ps(EXP_ARG_MIN));
        // Out-of-range lanes may hold garbage exponents; they are masked to zero below.
        let n_int = _mm256_cvtps_epi32(_mm256_and_ps(n, in_range));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127))));
        let e = _mm256_mul_ps(estrin8(&EXP_TAYLOR, r), scale);
        _mm256_and_ps(e, in_range)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn erfc_nonneg8(z: __m256, sq_hi: __m256, sq_lo: __m256) -> __m256 {
        let z = _mm256_min_ps(z, _mm256_set1_ps(ERFC_Z_MAX));
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.5), z, one));
        let p = estrin8(&ERFC_P, t);
        _mm256_mul_ps(t, exp_neg_split8(sq_hi, _mm256_sub_ps(p, sq_lo)))
    }

    /// Exact GELU of eight lanes; matches [`gelu_f32`] to an ulp or two.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn gelu8(x: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let u = _mm256_min_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(GELU_ABS_MAX));
        let hi = _mm256_mul_ps(u, u);
        let lo = _mm256_fmsub_ps(u, u, hi);
        let half = _mm256_set1_ps(0.5);
        let z = _mm256_mul_ps(u, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let phi_neg = _mm256_mul_ps(half, erfc_nonneg8(z, _mm256_mul_ps(half, hi), _mm256_mul_ps(half, lo)));
        let positive = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_setzero_ps());
        let factor = _mm256_blendv_ps(phi_neg, _mm256_sub_ps(_mm256_set1_ps(1.0), phi_neg), positive);
        _mm256_mul_ps(x, factor)
    }

    /// `erf` of eight lanes: Taylor series near zero, `1 - erfc` elsewhere, sign restored.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn erf8(x: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let z = _mm256_min_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(ERFC_Z_MAX + 1.0));
        let hi = _mm256_mul_ps(z, z);
        let lo = _mm256_fmsub_ps(z, z, hi);
        let far = _mm256_sub_ps(_mm256_set1_ps(1.0), erfc_nonneg8(z, hi, lo));
        let far = _mm256_or_ps(far, _mm256_and_ps(x, sign));
        let near = _mm256_mul_ps(x, horner8(&ERF_SERIES, _mm256_mul_ps(x, x)));
        let is_near = _mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_set1_ps(ERF_SERIES_MAX));
        let e = _mm256_blendv_ps(far, near, is_near);
        // NaN lanes stay NaN.
        let is_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        _mm256_blendv_ps(e, x, is_nan)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gelu_slice(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds exactly eight f32.
            unsafe {
                let v = _mm256_loadu_ps(chunk.as_ptr());
                _mm256_storeu_ps(chunk.as_mut_ptr(), gelu8(v));
            }
        }
        for v in chunks.into_remainder() {
            *v = gelu_f32(*v);
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn erf_slice(values: &mut [f32]) {
        let mut chunks = values.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds exactly eight f32.
            unsafe {
                let v = _mm256_loadu_ps(chunk.as_ptr());
                _mm256_storeu_ps(chunk.as_mut_ptr(), erf8(v));
            }
        }
        for v in chunks.into_remainder() {
            *v = erf_f32(*v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::test_util::{avx2_path, compared_against_scalar};

    /// erf in f64: Taylor series (|x| < 2.5) or 1 - erfc from a continued fraction; ~1e-14 relative.
    pub(crate) fn erf_f64(x: f64) -> f64 {
        let z = x.abs();
        if z < 2.5 {
            let mut term = z;
            let mut sum = z;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -z * z / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() <= 1e-18 * sum.abs() {
                    break;
                }
            }
            (sum * 2.0 / std::f64::consts::PI.sqrt()).copysign(x)
        } else {
            (1.0 - erfc_f64_tail(z)).copysign(x)
        }
    }

    /// erfc(z) for z >= 2.5 by its continued fraction, evaluated backwards with 300 terms.
    fn erfc_f64_tail(z: f64) -> f64 {
        let mut frac = z;
        for k in (1..300).rev() {
            frac = z + (k as f64 / 2.0) / frac;
        }
        (-z * z).exp() / std::f64::consts::PI.sqrt() / frac
    }

    pub(crate) fn erfc_f64(x: f64) -> f64 {
        if x >= 2.5 {
            erfc_f64_tail(x)
        } else if x <= -2.5 {
            2.0 - erfc_f64_tail(-x)
        } else {
            1.0 - erf_f64(x)
        }
    }

    pub(crate) fn gelu_f64(x: f64) -> f64 {
        x * 0.5 * erfc_f64(-x / std::f64::consts::SQRT_2)
    }

    fn grid() -> Vec<f32> {
        let mut xs: Vec<f32> = (-16_000..=16_000).map(|i| i as f32 * 1e-3).collect();
        xs.extend([
            1e-30,
            -1e-30,
            1e-7,
            -1e-7,
            3.3e-4,
            f32::MIN_POSITIVE,
            40.0,
            -40.0,
            1e20,
            -1e20,
        ]);
        xs
    }

    /// Relative error, or absolute error / 1e-30 where the reference is tinier than that (results that would be
    /// subnormal are flushed to zero by design).
    fn rel_err(got: f32, want: f64) -> f64 {
        let floor = 1e-30;
        (got as f64 - want).abs() / want.abs().max(floor)
    }

    #[test]
    fn f64_reference_agrees_with_known_values() {
        // erf(1), erf(0.5), erfc(3) from tables (20 digits).
        assert!((erf_f64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-15);
        assert!((erfc_f64(3.0) / 2.209_049_699_858_544e-5 - 1.0).abs() < 1e-13);
        assert!((erf_f64(2.4999) - (1.0 - erfc_f64_tail(2.4999))).abs() < 1e-14);
    }

    #[test]
    fn scalar_erf_erfc_gelu_match_f64() {
        let (mut e_erf, mut e_erfc, mut e_gelu) = (0f64, 0f64, 0f64);
        for x in grid() {
            e_erf = e_erf.max(rel_err(erf_f32(x), erf_f64(x as f64)));
            if x.abs() < 9.0 {
                e_erfc = e_erfc.max(rel_err(erfc_f32(x), erfc_f64(x as f64)));
            }
            e_gelu = e_gelu.max(rel_err(gelu_f32(x), gelu_f64(x as f64)));
        }
        assert!(e_erf < 1e-6, "erf max relative error {e_erf}");
        assert!(e_erfc < 2e-6, "erfc max relative error {e_erfc}");
        assert!(e_gelu < 1e-6, "gelu max relative error {e_gelu}");
        eprintln!("max relative errors: erf {e_erf:.2e}, erfc {e_erfc:.2e}, gelu {e_gelu:.2e}");
    }

    #[test]
    fn special_values() {
        assert_eq!(gelu_f32(0.0), 0.0);
        assert_eq!(gelu_f32(f32::INFINITY), f32::INFINITY);
        assert!(gelu_f32(f32::NAN).is_nan());
        assert_eq!(gelu_f32(-1e20), 0.0);
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erfc_f32(-30.0), 2.0);
    }

    #[test]
    fn slice_versions_match_scalar_and_f64() {
        // Lengths that leave a scalar remainder.
        let xs = grid();
        let mut g = xs.clone();
        gelu_inplace(&mut g);
        let mut e = xs.clone();
        erf_inplace(&mut e);
        for (i, &x) in xs.iter().enumerate() {
            assert!(
                rel_err(g[i], gelu_f64(x as f64)) < 1e-6,
                "gelu({x}) = {} vs {}",
                g[i],
                gelu_f64(x as f64)
            );
            assert!(
                rel_err(e[i], erf_f64(x as f64)) < 1e-6,
                "erf({x}) = {} vs {}",
                e[i],
                erf_f64(x as f64)
            );
            assert!(rel_err(g[i], gelu_f32(x) as f64) < 5e-7, "gelu({x}) simd vs scalar");
        }
        let mut special = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.0,
            1e-40,
        ];
        gelu_inplace(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(special[1], f32::INFINITY);
        assert_eq!(special[3], 0.0);
        let mut special = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            1.0,
            -1.0,
            2.0,
            1e-40,
        ];
        erf_inplace(&mut special);
        assert!(special[0].is_nan());
        assert_eq!(&special[1..3], &[1.0, -1.0]);
        compared_against_scalar("gelu_inplace, erf_inplace", &avx2_path());
    }
}
