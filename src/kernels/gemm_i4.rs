//! W4A8 dynamic GEMM: int4 weights with a scale and a (float) zero point per group of input columns, activations
//! quantized per row to int8 at run time, f32 output. `w[n,k] = (code[n,k] - zero[n,g]) * scale[n,g]` with
//! `g = k / group`, so `out[m,n] = sx[m] * sum_g scale[n,g] * (sum_{k in g} xq*code - zero[n,g] * sum_{k in g} xq)
//! + bias[n]`.
//!
//! Codes are unsigned (0..=15), which suits `_mm256_maddubs_epi16` (unsigned x signed bytes) directly: pair sums are
//! at most 2 * 15 * 127 = 3810, so eight of them can be added in i16 before widening to i32, and no sign trick is
//! needed. Weights stay nibble-packed in memory (half the bytes of int8) and are unpacked in registers.

use rayon::prelude::*;

use super::gemm_i8::quantize_row;
use crate::{Error, Result};

/// Output columns per panel: one 32-byte load holds 16 columns x 4 k as nibbles (low: columns 0-7, high: 8-15).
const NR: usize = 16;
/// Rows per micro-tile.
const MR: usize = 4;
/// Rows per parallel task.
const MB: usize = 64;
/// Groups of four k summed in i16 before widening: 8 * 3810 < 32767.
const I16_STEPS: usize = 8;

/// Int4 weights `[N, K]` packed for the kernel, with per-group scales and `scale * zero` per panel.
#[derive(Clone, Debug)]
pub struct PackedI4 {
    n: usize,
    k: usize,
    group: usize,
    groups: usize,
    /// `[panel][k_pad / 4][32 bytes]`.
    panels: Vec<u8>,
    /// `[panel][group][16]`: scale of each column's group, zero for padding columns.
    scales: Vec<f32>,
    /// `[panel][group][16]`: scale * zero point.
    scaled_zeros: Vec<f32>,
}

impl PackedI4 {
    /// Packs unpacked codes `[n, k]` (one per byte, 0..=15) with `scales` and `zeros` `[n, ceil(k / group)]`.
    /// `group` must be a positive multiple of 4; a last, shorter group is allowed.
    pub fn pack(codes: &[u8], scales: &[f32], zeros: &[f32], n: usize, k: usize, group: usize) -> Result<PackedI4> {
        if group == 0 || !group.is_multiple_of(4) {
            return Err(Error::Quant(format!(
                "PackedI4::pack: group size {group} must be a positive multiple of 4"
            )));
        }
        let groups = k.div_ceil(group);
        if codes.len() != n * k || scales.len() != n * groups || zeros.len() != n * groups {
            return Err(Error::Quant(format!(
                "PackedI4::pack: {} codes, {} scales, {} zero points given for N={n} K={k} group={group} (want {}, \
                 {} and {})",
                codes.len(),
                scales.len(),
                zeros.len(),
                n * k,
                n * groups,
                n * groups
            )));
        }
        if let Some(pos) = codes.iter().position(|&c| c > 15) {
            return Err(Error::Quant(format!(
                "PackedI4::pack: code {} at row {} column {} does not fit in 4 bits",
                codes[pos],
                pos / k.max(1),
                pos % k.max(1)
            )));
        }
        let k_pad = groups * group;
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0u8; n_panels * k_pad / 4 * 32];
        let mut gscales = vec![0f32; n_panels * groups * NR];
        let mut gzeros = vec![0f32; n_panels * groups * NR];
        for row in 0..n {
            let (p, j) = (row / NR, row % NR);
            let shift = if j < 8 { 0 } else { 4 };
            for kk in 0..k {
                panels[(p * k_pad / 4 + kk / 4) * 32 + (j % 8) * 4 + kk % 4] |= codes[row * k + kk] << shift;
            }
            for g in 0..groups {
                let (s, z) = (scales[row * groups + g], zeros[row * groups + g]);
                gscales[(p * groups + g) * NR + j] = s;
                gzeros[(p * groups + g) * NR + j] = s * z;
            }
        }
        Ok(PackedI4 {
            n,
            k,
            group,
            groups,
            panels,
            scales: gscales,
            scaled_zeros: gzeros,
        })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Input columns per scale / zero-point group.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Bytes held by the packed codes, scales and zero points (for memory reports).
    pub fn nbytes(&self) -> usize {
        self.panels.len() + (self.scales.len() + self.scaled_zeros.len()) * 4
    }

    fn k_pad(&self) -> usize {
        self.groups * self.group
    }

    /// The code of output row `row`, input column `col`, read back from the packed layout.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let (p, j) = (row / NR, row % NR);
        let byte = self.panels[(p * self.k_pad() / 4 + col / 4) * 32 + (j % 8) * 4 + col % 4];
        if j < 8 { byte & 15 } else { byte >> 4 }
    }

    fn group_scale(&self, row: usize, g: usize) -> (f32, f32) {
        let i = ((row / NR) * self.groups + g) * NR + row % NR;
        (self.scales[i], self.scaled_zeros[i])
    }
}

fn check_gemm(x: usize, m: usize, k: usize, w: &PackedI4, bias: Option<&[f32]>, out: usize) -> Result<()> {
    if k != w.k || x != m * k || out != m * w.n || bias.is_some_and(|b| b.len() != w.n) {
        return Err(Error::Model(format!(
            "gemm_i4_dynamic: shapes disagree: x has {x} values for M={m} K={k}, weight is N={} K={}, output has \
             {out} values (want {}), bias has {} (want {})",
            w.n,
            w.k,
            m * w.n,
            bias.map_or(0, |b| b.len()),
            w.n
        )));
    }
    Ok(())
}

/// Quantizes `rows` rows of `x` into `xq` (rows `k_pad` apart, zero padded) and returns, per row, its scale and the
/// sum of its codes in every group (`[rows][groups]`).
fn quantize_block(x: &[f32], rows: usize, k: usize, w: &PackedI4, xq: &mut [i8]) -> (Vec<f32>, Vec<f32>) {
    let k_pad = w.k_pad();
    let mut sx = vec![0f32; rows];
    let mut sums = vec![0f32; rows * w.groups];
    for r in 0..rows {
        let codes = &mut xq[r * k_pad..r * k_pad + k];
        sx[r] = quantize_row(&x[r * k..(r + 1) * k], codes);
        for (g, chunk) in codes.chunks(w.group).enumerate() {
            sums[r * w.groups + g] = chunk.iter().map(|&c| c as i32).sum::<i32>() as f32;
        }
    }
    (sx, sums)
}

/// `out[M,N] = x[M,K] * W^T + bias` with int4 group-quantized `W` and activations quantized per row on the fly.
/// Parallel over blocks of rows; AVX2 when the CPU has it, else the scalar reference.
pub fn gemm_i4_dynamic(
    x: &[f32],
    m: usize,
    k: usize,
    w: &PackedI4,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    if m == 0 || w.n == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        let n = w.n;
        out.par_chunks_mut(MB * n).enumerate().for_each(|(blk, dst)| {
            let rows = dst.len() / n;
            let r0 = blk * MB;
            let mut xq = vec![0i8; rows * w.k_pad()];
            let (sx, sums) = quantize_block(&x[r0 * k..(r0 + rows) * k], rows, k, w, &mut xq);
            // SAFETY: the CPU supports AVX2 and FMA (checked above); buffers sized for `rows` rows.
            unsafe { avx2::gemm_block(&xq, &sx, &sums, rows, w, bias, dst) };
        });
        return Ok(());
    }
    gemm_i4_dynamic_scalar(x, m, k, w, bias, out)
}

/// Scalar reference of [`gemm_i4_dynamic`]: the same integer group sums and the same f32 operations in order.
pub fn gemm_i4_dynamic_scalar(
    x: &[f32],
    m: usize,
    k: usize,
    w: &PackedI4,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_gemm(x.len(), m, k, w, bias, out.len())?;
    if m == 0 || w.n == 0 {
        return Ok(());
    }
    let n = w.n;
    let codes: Vec<u8> = (0..n)
        .flat_map(|row| (0..k).map(move |col| (row, col)))
        .map(|(r, c)| w.code(r, c))
        .collect();
    out.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let mut xq = vec![0i8; w.k_pad()];
        let (sx, sums) = quantize_block(&x[r * k..(r + 1) * k], 1, k, w, &mut xq);
        for (col, o) in dst.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (g, &sum) in sums.iter().enumerate() {
                let span = g * w.group..((g + 1) * w.group).min(k);
                let dot: i32 = span.map(|i| xq[i] as i32 * codes[col * k + i] as i32).sum();
                let (s, sz) = w.group_scale(col, g);
                acc = (dot as f32).mul_add(s, acc);
                acc = (-sum).mul_add(sz, acc);
            }
            *o = acc * sx[0] + bias.map_or(0.0, |b| b[col]);
        }
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{I16_STEPS, MR, NR, PackedI4};
    use std::arch::x86_64::*;

    /// f32 accumulators of `ROWS` rows of `xq` (rows `k_pad` apart; `sums` their group sums, rows `groups` apart)
    /// against panel `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn micro<const ROWS: usize>(xq: *const i8, sums: &[f32], w: &PackedI4, p: usize) -> [[__m256; 2]; ROWS] {
        let k_pad = w.k_pad();
        let steps_per_group = w.group / 4;
        let nibble = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut facc = [[_mm256_setzero_ps(); 2]; ROWS];
        // SAFETY: the panel holds k_pad / 4 groups of 32 bytes.
        let panel = unsafe { w.panels.as_ptr().add(p * k_pad / 4 * 32) };
        for g in 0..w.groups {
            let mut iacc = [[_mm256_setzero_si256(); 2]; ROWS];
            let mut s = g * steps_per_group;
            let group_end = s + steps_per_group;
            while s < group_end {
                let chunk_end = (s + I16_STEPS).min(group_end);
                let mut h = [[_mm256_setzero_si256(); 2]; ROWS];
                while s < chunk_end {
                    // SAFETY: s < k_pad / 4; every row of `xq` holds k_pad codes.
                    unsafe {
                        let v = _mm256_loadu_si256(panel.add(s * 32) as *const __m256i);
                        let w0 = _mm256_and_si256(v, nibble);
                        let w1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                        for (r, hr) in h.iter_mut().enumerate() {
                            let xb = _mm256_set1_epi32((xq.add(r * k_pad + s * 4) as *const i32).read_unaligned());
                            hr[0] = _mm256_add_epi16(hr[0], _mm256_maddubs_epi16(w0, xb));
                            hr[1] = _mm256_add_epi16(hr[1], _mm256_maddubs_epi16(w1, xb));
                        }
                    }
                    s += 1;
                }
                for (ia, hr) in iacc.iter_mut().zip(&h) {
                    ia[0] = _mm256_add_epi32(ia[0], _mm256_madd_epi16(hr[0], ones));
                    ia[1] = _mm256_add_epi32(ia[1], _mm256_madd_epi16(hr[1], ones));
                }
            }
            let base = (p * w.groups + g) * NR;
            // SAFETY: scales and scaled zeros hold 16 values per panel and group.
            let (s0, s1, z0, z1) = unsafe {
                (
                    _mm256_loadu_ps(w.scales.as_ptr().add(base)),
                    _mm256_loadu_ps(w.scales.as_ptr().add(base + 8)),
                    _mm256_loadu_ps(w.scaled_zeros.as_ptr().add(base)),
                    _mm256_loadu_ps(w.scaled_zeros.as_ptr().add(base + 8)),
                )
            };
            for (r, (fa, ia)) in facc.iter_mut().zip(&iacc).enumerate() {
                // Same operations, same order as the scalar reference: fma(dot, s, acc), fma(-sum, s*z, acc).
                let neg_sum = _mm256_set1_ps(-sums[r * w.groups + g]);
                fa[0] = _mm256_fmadd_ps(neg_sum, z0, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[0]), s0, fa[0]));
                fa[1] = _mm256_fmadd_ps(neg_sum, z1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[1]), s1, fa[1]));
            }
        }
        facc
    }

    /// Writes the f32 outputs of a block of `rows` rows.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `xq` holds `rows * k_pad` codes, `sums` `rows * groups` values, `dst`
    /// `rows * n` values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm_block(
        xq: &[i8],
        sx: &[f32],
        sums: &[f32],
        rows: usize,
        w: &PackedI4,
        bias: Option<&[f32]>,
        dst: &mut [f32],
    ) {
        let n = w.n;
        let k_pad = w.k_pad();
        for p in 0..n.div_ceil(NR) {
            let c0 = p * NR;
            let width = (n - c0).min(NR);
            let mut b = [0f32; NR];
            if let Some(bias) = bias {
                b[..width].copy_from_slice(&bias[c0..c0 + width]);
            }
            // SAFETY: `b` holds 16 values.
            let (b0, b1) = unsafe { (_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8))) };
            let mut r = 0;
            while r < rows {
                let base = xq[r * k_pad..].as_ptr();
                let s = &sums[r * w.groups..];
                let mut tile = [[_mm256_setzero_ps(); 2]; MR];
                let take = (rows - r).min(MR);
                // SAFETY: rows r..r+take exist in `xq` and `sums`.
                unsafe {
                    match take {
                        1 => tile[..1].copy_from_slice(&micro::<1>(base, s, w, p)),
                        2 => tile[..2].copy_from_slice(&micro::<2>(base, s, w, p)),
                        3 => tile[..3].copy_from_slice(&micro::<3>(base, s, w, p)),
                        _ => tile = micro::<MR>(base, s, w, p),
                    }
                }
                for (i, a) in tile[..take].iter().enumerate() {
                    let scale = _mm256_set1_ps(sx[r + i]);
                    let v0 = _mm256_add_ps(_mm256_mul_ps(a[0], scale), b0);
                    let v1 = _mm256_add_ps(_mm256_mul_ps(a[1], scale), b1);
                    let out_row = &mut dst[(r + i) * n + c0..(r + i) * n + c0 + width];
                    let mut tmp = [0f32; NR];
                    // SAFETY: `tmp` holds 16 values.
                    unsafe {
                        _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
                        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
                    }
                    out_row.copy_from_slice(&tmp[..width]);
                }
                r += MR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm_i8::quantize_rows_i8;
    use crate::kernels::test_util::{avx2_path, compared_against, compared_against_scalar, random_vec};

    fn random_weight(n: usize, k: usize, group: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let groups = k.div_ceil(group);
        let codes = random_vec(n * k, seed, 1.0)
            .iter()
            .map(|v| ((v + 1.0) * 7.999) as u8)
            .collect();
        let scales = random_vec(n * groups, seed + 1, 0.01)
            .iter()
            .map(|v| v.abs() + 1e-3)
            .collect();
        let zeros = random_vec(n * groups, seed + 2, 1.0)
            .iter()
            .map(|v| 7.5 + 4.0 * v)
            .collect();
        (codes, scales, zeros)
    }

    #[test]
    fn pack_round_trips_and_rejects_bad_input() {
        let (codes, scales, zeros) = random_weight(19, 33, 8, 1);
        let w = PackedI4::pack(&codes, &scales, &zeros, 19, 33, 8).unwrap();
        for r in 0..19 {
            for c in 0..33 {
                assert_eq!(w.code(r, c), codes[r * 33 + c], "({r},{c})");
            }
            for g in 0..5 {
                let (s, sz) = w.group_scale(r, g);
                assert_eq!((s, sz), (scales[r * 5 + g], scales[r * 5 + g] * zeros[r * 5 + g]));
            }
        }
        let mut bad = codes.clone();
        bad[34] = 16;
        let e = PackedI4::pack(&bad, &scales, &zeros, 19, 33, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 1 column 1"), "{e}");
        assert!(PackedI4::pack(&codes, &scales, &zeros, 19, 33, 6).is_err());
        assert!(PackedI4::pack(&codes, &scales[1..], &zeros, 19, 33, 8).is_err());
    }

    #[test]
    fn simd_matches_scalar_and_dequantized_reference() {
        let cases = [
            (1, 9, 1, 4),
            (3, 27, 7, 8),
            (17, 33, 19, 32),
            (257, 147, 150, 64),
            (70, 1000, 17, 128),
            (5, 64, 33, 64),
        ];
        for &(m, k, n, group) in &cases {
            let x = random_vec(m * k, (m + k + n) as u64, 2.0);
            let (codes, scales, zeros) = random_weight(n, k, group, (3 * k + n) as u64);
            let bias = random_vec(n, 99, 1.0);
            let w = PackedI4::pack(&codes, &scales, &zeros, n, k, group).unwrap();
            let groups = k.div_ceil(group);
            let (xq, sx) = quantize_rows_i8(&x, m, k).unwrap();
            for b in [None, Some(&bias[..])] {
                let mut fast = vec![f32::NAN; m * n];
                let mut slow = vec![f32::NAN; m * n];
                gemm_i4_dynamic(&x, m, k, &w, b, &mut fast).unwrap();
                gemm_i4_dynamic_scalar(&x, m, k, &w, b, &mut slow).unwrap();
                for r in 0..m {
                    for c in 0..n {
                        let i = r * n + c;
                        let exact: f64 = (0..k)
                            .map(|j| {
                                let g = c * groups + j / group;
                                let wv = (codes[c * k + j] as f64 - zeros[g] as f64) * scales[g] as f64;
                                xq[r * k + j] as f64 * sx[r] as f64 * wv
                            })
                            .sum::<f64>()
                            + b.map_or(0.0, |b| b[c] as f64);
                        let tol = 1e-5 * (1.0 + exact.abs());
                        assert!(
                            (slow[i] as f64 - exact).abs() < tol,
                            "scalar M={m} K={k} N={n} ({r},{c})"
                        );
                        assert!(
                            (fast[i] - slow[i]).abs() <= 1e-6 * slow[i].abs().max(1e-3),
                            "simd M={m} K={k} N={n} ({r},{c}): {} vs {}",
                            fast[i],
                            slow[i]
                        );
                    }
                }
            }
        }
        compared_against_scalar("gemm_i4_dynamic", &avx2_path());
    }

    #[test]
    fn largest_codes_do_not_overflow_i16() {
        // All codes 15, all activations at +-127: the i16 partial sums reach their bound.
        let (m, k, n) = (2, 256, 3);
        let x: Vec<f32> = (0..m * k).map(|i| if i < k { 1.0 } else { -1.0 }).collect();
        let w = PackedI4::pack(&vec![15; n * k], &vec![1.0; n * 2], &vec![0.0; n * 2], n, k, 128).unwrap();
        let mut out = vec![0f32; m * n];
        gemm_i4_dynamic(&x, m, k, &w, None, &mut out).unwrap();
        // Row scale 1/127, codes 127: each output is 15 * k (sign of the row).
        for (i, &v) in out.iter().enumerate() {
            let want = if i < n { 15.0 * k as f32 } else { -15.0 * k as f32 };
            assert!((v - want).abs() < 1e-3 * want.abs(), "[{i}] {v} vs {want}");
        }
        // The i16 partial sums are the SIMD path's; the scalar loop accumulates in i32.
        compared_against("gemm_i4_dynamic at the i16 bound", &avx2_path(), "the exact sums");
    }
}
