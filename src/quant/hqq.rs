//! Half-quadratic quantization (the `hqq` method, after Badri & Shaji 2023): calibration-free optimisation of the
//! scale and zero point of every group of an affine integer weight.
//!
//! For each group, starting from min/max parameters, three searches run and the parameters with the lowest squared
//! reconstruction error win (so a group is never worse than `rtn`'s min/max before parameter rounding):
//! 1. HQQ's proximal solver for the zero point: with the scale fixed, alternate `e = shrink_lp(w - w_r)` (the
//!    sparsity-promoting lp step, p < 1) and the closed-form zero point `z = mean(q - (w - e) / s)`, growing beta by
//!    kappa each iteration; every iterate is scored, not only the last.
//! 2. A half-quadratic refit (p = 2) of both scale and zero: with the codes fixed, the least-squares line
//!    `w ~ s * q - s * z` gives the best scale and zero; with the parameters fixed, rounding gives the best codes.
//!    Alternating the two never increases the error; it stops when an iteration no longer helps.
//! 3. A small scale search: the min/max range shrunk by each factor of [`HqqOptions::shrink`] (clipping outliers),
//!    each followed by the refit of step 2. Step 1's result is refit too.
//!
//! optimum-quanto's `HqqOptimizer`, by contrast, refines only the shift, accepts an iteration only if the mean
//! absolute error of the whole tensor falls, and stops at the first that does not (20 iterations at most).

use super::int::{affine_code, affine_qmax, affine_sq_error, minmax_params, quantize_grouped};
use super::{QuantTensor, Recipe};
use crate::{Error, Result};

/// Tuning of the per-group search.
#[derive(Debug, Clone, PartialEq)]
pub struct HqqOptions {
    /// Exponent of the lp error norm the proximal step promotes (HQQ's default 0.7).
    pub lp_norm: f32,
    /// Initial half-quadratic penalty (HQQ's default 10), multiplied by `kappa` each iteration.
    pub beta: f32,
    pub kappa: f32,
    /// Proximal iterations for the zero point.
    pub iters: usize,
    /// Maximum least-squares refit iterations per starting point.
    pub refit_iters: usize,
    /// Factors applied to the min/max range before refitting (1.0 is plain min/max).
    pub shrink: Vec<f32>,
}

impl Default for HqqOptions {
    fn default() -> Self {
        HqqOptions {
            lp_norm: 0.7,
            beta: 10.0,
            kappa: 1.01,
            iters: 40,
            refit_iters: 10,
            shrink: vec![1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5],
        }
    }
}

/// Quantizes a row-major `[rows, cols]` weight with affine codes whose per-group scale and zero point are found by
/// [`optimize_group`] (HQQ needs no data).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    _stats: Option<&super::LayerStats>,
) -> Result<QuantTensor> {
    let bits = recipe
        .level
        .int_bits()
        .ok_or_else(|| Error::unsupported("hqq", format!("applies to integer levels only, not {}", recipe.level)))?;
    if recipe.is_symmetric() {
        return Err(Error::unsupported(
            "hqq",
            "needs affine quantization (a zero point to optimise)",
        ));
    }
    let options = HqqOptions::default();
    let group_size = recipe.effective_group_size(cols);
    Ok(quantize_grouped(w, rows, cols, bits, false, group_size, |g| {
        optimize_group(g, bits, &options)
    }))
}

/// HQQ's generalised soft-thresholding: `sign(x) * max(|x| - |x|^(p-1) / beta, 0)`.
///
/// `zero_below` is [`shrink_lp_zero_below`]`(beta, p)`: residuals under it shrink to zero, and `powf` (most of a
/// proximal step's cost) is skipped for them; the result is the same as without the test.
fn shrink_lp(x: f32, beta: f32, p: f32, zero_below: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 {
        return 0.0;
    }
    if a < zero_below {
        return x.signum() * 0.0;
    }
    x.signum() * (a - a.powf(p - 1.0) / beta).max(0.0)
}

/// A magnitude under which [`shrink_lp`] is zero for every residual: `|x| - |x|^(p-1) / beta <= 0` exactly when
/// `|x|^(2-p) <= 1 / beta`, for `p < 2`. The bound keeps a 1e-3 relative margin, far above the rounding of `powf`
/// and the division, so the skipped evaluations would have given zero too. 0 (never skip) for `p >= 2`.
fn shrink_lp_zero_below(beta: f32, p: f32) -> f32 {
    if p < 2.0 && beta > 0.0 {
        (1.0 / beta as f64).powf(1.0 / (2.0 - p as f64)) as f32 * 0.999
    } else {
        0.0
    }
}

/// Finds `(scale, zero)` for one group of `bits`-bit affine codes (see the module documentation).
pub fn optimize_group(w: &[f32], bits: u32, options: &HqqOptions) -> (f32, f32) {
    let (s0, z0) = minmax_params(w, bits);
    let (min, max) = w.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    if w.len() < 2 || max <= min {
        return (s0, z0);
    }
    let mut best = (s0, z0, affine_sq_error(w, s0, z0, bits));
    let consider = |s: f32, z: f32, best: &mut (f32, f32, f64)| {
        let refined = refit(w, bits, s, z, options.refit_iters);
        if refined.2 < best.2 {
            *best = refined;
        }
    };

    let (hs, hz) = proximal_zero(w, bits, s0, z0, options);
    consider(hs, hz, &mut best);
    for &factor in &options.shrink {
        let (lo, hi) = (min * factor, max * factor);
        let s = (hi - lo) / affine_qmax(bits) as f32;
        if s > 0.0 && s.is_finite() {
            consider(s, -lo / s, &mut best);
        }
    }
    (best.0, best.1)
}

/// HQQ's proximal solver for the zero point at a fixed scale; returns the iterate with the lowest squared error.
fn proximal_zero(w: &[f32], bits: u32, s: f32, z0: f32, options: &HqqOptions) -> (f32, f32) {
    let qmax = affine_qmax(bits) as f32;
    let mut z = z0;
    let mut beta = options.beta;
    let mut best = (z0, f64::INFINITY);
    for _ in 0..options.iters {
        // One pass scores the current zero point and accumulates the next one.
        let (mut sum, mut err) = (0f64, 0f64);
        let zero_below = shrink_lp_zero_below(beta, options.lp_norm);
        for &x in w {
            let q = affine_code(x, s, z, qmax);
            let residual = x - (q - z) * s;
            err += (residual as f64) * (residual as f64);
            let e = shrink_lp(residual, beta, options.lp_norm, zero_below);
            sum += (q - (x - e) / s) as f64;
        }
        if err < best.1 {
            best = (z, err);
        }
        z = (sum / w.len() as f64) as f32;
        beta *= options.kappa;
    }
    if affine_sq_error(w, s, z, bits) < best.1 {
        best.0 = z;
    }
    (s, best.0)
}

/// Squared error of a group under `(s, z)` and the sums the least-squares refit needs, in one pass:
/// `(error, sum q, sum w, sum q^2, sum q w)`.
fn refit_stats(w: &[f32], s: f32, z: f32, qmax: f32) -> [f64; 5] {
    let mut acc = [0f64; 5];
    for &x in w {
        let q = affine_code(x, s, z, qmax);
        let residual = (x - (q - z) * s) as f64;
        let (q, x) = (q as f64, x as f64);
        acc[0] += residual * residual;
        acc[1] += q;
        acc[2] += x;
        acc[3] += q * q;
        acc[4] += q * x;
    }
    acc
}

/// Alternates optimal codes (rounding) and the least-squares scale and zero for those codes, while it helps.
/// Returns `(scale, zero, squared error)`.
fn refit(w: &[f32], bits: u32, mut s: f32, mut z: f32, iters: usize) -> (f32, f32, f64) {
    let qmax = affine_qmax(bits) as f32;
    let n = w.len() as f64;
    let mut stats = refit_stats(w, s, z, qmax);
    for _ in 0..iters {
        let [_, sq, sw, sqq, sqw] = stats;
        let var = sqq - sq * sq / n;
        if var <= 0.0 {
            break;
        }
        let slope = (sqw - sq * sw / n) / var;
        let intercept = (sw - slope * sq) / n;
        if slope <= 0.0 || !slope.is_finite() {
            break;
        }
        let (ns, nz) = (slope as f32, (-intercept / slope) as f32);
        let next = refit_stats(w, ns, nz, qmax);
        if next[0].is_nan() || next[0] >= stats[0] {
            break;
        }
        (s, z, stats) = (ns, nz, next);
    }
    (s, z, stats[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Level, Method, quantize_weight, relative_error, testing};

    /// optimum-quanto's default qint4/qint2 weight quantization, re-implemented from its source: group size 128,
    /// else 96, 64, 32 if it divides the row, else per channel; min/max scale and shift (`q = round((w + shift) /
    /// scale)`, `w_r = q * scale - shift`, f32 parameters); then, if `hqq`, its HqqOptimizer (shift only, lp 0.7,
    /// beta 10, kappa 1.01, 20 iterations, accepted while the whole tensor's mean absolute error falls).
    /// Returns the dequantized weight and the group size used.
    fn quanto_reference(w: &[f32], rows: usize, cols: usize, bits: u32, hqq: bool) -> (Vec<f32>, usize) {
        let mut group = 128;
        let mut group_size = cols;
        if cols > group {
            while !cols.is_multiple_of(group) && group > 32 {
                group -= 32;
            }
            if cols.is_multiple_of(group) {
                group_size = group;
            }
        }
        let qmax = affine_qmax(bits) as f32;
        let groups: Vec<&[f32]> = w[..rows * cols].chunks(group_size).collect();
        let scales: Vec<f32> = groups
            .iter()
            .map(|g| {
                let (lo, hi) = g
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                (hi - lo) / qmax
            })
            .collect();
        let mut shifts: Vec<f32> = groups
            .iter()
            .map(|g| -g.iter().fold(f32::INFINITY, |a, &v| a.min(v)))
            .collect();
        let codes = |shifts: &[f32]| -> Vec<Vec<f32>> {
            groups
                .iter()
                .zip(&scales)
                .zip(shifts)
                .map(|((g, &s), &sh)| {
                    g.iter()
                        .map(|&x| ((x + sh) / s).round_ties_even().clamp(0.0, qmax))
                        .collect()
                })
                .collect()
        };
        let dequant = |codes: &[Vec<f32>], shifts: &[f32]| -> Vec<f32> {
            codes
                .iter()
                .zip(&scales)
                .zip(shifts)
                .flat_map(|((c, &s), &sh)| c.iter().map(move |&q| q * s - sh))
                .collect()
        };
        let mean_abs = |d: &[f32]| w.iter().zip(d).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / w.len() as f64;
        let mut q = codes(&shifts);
        if hqq {
            let mut best_error = mean_abs(&dequant(&q, &shifts));
            let mut beta = 10f32;
            for _ in 0..20 {
                let deq = dequant(&q, &shifts);
                let new_shifts: Vec<f32> = groups
                    .iter()
                    .enumerate()
                    .map(|(gi, g)| {
                        let s = scales[gi];
                        let sum: f32 = g
                            .iter()
                            .enumerate()
                            .map(|(k, &x)| {
                                let e = shrink_lp(x - deq[gi * group_size + k], beta, 0.7, 0.0);
                                q[gi][k] * s - (x - e)
                            })
                            .sum();
                        sum / g.len() as f32
                    })
                    .collect();
                let new_q = codes(&new_shifts);
                let error = mean_abs(&dequant(&new_q, &new_shifts));
                q = new_q;
                if error < best_error {
                    best_error = error;
                    shifts = new_shifts;
                    beta *= 1.01;
                } else {
                    break;
                }
            }
            q = codes(&shifts);
        }
        (dequant(&q, &shifts), group_size)
    }

    fn error_of(w: &[f32], rows: usize, cols: usize, level: Level, method: Method, g: Option<usize>) -> (f64, f64) {
        let recipe = Recipe::new(level, method, g, None, vec![]).unwrap();
        let q = quantize_weight("w", w, rows, cols, &recipe).unwrap();
        (relative_error(w, &q.dequantize()), q.bits_per_weight())
    }

    #[test]
    fn hqq_beats_rtn_and_quanto_on_a_trained_like_matrix() {
        let (rows, cols) = (256, 1024);
        let w = testing::trained_like(rows, cols, 42);
        for (level, bits, default_group) in [(Level::Int4, 4, 64), (Level::Int2, 2, 32)] {
            let (quanto_minmax, quanto_group) = quanto_reference(&w, rows, cols, bits, false);
            let (quanto_hqq, _) = quanto_reference(&w, rows, cols, bits, true);
            assert_eq!(quanto_group, 128);
            let quanto_minmax = relative_error(&w, &quanto_minmax);
            let quanto_hqq = relative_error(&w, &quanto_hqq);
            let (rtn, _) = error_of(&w, rows, cols, level, Method::Rtn, None);
            let (hqq, bpw) = error_of(&w, rows, cols, level, Method::Hqq, None);
            let (rtn_128, _) = error_of(&w, rows, cols, level, Method::Rtn, Some(128));
            let (hqq_128, bpw_128) = error_of(&w, rows, cols, level, Method::Hqq, Some(128));
            println!(
                "{level}: quanto minmax g128 {quanto_minmax:.4} quanto hqq g128 {quanto_hqq:.4} | rtn g{default_group} \
                 {rtn:.4} hqq g{default_group} {hqq:.4} ({bpw} bits) | rtn g128 {rtn_128:.4} hqq g128 {hqq_128:.4} \
                 ({bpw_128} bits)"
            );
            assert!(quanto_hqq <= quanto_minmax);
            assert!(
                hqq < rtn && hqq < quanto_hqq && hqq < quanto_minmax,
                "{level}: hqq {hqq}"
            );
            // At quanto's own group size, with f16 instead of f32 parameters (fewer bits), hqq still wins.
            assert!(hqq_128 < rtn_128 && hqq_128 < quanto_hqq, "{level}: hqq g128 {hqq_128}");
            // Our rtn at g128 is quanto's min/max up to the f16 rounding of the parameters.
            assert!(
                (rtn_128 - quanto_minmax).abs() < 0.01 * quanto_minmax,
                "{rtn_128} vs {quanto_minmax}"
            );
        }
    }

    #[test]
    fn every_group_is_at_least_as_good_as_minmax() {
        let w = testing::trained_like(16, 256, 8);
        let options = HqqOptions::default();
        for bits in [2, 4, 8] {
            for g in w.chunks(64) {
                let (s0, z0) = minmax_params(g, bits);
                let (s, z) = optimize_group(g, bits, &options);
                assert!(affine_sq_error(g, s, z, bits) <= affine_sq_error(g, s0, z0, bits));
            }
        }
        // Constant and tiny groups keep exact min/max parameters.
        assert_eq!(optimize_group(&[0.5; 8], 4, &options), minmax_params(&[0.5; 8], 4));
        assert_eq!(optimize_group(&[0.5], 4, &options), minmax_params(&[0.5], 4));
    }

    #[test]
    fn shrink_operator_matches_its_definition() {
        let t = shrink_lp_zero_below(10.0, 0.7);
        assert_eq!(shrink_lp(0.0, 10.0, 0.7, t), 0.0);
        let x = 0.5f32;
        assert!((shrink_lp(x, 10.0, 0.7, t) - (x - x.powf(-0.3) / 10.0)).abs() < 1e-7);
        assert_eq!(shrink_lp(-0.01, 10.0, 0.7, t), 0.0, "small errors are zeroed");
        assert!(shrink_lp(-2.0, 10.0, 0.7, t) < -1.8);
    }

    #[test]
    fn skipping_powf_below_the_bound_changes_no_bit() {
        // Around the bound and far from it, for the betas a proximal run visits: bit-identical to evaluating powf.
        for p in [0.5f32, 0.7, 1.0, 1.5] {
            let mut beta = 10.0f32;
            for _ in 0..60 {
                let t = shrink_lp_zero_below(beta, p);
                assert!(t > 0.0);
                for i in 0..4000 {
                    let a = t * (0.5 + i as f32 / 2000.0);
                    for x in [a, -a, a * 1e-3, -a * 1e-6, f32::MIN_POSITIVE] {
                        let skipped = shrink_lp(x, beta, p, t);
                        let full = shrink_lp(x, beta, p, 0.0);
                        assert_eq!(skipped.to_bits(), full.to_bits(), "x {x} beta {beta} p {p}");
                    }
                }
                beta *= 1.01;
            }
        }
        assert_eq!(shrink_lp_zero_below(10.0, 2.0), 0.0, "p = 2 never skips");
    }

    /// Prints the level x method error table of docs/quantization.md (run with `--nocapture`), and checks that more
    /// bits mean less error.
    #[test]
    fn error_table_on_the_trained_like_matrix() {
        let (rows, cols) = (256, 1024);
        let w = testing::trained_like(rows, cols, 42);
        let mut last = 0.0;
        for (level, method) in [
            (Level::F16, Method::Rtn),
            (Level::Bf16, Method::Rtn),
            (Level::Int8, Method::Rtn),
            (Level::Int8, Method::Hqq),
            (Level::F8E4m3, Method::Rtn),
            (Level::F8E5m2, Method::Rtn),
            (Level::Int4, Method::Rtn),
            (Level::Int4, Method::Hqq),
            (Level::Int2, Method::Rtn),
            (Level::Int2, Method::Hqq),
        ] {
            let recipe = Recipe::new(level, method, None, None, vec![]).unwrap();
            let (err, bpw) = error_of(&w, rows, cols, level, method, None);
            println!("| {} | {:.5} | {:.3} |", recipe.label(), err, bpw);
            if method == Method::Rtn && matches!(level, Level::F16 | Level::Int8 | Level::Int4 | Level::Int2) {
                assert!(err > last, "{level}: {err} <= {last}");
                last = err;
            }
        }
    }
}
