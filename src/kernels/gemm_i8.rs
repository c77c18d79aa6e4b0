//! W8A8 int8 GEMM for quantized Linear and 1x1-conv layers: `out[M,N] = x[M,K] * W[N,K]^T + bias`, with `W` int8
//! codes with one f32 scale per output row, packed once at load time ([`I8Panels::pack`]), and `x` quantized to
//! codes in [-127, 127] either per row at run time (symmetric absmax, [`gemm_i8_dynamic`], level `int8-dyn`) or with
//! one per-tensor scale fixed by calibration ([`gemm_i8_static`], level `int8-static`: no absmax pass).
//!
//! AVX2 has no signed x signed byte multiply: `_mm256_maddubs_epi16` multiplies unsigned by signed bytes and sums
//! pairs into saturating i16. The kernel feeds it `|x|` and `w * sign(x)` (`_mm256_sign_epi8`), whose pair sums are at
//! most 2 * 127 * 127 = 32258 < 32767, so nothing saturates and accumulators are exact; `_mm256_madd_epi16` with
//! ones widens to i32. That needs weight codes in [-127, 127] (the negation of -128 does not fit), which `pack`
//! checks.
//!
//! With VNNI (`vpdpbusd`: unsigned x signed bytes, four products summed straight into i32, no i16 step) the
//! activations are shifted to unsigned (`code + 128`, one bit flip) and the shift is taken back with each column's
//! code sum, precomputed at pack time: `sum (x + 128) w = sum x w + 128 sum w`. One instruction replaces four, and
//! the accumulators are the same integers as on the AVX2 path.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{as_uninit, filled_vec};
use crate::{Error, Result};

/// Output columns per packed panel (two AVX2 vectors of eight i32 lanes).
const NR: usize = 16;
/// Rows per micro-tile.
const MR: usize = 4;
/// Rows per parallel task: their quantized activations (MB * K bytes) stay in L2 while every panel passes over them.
const MB: usize = 64;

/// Int8 weights `[N, K]` with a scale per output row, re-laid out for the kernel: panels of 16 output columns, and
/// within a panel, for every group of four `k`, 16 x 4 consecutive codes (each 32-bit lane = four `k` of one column).
/// `K` is padded to a multiple of four and `N` to a multiple of 16 with zero codes.
#[derive(Clone, Debug)]
pub struct I8Panels {
    n: usize,
    k: usize,
    k4: usize,
    panels: Vec<i8>,
    scales: Vec<f32>,
    /// `128 * sum_k code[n, k]` per (padded) output column: the VNNI path's correction for unsigned activations.
    shifted_col_sums: Vec<i32>,
}

impl I8Panels {
    /// Packs row-major codes `[n, k]` (one row per output channel) and their per-row scales.
    /// Codes must lie in [-127, 127] (symmetric quantization).
    pub fn pack(codes: &[i8], scales: &[f32], n: usize, k: usize) -> Result<I8Panels> {
        if codes.len() != n * k || scales.len() != n {
            return Err(Error::invalid(
                "I8Panels::pack",
                format!(
                    "{} codes and {} scales given for N={n} K={k} (want {} and {n})",
                    codes.len(),
                    scales.len(),
                    n * k
                ),
            ));
        }
        if let Some(pos) = codes.iter().position(|&c| c == i8::MIN) {
            return Err(Error::invalid(
                "I8Panels::pack",
                format!(
                    "code -128 at row {} column {}; int8 weight codes must be symmetric, in [-127, 127]",
                    pos / k.max(1),
                    pos % k.max(1)
                ),
            ));
        }
        let k4 = k.div_ceil(4) * 4;
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0i8; n_panels * NR * k4];
        for row in 0..n {
            let (p, j) = (row / NR, row % NR);
            for kk in 0..k {
                panels[(p * k4 / 4 + kk / 4) * NR * 4 + j * 4 + kk % 4] = codes[row * k + kk];
            }
        }
        let mut shifted_col_sums = vec![0i32; n_panels * NR];
        for (row, sum) in shifted_col_sums.iter_mut().enumerate().take(n) {
            *sum = 128 * codes[row * k..(row + 1) * k].iter().map(|&c| c as i32).sum::<i32>();
        }
        Ok(I8Panels {
            n,
            k,
            k4,
            panels,
            scales: scales.to_vec(),
            shifted_col_sums,
        })
    }

    /// Output features (rows of the original weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Per-output-row scales.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Bytes held by the packed codes, scales and column sums (for memory reports).
    pub fn nbytes(&self) -> usize {
        self.panels.len() + self.scales.len() * 4 + self.shifted_col_sums.len() * 4
    }

    /// The code of output row `row`, input column `col`, read back from the packed layout.
    pub fn code(&self, row: usize, col: usize) -> i8 {
        let (p, j) = (row / NR, row % NR);
        self.panels[(p * self.k4 / 4 + col / 4) * NR * 4 + j * 4 + col % 4]
    }

    fn panel(&self, p: usize) -> &[i8] {
        let len = self.k4 * NR;
        &self.panels[p * len..(p + 1) * len]
    }
}

/// Activations already quantized per row for the int8 GEMM ([`gemm_i8_quantized`]), written by the kernel that
/// produces them (fused attention's softmax, Mix-FFN's depthwise conv + GELU) instead of by a separate pass over a
/// float matrix. Codes and scales are exactly those of [`quantize_rows_i8`]; each row is padded to a multiple of
/// four codes (the padding multiplies zero weights), and on the VNNI path rows hold the codes shifted to unsigned
/// (`code + 128`, top bit flipped), as the micro-kernels read them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedRows {
    codes: Vec<i8>,
    scales: Vec<f32>,
    rows: usize,
    k: usize,
    stride: usize,
    shifted: bool,
}

impl QuantizedRows {
    /// `rows` rows of `k` zero codes (scale 0), laid out for the int8 GEMM path this CPU takes.
    pub fn zeros(rows: usize, k: usize) -> QuantizedRows {
        let stride = k.div_ceil(4) * 4;
        QuantizedRows {
            codes: vec![0; rows * stride],
            scales: vec![0.0; rows],
            rows,
            k,
            stride,
            shifted: codes_shifted(),
        }
    }

    /// Quantizes each row of `x` `[rows, k]` as [`quantize_rows_i8`] does (the separate pass).
    pub fn quantize(x: &[f32], rows: usize, k: usize) -> Result<QuantizedRows> {
        if x.len() != rows * k {
            return Err(Error::invalid(
                "QuantizedRows::quantize",
                format!("input has {} values, want rows*K = {rows}*{k}", x.len()),
            ));
        }
        let mut q = QuantizedRows::zeros(rows, k);
        let shifted = q.shifted;
        q.par_rows_mut(1).enumerate().for_each(|(r, (codes, scales))| {
            scales[0] = quantize_row_for_gemm(&x[r * k..(r + 1) * k], &mut codes[..k], shifted);
        });
        Ok(q)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Codes per row (input features of the product).
    pub fn k(&self) -> usize {
        self.k
    }

    /// One scale per row: `absmax / 127`.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The signed code of row `row`, column `col`, whatever the layout.
    pub fn code(&self, row: usize, col: usize) -> i8 {
        let c = self.codes[row * self.stride + col];
        if self.shifted { c ^ i8::MIN } else { c }
    }

    /// True when rows hold shifted codes (the VNNI layout); producers pass it to [`quantize_row_for_gemm`].
    pub(crate) fn shifted(&self) -> bool {
        self.shifted
    }

    /// Codes per row as stored (`k` rounded up to four).
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// Blocks of `rows_per_block` rows in parallel: (their codes, `stride` per row, and their scales).
    pub(crate) fn par_rows_mut(
        &mut self,
        rows_per_block: usize,
    ) -> impl IndexedParallelIterator<Item = (&mut [i8], &mut [f32])> {
        let block = rows_per_block.max(1);
        self.codes
            .par_chunks_mut((block * self.stride).max(1))
            .zip(self.scales.par_chunks_mut(block))
    }
}

/// Scalar reference of [`quantize_row_for_gemm`].
pub(crate) fn quantize_row_for_gemm_scalar(x: &[f32], codes: &mut [i8], shifted: bool) -> f32 {
    let scale = quantize_row_scalar(x, codes);
    if shifted {
        codes.iter_mut().for_each(|c| *c ^= i8::MIN);
    }
    scale
}

/// True when the int8 GEMM reads shifted (unsigned) activation codes: the VNNI path.
pub(crate) fn codes_shifted() -> bool {
    vnni_kind().is_some()
}

/// Quantizes one row as the GEMM reads it: [`quantize_row`]'s codes (flipped to unsigned when `shifted`) and scale.
pub(crate) fn quantize_row_for_gemm(x: &[f32], codes: &mut [i8], shifted: bool) -> f32 {
    quantize_row_flipped(x, codes, code_flip(shifted))
}

/// What a signed code is XORed with to be stored in the layout the GEMM reads: `i8::MIN` when `shifted` (code + 128
/// as an unsigned byte is the code with its top bit flipped), else 0.
pub(crate) fn code_flip(shifted: bool) -> i8 {
    if shifted { i8::MIN } else { 0 }
}

/// Quantizes each row of `x` `[m, k]` to int8: `scale = absmax / 127`, `code = round_half_even(x * 127 / absmax)`.
/// Returns codes `[m, k]` and one scale per row (0 for an all-zero row, whose codes are all 0).
pub fn quantize_rows_i8(x: &[f32], m: usize, k: usize) -> Result<(Vec<i8>, Vec<f32>)> {
    if x.len() != m * k {
        return Err(Error::invalid(
            "quantize_rows_i8",
            format!("input has {} values, want M*K = {m}*{k}", x.len()),
        ));
    }
    let mut codes = vec![0i8; m * k];
    let mut scales = vec![0f32; m];
    for r in 0..m {
        scales[r] = quantize_row(&x[r * k..(r + 1) * k], &mut codes[r * k..(r + 1) * k]);
    }
    Ok((codes, scales))
}

/// Quantizes one row into `codes` (same length); returns its scale. AVX2 when available; same results either way.
pub(super) fn quantize_row(x: &[f32], codes: &mut [i8]) -> f32 {
    quantize_row_flipped(x, codes, 0)
}

/// [`quantize_row`] with every code XORed with `flip` as it is stored (`i8::MIN`: the VNNI path's unsigned codes).
fn quantize_row_flipped(x: &[f32], codes: &mut [i8], flip: i8) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 (checked above); `codes` is as long as `x`.
        return unsafe { avx2::quantize_row(x, codes, flip) };
    }
    let scale = quantize_row_scalar(x, codes);
    codes.iter_mut().for_each(|c| *c ^= flip);
    scale
}

/// Scalar reference of the row quantizer.
pub(crate) fn quantize_row_scalar(x: &[f32], codes: &mut [i8]) -> f32 {
    let absmax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    if absmax == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    quantize_with_inverse_scalar(x, 127.0 / absmax, codes);
    absmax / 127.0
}

/// `codes = clamp(round_half_even(x * inv), -127, 127)`: the step both quantizers end with. AVX2 when available;
/// same results either way (NaN inputs give some code in [-127, 127]).
/// Codes are XORed with `flip` as they are stored.
fn quantize_with_inverse(x: &[f32], inv: f32, codes: &mut [i8], flip: i8) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 (checked above); `codes` is as long as `x`.
        return unsafe { avx2::quantize_with_inverse(x, inv, codes, flip) };
    }
    quantize_with_inverse_scalar(x, inv, codes);
    codes.iter_mut().for_each(|c| *c ^= flip);
}

pub(crate) fn quantize_with_inverse_scalar(x: &[f32], inv: f32, codes: &mut [i8]) {
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
}

/// The multiplier [`gemm_i8_static`] quantizes by: `1 / scale`, or 0 for a zero scale (an input calibrated as
/// always zero quantizes to zero codes). Errors on a negative or non-finite scale.
fn static_inverse(act_scale: f32) -> Result<f32> {
    if !(act_scale.is_finite() && act_scale >= 0.0) {
        return Err(Error::invalid(
            "gemm_i8_static",
            format!("activation scale {act_scale} (want a finite scale >= 0)"),
        ));
    }
    Ok(if act_scale > 0.0 { 1.0 / act_scale } else { 0.0 })
}

/// Quantizes `x` with one fixed scale, as [`gemm_i8_static`] does: `code = clamp(round_half_even(x / scale), -127,
/// 127)` (0 everywhere for a zero scale).
pub fn quantize_static_i8(x: &[f32], act_scale: f32) -> Result<Vec<i8>> {
    let inv = static_inverse(act_scale)?;
    let mut codes = vec![0i8; x.len()];
    quantize_with_inverse(x, inv, &mut codes, 0);
    Ok(codes)
}

fn check_gemm(x: usize, m: usize, k: usize, w: &I8Panels, bias: Option<&[f32]>, out: usize) -> Result<()> {
    if k != w.k || x != m * k || out != m * w.n || bias.is_some_and(|b| b.len() != w.n) {
        return Err(Error::invalid(
            "gemm_i8",
            format!(
                "shapes disagree: x has {x} values for M={m} K={k}, weight is N={} K={}, output has \
             {out} values (want {}), bias has {} (want {})",
                w.n,
                w.k,
                m * w.n,
                bias.map_or(0, |b| b.len()),
                w.n
            ),
        ));
    }
    Ok(())
}

/// The signature shared by [`gemm_i8_dynamic`] and [`gemm_i8_dynamic_scalar`], for kernels built on either (their
/// scalar references take the scalar one).
pub(crate) type GemmI8Fn = fn(&[f32], usize, usize, &I8Panels, Option<&[f32]>, &mut [f32]) -> Result<()>;

/// `out[M,N] = (sum_k q(x)[m,k] * w[n,k]) * sx[m] * sw[n] + bias[n]`, activations quantized per row on the fly.
/// Parallel over blocks of rows; VNNI or AVX2 when the CPU has them (same accumulators), else the scalar reference.
pub fn gemm_i8_dynamic(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the blocks write initialized floats only.
        gemm_blocks(x, k, w, bias, None, unsafe { as_uninit(out) }, quantize_row_flipped);
        return Ok(());
    }
    gemm_i8_dynamic_scalar(x, m, k, w, bias, out)
}

/// [`gemm_i8_dynamic`] into a new vector, plus `residual` `[M, N]` when given (added to each finished block: the
/// same sums as a separate pass). The SIMD path writes every output once, with no zeroing pass before.
pub fn gemm_i8_dynamic_vec(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_gemm(x.len(), m, k, w, bias, m * w.n)?;
    check_residual("gemm_i8_dynamic", residual, m * w.n)?;
    gemm_vec_with(x, m, k, w, bias, residual, quantize_row_flipped, |out| {
        gemm_i8_dynamic_scalar(x, m, k, w, bias, out)
    })
}

/// [`gemm_i8_static`] into a new vector, plus `residual` when given, as [`gemm_i8_dynamic_vec`].
pub fn gemm_i8_static_vec(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    act_scale: f32,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_gemm(x.len(), m, k, w, bias, m * w.n)?;
    check_residual("gemm_i8_static", residual, m * w.n)?;
    let inv = static_inverse(act_scale)?;
    let quantize = |src: &[f32], codes: &mut [i8], flip: i8| {
        quantize_with_inverse(src, inv, codes, flip);
        act_scale
    };
    gemm_vec_with(x, m, k, w, bias, residual, quantize, |out| {
        gemm_i8_static_scalar(x, m, k, w, act_scale, bias, out)
    })
}

/// The shared body of the `_vec` GEMMs (shapes checked by the caller): the SIMD blocks fill a fresh vector through
/// its spare capacity with the residual added per block; otherwise `scalar` fills a zeroed one and the residual is
/// added after.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn gemm_vec_with(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    quantize: impl Fn(&[f32], &mut [i8], i8) -> f32 + Sync,
    scalar: impl FnOnce(&mut [f32]) -> Result<()>,
) -> Result<Vec<f32>> {
    let len = m * w.n;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // SAFETY: the blocks write every output (shapes checked by the caller).
        return unsafe {
            filled_vec(len, |out| {
                gemm_blocks(x, k, w, bias, residual, out, quantize);
                Ok(())
            })
        };
    }
    let mut out = vec![0f32; len];
    scalar(&mut out)?;
    add_residual(&mut out, residual);
    Ok(out)
}

fn check_residual(what: &str, residual: Option<&[f32]>, out: usize) -> Result<()> {
    match residual {
        Some(r) if r.len() != out => Err(Error::invalid(
            what,
            format!("residual of {} values for an output of {out}", r.len()),
        )),
        _ => Ok(()),
    }
}

fn add_residual(out: &mut [f32], residual: Option<&[f32]>) {
    if let Some(r) = residual {
        out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
    }
}

/// Adds `residual` to a block of outputs the micro-kernels have written.
///
/// # Safety
/// Every value of `dst` is initialized; `residual` is as long as `dst`.
unsafe fn add_residual_written(dst: &mut [MaybeUninit<f32>], residual: &[f32]) {
    for (o, r) in dst.iter_mut().zip(residual) {
        // SAFETY: written by the block (caller's contract).
        let v = unsafe { o.assume_init() } + r;
        o.write(v);
    }
}

/// `out[M,N] = (sum_k q(x)[m,k] * w[n,k]) * act_scale * sw[n] + bias[n]` with every activation quantized by the
/// same calibrated scale ([`quantize_static_i8`]: round half to even, saturate to [-127, 127]): no absmax pass.
/// The same blocks and micro-kernels as [`gemm_i8_dynamic`].
pub fn gemm_i8_static(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    act_scale: f32,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    let inv = static_inverse(act_scale)?;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        let quantize = |src: &[f32], codes: &mut [i8], flip: i8| {
            quantize_with_inverse(src, inv, codes, flip);
            act_scale
        };
        // SAFETY: the blocks write initialized floats only.
        gemm_blocks(x, k, w, bias, None, unsafe { as_uninit(out) }, quantize);
        return Ok(());
    }
    gemm_i8_static_scalar(x, m, k, w, act_scale, bias, out)
}

/// The SIMD GEMM over blocks of [`MB`] rows in parallel: `quantize(row, codes, flip)` fills a row's codes (XORed
/// with `flip`: the VNNI path's unsigned codes) and returns its scale, then [`gemm_codes_block`] runs the VNNI or
/// AVX2 micro-kernels on the block and `residual` is added to it. Every output is written. Shapes are checked by
/// the caller.
#[cfg(target_arch = "x86_64")]
fn gemm_blocks(
    x: &[f32],
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    quantize: impl Fn(&[f32], &mut [i8], i8) -> f32 + Sync,
) {
    let n = w.n;
    if out.is_empty() || n == 0 {
        return;
    }
    let shifted = codes_shifted();
    let flip = code_flip(shifted);
    out.par_chunks_mut(MB * n).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(xq, sx): &mut (Vec<i8>, Vec<f32>), (blk, dst)| {
            let rows = dst.len() / n;
            let r0 = blk * MB;
            xq.clear();
            xq.resize(rows * w.k4, 0);
            sx.resize(rows, 0.0);
            for r in 0..rows {
                let src = &x[(r0 + r) * k..(r0 + r + 1) * k];
                let codes = &mut xq[r * w.k4..r * w.k4 + k];
                sx[r] = quantize(src, codes, flip);
            }
            gemm_codes_block(xq, shifted, sx, rows, w, bias, dst);
            if let Some(r) = residual {
                // SAFETY: the block wrote all of `dst`; the residual has the output's shape (checked by callers).
                unsafe { add_residual_written(dst, &r[r0 * n..(r0 + rows) * n]) };
            }
        },
    );
}

/// `out[M,N] = (sum_k x.code[m,k] * w[n,k]) * x.scale[m] * sw[n] + bias[n] (+ residual[m,n])` for activations a
/// producing kernel already quantized ([`QuantizedRows`]): the same blocks, micro-kernels and epilogue as
/// [`gemm_i8_dynamic`], so the same floats as it gives for the float rows those codes came from; the residual is added
/// to each finished block (the same sum as a separate pass).
pub fn gemm_i8_quantized(
    x: &QuantizedRows,
    w: &I8Panels,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let n = w.n;
    let len = x.rows * n;
    if x.k != w.k || bias.is_some_and(|b| b.len() != n) || residual.is_some_and(|r| r.len() != len) {
        return Err(Error::invalid(
            "gemm_i8_quantized",
            format!(
                "shapes disagree: {} rows of K={} codes, weight N={n} K={}, bias {}, residual {} (want {len})",
                x.rows,
                x.k,
                w.k,
                bias.map_or(0, |b| b.len()),
                residual.map_or(0, |r| r.len())
            ),
        ));
    }
    let fill = |out: &mut [MaybeUninit<f32>]| {
        if n > 0 {
            out.par_chunks_mut(MB * n).enumerate().for_each(|(blk, dst)| {
                let rows = dst.len() / n;
                let r0 = blk * MB;
                let codes = &x.codes[r0 * x.stride..(r0 + rows) * x.stride];
                gemm_codes_block(codes, x.shifted, &x.scales[r0..r0 + rows], rows, w, bias, dst);
                if let Some(r) = residual {
                    // SAFETY: the block wrote all of `dst`; the residual has the output's shape (checked).
                    unsafe { add_residual_written(dst, &r[r0 * n..(r0 + rows) * n]) };
                }
            });
        }
        Ok(())
    };
    // SAFETY: every block is written by `gemm_codes_block`.
    unsafe { filled_vec(len, fill) }
}

/// One block of `rows` pre-quantized rows (`codes`, rows `w.k4` apart, shifted when `shifted`) times `w` into `dst`
/// `[rows, n]`, on this thread: the VNNI or AVX2 micro-kernels, else the scalar loop. Shifted codes come from
/// [`codes_shifted`], so they are shifted exactly when a VNNI kernel runs.
pub(crate) fn gemm_codes_block(
    codes: &[i8],
    shifted: bool,
    scales: &[f32],
    rows: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    dst: &mut [MaybeUninit<f32>],
) {
    debug_assert!(codes.len() >= rows * w.k4 && scales.len() >= rows && dst.len() == rows * w.n);
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        let vnni = vnni_kind();
        if vnni.is_some() == shifted {
            // SAFETY: the CPU supports the instructions of the path taken (detected); `codes` holds `rows` rows of
            // k4 codes, shifted exactly when a VNNI kernel reads them; `dst` holds `rows * n` outputs.
            unsafe {
                match vnni {
                    Some(Vnni::Avx) => vnni_avx::gemm_block(codes, scales, rows, w, bias, dst),
                    Some(Vnni::Avx512) => vnni_avx512::gemm_block(codes, scales, rows, w, bias, dst),
                    None => avx2::gemm_block(codes, scales, rows, w, bias, dst),
                }
            }
            return;
        }
    }
    gemm_codes_block_scalar(codes, shifted, scales, rows, w, bias, dst);
}

/// Scalar reference of [`gemm_codes_block`]: plain dot products and the shared epilogue; writes all of `dst`.
pub(crate) fn gemm_codes_block_scalar(
    codes: &[i8],
    shifted: bool,
    scales: &[f32],
    rows: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    dst: &mut [MaybeUninit<f32>],
) {
    let (n, k) = (w.n, w.k);
    let flip = code_flip(shifted);
    for r in 0..rows {
        let row: Vec<i8> = codes[r * w.k4..r * w.k4 + k].iter().map(|&c| c ^ flip).collect();
        for col in 0..n {
            let acc: i32 = row
                .iter()
                .enumerate()
                .map(|(i, &c)| c as i32 * w.code(col, i) as i32)
                .sum();
            dst[r * n + col].write(epilogue(acc, scales[r], w.scales[col], bias.map_or(0.0, |b| b[col])));
        }
    }
}

/// Which `vpdpbusd` the CPU has (when [`super::simd`] allows VNNI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vnni {
    /// AVX-VNNI (VEX-encoded, 256-bit).
    Avx,
    /// AVX-512 VNNI with VL (its 256-bit form).
    Avx512,
}

fn vnni_kind() -> Option<Vnni> {
    #[cfg(target_arch = "x86_64")]
    if super::simd() >= super::Simd::Vnni {
        if std::arch::is_x86_feature_detected!("avxvnni") {
            return Some(Vnni::Avx);
        }
        return Some(Vnni::Avx512);
    }
    None
}

/// Scalar reference of [`gemm_i8_dynamic`] (and the fallback on CPUs without AVX2).
pub fn gemm_i8_dynamic_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    gemm_rows_scalar(x, k, w, bias, out, quantize_row_scalar);
    Ok(())
}

/// Scalar reference of [`gemm_i8_static`] (and the fallback on CPUs without AVX2).
pub fn gemm_i8_static_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    w: &I8Panels,
    act_scale: f32,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    let inv = static_inverse(act_scale)?;
    gemm_rows_scalar(x, k, w, bias, out, |src, codes| {
        quantize_with_inverse_scalar(src, inv, codes);
        act_scale
    });
    Ok(())
}

/// The scalar GEMM, one output row per task: `quantize(row, codes)` gives the row's codes and scale, then plain dot
/// products with the unpacked weight codes and the shared epilogue.
fn gemm_rows_scalar(
    x: &[f32],
    k: usize,
    w: &I8Panels,
    bias: Option<&[f32]>,
    out: &mut [f32],
    quantize: impl Fn(&[f32], &mut [i8]) -> f32 + Sync,
) {
    let n = w.n;
    if out.is_empty() || n == 0 {
        return;
    }
    // Unpack once to row-major codes so the inner loop is a plain dot product.
    let wt: Vec<i8> = (0..n)
        .flat_map(|row| (0..k).map(move |col| (row, col)))
        .map(|(r, c)| w.code(r, c))
        .collect();
    out.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let mut xq = vec![0i8; k];
        let sx = quantize(&x[r * k..(r + 1) * k], &mut xq);
        for (col, o) in dst.iter_mut().enumerate() {
            let acc = dot_i8(&xq, &wt[col * k..(col + 1) * k]);
            *o = epilogue(acc, sx, w.scales[col], bias.map_or(0.0, |b| b[col]));
        }
    });
}

fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&p, &q)| p as i32 * q as i32).sum()
}

/// Dequantizes one accumulator; the SIMD epilogue performs the same operations in the same order.
#[inline]
fn epilogue(acc: i32, sx: f32, sw: f32, bias: f32) -> f32 {
    acc as f32 * sx * sw + bias
}

/// The raw i32 accumulators `xq[M,K] * W^T` of every kernel this CPU can run (AVX2, then each VNNI flavour),
/// else of the scalar loop, for tests.
#[cfg(test)]
fn accumulate_i32_all(xq: &[i8], m: usize, k: usize, w: &I8Panels) -> Vec<(&'static str, Vec<i32>)> {
    let mut results = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        let mut padded = vec![0i8; m * w.k4];
        for r in 0..m {
            padded[r * w.k4..r * w.k4 + k].copy_from_slice(&xq[r * k..(r + 1) * k]);
        }
        let mut acc = vec![0i32; m * w.n];
        // SAFETY: the CPU supports AVX2; `padded` holds m rows of k4 codes, `acc` m rows of n.
        unsafe { avx2::accumulate_block(&padded, m, w, &mut acc) };
        results.push(("avx2", acc));
        let shifted: Vec<i8> = padded.iter().map(|c| c ^ i8::MIN).collect();
        use std::arch::is_x86_feature_detected as has;
        if has!("avxvnni") {
            let mut acc = vec![0i32; m * w.n];
            // SAFETY: the CPU supports AVX-VNNI (checked); buffers as above.
            unsafe { vnni_avx::accumulate_block(&shifted, m, w, &mut acc) };
            results.push(("avx-vnni", acc));
        }
        if has!("avx512vnni") && has!("avx512vl") {
            let mut acc = vec![0i32; m * w.n];
            // SAFETY: the CPU supports AVX-512 VNNI and VL (checked); buffers as above.
            unsafe { vnni_avx512::accumulate_block(&shifted, m, w, &mut acc) };
            results.push(("avx512-vnni", acc));
        }
        return results;
    }
    let mut acc = vec![0i32; m * w.n];
    for r in 0..m {
        for col in 0..w.n {
            let wrow: Vec<i8> = (0..k).map(|c| w.code(col, c)).collect();
            acc[r * w.n + col] = dot_i8(&xq[r * k..(r + 1) * k], &wrow);
        }
    }
    results.push(("scalar", acc));
    results
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{I8Panels, MR, NR};
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// See [`super::quantize_row_scalar`]; bit-identical results (same multiply, round-half-even conversion).
    ///
    /// # Safety
    /// The CPU must support AVX2; `codes.len() == x.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row(x: &[f32], codes: &mut [i8], flip: i8) -> f32 {
        let n = x.len();
        let sign = _mm256_set1_ps(-0.0);
        let mut vmax = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let v = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
            i += 8;
        }
        // The lanes' maximum in registers (rows are often 32 values: a store and a scalar fold cost as much as the
        // row); the same value as a fold for numbers.
        let m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps::<1>(vmax));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let mut absmax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        for &v in &x[i..] {
            absmax = absmax.max(v.abs());
        }
        if absmax == 0.0 {
            codes.fill(flip);
            return 0.0;
        }
        // SAFETY: AVX2 is available (caller's contract); `codes` is as long as `x`.
        unsafe { quantize_with_inverse(x, 127.0 / absmax, codes, flip) };
        absmax / 127.0
    }

    /// See [`super::quantize_with_inverse_scalar`]; bit-identical results (same multiply, round-half-even
    /// conversion; clamping before or after rounding to the integer bounds gives the same codes). Clamped in float
    /// first so that values past the i32 range (a static scale's outliers) saturate instead of wrapping.
    ///
    /// # Safety
    /// The CPU must support AVX2; `codes.len() == x.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_with_inverse(x: &[f32], inv: f32, codes: &mut [i8], flip: i8) {
        let n = x.len();
        let vinv = _mm256_set1_ps(inv);
        let vflip = _mm256_set1_epi8(flip);
        let mut i = 0;
        while i + 32 <= n {
            // SAFETY: i + 32 <= n for both `x` and `codes`.
            unsafe {
                let v = |o: usize| _mm256_loadu_ps(x.as_ptr().add(i + o));
                let bytes = codes32([v(0), v(8), v(16), v(24)], vinv);
                _mm256_storeu_si256(
                    codes.as_mut_ptr().add(i) as *mut __m256i,
                    _mm256_xor_si256(bytes, vflip),
                );
            }
            i += 32;
        }
        let (flo, fhi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both `x` and `codes`; the store writes eight bytes.
            unsafe {
                let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), vinv);
                let v = _mm256_min_ps(_mm256_max_ps(v, flo), fhi);
                let q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), lo), hi);
                // i32 -> i16 (lanes 0-3 and 4-7 in each half's low quarter) -> bytes 0-7 in order.
                let words = _mm256_permute4x64_epi64::<0b1000>(_mm256_packs_epi32(q, q));
                let bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_castsi256_si128(words));
                let bytes = _mm_xor_si128(bytes, _mm256_castsi256_si128(vflip));
                _mm_storel_epi64(codes.as_mut_ptr().add(i) as *mut __m128i, bytes);
            }
            i += 8;
        }
        super::quantize_with_inverse_scalar(&x[i..], inv, &mut codes[i..]);
        codes[i..].iter_mut().for_each(|c| *c ^= flip);
    }

    /// The codes of 32 values (four vectors in order) times `vinv`: `clamp(round_half_even(v * inv), -127, 127)`
    /// as 32 bytes in order, as [`quantize_with_inverse`] stores them; for kernels that quantize values they have
    /// just computed (the fused softmax).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn codes32(v: [__m256; 4], vinv: __m256) -> __m256i {
        let (flo, fhi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        let q = |v: __m256| {
            let v = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, vinv), flo), fhi);
            _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), lo), hi)
        };
        let ab = _mm256_packs_epi32(q(v[0]), q(v[1]));
        let cd = _mm256_packs_epi32(q(v[2]), q(v[3]));
        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// i32 accumulators of `ROWS` rows (`ROWS <= MR`) of `xq` (rows `k4` apart) against one 16-column panel.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn micro<const ROWS: usize>(xq: *const i8, k4: usize, panel: &[i8]) -> [[__m256i; 2]; ROWS] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
        let mut wp = panel.as_ptr();
        for s in 0..k4 / 4 {
            // SAFETY: the panel holds k4/4 groups of 64 bytes; every row of `xq` holds k4 codes.
            unsafe {
                let w0 = _mm256_loadu_si256(wp as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xb = _mm256_set1_epi32((xq.add(r * k4 + s * 4) as *const i32).read_unaligned());
                    let xa = _mm256_abs_epi8(xb);
                    let p0 = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w0, xb));
                    let p1 = _mm256_maddubs_epi16(xa, _mm256_sign_epi8(w1, xb));
                    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(p0, ones));
                    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(p1, ones));
                }
                wp = wp.add(64);
            }
        }
        acc
    }

    /// Runs `f(row0, accumulators)` for every micro-tile of `rows` rows against panel `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn for_tiles(xq: &[i8], rows: usize, w: &I8Panels, p: usize, mut f: impl FnMut(usize, &[[__m256i; 2]])) {
        let panel = w.panel(p);
        let mut r = 0;
        while r < rows {
            let base = xq[r * w.k4..].as_ptr();
            // SAFETY: rows r..r+take exist in `xq`.
            unsafe {
                match rows - r {
                    1 => f(r, &micro::<1>(base, w.k4, panel)),
                    2 => f(r, &micro::<2>(base, w.k4, panel)),
                    3 => f(r, &micro::<3>(base, w.k4, panel)),
                    _ => f(r, &micro::<MR>(base, w.k4, panel)),
                }
            }
            r += MR;
        }
    }

    /// Per-panel epilogue constants: weight scales and bias of the panel's 16 columns (zeros past `n`).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn panel_params(w: &I8Panels, bias: Option<&[f32]>, p: usize) -> [__m256; 4] {
        let c0 = p * NR;
        let width = (w.n - c0).min(NR);
        let mut sw = [0f32; NR];
        let mut b = [0f32; NR];
        sw[..width].copy_from_slice(&w.scales[c0..c0 + width]);
        if let Some(bias) = bias {
            b[..width].copy_from_slice(&bias[c0..c0 + width]);
        }
        // SAFETY: `sw` and `b` hold 16 f32.
        unsafe {
            [
                _mm256_loadu_ps(sw.as_ptr()),
                _mm256_loadu_ps(sw.as_ptr().add(8)),
                _mm256_loadu_ps(b.as_ptr()),
                _mm256_loadu_ps(b.as_ptr().add(8)),
            ]
        }
    }

    /// Writes the f32 outputs of one micro-tile: rows `r0..` of `dst` (`n` wide), columns of panel `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn store_tile(
        acc: &[[__m256i; 2]],
        r0: usize,
        sx: &[f32],
        params: &[__m256; 4],
        n: usize,
        p: usize,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let [sw0, sw1, b0, b1] = *params;
        let c0 = p * NR;
        let width = (n - c0).min(NR);
        for (i, a) in acc.iter().enumerate() {
            let s = _mm256_set1_ps(sx[r0 + i]);
            // Same operation order as `epilogue`: acc * sx * sw + bias, no FMA.
            let v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[0]), s), sw0), b0);
            let v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(a[1]), s), sw1), b1);
            let out_row = &mut dst[(r0 + i) * n + c0..(r0 + i) * n + c0 + width];
            // SAFETY: a full-width row holds 16 values; otherwise the copy goes through a 16-value buffer.
            unsafe {
                let out_ptr = out_row.as_mut_ptr() as *mut f32;
                if width == NR {
                    _mm256_storeu_ps(out_ptr, v0);
                    _mm256_storeu_ps(out_ptr.add(8), v1);
                } else {
                    let mut tmp = [0f32; NR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
                    _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out_ptr, width);
                }
            }
        }
    }

    /// Writes `f32` outputs of a block of `rows` rows: quantized codes `xq` (rows `k4` apart) with scales `sx`.
    ///
    /// # Safety
    /// The CPU must support AVX2; `xq` holds `rows * k4` codes, `dst` `rows * n` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn gemm_block(
        xq: &[i8],
        sx: &[f32],
        rows: usize,
        w: &I8Panels,
        bias: Option<&[f32]>,
        dst: &mut [MaybeUninit<f32>],
    ) {
        let n = w.n;
        for p in 0..n.div_ceil(NR) {
            let params = panel_params(w, bias, p);
            // SAFETY: AVX2 is available (caller's contract).
            unsafe { for_tiles(xq, rows, w, p, |r0, acc| store_tile(acc, r0, sx, &params, n, p, dst)) };
        }
    }

    /// Raw i32 accumulators for `rows` rows of `xq` (rows `k4` apart) into `acc` `[rows, n]`.
    ///
    /// # Safety
    /// The CPU must support AVX2; buffers sized as described.
    #[cfg(test)]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn accumulate_block(xq: &[i8], rows: usize, w: &I8Panels, acc_out: &mut [i32]) {
        let n = w.n;
        for p in 0..n.div_ceil(NR) {
            let c0 = p * NR;
            let width = (n - c0).min(NR);
            // SAFETY: AVX2 is available (caller's contract).
            unsafe {
                for_tiles(xq, rows, w, p, |r0, acc| {
                    for (i, a) in acc.iter().enumerate() {
                        let mut tmp = [0i32; NR];
                        _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, a[0]);
                        _mm256_storeu_si256(tmp.as_mut_ptr().add(8) as *mut __m256i, a[1]);
                        acc_out[(r0 + i) * n + c0..(r0 + i) * n + c0 + width].copy_from_slice(&tmp[..width]);
                    }
                });
            }
        }
    }
}

/// The VNNI kernels, once per encoding of `vpdpbusd` (AVX-VNNI and AVX-512 VNNI differ only in the instruction).
/// Activations arrive shifted to unsigned (`code ^ 0x80` = `code + 128`); accumulators are corrected with the
/// panel's shifted column sums, so they equal the AVX2 path's exactly.
macro_rules! vnni_kernels {
    ($module:ident, $features:literal, $dpbusd:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{I8Panels, MR, NR};
            use std::arch::x86_64::*;

            /// i32 accumulators of `ROWS` shifted rows of `xu` (rows `k4` apart) against one 16-column panel.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn micro<const ROWS: usize>(
                xu: *const i8,
                k4: usize,
                w: &I8Panels,
                p: usize,
            ) -> [[__m256i; 2]; ROWS] {
                let panel = w.panel(p);
                let mut acc = [[_mm256_setzero_si256(); 2]; ROWS];
                let mut wp = panel.as_ptr();
                for s in 0..k4 / 4 {
                    // SAFETY: the panel holds k4/4 groups of 64 bytes; every row of `xu` holds k4 codes.
                    unsafe {
                        let w0 = _mm256_loadu_si256(wp as *const __m256i);
                        let w1 = _mm256_loadu_si256(wp.add(32) as *const __m256i);
                        for (r, a) in acc.iter_mut().enumerate() {
                            let xb = _mm256_set1_epi32((xu.add(r * k4 + s * 4) as *const i32).read_unaligned());
                            a[0] = $dpbusd(a[0], xb, w0);
                            a[1] = $dpbusd(a[1], xb, w1);
                        }
                        wp = wp.add(64);
                    }
                }
                // SAFETY: the column sums hold 16 values per panel.
                let (c0, c1) = unsafe {
                    let sums = w.shifted_col_sums.as_ptr().add(p * NR);
                    (
                        _mm256_loadu_si256(sums as *const __m256i),
                        _mm256_loadu_si256(sums.add(8) as *const __m256i),
                    )
                };
                for a in acc.iter_mut() {
                    a[0] = _mm256_sub_epi32(a[0], c0);
                    a[1] = _mm256_sub_epi32(a[1], c1);
                }
                acc
            }

            /// Runs `f(row0, accumulators)` for every micro-tile of `rows` rows against panel `p`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn for_tiles(
                xu: &[i8],
                rows: usize,
                w: &I8Panels,
                p: usize,
                mut f: impl FnMut(usize, &[[__m256i; 2]]),
            ) {
                let mut r = 0;
                while r < rows {
                    let base = xu[r * w.k4..].as_ptr();
                    // SAFETY: rows r..r+take exist in `xu`.
                    unsafe {
                        match rows - r {
                            1 => f(r, &micro::<1>(base, w.k4, w, p)),
                            2 => f(r, &micro::<2>(base, w.k4, w, p)),
                            3 => f(r, &micro::<3>(base, w.k4, w, p)),
                            _ => f(r, &micro::<MR>(base, w.k4, w, p)),
                        }
                    }
                    r += MR;
                }
            }

            /// See [`super::avx2::gemm_block`]; `xu` holds shifted codes.
            ///
            /// # Safety
            /// The CPU must support the module's features; `xu` holds `rows * k4` codes, `dst` `rows * n` values.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm_block(
                xu: &[i8],
                sx: &[f32],
                rows: usize,
                w: &I8Panels,
                bias: Option<&[f32]>,
                dst: &mut [std::mem::MaybeUninit<f32>],
            ) {
                for p in 0..w.n.div_ceil(NR) {
                    let params = super::avx2::panel_params(w, bias, p);
                    // SAFETY: the features are available (caller's contract).
                    unsafe {
                        for_tiles(xu, rows, w, p, |r0, acc| {
                            super::avx2::store_tile(acc, r0, sx, &params, w.n, p, dst)
                        })
                    };
                }
            }

            /// Raw corrected accumulators, for tests.
            ///
            /// # Safety
            /// As [`gemm_block`]; `acc_out` holds `rows * n` values.
            #[cfg(test)]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn accumulate_block(xu: &[i8], rows: usize, w: &I8Panels, acc_out: &mut [i32]) {
                let n = w.n;
                for p in 0..n.div_ceil(NR) {
                    let (c0, width) = (p * NR, (n - p * NR).min(NR));
                    // SAFETY: the features are available (caller's contract); `tmp` holds 16 i32.
                    unsafe {
                        for_tiles(xu, rows, w, p, |r0, acc| {
                            for (i, a) in acc.iter().enumerate() {
                                let mut tmp = [0i32; NR];
                                _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, a[0]);
                                _mm256_storeu_si256(tmp.as_mut_ptr().add(8) as *mut __m256i, a[1]);
                                acc_out[(r0 + i) * n + c0..(r0 + i) * n + c0 + width].copy_from_slice(&tmp[..width]);
                            }
                        });
                    }
                }
            }
        }
    };
}

vnni_kernels!(vnni_avx, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
vnni_kernels!(vnni_avx512, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::test_util::{avx2_path, compared_against_scalar, random_vec};

    /// The path [`gemm_i8_dynamic`] takes here, by its own dispatch (`has_avx2_fma`, then `vnni_kind`, so capped by
    /// `SEGQ_SIMD`); empty when it runs the scalar reference. For the tests of the kernels built on it too.
    pub(crate) fn dispatched_path() -> Vec<&'static str> {
        if !crate::kernels::has_avx2_fma() {
            return Vec::new();
        }
        vec![match vnni_kind() {
            Some(Vnni::Avx) => "avx-vnni",
            Some(Vnni::Avx512) => "avx512-vnni",
            None => "avx2",
        }]
    }

    /// Adds a path [`accumulate_i32_all`] ran to `seen`, unless it is the scalar loop or already there.
    fn simd_paths(seen: &mut Vec<&'static str>, path: &'static str) {
        if path != "scalar" && !seen.contains(&path) {
            seen.push(path);
        }
    }

    /// Random symmetric int8 weight codes in [-127, 127] with scales.
    fn random_weight(n: usize, k: usize, seed: u64) -> (Vec<i8>, Vec<f32>) {
        let codes = random_vec(n * k, seed, 127.49)
            .iter()
            .map(|v| v.round() as i8)
            .collect();
        let scales = random_vec(n, seed + 1, 0.01).iter().map(|v| v.abs() + 1e-3).collect();
        (codes, scales)
    }

    #[test]
    fn pack_round_trips_and_rejects_bad_input() {
        let (codes, scales) = random_weight(19, 33, 1);
        let w = I8Panels::pack(&codes, &scales, 19, 33).unwrap();
        for r in 0..19 {
            for c in 0..33 {
                assert_eq!(w.code(r, c), codes[r * 33 + c]);
            }
        }
        assert_eq!((w.n(), w.k()), (19, 33));
        let mut bad = codes.clone();
        bad[40] = -128;
        let e = I8Panels::pack(&bad, &scales, 19, 33).unwrap_err().to_string();
        assert!(e.contains("row 1 column 7"), "{e}");
        assert!(I8Panels::pack(&codes, &scales[1..], 19, 33).is_err());
    }

    #[test]
    fn quantize_simd_matches_scalar_and_bounds() {
        for (m, k) in [(3, 1), (2, 31), (5, 33), (3, 40), (2, 45), (4, 97), (1, 1000)] {
            let mut x = random_vec(m * k, (m * 1000 + k) as u64, 3.0);
            x[0] = 0.5; // rows with a value on a rounding boundary do occur; the results must still agree
            let (codes, scales) = quantize_rows_i8(&x, m, k).unwrap();
            for r in 0..m {
                let mut want = vec![0i8; k];
                let s = quantize_row_scalar(&x[r * k..(r + 1) * k], &mut want);
                assert_eq!(s, scales[r]);
                assert_eq!(&codes[r * k..(r + 1) * k], &want[..], "m={m} k={k} row {r}");
                assert!(want.iter().any(|&c| c.abs() == 127));
                // The GEMM's layouts: the same codes, flipped to unsigned for VNNI.
                for shifted in [false, true] {
                    let mut got = vec![0i8; k];
                    let s2 = quantize_row_for_gemm(&x[r * k..(r + 1) * k], &mut got, shifted);
                    let flip = code_flip(shifted);
                    assert_eq!(s2, s);
                    assert!(
                        got.iter().zip(&want).all(|(g, w)| g ^ flip == *w),
                        "m={m} k={k} shifted"
                    );
                }
                for (c, &v) in want.iter().zip(&x[r * k..]) {
                    assert!((*c as f32 * s - v).abs() <= s * 0.5 + 1e-6);
                }
            }
        }
        compared_against_scalar("quantize_rows_i8", &avx2_path());
        let (codes, scales) = quantize_rows_i8(&[0.0; 10], 2, 5).unwrap();
        assert_eq!((codes, scales), (vec![0; 10], vec![0.0, 0.0]));
        assert!(quantize_rows_i8(&[0.0; 10], 3, 5).is_err());
    }

    #[test]
    fn accumulators_are_exact_on_awkward_sizes() {
        let mut simd = Vec::new();
        for &k in &[1usize, 9, 27, 33, 147, 1000] {
            for &n in &[1usize, 7, 19, 150] {
                for &m in &[1usize, 3, 17] {
                    let x = random_vec(m * k, (k * 7 + n * 3 + m) as u64, 1.0);
                    let (xq, _) = quantize_rows_i8(&x, m, k).unwrap();
                    let (codes, scales) = random_weight(n, k, (k + n) as u64);
                    let w = I8Panels::pack(&codes, &scales, n, k).unwrap();
                    for (path, got) in accumulate_i32_all(&xq, m, k, &w) {
                        simd_paths(&mut simd, path);
                        for r in 0..m {
                            for c in 0..n {
                                let want = dot_i8(&xq[r * k..(r + 1) * k], &codes[c * k..(c + 1) * k]);
                                assert_eq!(got[r * n + c], want, "{path}: M={m} K={k} N={n} at ({r},{c})");
                            }
                        }
                    }
                }
            }
        }
        compared_against_scalar("gemm_i8 accumulators", &simd);
    }

    #[test]
    fn extreme_codes_do_not_saturate() {
        // Every pair at the +-127 * +-127 limit, of both signs.
        let k = 64;
        let x: Vec<f32> = (0..2 * k).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let (xq, _) = quantize_rows_i8(&x, 2, k).unwrap();
        let codes: Vec<i8> = (0..2 * k).map(|i| if i % 5 < 2 { -127 } else { 127 }).collect();
        let w = I8Panels::pack(&codes, &[1.0, 1.0], 2, k).unwrap();
        let mut simd = Vec::new();
        for (path, got) in accumulate_i32_all(&xq, 2, k, &w) {
            simd_paths(&mut simd, path);
            for r in 0..2 {
                for c in 0..2 {
                    let want = dot_i8(&xq[r * k..(r + 1) * k], &codes[c * k..(c + 1) * k]);
                    assert_eq!(got[r * 2 + c], want, "{path}");
                }
            }
        }
        compared_against_scalar("gemm_i8 accumulators at +-127", &simd);
    }

    #[test]
    fn f32_output_matches_scalar_and_dequantized_reference() {
        for &(m, k, n) in &[
            (1, 9, 1),
            (3, 27, 7),
            (17, 33, 19),
            (257, 147, 150),
            (70, 1000, 17),
            (5, 2, 33),
        ] {
            let x = random_vec(m * k, (m + k + n) as u64, 2.0);
            let (codes, scales) = random_weight(n, k, (3 * k + n) as u64);
            let bias = random_vec(n, 99, 1.0);
            let w = I8Panels::pack(&codes, &scales, n, k).unwrap();
            for b in [None, Some(&bias[..])] {
                let mut fast = vec![f32::NAN; m * n];
                let mut slow = vec![f32::NAN; m * n];
                gemm_i8_dynamic(&x, m, k, &w, b, &mut fast).unwrap();
                gemm_i8_dynamic_scalar(&x, m, k, &w, b, &mut slow).unwrap();
                for i in 0..m * n {
                    let tol = 1e-6 * slow[i].abs().max(1e-6);
                    assert!(
                        (fast[i] - slow[i]).abs() <= tol,
                        "M={m} K={k} N={n} [{i}] {} vs {}",
                        fast[i],
                        slow[i]
                    );
                }
                // Against the float product: the error is the quantization error, bounded by half a step.
                let (xq, sx) = quantize_rows_i8(&x, m, k).unwrap();
                for r in 0..m {
                    for c in 0..n {
                        let exact: f64 = (0..k)
                            .map(|i| xq[r * k + i] as f64 * sx[r] as f64 * codes[c * k + i] as f64 * scales[c] as f64)
                            .sum::<f64>()
                            + b.map_or(0.0, |b| b[c] as f64);
                        let got = fast[r * n + c] as f64;
                        assert!(
                            (got - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                            "({r},{c}) {got} vs {exact}"
                        );
                    }
                }
            }
        }
        compared_against_scalar("gemm_i8_dynamic", &dispatched_path());
    }

    #[test]
    fn static_quantizer_rounds_and_saturates_like_its_scalar_reference() {
        for (len, scale) in [(1usize, 0.01f32), (31, 0.02), (33, 0.005), (100, 1e-3), (257, 0.1)] {
            let mut x = random_vec(len, len as u64, 3.0);
            x[0] = 1e30; // far past the i32 range once divided by the scale: must saturate, not wrap
            if len > 40 {
                x[40] = -f32::INFINITY;
                x[39] = 2.5 * scale; // a tie, to even
            }
            let codes = quantize_static_i8(&x, scale).unwrap();
            let mut want = vec![0i8; len];
            quantize_with_inverse_scalar(&x, 1.0 / scale, &mut want);
            assert_eq!(codes, want, "len {len}");
            assert_eq!(codes[0], 127);
            if len > 40 {
                assert_eq!((codes[40], codes[39]), (-127, 2));
            }
            for (c, &v) in codes.iter().zip(&x) {
                if v.abs() < 127.0 * scale {
                    assert!((*c as f32 * scale - v).abs() <= 0.5 * scale * 1.0001, "{v} -> {c}");
                }
            }
        }
        assert_eq!(quantize_static_i8(&[1.0, -2.0], 0.0).unwrap(), vec![0, 0]);
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(quantize_static_i8(&[1.0], bad).is_err());
        }
        compared_against_scalar("quantize_static_i8", &avx2_path());
    }

    #[test]
    fn static_gemm_matches_scalar_and_float_reference_on_awkward_sizes() {
        for &(m, k, n) in &[
            (1, 9, 1),
            (3, 27, 7),
            (17, 33, 19),
            (257, 147, 150),
            (70, 1000, 17),
            (5, 2, 33),
        ] {
            let x = random_vec(m * k, (7 * m + k + n) as u64, 2.0);
            let (codes, scales) = random_weight(n, k, (5 * k + n) as u64);
            let bias = random_vec(n, 98, 1.0);
            let w = I8Panels::pack(&codes, &scales, n, k).unwrap();
            let absmax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            // The absmax's scale (nothing clips), and a third of it (a third of the values saturate).
            for act_scale in [absmax / 127.0, absmax / 381.0] {
                for b in [None, Some(&bias[..])] {
                    let mut fast = vec![f32::NAN; m * n];
                    let mut slow = vec![f32::NAN; m * n];
                    gemm_i8_static(&x, m, k, &w, act_scale, b, &mut fast).unwrap();
                    assert_eq!(gemm_i8_static_vec(&x, m, k, &w, act_scale, b, None).unwrap(), fast);
                    gemm_i8_static_scalar(&x, m, k, &w, act_scale, b, &mut slow).unwrap();
                    // Exact accumulators and the same epilogue: the same floats.
                    assert_eq!(fast, slow, "M={m} K={k} N={n} scale {act_scale}");
                    let xq = quantize_static_i8(&x, act_scale).unwrap();
                    for r in 0..m {
                        for c in 0..n {
                            let wrow = |i: usize| codes[c * k + i] as f64 * scales[c] as f64;
                            let bias = b.map_or(0.0, |b| b[c] as f64);
                            let exact: f64 = (0..k)
                                .map(|i| xq[r * k + i] as f64 * act_scale as f64 * wrow(i))
                                .sum::<f64>()
                                + bias;
                            let got = fast[r * n + c] as f64;
                            assert!(
                                (got - exact).abs() < 1e-5 * (1.0 + exact.abs()),
                                "({r},{c}) {got} vs {exact}"
                            );
                            if act_scale == absmax / 127.0 {
                                // Against the float product: at most half a step per input.
                                let float: f64 = (0..k).map(|i| x[r * k + i] as f64 * wrow(i)).sum::<f64>() + bias;
                                let bound: f64 =
                                    (0..k).map(|i| 0.5 * act_scale as f64 * wrow(i).abs()).sum::<f64>() + 1e-4;
                                assert!(
                                    (got - float).abs() <= bound,
                                    "({r},{c}) {got} vs f32 {float} (bound {bound})"
                                );
                            }
                        }
                    }
                }
            }
        }
        let w = I8Panels::pack(&[1; 6], &[1.0; 2], 2, 3).unwrap();
        let mut out = vec![0f32; 4];
        assert!(gemm_i8_static(&[0.0; 6], 3, 2, &w, 1.0, None, &mut out).is_err());
        assert!(gemm_i8_static(&[0.0; 6], 2, 3, &w, -1.0, None, &mut out).is_err());
        compared_against_scalar("gemm_i8_static", &dispatched_path());
    }

    #[test]
    fn prequantized_rows_give_the_dynamic_gemm_floats_on_awkward_sizes() {
        for &(m, k, n) in &[
            (1, 9, 1),
            (3, 27, 7),
            (17, 33, 19),
            (130, 147, 150),
            (70, 256, 17),
            (5, 2, 33),
        ] {
            let x = random_vec(m * k, (11 * m + k + n) as u64, 2.0);
            let (codes, scales) = random_weight(n, k, (7 * k + n) as u64);
            let bias = random_vec(n, 97, 1.0);
            let residual = random_vec(m * n, 96, 1.0);
            let w = I8Panels::pack(&codes, &scales, n, k).unwrap();
            let q = QuantizedRows::quantize(&x, m, k).unwrap();
            let (want_codes, want_scales) = quantize_rows_i8(&x, m, k).unwrap();
            assert_eq!(q.scales(), &want_scales[..]);
            assert!((0..m * k).all(|i| q.code(i / k, i % k) == want_codes[i]));
            for (b, r) in [(None, None), (Some(&bias[..]), Some(&residual[..]))] {
                let mut want = vec![f32::NAN; m * n];
                gemm_i8_dynamic(&x, m, k, &w, b, &mut want).unwrap();
                if let Some(r) = r {
                    want.iter_mut().zip(r).for_each(|(o, r)| *o += r);
                }
                let got = gemm_i8_quantized(&q, &w, b, r).unwrap();
                assert_eq!(got, want, "M={m} K={k} N={n}");
                assert_eq!(
                    gemm_i8_dynamic_vec(&x, m, k, &w, b, r).unwrap(),
                    want,
                    "M={m} K={k} N={n}"
                );
                // The scalar block on the same codes: exact accumulators, the same epilogue.
                let mut slow = vec![f32::NAN; m * n];
                // SAFETY: the scalar block writes initialized floats only.
                gemm_codes_block_scalar(&q.codes, q.shifted, q.scales(), m, &w, b, unsafe {
                    as_uninit(&mut slow)
                });
                add_residual(&mut slow, r);
                assert_eq!(slow, got, "scalar M={m} K={k} N={n}");
            }
        }
        let w = I8Panels::pack(&[1; 6], &[1.0; 2], 2, 3).unwrap();
        let q = QuantizedRows::zeros(2, 2);
        assert!(gemm_i8_quantized(&q, &w, None, None).is_err());
        assert!(gemm_i8_dynamic_vec(&[0.0; 6], 2, 3, &w, None, Some(&[0.0; 3])).is_err());
        assert!(QuantizedRows::quantize(&[0.0; 5], 2, 3).is_err());
        compared_against_scalar("gemm_i8_quantized", &dispatched_path());
    }

    #[test]
    fn shape_errors_are_reported() {
        let w = I8Panels::pack(&[1; 6], &[1.0; 2], 2, 3).unwrap();
        let mut out = vec![0f32; 4];
        assert!(gemm_i8_dynamic(&[0.0; 6], 2, 3, &w, None, &mut out).is_ok());
        let e = gemm_i8_dynamic(&[0.0; 6], 3, 2, &w, None, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("M=3 K=2"), "{e}");
        assert!(gemm_i8_dynamic(&[0.0; 6], 2, 3, &w, Some(&[0.0]), &mut out).is_err());
    }
}
