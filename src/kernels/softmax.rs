//! Row-wise softmax of scaled attention scores, `out[r] = softmax(scale * x[r])` (scale > 0), in one read and one
//! write of the scores: the `1/sqrt(head_size)` of attention is applied inside instead of in a separate pass over
//! the (large) score matrix. `exp` is the polynomial of [`super::gelu`] (relative error about 2e-7).

use rayon::prelude::*;

use super::gelu::exp_neg_split;
use crate::{Error, Result};

/// Rows handed to one rayon task at least.
const MIN_ROWS_PER_TASK: usize = 16;

fn check(x: usize, rows: usize, cols: usize, scale: f32, out: usize) -> Result<()> {
    if x != rows * cols || out != rows * cols || !(scale > 0.0 && scale.is_finite()) {
        return Err(Error::invalid(
            "softmax_rows",
            format!(
                "input {x} and output {out} values for rows={rows} cols={cols} (want {}), scale {scale} \
             (want finite > 0)",
                rows * cols
            ),
        ));
    }
    Ok(())
}

/// Softmax of every row of `scale * x` into `out`. AVX2 when the CPU has it; parallel over rows.
pub fn softmax_rows(x: &[f32], rows: usize, cols: usize, scale: f32, out: &mut [f32]) -> Result<()> {
    check(x.len(), rows, cols, scale, out.len())?;
    if rows * cols == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        out.par_chunks_mut(cols)
            .with_min_len(MIN_ROWS_PER_TASK)
            .enumerate()
            .for_each(|(r, dst)| {
                // SAFETY: the CPU supports AVX2 and FMA (checked above); both slices hold `cols` values.
                unsafe { avx2::row(&x[r * cols..(r + 1) * cols], scale, dst) };
            });
        return Ok(());
    }
    softmax_rows_scalar(x, rows, cols, scale, out)
}

/// Softmax of one row of `scale * src` into `dst` (same length), AVX2 when the CPU has it; for callers that keep
/// their scores in a small per-thread buffer (fused attention).
pub(crate) fn softmax_row(src: &[f32], scale: f32, dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); the slices have the same length.
        unsafe { avx2::row(src, scale, dst) };
        return;
    }
    softmax_row_scalar(src, scale, dst);
}

pub(crate) fn softmax_row_scalar(src: &[f32], scale: f32, dst: &mut [f32]) {
    let max = src.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = exp_neg_split((max - v) * scale, 0.0);
        sum += *d;
    }
    let inv = 1.0 / sum;
    for d in dst.iter_mut() {
        *d *= inv;
    }
}

/// Softmax of one row of `scale * scores`, quantized per row for the int8 GEMM (fused attention's P.V product):
/// writes the probabilities' codes into `codes` (as long as the row; flipped to unsigned when `shifted`, the VNNI
/// layout) and returns their scale. The same codes and scale as [`softmax_row`] followed by the GEMM's row
/// quantizer, without storing the probabilities or reading them twice more: their absmax is the largest
/// exponential times `1 / sum` (multiplying by a positive number keeps the order), known after the exp pass.
/// `scores` is overwritten with the exponentials. AVX2 when the CPU has it.
pub(crate) fn softmax_row_quantized(scores: &mut [f32], scale: f32, codes: &mut [i8], shifted: bool) -> f32 {
    debug_assert_eq!(scores.len(), codes.len());
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above); the slices have the same length.
        return unsafe { avx2::row_quantized(scores, scale, codes, shifted) };
    }
    softmax_row_quantized_scalar(scores, scale, codes, shifted)
}

/// Scalar reference of [`softmax_row_quantized`]: the scalar softmax, then the scalar row quantizer.
pub(crate) fn softmax_row_quantized_scalar(scores: &mut [f32], scale: f32, codes: &mut [i8], shifted: bool) -> f32 {
    let mut probs = vec![0f32; scores.len()];
    softmax_row_scalar(scores, scale, &mut probs);
    scores.copy_from_slice(&probs);
    super::gemm_i8::quantize_row_for_gemm_scalar(&probs, codes, shifted)
}

/// Scalar reference of [`softmax_rows`] (same `exp`, same operation order per element).
pub fn softmax_rows_scalar(x: &[f32], rows: usize, cols: usize, scale: f32, out: &mut [f32]) -> Result<()> {
    check(x.len(), rows, cols, scale, out.len())?;
    out.par_chunks_mut(cols.max(1))
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, dst)| softmax_row_scalar(&x[r * cols..(r + 1) * cols], scale, dst));
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::gelu::avx2::exp_neg_split8;
    use super::super::gemm_i8::avx2::codes32;
    use super::exp_neg_split;
    use std::arch::x86_64::*;

    /// The largest value of a row (the shift that keeps every exponential at most 1).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn row_max(x: &[f32]) -> f32 {
        let n = x.len();
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
        x[i..].iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
    }

    /// One row; see [`super::softmax_rows_scalar`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `dst.len() == src.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row(src: &[f32], scale: f32, dst: &mut [f32]) {
        let n = src.len();
        // SAFETY: AVX2 is available (caller's contract).
        let max = unsafe { row_max(src) };
        let mut lanes = [0f32; 8];
        let (vm, vs, zero) = (_mm256_set1_ps(max), _mm256_set1_ps(scale), _mm256_setzero_ps());
        let mut vsum = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let e = exp_neg_split8(_mm256_mul_ps(_mm256_sub_ps(vm, v), vs), zero);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), e);
                vsum = _mm256_add_ps(vsum, e);
            }
            i += 8;
        }
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vsum) };
        let mut sum: f32 = lanes.iter().sum();
        for j in i..n {
            dst[j] = exp_neg_split((max - src[j]) * scale, 0.0);
            sum += dst[j];
        }
        let inv = 1.0 / sum;
        let vinv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let p = dst.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), vinv));
            }
            i += 8;
        }
        for d in &mut dst[i..] {
            *d *= inv;
        }
    }

    /// See [`super::softmax_row_quantized`]: [`row`]'s arithmetic, then [`quantize_row`]'s on the probabilities as
    /// they are formed (same multiplies, same round-half-even conversion, same clamps).
    ///
    /// [`quantize_row`]: super::super::gemm_i8
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `codes.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_quantized(x: &mut [f32], scale: f32, codes: &mut [i8], shifted: bool) -> f32 {
        let n = x.len();
        // SAFETY: AVX2 is available (caller's contract).
        let max = unsafe { row_max(x) };
        let mut lanes = [0f32; 8];
        let (vm, vs, zero) = (_mm256_set1_ps(max), _mm256_set1_ps(scale), _mm256_setzero_ps());
        let (mut vsum, mut vemax) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let p = x.as_mut_ptr().add(i);
                let e = exp_neg_split8(_mm256_mul_ps(_mm256_sub_ps(vm, _mm256_loadu_ps(p)), vs), zero);
                _mm256_storeu_ps(p, e);
                vsum = _mm256_add_ps(vsum, e);
                vemax = _mm256_max_ps(vemax, e);
            }
            i += 8;
        }
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vsum) };
        let mut sum: f32 = lanes.iter().sum();
        // SAFETY: `lanes` holds eight f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vemax) };
        let mut emax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        for v in &mut x[i..] {
            *v = exp_neg_split((max - *v) * scale, 0.0);
            sum += *v;
            emax = emax.max(*v);
        }
        let inv = 1.0 / sum;
        let absmax = emax * inv;
        let flip = super::super::gemm_i8::code_flip(shifted);
        if absmax == 0.0 {
            codes.fill(flip);
            return 0.0;
        }
        let qinv = 127.0 / absmax;
        let (vinv, vq) = (_mm256_set1_ps(inv), _mm256_set1_ps(qinv));
        let vflip = _mm256_set1_epi8(flip);
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n for both slices.
            unsafe {
                let p = |o: usize| _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i + o)), vinv);
                let bytes = codes32([p(0), p(8), p(16), p(24)], vq);
                _mm256_storeu_si256(
                    codes.as_mut_ptr().add(i) as *mut __m256i,
                    _mm256_xor_si256(bytes, vflip),
                );
            }
            i += 32;
        }
        for (c, &e) in codes[i..].iter_mut().zip(&x[i..]) {
            *c = ((e * inv) * qinv).round_ties_even().clamp(-127.0, 127.0) as i8 ^ flip;
        }
        absmax / 127.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{avx2_path, compared_against_scalar, random_vec};

    fn softmax_f64(x: &[f32], scale: f32) -> Vec<f64> {
        let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - max) * scale as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn simd_and_scalar_match_f64_on_awkward_sizes() {
        for (rows, cols) in [(1, 1), (3, 7), (5, 8), (17, 33), (64, 256), (2, 1000)] {
            let x = random_vec(rows * cols, (rows * 31 + cols) as u64, 12.0);
            let scale = 0.35;
            let (mut fast, mut slow) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            softmax_rows(&x, rows, cols, scale, &mut fast).unwrap();
            softmax_rows_scalar(&x, rows, cols, scale, &mut slow).unwrap();
            for r in 0..rows {
                let want = softmax_f64(&x[r * cols..(r + 1) * cols], scale);
                for (c, &w) in want.iter().enumerate() {
                    let i = r * cols + c;
                    let tol = 2e-6 * w + 1e-12;
                    assert!(
                        (fast[i] as f64 - w).abs() <= tol,
                        "simd {rows}x{cols} [{r},{c}]: {} vs {w}",
                        fast[i]
                    );
                    assert!(
                        (slow[i] as f64 - w).abs() <= tol,
                        "scalar {rows}x{cols} [{r},{c}]: {} vs {w}",
                        slow[i]
                    );
                }
            }
        }
        compared_against_scalar("softmax_rows", &avx2_path());
    }

    #[test]
    fn quantized_row_equals_softmax_then_row_quantizer_on_awkward_sizes() {
        for cols in [1usize, 3, 8, 31, 33, 64, 100, 256, 257] {
            for shifted in [false, true] {
                let mut x = random_vec(cols, cols as u64 + 7, 9.0);
                if cols > 2 {
                    x[1] = x[0]; // a tied maximum or two
                }
                let scale = 0.18;
                // The separate passes: softmax, then the GEMM's row quantizer.
                let mut probs = vec![0f32; cols];
                softmax_row(&x, scale, &mut probs);
                let mut want = vec![0i8; cols];
                let want_scale = crate::kernels::gemm_i8::quantize_row_for_gemm(&probs, &mut want, shifted);
                let (mut scores, mut codes) = (x.clone(), vec![0i8; cols]);
                let got_scale = softmax_row_quantized(&mut scores, scale, &mut codes, shifted);
                assert_eq!(
                    (got_scale, &codes),
                    (want_scale, &want),
                    "cols {cols} shifted {shifted}"
                );
                // The scalar reference: its exp sums in another order, so codes may differ by one step.
                let mut scores = x.clone();
                let mut slow = vec![0i8; cols];
                let s = softmax_row_quantized_scalar(&mut scores, scale, &mut slow, shifted);
                assert!((s - got_scale).abs() <= 1e-6 * got_scale, "{s} vs {got_scale}");
                for (a, b) in slow.iter().zip(&codes) {
                    assert!((*a as i32 - *b as i32).abs() <= 1, "cols {cols}: {a} vs {b}");
                }
            }
        }
        compared_against_scalar("softmax_row_quantized", &avx2_path());
    }

    #[test]
    fn large_gaps_underflow_to_zero_not_nan() {
        let x = [0.0f32, -1000.0, 5.0, -1e30];
        let mut out = [0f32; 4];
        softmax_rows(&x, 1, 4, 1.0, &mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()), "{out:?}");
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(out[1], 0.0);
    }

    #[test]
    fn rejects_bad_shapes_and_scales() {
        let mut out = [0f32; 4];
        assert!(softmax_rows(&[0.0; 3], 1, 4, 1.0, &mut out).is_err());
        assert!(softmax_rows(&[0.0; 4], 1, 4, 0.0, &mut out).is_err());
    }
}
