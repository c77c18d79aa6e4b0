//! GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
//! Pre-trained Transformers", arXiv:2210.17323): the `gptq` method. This module owns GPTQ's rounding of one weight
//! matrix given its layer's input Hessian, and the f64 Cholesky factorisation that rounding needs.
//!
//! GPTQ minimises the layer's output error `tr(dW H dW^T)`, `H = 2 X^T X / n` over calibration inputs `X`, by
//! rounding the input columns one at a time and moving each column's rounding error onto the columns not yet rounded,
//! through the inverse Hessian (the Optimal Brain Surgeon update, in a fixed column order). What is implemented:
//! - Dead inputs (`diag(H) = 0`: the input was zero on every calibration sample) get weight 0 and `H_ii = 1`; damping
//!   `damp x mean(diag H)` is added to the diagonal; a Hessian that is still not positive definite is retried with
//!   ten times the damping (twice at most), then refused.
//! - The inverse-Hessian update is the paper's, written with the factor `H = V V^T`, `V` upper triangular (the
//!   Cholesky factor of the reversed matrix): the paper's `U = chol(H^-1)` (upper) is `V^-1`, and its sequence of
//!   updates adds up to `w~_j = w_j + sum_{i<j} (w_i - q_i) V_ij / V_jj`, the weight column `j` has when it is rounded
//!   (`w` the original weights, `q` the rounded ones). So one Cholesky (`cols^3 / 3` multiply-adds, blocked, its
//!   panels by the `gemm` crate) replaces the paper's Cholesky, inverse and second Cholesky.
//! - Lazy batch updates: the columns go in blocks of [`GptqOptions::block_size`]; within a block each row carries its
//!   own updates; after the block, its errors reach the columns to the right in one matrix product. Rows are
//!   independent (groups run along rows), so they are processed in parallel.
//! - Groups: by default a group's scale and zero point are fixed when its first column is reached, from that
//!   group's weights as the errors of all earlier columns have updated them (the optimal compensation of those
//!   errors, one triangular solve per group); with [`GptqOptions::static_groups`] they come from the original
//!   weights before any rounding. [`GptqOptions::act_order`] rounds the columns by decreasing `diag(H)` and always
//!   uses static groups, since segq stores groups of consecutive columns in the original order (GPTQ's dynamic
//!   groups under act-order would be scattered).
//! - The output is an ordinary integer [`QuantTensor`] in the recipe's format (int8/int4/int2, symmetric or affine,
//!   the recipe's group size): scales and zero points are rounded to their storage type before any code is computed,
//!   as [`int::quantize_grouped`] does, so a checkpoint reloads without calibration data. Float levels are refused.
//!
//! Defaults ([`GptqOptions::default`]) are the variant with the lowest output error `tr(dW H dW^T) / tr(W H W^T)`
//! measured by `measure_options` in the tests (run it with `--ignored --nocapture`): trained-like weights
//! (`quant::testing::trained_like`, 256 x 1024 and 128 x 2048) and `4 x cols` correlated calibration inputs
//! (a low-rank common part, a mean and a log-normal scale per channel, 2% or none of the channels 10x larger):
//! - `act_order = true` (hence static groups): 1.25-1.8x lower error than the plain column order on every format
//!   and data set measured, with or without the large channels; without act-order, static and dynamic groups were
//!   within a few percent of each other (so `static_groups = true` as well).
//! - `group_params = GroupParams::Hqq`: with act-order, 10% lower error than min/max at int4 g64, 46% lower at
//!   int2 g32 (MSE range search: 6% and 33%); for symmetric formats it is the MSE search, 18% lower at int4 g128 sym,
//!   0.3% at int8.
//! - `damp = 0.01` (the paper's): 0.001 was up to 4% better at int4/int8 and 3% worse at int2, 0.1 was 7-18% worse;
//!   the larger of the two close values is kept since real calibration sets are small.
//! - `block_size = 128` (the paper's): speed only.
//!
//! Measured on 256 x 1024 with 2% large channels (relative output error; rtn / gptq in brackets):
//!
//! | format | rtn | hqq | gptq, paper's choices (min/max, in order) | gptq, defaults |
//! |---|---|---|---|---|
//! | int4 g64 affine | 1.57e-2 | 1.35e-2 | 4.03e-3 (3.9x) | 2.30e-3 (6.8x) |
//! | int2 g32 affine | 2.56e-1 | 1.23e-1 | 1.15e-1 (2.2x) | 2.30e-2 (11.1x) |
//! | int8 per channel, symmetric | 4.57e-4 | | 1.15e-4 (4.0x) | 7.37e-5 (6.2x) |
//! | int4 g128 symmetric | 4.96e-2 | | 1.30e-2 (3.8x) | 6.68e-3 (7.4x) |
//!
//! Speed (2 threads, test profile: this crate at opt-level 1): 256 x 2048 int4 g64 in 1.2 s, of which the HQQ
//! parameter search takes 0.7 s and the 2048^3 / 3 Cholesky 0.2 s; int8 per channel 0.5 s; 256 x 1024 int4 g64 in
//! 0.35 s.

use rayon::prelude::*;

use super::hqq::{self, HqqOptions};
use super::int;
use super::{Format, LayerStats, ParamDtype, QuantTensor, Recipe, ZeroPoint};
use crate::{Error, Result};

/// How a group's scale (and zero point) are chosen from the weights of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupParams {
    /// absmax (symmetric) or min/max (affine), as `rtn`.
    MinMax,
    /// The absmax or min/max range shrunk toward zero by factors 1, 0.975, ..., 0.5; the factor with the lowest
    /// squared error of the group is kept (AutoGPTQ's `mse` option, on a coarser grid).
    Mse,
    /// [`hqq::optimize_group`] for affine formats (a zero point to optimise), [`GroupParams::Mse`] for symmetric ones.
    Hqq,
}

/// Tuning of [`quantize_with_hessian`]. The defaults and the measurements behind them are in the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqOptions {
    /// Added to the Hessian's diagonal, as a fraction of its mean diagonal (GPTQ's `percdamp`, default 0.01): keeps
    /// the factorisation stable when inputs are nearly collinear.
    pub damp: f64,
    /// Columns per lazy batch update (default 128). Affects speed only, not the result (beyond float summation
    /// order).
    pub block_size: usize,
    /// Round columns by decreasing `diag(H)` (GPTQ's `desc_act`), implying static groups (default off).
    pub act_order: bool,
    /// Fix every group's parameters from the original weights before rounding, instead of when the group's first
    /// column is reached (default off).
    pub static_groups: bool,
    /// How a group's scale and zero point are chosen (default [`GroupParams::Mse`]).
    pub group_params: GroupParams,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            block_size: 128,
            act_order: true,
            static_groups: true,
            group_params: GroupParams::Hqq,
        }
    }
}

/// Quantizes a row-major `[rows, cols]` weight with GPTQ and default options, given the layer's input statistics
/// (the [`super::QuantizeFn`] signature): needs their Hessian.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    stats: Option<&LayerStats>,
) -> Result<QuantTensor> {
    let stats = stats.ok_or_else(|| {
        Error::invalid(
            "gptq",
            "needs calibration statistics of the layer's inputs (pass a calibration set)",
        )
    })?;
    let hessian = stats.hessian_mean().ok_or_else(|| {
        Error::invalid(
            "gptq",
            "the calibration statistics have no Hessian (X^T X was not collected for this layer)",
        )
    })?;
    quantize_with_hessian(w, rows, cols, recipe, &hessian, &GptqOptions::default())
}

/// Quantizes a row-major `[rows, cols]` weight with GPTQ, given the mean Hessian `2 X^T X / n` of its inputs
/// (`[cols, cols]`, row-major, as [`LayerStats::hessian_mean`] returns it). Integer levels only.
pub fn quantize_with_hessian(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    hessian: &[f64],
    options: &GptqOptions,
) -> Result<QuantTensor> {
    let bits = recipe.level.int_bits().ok_or_else(|| {
        Error::unsupported(
            "gptq",
            format!(
                "applies to integer levels only, not {} (float levels are cast: use rtn)",
                recipe.level
            ),
        )
    })?;
    if w.len() != rows * cols {
        return Err(Error::invalid(
            "gptq",
            format!("{} weight values for shape [{rows}, {cols}]", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "gptq",
            format!(
                "weight at row {}, column {} is {} (cannot quantize non-finite values)",
                i / cols.max(1),
                i % cols.max(1),
                w[i]
            ),
        ));
    }
    check_options(options)?;
    check_hessian(hessian, cols)?;
    let layout = Layout {
        rows,
        cols,
        bits,
        symmetric: recipe.is_symmetric(),
        group_size: recipe.effective_group_size(cols),
    };
    if rows == 0 || cols == 0 {
        return Ok(int::quantize_grouped(
            w,
            rows,
            cols,
            bits,
            layout.symmetric,
            layout.group_size,
            |g| (int::absmax_scale(g, bits), 0.0),
        ));
    }

    // Dead inputs: nothing to preserve, and a zero pivot would stop the factorisation.
    let dead: Vec<bool> = (0..cols).map(|i| hessian[i * cols + i] == 0.0).collect();
    let mut weights = w.to_vec();
    if dead.iter().any(|&d| d) {
        for row in weights.chunks_mut(cols) {
            for (v, _) in row.iter_mut().zip(&dead).filter(|(_, d)| **d) {
                *v = 0.0;
            }
        }
    }
    let diag = |i: usize| if dead[i] { 1.0 } else { hessian[i * cols + i] };
    let mut order: Vec<usize> = (0..cols).collect();
    if options.act_order {
        // Stable: equal diagonals keep their order.
        order.sort_by(|&a, &b| diag(b).total_cmp(&diag(a)));
    }
    let factor = hessian_factor(hessian, &dead, &order, options.damp)?;
    let ordered: Vec<f32> = weights
        .chunks(cols)
        .flat_map(|row| order.iter().map(move |&c| row[c]))
        .collect();
    let hqq_options = HqqOptions::default();
    let search = |group: &[f32]| group_params(group, &layout, options.group_params, &hqq_options);

    let static_groups = options.static_groups || options.act_order;
    let pass = if static_groups {
        let params = static_params(&weights, &layout, &search);
        let (dtype, params) = round_params(params, layout.symmetric);
        run_columns(
            &layout,
            &factor,
            &ordered,
            &order,
            Params::Fixed(params),
            dtype,
            options.block_size,
            &search,
        )
    } else {
        // Parameters appear as the columns are reached; assume the usual f16 storage and redo the rare layer whose
        // parameters turn out not to fit it.
        let pass = run_columns(
            &layout,
            &factor,
            &ordered,
            &order,
            Params::Dynamic,
            ParamDtype::F16,
            options.block_size,
            &search,
        );
        let (scales, zeros) = raw_params(&pass.params, layout.symmetric);
        if int::choose_param_dtype(&scales, &zeros) == ParamDtype::F16 {
            pass
        } else {
            run_columns(
                &layout,
                &factor,
                &ordered,
                &order,
                Params::Dynamic,
                ParamDtype::F32,
                options.block_size,
                &search,
            )
        }
    };
    Ok(pass.into_tensor(&layout))
}

/// Sizes and format of the weight being quantized.
struct Layout {
    rows: usize,
    cols: usize,
    bits: u32,
    symmetric: bool,
    group_size: usize,
}

impl Layout {
    fn groups(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }
}

/// One group's parameters: as stored (rounded to the tensor's parameter type) and as found (to choose that type).
#[derive(Debug, Clone, Copy, Default)]
struct GroupParam {
    scale: f32,
    zero: f32,
    raw_scale: f32,
    raw_zero: f32,
}

enum Params {
    /// Every group's parameters, known before the columns are rounded (static groups).
    Fixed(Vec<GroupParam>),
    /// Found when each group's first column is reached.
    Dynamic,
}

/// The codes (original column order) and parameters of one GPTQ pass over the columns.
struct Pass {
    codes: Vec<u8>,
    params: Vec<GroupParam>,
    dtype: ParamDtype,
}

impl Pass {
    fn into_tensor(self, layout: &Layout) -> QuantTensor {
        let rb = int::row_bytes(layout.cols, layout.bits);
        let mut data = vec![0u8; layout.rows * rb];
        data.par_chunks_mut(rb)
            .zip(self.codes.par_chunks(layout.cols))
            .for_each(|(packed, codes)| int::pack_row(codes, layout.bits, packed));
        let format = match layout.bits {
            8 => Format::Int8,
            4 => Format::Int4,
            _ => Format::Int2,
        };
        QuantTensor {
            format,
            symmetric: layout.symmetric,
            zero_point: ZeroPoint::Codes,
            rows: layout.rows,
            cols: layout.cols,
            group_size: layout.group_size,
            param_dtype: self.dtype,
            data,
            scales: self.params.iter().map(|p| p.scale).collect(),
            zeros: if layout.symmetric {
                Vec::new()
            } else {
                self.params.iter().map(|p| p.zero).collect()
            },
            col_scales: Vec::new(),
        }
    }
}

fn check_options(options: &GptqOptions) -> Result<()> {
    if !(options.damp.is_finite() && options.damp >= 0.0) {
        return Err(Error::invalid(
            "gptq options",
            format!("damp must be a finite number >= 0, not {}", options.damp),
        ));
    }
    if options.block_size == 0 {
        return Err(Error::invalid("gptq options", "block_size must be at least 1"));
    }
    Ok(())
}

fn check_hessian(hessian: &[f64], cols: usize) -> Result<()> {
    if hessian.len() != cols * cols {
        return Err(Error::invalid(
            "gptq Hessian",
            format!(
                "has {} values, expected {cols} x {cols} = {} for a weight of {cols} input columns",
                hessian.len(),
                cols * cols
            ),
        ));
    }
    if let Some(i) = hessian.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "gptq Hessian",
            format!(
                "value at row {}, column {} is {} (not finite)",
                i / cols,
                i % cols,
                hessian[i]
            ),
        ));
    }
    if let Some(i) = (0..cols).find(|&i| hessian[i * cols + i] < 0.0) {
        return Err(Error::invalid(
            "gptq Hessian",
            format!(
                "diagonal value {i} is negative ({}); 2 X^T X / n has a non-negative diagonal",
                hessian[i * cols + i]
            ),
        ));
    }
    Ok(())
}

/// `V` (upper triangular, row-major `[cols, cols]`) with `P H P^T + damping = V V^T`, `P` the column order: the
/// Cholesky factor of the reversed matrix, reversed. Retries with more damping when the matrix is not positive
/// definite in floating point.
fn hessian_factor(hessian: &[f64], dead: &[bool], order: &[usize], damp: f64) -> Result<Vec<f64>> {
    let n = order.len();
    let diag = |i: usize| if dead[i] { 1.0 } else { hessian[i * n + i] };
    let mean_diag = (0..n).map(diag).sum::<f64>() / n as f64;
    let mut damping = damp * mean_diag;
    let mut failed_at = 0;
    for _ in 0..3 {
        // Reversing the flat array reverses both row and column order; build it reversed directly.
        let mut a = vec![0f64; n * n];
        a.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let i = order[n - 1 - r];
            for (c, v) in row.iter_mut().enumerate().take(r + 1) {
                let j = order[n - 1 - c];
                *v = if i == j { diag(i) + damping } else { hessian[i * n + j] };
            }
        });
        match cholesky_lower(&mut a, n) {
            Ok(()) => {
                a.reverse();
                return Ok(a);
            }
            Err(column) => {
                failed_at = order[n - 1 - column];
                damping = if damping > 0.0 {
                    damping * 10.0
                } else {
                    1e-6 * mean_diag
                };
            }
        }
    }
    Err(Error::invalid(
        "gptq Hessian",
        format!(
            "not positive definite: the Cholesky factorisation failed at input column {failed_at} even with damping \
             {:.3e} ({:.3e} x the mean diagonal)",
            damping / 10.0,
            damping / 10.0 / mean_diag
        ),
    ))
}

/// Columns per diagonal block of the Cholesky factorisation.
const CHOLESKY_BLOCK: usize = 64;

/// In-place lower Cholesky factor of a symmetric positive definite row-major `[n, n]` matrix given by its lower
/// triangle; the strictly upper triangle is set to zero. Left-looking by blocks of columns: each panel is updated by
/// one matrix product with the columns already factored, its diagonal block factored, and the rows below solved in
/// parallel. `Err(column)` when a pivot is not positive.
fn cholesky_lower(a: &mut [f64], n: usize) -> std::result::Result<(), usize> {
    let mut k0 = 0;
    while k0 < n {
        let k1 = (k0 + CHOLESKY_BLOCK).min(n);
        if k0 > 0 {
            let m = n - k0;
            let p = a.as_mut_ptr();
            // SAFETY: A[k0.., k0..k1] -= L[k0.., ..k0] L[k0..k1, ..k0]^T. All three views lie inside the n x n
            // matrix (row stride n); the destination's columns k0..k1 do not overlap the sources' columns ..k0.
            unsafe {
                gemm::gemm(
                    m,
                    k1 - k0,
                    k0,
                    p.add(k0 * n + k0),
                    1,
                    n as isize,
                    true,
                    p.add(k0 * n) as *const f64,
                    1,
                    n as isize,
                    p.add(k0 * n) as *const f64,
                    n as isize,
                    1,
                    1.0,
                    -1.0,
                    false,
                    false,
                    false,
                    parallelism(m * (k1 - k0) * k0),
                );
            }
        }
        for j in k0..k1 {
            let pivot = a[j * n + j] - dot(&a[j * n + k0..j * n + j], &a[j * n + k0..j * n + j]);
            if !(pivot > 0.0 && pivot.is_finite()) {
                return Err(j);
            }
            let ljj = pivot.sqrt();
            a[j * n + j] = ljj;
            for i in j + 1..k1 {
                let s = dot(&a[i * n + k0..i * n + j], &a[j * n + k0..j * n + j]);
                a[i * n + j] = (a[i * n + j] - s) / ljj;
            }
        }
        let (top, bottom) = a.split_at_mut(k1 * n);
        let block = &top[k0 * n..];
        bottom.par_chunks_mut(n).with_min_len(16).for_each(|row| {
            for j in k0..k1 {
                let lj = &block[(j - k0) * n..(j - k0 + 1) * n];
                let s = dot(&row[k0..j], &lj[k0..j]);
                row[j] = (row[j] - s) / lj[j];
            }
        });
        k0 = k1;
    }
    for (i, row) in a.chunks_mut(n).enumerate() {
        row[i + 1..].fill(0.0);
    }
    Ok(())
}

/// Dot product with four partial sums (lets the compiler vectorise it; a single sum is a chain of dependent
/// additions). AWQ's output-error search uses it too.
pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((a, p), q) in acc.iter_mut().zip(x).zip(y) {
            *a += p * q;
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Products too small to be worth spreading over threads stay on the calling one.
fn parallelism(multiply_adds: usize) -> gemm::Parallelism {
    if multiply_adds < 1 << 20 || rayon::current_num_threads() < 2 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `(scale, zero)` of one group (zero 0 when symmetric), before rounding to the storage type.
fn group_params(group: &[f32], layout: &Layout, how: GroupParams, hqq_options: &HqqOptions) -> (f32, f32) {
    let bits = layout.bits;
    match (how, layout.symmetric) {
        (GroupParams::MinMax, true) => (int::absmax_scale(group, bits), 0.0),
        (GroupParams::MinMax, false) => int::minmax_params(group, bits),
        (GroupParams::Mse | GroupParams::Hqq, true) => mse_symmetric(group, bits),
        (GroupParams::Mse, false) => mse_affine(group, bits),
        (GroupParams::Hqq, false) => hqq::optimize_group(group, bits, hqq_options),
    }
}

/// Range factors tried by [`GroupParams::Mse`].
fn shrink_factors() -> impl Iterator<Item = f32> {
    (0..=20).map(|k| 1.0 - 0.025 * k as f32)
}

fn mse_symmetric(group: &[f32], bits: u32) -> (f32, f32) {
    let absmax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let first = int::absmax_scale(group, bits);
    if absmax == 0.0 {
        return (first, 0.0);
    }
    let qmax = int::symmetric_qmax(bits) as f32;
    let error = |s: f32| -> f64 {
        group
            .iter()
            .map(|&x| {
                let e = (x - int::symmetric_code(x, s, qmax) * s) as f64;
                e * e
            })
            .sum()
    };
    let mut best = (first, error(first));
    for factor in shrink_factors().skip(1) {
        let s = absmax * factor / qmax;
        let e = error(s);
        if e < best.1 {
            best = (s, e);
        }
    }
    (best.0, 0.0)
}

fn mse_affine(group: &[f32], bits: u32) -> (f32, f32) {
    let first = int::minmax_params(group, bits);
    let (min, max) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    if max <= min {
        return first;
    }
    let qmax = int::affine_qmax(bits) as f32;
    let mut best = (first, int::affine_sq_error(group, first.0, first.1, bits));
    for factor in shrink_factors().skip(1) {
        let (lo, hi) = (min * factor, max * factor);
        let s = (hi - lo) / qmax;
        if s > 0.0 && s.is_finite() {
            let z = -lo / s;
            let e = int::affine_sq_error(group, s, z, bits);
            if e < best.1 {
                best = ((s, z), e);
            }
        }
    }
    best.0
}

/// Parameters of every group from the (dead-column-zeroed) original weights, row-major `[rows, groups]`.
fn static_params<F>(weights: &[f32], layout: &Layout, search: &F) -> Vec<(f32, f32)>
where
    F: Fn(&[f32]) -> (f32, f32) + Sync,
{
    let groups = layout.groups();
    let mut out = vec![(0f32, 0f32); layout.rows * groups];
    out.par_chunks_mut(groups).enumerate().for_each(|(r, row_params)| {
        let row = &weights[r * layout.cols..(r + 1) * layout.cols];
        for (g, p) in row_params.iter_mut().enumerate() {
            let start = g * layout.group_size;
            *p = search(&row[start..(start + layout.group_size).min(layout.cols)]);
        }
    });
    out
}

/// The storage type for these parameters and the parameters rounded to it (as [`int::quantize_grouped`] does).
fn round_params(params: Vec<(f32, f32)>, symmetric: bool) -> (ParamDtype, Vec<GroupParam>) {
    let scales: Vec<f32> = params.iter().map(|p| p.0).collect();
    let zeros: Vec<f32> = if symmetric {
        Vec::new()
    } else {
        params.iter().map(|p| p.1).collect()
    };
    let dtype = int::choose_param_dtype(&scales, &zeros);
    let rounded = params
        .into_iter()
        .map(|(s, z)| rounded_param(s, z, dtype, symmetric))
        .collect();
    (dtype, rounded)
}

fn rounded_param(scale: f32, zero: f32, dtype: ParamDtype, symmetric: bool) -> GroupParam {
    let zero = if symmetric { 0.0 } else { zero };
    GroupParam {
        scale: dtype.round(scale),
        zero: dtype.round(zero),
        raw_scale: scale,
        raw_zero: zero,
    }
}

/// The parameters as found, before rounding: (scales, zeros; empty when symmetric).
fn raw_params(params: &[GroupParam], symmetric: bool) -> (Vec<f32>, Vec<f32>) {
    let scales = params.iter().map(|p| p.raw_scale).collect();
    let zeros = if symmetric {
        Vec::new()
    } else {
        params.iter().map(|p| p.raw_zero).collect()
    };
    (scales, zeros)
}

/// The GPTQ loop over the columns, in `order`. `factor` is `V` of [`hessian_factor`]; `ordered` the weights with
/// their columns in `order`. `acc[r][j]` holds `sum_i (w_ri - q_ri) V_ij` over the columns `i` rounded so far whose
/// error has reached column `j`; column `j` is rounded from `w_rj + acc[r][j] / V_jj`.
#[allow(clippy::too_many_arguments)]
fn run_columns<F>(
    layout: &Layout,
    factor: &[f64],
    ordered: &[f32],
    order: &[usize],
    params: Params,
    dtype: ParamDtype,
    block_size: usize,
    search: &F,
) -> Pass
where
    F: Fn(&[f32]) -> (f32, f32) + Sync,
{
    let (rows, n, g) = (layout.rows, layout.cols, layout.group_size);
    let groups = layout.groups();
    let (dynamic, mut params) = match params {
        Params::Fixed(p) => (false, p),
        Params::Dynamic => (true, vec![GroupParam::default(); rows * groups]),
    };
    let symmetric = layout.symmetric;
    let qmax = if symmetric {
        int::symmetric_qmax(layout.bits) as f32
    } else {
        int::affine_qmax(layout.bits) as f32
    };
    let v_diag: Vec<f64> = (0..n).map(|j| factor[j * n + j]).collect();
    let mut acc = vec![0f64; rows * n];
    let mut errors = vec![0f64; rows * block_size];
    let mut codes = vec![0u8; rows * n];
    let mut b0 = 0;
    while b0 < n {
        // Blocks also end where a dynamic group starts, so that every earlier error has reached the whole group.
        let mut b1 = (b0 / block_size + 1) * block_size;
        if dynamic {
            b1 = b1.min((b0 / g + 1) * g);
        }
        let b1 = b1.min(n);
        let group_start = dynamic && b0.is_multiple_of(g);
        acc.par_chunks_mut(n)
            .zip(errors.par_chunks_mut(block_size))
            .zip(codes.par_chunks_mut(n))
            .zip(params.par_chunks_mut(groups))
            .enumerate()
            .for_each(|(r, (((acc, errors), codes), params))| {
                let w = &ordered[r * n..(r + 1) * n];
                if group_start {
                    let end = (b0 + g).min(n);
                    let current = updated_group(w, acc, factor, n, b0, end);
                    let (s, z) = search(&current);
                    params[b0 / g] = rounded_param(s, z, dtype, symmetric);
                }
                for j in b0..b1 {
                    let column = order[j];
                    let p = params[column / g];
                    let target = (w[j] as f64 + acc[j] / v_diag[j]) as f32;
                    let (code, q) = if symmetric {
                        let c = int::symmetric_code(target, p.scale, qmax);
                        (c as i8 as u8, c * p.scale)
                    } else {
                        let c = int::affine_code(target, p.scale, p.zero, qmax);
                        (c as u8, (c - p.zero) * p.scale)
                    };
                    codes[column] = code;
                    let e = w[j] as f64 - q as f64;
                    errors[j - b0] = e;
                    let v_row = &factor[j * n..(j + 1) * n];
                    for (a, v) in acc[j + 1..b1].iter_mut().zip(&v_row[j + 1..b1]) {
                        *a += e * v;
                    }
                }
            });
        if b1 < n {
            let (m, k) = (n - b1, b1 - b0);
            // SAFETY: acc[:, b1..] (rows x m, row stride n) += errors[:, ..k] (rows x k, row stride block_size)
            // V[b0..b1, b1..] (k x m, row stride n); all in bounds, the destination is a separate buffer.
            unsafe {
                gemm::gemm(
                    rows,
                    m,
                    k,
                    acc.as_mut_ptr().add(b1),
                    1,
                    n as isize,
                    true,
                    errors.as_ptr(),
                    1,
                    block_size as isize,
                    factor.as_ptr().add(b0 * n + b1),
                    1,
                    n as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(rows * m * k),
                );
            }
        }
        b0 = b1;
    }
    Pass { codes, params, dtype }
}

/// The weights of columns `t..end` of one row once the errors of every column before `t` are compensated: `w + x`
/// with `x V[t..end, t..end] = acc[t..end]` (the optimal update of the columns not yet rounded, restricted to these).
fn updated_group(w: &[f32], acc: &[f64], factor: &[f64], n: usize, t: usize, end: usize) -> Vec<f32> {
    if acc[t..end].iter().all(|&a| a == 0.0) {
        return w[t..end].to_vec();
    }
    let mut rest = acc[t..end].to_vec();
    let mut out = Vec::with_capacity(end - t);
    for m in 0..end - t {
        let v_row = &factor[(t + m) * n + t..(t + m + 1) * n];
        let x = rest[m] / v_row[m];
        out.push((w[t + m] as f64 + x) as f32);
        for (r, v) in rest[m + 1..].iter_mut().zip(&v_row[m + 1..end - t]) {
            *r -= x * v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testing::{SplitMix, trained_like};
    use crate::quant::{Level, Method, rtn};

    fn recipe(level: Level, g: Option<usize>, sym: Option<bool>) -> Recipe {
        Recipe::new(level, Method::Gptq, g, sym, vec![]).unwrap()
    }

    fn rtn_recipe(level: Level, g: Option<usize>, sym: Option<bool>) -> Recipe {
        Recipe::new(level, Method::Rtn, g, sym, vec![]).unwrap()
    }

    fn hqq_recipe(level: Level, g: Option<usize>) -> Recipe {
        Recipe::new(level, Method::Hqq, g, Some(false), vec![]).unwrap()
    }

    /// Calibration inputs `[samples, cols]` shaped like a layer's: a low-rank common part (columns correlated), a mean
    /// per channel, a log-normal scale per channel and 2% of the channels 10x larger (outlier channels).
    fn calibration_inputs(samples: usize, cols: usize, seed: u64) -> Vec<f32> {
        calibration_inputs_with(samples, cols, seed, 0.02)
    }

    /// [`calibration_inputs`] with a given fraction of 10x channels.
    fn calibration_inputs_with(samples: usize, cols: usize, seed: u64, outliers: f64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        let factors = (cols / 16).max(2);
        let mixing: Vec<f64> = (0..factors * cols)
            .map(|_| rng.normal() / (factors as f64).sqrt())
            .collect();
        let scale: Vec<f64> = (0..cols)
            .map(|_| {
                let s = (0.5 * rng.normal()).exp();
                if rng.uniform() < outliers { 10.0 * s } else { s }
            })
            .collect();
        let mean: Vec<f64> = (0..cols).map(|_| 0.3 * rng.normal()).collect();
        let mut x = Vec::with_capacity(samples * cols);
        let mut common = vec![0f64; cols];
        for _ in 0..samples {
            common.fill(0.0);
            for f in 0..factors {
                let z = rng.normal();
                for (c, m) in common.iter_mut().zip(&mixing[f * cols..(f + 1) * cols]) {
                    *c += z * m;
                }
            }
            for j in 0..cols {
                x.push(((common[j] + 0.5 * rng.normal() + mean[j]) * scale[j]) as f32);
            }
        }
        x
    }

    /// `2 X^T X / samples` in f64.
    fn hessian_of(x: &[f32], samples: usize, cols: usize) -> Vec<f64> {
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let mut h = vec![0f64; cols * cols];
        // SAFETY: h (cols x cols) = X^T (cols x samples, read with strides of X) X (samples x cols).
        unsafe {
            gemm::gemm(
                cols,
                cols,
                samples,
                h.as_mut_ptr(),
                1,
                cols as isize,
                false,
                x64.as_ptr(),
                cols as isize,
                1,
                x64.as_ptr(),
                1,
                cols as isize,
                0.0,
                2.0 / samples as f64,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        h
    }

    /// `tr(dW H dW^T) / tr(W H W^T)`: the layer's output error relative to its output.
    fn output_error(w: &[f32], deq: &[f32], cols: usize, h: &[f64]) -> f64 {
        let quad = |d: &[f64]| -> f64 {
            (0..cols)
                .map(|i| {
                    d[i] * h[i * cols..(i + 1) * cols]
                        .iter()
                        .zip(d)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
                })
                .sum()
        };
        let (mut num, mut den) = (0f64, 0f64);
        for (row, approx) in w.chunks(cols).zip(deq.chunks(cols)) {
            let d: Vec<f64> = row.iter().zip(approx).map(|(a, b)| (a - b) as f64).collect();
            let r: Vec<f64> = row.iter().map(|&a| a as f64).collect();
            num += quad(&d);
            den += quad(&r);
        }
        num / den
    }

    fn gptq_error(w: &[f32], rows: usize, cols: usize, recipe: &Recipe, h: &[f64], options: &GptqOptions) -> f64 {
        let q = quantize_with_hessian(w, rows, cols, recipe, h, options).unwrap();
        output_error(w, &q.dequantize(), cols, h)
    }

    fn method_error(w: &[f32], rows: usize, cols: usize, recipe: &Recipe, h: &[f64]) -> f64 {
        let q = crate::quant::quantize_weight("w", w, rows, cols, recipe).unwrap();
        output_error(w, &q.dequantize(), cols, h)
    }

    fn identity(cols: usize) -> Vec<f64> {
        let mut h = vec![0f64; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0;
        }
        h
    }

    #[test]
    fn identity_hessian_reproduces_rtn_exactly() {
        let rows = 7;
        for cols in [1usize, 64, 100, 257] {
            let w = trained_like(rows, cols, cols as u64);
            let tiny: Vec<f32> = w.iter().map(|v| v * 1e-6).collect();
            let h = identity(cols);
            for (level, g, sym) in [
                (Level::Int8, None, None),
                (Level::Int4, Some(64), Some(false)),
                (Level::Int2, Some(32), None),
                (Level::Int4, Some(16), Some(true)),
            ] {
                for weights in [&w, &tiny] {
                    let expected = rtn::quantize(weights, rows, cols, &rtn_recipe(level, g, sym), None).unwrap();
                    for (act_order, static_groups, block_size) in [
                        (false, false, 128),
                        (false, true, 128),
                        (true, false, 128),
                        (false, false, 5),
                    ] {
                        let options = GptqOptions {
                            act_order,
                            static_groups,
                            block_size,
                            group_params: GroupParams::MinMax,
                            ..GptqOptions::default()
                        };
                        let q =
                            quantize_with_hessian(weights, rows, cols, &recipe(level, g, sym), &h, &options).unwrap();
                        assert_eq!(
                            q, expected,
                            "{level} g{g:?} cols {cols} act_order {act_order} static {static_groups}"
                        );
                    }
                }
            }
        }
        // The tiny weights needed f32 parameters (scales below f16's normal range): the redo path ran.
        let tiny: Vec<f32> = trained_like(2, 64, 1).iter().map(|v| v * 1e-6).collect();
        let q = quantize_with_hessian(
            &tiny,
            2,
            64,
            &recipe(Level::Int4, Some(32), None),
            &identity(64),
            &GptqOptions::default(),
        )
        .unwrap();
        assert_eq!(q.param_dtype, ParamDtype::F32);
    }

    /// The paper's Algorithm 1 written out directly: dense `H^-1`, its upper Cholesky factor `U`, one column at a
    /// time with every update applied at once; a group's parameters from the current weights when its first column
    /// is reached (or fixed beforehand when `static_groups`). Min/max parameters rounded to f16. Returns the
    /// dequantized weights.
    fn reference_gptq(
        w: &[f32],
        rows: usize,
        cols: usize,
        h: &[f64],
        g: usize,
        bits: u32,
        static_groups: bool,
    ) -> Vec<f32> {
        let n = cols;
        let mean = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
        let mut a: Vec<f64> = h.to_vec();
        for i in 0..n {
            a[i * n + i] += 0.01 * mean;
        }
        // Gauss-Jordan inverse.
        let mut inv = identity(n);
        for c in 0..n {
            let p = a[c * n + c];
            for k in 0..n {
                a[c * n + k] /= p;
                inv[c * n + k] /= p;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for k in 0..n {
                        a[r * n + k] -= f * a[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        // Lower Cholesky of H^-1, transposed: U with U^T U = H^-1.
        let mut l = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let s: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
                l[i * n + j] = if i == j {
                    (inv[i * n + i] - s).sqrt()
                } else {
                    (inv[i * n + j] - s) / l[j * n + j]
                };
            }
        }
        let u = |i: usize, j: usize| l[j * n + i];
        let qmax = int::affine_qmax(bits) as f32;
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        let mut out = vec![0f32; rows * cols];
        for r in 0..rows {
            let mut cur: Vec<f64> = w[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
            let mut params = (0f32, 0f32);
            for j in 0..n {
                if j % g == 0 {
                    let source: Vec<f32> = if static_groups {
                        w[r * n + j..r * n + (j + g).min(n)].to_vec()
                    } else {
                        cur[j..(j + g).min(n)].iter().map(|&v| v as f32).collect()
                    };
                    let (s, z) = int::minmax_params(&source, bits);
                    params = (f16(s), f16(z));
                }
                let (s, z) = params;
                let q = (int::affine_code(cur[j] as f32, s, z, qmax) - z) * s;
                out[r * n + j] = q;
                let err = (cur[j] - q as f64) / u(j, j);
                for (k, c) in cur.iter_mut().enumerate().skip(j + 1) {
                    *c -= err * u(j, k);
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_papers_algorithm() {
        let (rows, cols, samples) = (12, 96, 400);
        let w = trained_like(rows, cols, 5);
        let h = hessian_of(&calibration_inputs(samples, cols, 6), samples, cols);
        for (g, static_groups) in [(32, false), (32, true), (96, false)] {
            let expected = reference_gptq(&w, rows, cols, &h, g, 4, static_groups);
            let options = GptqOptions {
                act_order: false,
                static_groups,
                block_size: 40,
                group_params: GroupParams::MinMax,
                ..GptqOptions::default()
            };
            let q = quantize_with_hessian(&w, rows, cols, &recipe(Level::Int4, Some(g), Some(false)), &h, &options)
                .unwrap();
            let deq = q.dequantize();
            // Float summation order may flip a code sitting on a rounding boundary; then the rows diverge a little.
            let same = deq.iter().zip(&expected).filter(|(a, b)| a == b).count();
            let (ours, theirs) = (output_error(&w, &deq, cols, &h), output_error(&w, &expected, cols, &h));
            println!(
                "g{g} static {static_groups}: {same}/{} equal, error {ours:.6} vs {theirs:.6}",
                deq.len()
            );
            assert!(
                same as f64 >= 0.98 * deq.len() as f64,
                "only {same} of {} values equal",
                deq.len()
            );
            assert!((ours - theirs).abs() <= 0.02 * theirs, "{ours} vs {theirs}");
        }
    }

    #[test]
    fn gptq_lowers_the_output_error_on_correlated_inputs() {
        let (rows, cols, samples) = (64, 256, 1024);
        let w = trained_like(rows, cols, 11);
        let h = hessian_of(&calibration_inputs(samples, cols, 12), samples, cols);
        for (level, g, sym, min_ratio) in [
            // Measured 5.2, 5.5 and 6.2.
            (Level::Int8, None, None, 3.5),
            (Level::Int4, Some(64), None, 3.5),
            (Level::Int2, Some(32), None, 4.0),
        ] {
            let rtn = method_error(&w, rows, cols, &rtn_recipe(level, g, sym), &h);
            let gptq = gptq_error(&w, rows, cols, &recipe(level, g, sym), &h, &GptqOptions::default());
            println!("{level} g{g:?}: rtn {rtn:.6} gptq {gptq:.6} ratio {:.2}", rtn / gptq);
            assert!(
                rtn / gptq >= min_ratio,
                "{level}: rtn {rtn} / gptq {gptq} < {min_ratio}"
            );
        }
    }

    #[test]
    fn act_order_on_and_off_both_beat_rtn() {
        let (rows, cols, samples) = (32, 192, 768);
        let w = trained_like(rows, cols, 21);
        let h = hessian_of(&calibration_inputs(samples, cols, 22), samples, cols);
        for (level, g) in [(Level::Int4, Some(64)), (Level::Int2, Some(32)), (Level::Int4, None)] {
            let rtn = method_error(&w, rows, cols, &rtn_recipe(level, g, None), &h);
            for act_order in [false, true] {
                let options = GptqOptions {
                    act_order,
                    ..GptqOptions::default()
                };
                let gptq = gptq_error(&w, rows, cols, &recipe(level, g, None), &h, &options);
                assert!(
                    gptq < 0.8 * rtn,
                    "{level} act_order {act_order}: gptq {gptq} vs rtn {rtn}"
                );
            }
        }
    }

    #[test]
    fn dead_inputs_get_zero_weight() {
        let (rows, cols, samples) = (16, 128, 512);
        let w = trained_like(rows, cols, 31);
        let mut x = calibration_inputs(samples, cols, 32);
        let dead = [0usize, 3, 50, 51, 127];
        for row in x.chunks_mut(cols) {
            for &d in &dead {
                row[d] = 0.0;
            }
        }
        let h = hessian_of(&x, samples, cols);
        for (level, g, sym) in [(Level::Int8, None, None), (Level::Int4, Some(32), None)] {
            let q = quantize_with_hessian(&w, rows, cols, &recipe(level, g, sym), &h, &GptqOptions::default()).unwrap();
            let deq = q.dequantize();
            let groups = q.groups_per_row();
            for r in 0..rows {
                for &d in &dead {
                    // Zero up to rounding of the affine zero point: at most half a step.
                    let s = q.scales[r * groups + d / q.group_size];
                    assert!(
                        deq[r * cols + d].abs() <= 0.5 * s * (1.0 + 1e-6),
                        "{level} row {r} col {d}"
                    );
                }
            }
            let rtn = method_error(&w, rows, cols, &rtn_recipe(level, g, sym), &h);
            assert!(output_error(&w, &deq, cols, &h) < rtn);
        }
        // A layer whose inputs were all zero: every weight goes to zero.
        let zero = vec![0f64; cols * cols];
        let q = quantize_with_hessian(
            &w,
            rows,
            cols,
            &recipe(Level::Int8, None, None),
            &zero,
            &GptqOptions::default(),
        )
        .unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_problem() {
        let (rows, cols) = (4, 8);
        let w = trained_like(rows, cols, 1);
        let r = recipe(Level::Int4, None, None);
        let options = GptqOptions::default();
        let message = |h: &[f64], w: &[f32], r: &Recipe, o: &GptqOptions| {
            quantize_with_hessian(w, rows, cols, r, h, o).unwrap_err().to_string()
        };
        let e = message(&identity(7), &w, &r, &options);
        assert!(
            e.contains("gptq Hessian") && e.contains("49 values") && e.contains("64"),
            "{e}"
        );
        let mut h = identity(cols);
        h[2 * cols + 3] = f64::NAN;
        let e = message(&h, &w, &r, &options);
        assert!(
            e.contains("gptq Hessian") && e.contains("row 2, column 3") && e.contains("not finite"),
            "{e}"
        );
        let mut h = identity(cols);
        h[5 * cols + 5] = f64::INFINITY;
        assert!(message(&h, &w, &r, &options).contains("not finite"));
        let mut h = identity(cols);
        h[cols + 1] = -1.0;
        let e = message(&h, &w, &r, &options);
        assert!(e.contains("diagonal value 1 is negative"), "{e}");
        // Indefinite (eigenvalues 1 +- 5): neither the damping nor its two retries (up to the mean diagonal) help.
        let mut h = identity(cols);
        h[1] = 5.0;
        h[cols] = 5.0;
        let e = message(&h, &w, &r, &options);
        assert!(e.contains("not positive definite") && e.contains("input column"), "{e}");
        let e = message(&identity(cols), &w[1..], &r, &options);
        assert!(e.contains("gptq") && e.contains("31 weight values"), "{e}");
        let e = message(&identity(cols), &w, &Recipe::level_default(Level::F16), &options);
        assert!(e.contains("gptq") && e.contains("integer levels only"), "{e}");
        // The recipe itself refuses gptq for float levels, before any weight is seen.
        let e = Recipe::new(Level::F8E4m3, Method::Gptq, None, None, vec![])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gptq applies to integer levels only"), "{e}");
        let bad = GptqOptions {
            damp: -1.0,
            ..GptqOptions::default()
        };
        assert!(message(&identity(cols), &w, &r, &bad).contains("damp"));
        let bad = GptqOptions {
            block_size: 0,
            ..GptqOptions::default()
        };
        assert!(message(&identity(cols), &w, &r, &bad).contains("block_size"));
        // The QuantizeFn entry point: statistics and their Hessian are required.
        let e = quantize(&w, rows, cols, &r, None).unwrap_err().to_string();
        assert!(e.contains("gptq") && e.contains("calibration statistics"), "{e}");
        let stats = LayerStats::new(cols, crate::quant::StatsNeeds::default());
        let e = quantize(&w, rows, cols, &r, Some(&stats)).unwrap_err().to_string();
        assert!(e.contains("gptq") && e.contains("no Hessian"), "{e}");
        // Through the method table, the weight's name leads.
        let e = crate::quant::quantize_weight_with("blk.fc", &w, rows, cols, &r, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.fc") && e.contains("gptq"), "{e}");
    }

    #[test]
    fn quantize_reads_the_mean_hessian_of_the_statistics() {
        let (rows, cols, samples) = (8, 48, 200);
        let w = trained_like(rows, cols, 41);
        let x = calibration_inputs(samples, cols, 42);
        let needs = crate::quant::StatsNeeds {
            hessian: true,
            histogram: false,
        };
        let mut stats = LayerStats::new(cols, needs);
        stats.observe(&x, None);
        let r = recipe(Level::Int4, Some(16), None);
        let via_stats = quantize(&w, rows, cols, &r, Some(&stats)).unwrap();
        let direct = quantize_with_hessian(
            &w,
            rows,
            cols,
            &r,
            &stats.hessian_mean().unwrap(),
            &GptqOptions::default(),
        )
        .unwrap();
        assert_eq!(via_stats, direct);
        // The tensor saves and reloads like any other (no calibration data needed).
        let tensors = via_stats.to_tensors("w");
        assert!(tensors.iter().any(|t| t.0 == "w.qdata") && tensors.iter().any(|t| t.0 == "w.zero"));
    }

    #[test]
    fn int4_dyn_gets_symmetric_per_channel_codes_the_int8_gemm_can_run() {
        let (rows, cols, samples) = (16, 96, 400);
        let w = trained_like(rows, cols, 51);
        let x = calibration_inputs(samples, cols, 52);
        let h = hessian_of(&x, samples, cols);
        let r = recipe(Level::Int4Dyn, None, None);
        assert_eq!(r.label(), "int4-dyn-gptq");
        let q = quantize_with_hessian(&w, rows, cols, &r, &h, &GptqOptions::default()).unwrap();
        // One scale per output channel, no zero point: what W8A8Weight packs for the int8 GEMM.
        assert_eq!((q.format, q.symmetric, q.group_size), (Format::Int4, true, cols));
        assert_eq!((q.scales.len(), q.zeros.len()), (rows, 0));
        let rtn = method_error(&w, rows, cols, &rtn_recipe(Level::Int4Dyn, None, None), &h);
        let gptq = gptq_error(&w, rows, cols, &r, &h, &GptqOptions::default());
        assert!(gptq < rtn, "int4-dyn: gptq {gptq} not below rtn {rtn}");
    }

    /// Prints the relative output error of rtn, hqq and GPTQ's variants on trained-like layers (the measurements
    /// behind the defaults in the module docs). `cargo test --lib gptq::tests::measure_options -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "measurement, prints a table"]
    fn measure_options() {
        for (rows, cols, outliers) in [(256, 1024, 0.02), (256, 1024, 0.0), (128, 2048, 0.02)] {
            let samples = 4 * cols;
            let w = trained_like(rows, cols, 42);
            let h = hessian_of(&calibration_inputs_with(samples, cols, 43, outliers), samples, cols);
            println!(
                "{rows} x {cols}, {samples} inputs, {:.0}% 10x channels",
                outliers * 100.0
            );
            for (level, g, sym) in [
                (Level::Int4, Some(64), None),
                (Level::Int2, Some(32), None),
                (Level::Int8, None, None),
                (Level::Int4, Some(128), Some(true)),
            ] {
                let rtn = method_error(&w, rows, cols, &rtn_recipe(level, g, sym), &h);
                let r = recipe(level, g, sym);
                print!("  {}: rtn {rtn:.3e}", r.label());
                if !r.is_symmetric() {
                    let hqq = method_error(&w, rows, cols, &hqq_recipe(level, g), &h);
                    print!(" hqq {hqq:.3e} (rtn / hqq {:.2})", rtn / hqq);
                }
                println!();
                let mut variants = Vec::new();
                for group_params in [GroupParams::MinMax, GroupParams::Mse, GroupParams::Hqq] {
                    for (act_order, static_groups) in [(false, false), (false, true), (true, true)] {
                        variants.push((group_params, act_order, static_groups, 0.01));
                    }
                }
                variants.push((GroupParams::Hqq, true, true, 0.001));
                variants.push((GroupParams::Hqq, true, true, 0.1));
                for (group_params, act_order, static_groups, damp) in variants {
                    let options = GptqOptions {
                        damp,
                        act_order,
                        static_groups,
                        group_params,
                        ..GptqOptions::default()
                    };
                    let e = gptq_error(&w, rows, cols, &r, &h, &options);
                    println!(
                        "    {group_params:?} act_order {act_order} static {static_groups} damp {damp}: {e:.3e} \
                         (rtn / gptq {:.2})",
                        rtn / e
                    );
                }
            }
        }
    }

    /// Timing of the largest SegFormer-B0 shapes. `cargo test --release --lib gptq::tests::timing -- --ignored
    /// --nocapture`
    #[test]
    #[ignore = "timing, prints"]
    fn timing() {
        for (rows, cols) in [(256, 2048), (32, 2048), (256, 1024)] {
            let w = trained_like(rows, cols, 7);
            let samples = 2 * cols;
            let h = hessian_of(&calibration_inputs(samples, cols, 8), samples, cols);
            let mut a: Vec<f64> = h.clone();
            let start = std::time::Instant::now();
            cholesky_lower(&mut a, cols).unwrap();
            let cholesky = start.elapsed();
            for (level, g) in [(Level::Int4, Some(64)), (Level::Int8, None)] {
                let start = std::time::Instant::now();
                let q = quantize_with_hessian(&w, rows, cols, &recipe(level, g, None), &h, &GptqOptions::default())
                    .unwrap();
                println!(
                    "{rows} x {cols} {}: {:.3} s (Cholesky alone {:.3} s, {} threads)",
                    q.format_name(),
                    start.elapsed().as_secs_f64(),
                    cholesky.as_secs_f64(),
                    rayon::current_num_threads()
                );
            }
        }
    }
}
