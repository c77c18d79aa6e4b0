//! Layer normalisation over the last dimension of a row-major `[rows, cols]` matrix (PyTorch's `nn.LayerNorm`):
//! `out = (x - mean) / sqrt(var + eps) * gamma + beta`, biased variance, two passes over each row (which stays in
//! L1) so there is no cancellation.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::{Error, Result};

/// Rows handed to one rayon task at least (SegFormer rows can be as short as 32 values).
const MIN_ROWS_PER_TASK: usize = 64;

fn check(x: usize, rows: usize, cols: usize, gamma: usize, beta: usize, out: usize) -> Result<()> {
    if x != rows * cols || out != rows * cols || gamma != cols || beta != cols {
        return Err(Error::invalid(
            "layer_norm",
            format!(
                "shapes disagree for rows={rows} cols={cols}: input {x}, output {out} (want {}), gamma \
             {gamma}, beta {beta} (want {cols})",
                rows * cols
            ),
        ));
    }
    Ok(())
}

/// Normalises every row of `x` into `out`. AVX2 when the CPU has it; parallel over rows.
pub fn layer_norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    check(x.len(), rows, cols, gamma.len(), beta.len(), out.len())?;
    if rows * cols == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the rows write initialized floats only.
        rows_avx2(x, cols, gamma, beta, eps, unsafe { super::as_uninit(out) });
        return Ok(());
    }
    layer_norm_scalar(x, rows, cols, gamma, beta, eps, out)
}

/// [`layer_norm`] into a new vector: the SIMD path writes every value once, with no zeroing pass before.
pub fn layer_norm_vec(x: &[f32], rows: usize, cols: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Result<Vec<f32>> {
    check(x.len(), rows, cols, gamma.len(), beta.len(), rows * cols)?;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: `rows_avx2` writes every row (shapes checked above).
        return unsafe {
            super::filled_vec(rows * cols, |out| {
                rows_avx2(x, cols, gamma, beta, eps, out);
                Ok(())
            })
        };
    }
    let mut out = vec![0f32; rows * cols];
    layer_norm_scalar(x, rows, cols, gamma, beta, eps, &mut out)?;
    Ok(out)
}

/// Every row of `x` into `out` (shapes checked by the caller; the CPU has AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
fn rows_avx2(x: &[f32], cols: usize, gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(cols)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, dst)| {
            // SAFETY: the callers saw AVX2 and FMA on this CPU; all slices hold `cols` values.
            unsafe { avx2::row(&x[r * cols..(r + 1) * cols], gamma, beta, eps, dst) };
        });
}

/// Scalar reference of [`layer_norm`] (statistics accumulated in f64).
pub fn layer_norm_scalar(
    x: &[f32],
    rows: usize,
    cols: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    check(x.len(), rows, cols, gamma.len(), beta.len(), out.len())?;
    if rows * cols == 0 {
        return Ok(());
    }
    out.par_chunks_mut(cols)
        .with_min_len(MIN_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(r, dst)| {
            let src = &x[r * cols..(r + 1) * cols];
            let mean = src.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for i in 0..cols {
                dst[i] = (((src[i] as f64 - mean) * rstd) as f32) * gamma[i] + beta[i];
            }
        });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    #[inline]
    #[target_feature(enable = "avx2")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; all slices hold the same number of values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let n = x.len();
        let end = n / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        for i in (0..end).step_by(8) {
            // SAFETY: i + 8 <= n.
            acc = _mm256_add_ps(acc, unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
        }
        let mean = (hsum(acc) + x[end..].iter().sum::<f32>()) / n as f32;
        let vmean = _mm256_set1_ps(mean);
        let mut acc = _mm256_setzero_ps();
        for i in (0..end).step_by(8) {
            // SAFETY: i + 8 <= n.
            let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) }, vmean);
            acc = _mm256_fmadd_ps(d, d, acc);
        }
        let var = (hsum(acc) + x[end..].iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()) / n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        let vrstd = _mm256_set1_ps(rstd);
        for i in (0..end).step_by(8) {
            // SAFETY: i + 8 <= n for every slice.
            unsafe {
                let d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vmean), vrstd);
                let g = _mm256_loadu_ps(gamma.as_ptr().add(i));
                let b = _mm256_loadu_ps(beta.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i) as *mut f32, _mm256_fmadd_ps(d, g, b));
            }
        }
        for i in end..n {
            out[i].write(((x[i] - mean) * rstd).mul_add(gamma[i], beta[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{avx2_path, compared_against_scalar, random_vec};

    #[test]
    fn simd_matches_scalar_on_awkward_sizes() {
        for &(rows, cols) in &[(1, 1), (3, 5), (7, 13), (130, 32), (5, 1000), (2, 257)] {
            // An offset far from zero checks that the two-pass variance does not cancel.
            let x: Vec<f32> = random_vec(rows * cols, (rows * cols) as u64, 1.0)
                .iter()
                .map(|v| v + 100.0)
                .collect();
            let gamma = random_vec(cols, 7, 2.0);
            let beta = random_vec(cols, 8, 1.0);
            let mut fast = vec![f32::NAN; rows * cols];
            let mut slow = vec![f32::NAN; rows * cols];
            layer_norm(&x, rows, cols, &gamma, &beta, 1e-5, &mut fast).unwrap();
            layer_norm_scalar(&x, rows, cols, &gamma, &beta, 1e-5, &mut slow).unwrap();
            assert_eq!(
                layer_norm_vec(&x, rows, cols, &gamma, &beta, 1e-5).unwrap(),
                fast,
                "{rows}x{cols}"
            );
            for i in 0..rows * cols {
                assert!(
                    (fast[i] - slow[i]).abs() < 2e-4 * (1.0 + slow[i].abs()),
                    "{rows}x{cols} [{i}]"
                );
            }
            if cols > 1 {
                // With gamma = 1 and beta = 0 each row has mean 0 and variance ~1.
                let mut unit = vec![0f32; rows * cols];
                layer_norm(&x, rows, cols, &vec![1.0; cols], &vec![0.0; cols], 0.0, &mut unit).unwrap();
                let row = &unit[..cols];
                let mean = row.iter().sum::<f32>() / cols as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
                assert!(
                    mean.abs() < 1e-3 && (var - 1.0).abs() < 1e-3,
                    "{rows}x{cols}: mean {mean} var {var}"
                );
            }
        }
        compared_against_scalar("layer_norm", &avx2_path());
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let mut out = vec![0f32; 6];
        assert!(layer_norm(&[0.0; 6], 2, 3, &[1.0; 2], &[0.0; 3], 1e-5, &mut out).is_err());
    }
}
