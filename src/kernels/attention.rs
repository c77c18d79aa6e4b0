//! Fused multi-head attention, `softmax(Q K^T / sqrt(d)) V`, reading queries, keys and values straight from the
//! projections' token layout `[batch, tokens, heads * head_dim]` and writing the context in the same layout. The
//! score matrix is never materialised: each task takes a block of query rows of one head, computes its scores into
//! a small per-thread buffer (it stays in cache), applies the softmax there and multiplies by V. For SegFormer's
//! first stage at 512x512 that avoids writing and re-reading two 16 MiB score matrices per layer, and the head
//! split/merge copies around them.

use rayon::prelude::*;

use super::OutPtr;
use super::softmax::softmax_row;
use crate::{Error, Result};

/// Query rows per task: a 64 x keys score block (64 KiB for 256 keys) stays in L2.
const BLOCK_ROWS: usize = 64;

/// Sizes of one attention call. Queries, keys, values and the output are row-major `[batch, tokens, heads *
/// head_dim]` (head `h` owns columns `h * head_dim .. (h + 1) * head_dim`, as transformers' head split).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Blocks of query rows per (batch, head).
    fn blocks(&self) -> usize {
        self.queries.div_ceil(BLOCK_ROWS)
    }

    /// Parallel task `item` of `batch * heads * blocks()`: its batch, head, first query row and number of rows.
    fn task(&self, item: usize) -> (usize, usize, usize, usize) {
        let blocks = self.blocks();
        let (b, h, block) = (item / (self.heads * blocks), item / blocks % self.heads, item % blocks);
        let r0 = block * BLOCK_ROWS;
        (b, h, r0, BLOCK_ROWS.min(self.queries - r0))
    }

    fn check(&self, q: usize, k: usize, v: usize, out: usize) -> Result<()> {
        let c = self.width();
        let want_q = self.batch * self.queries * c;
        let want_kv = self.batch * self.keys * c;
        if q != want_q || k != want_kv || v != want_kv || out != want_q || self.keys == 0 || self.head_dim == 0 {
            return Err(Error::invalid(
                format!("attention {self:?}"),
                format!(
                    "got q {q}, k {k}, v {v}, out {out} values (want q and out {want_q}, k and v \
                 {want_kv}; keys and head_dim > 0)"
                ),
            ));
        }
        Ok(())
    }
}

/// `out = softmax(Q K^T / sqrt(head_dim)) V` per batch and head, parallel over (batch, head, block of query rows).
/// The two products run through the `gemm` crate (SIMD, strided operands, no copies); the softmax is
/// [`super::softmax_rows`]'s row kernel.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) -> Result<()> {
    shape.check(q.len(), k.len(), v.len(), out.len())?;
    let AttentionShape {
        queries,
        keys,
        heads,
        head_dim,
        ..
    } = shape;
    let c = shape.width();
    let blocks = shape.blocks();
    let items = shape.batch * heads * blocks;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..items).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(scores, probs): &mut (Vec<f32>, Vec<f32>), item| {
            let (b, h, r0, rows) = shape.task(item);
            scores.resize(rows * keys, 0.0);
            probs.resize(rows * keys, 0.0);
            let q_tile = (b * queries + r0) * c + h * head_dim;
            let kv_head = b * keys * c + h * head_dim;
            // SAFETY: every operand index stays inside its slice (checked sizes: the last row read is
            // r0 + rows - 1 < queries, the last key keys - 1, columns below (h + 1) * head_dim <= c); `scores` and
            // `probs` hold rows * keys values; the output tile (rows r0.., columns of head h) belongs to this task
            // alone, and `out` outlives the parallel loop.
            unsafe {
                // scores[r, j] = sum_d q[r0 + r, h, d] * k[j, h, d]: K^T read with strides (column j steps c).
                gemm::gemm(
                    rows,
                    keys,
                    head_dim,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    q.as_ptr().add(q_tile),
                    1,
                    c as isize,
                    k.as_ptr().add(kv_head),
                    c as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (s, p) in scores.chunks_exact(keys).zip(probs.chunks_exact_mut(keys)) {
                softmax_row(s, scale, p);
            }
            // SAFETY: as above; the output tile starts at q_tile and spans rows x head_dim with row stride c.
            unsafe {
                gemm::gemm(
                    rows,
                    head_dim,
                    keys,
                    out_ptr.get().add(q_tile),
                    1,
                    c as isize,
                    false,
                    probs.as_ptr(),
                    1,
                    keys as isize,
                    v.as_ptr().add(kv_head),
                    1,
                    c as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    Ok(())
}

/// Copies a task's finished context rows (`[rows, head_dim]`) into its tile of the output: rows `r0..` of image `b`,
/// the columns of head `h`.
///
/// # Safety
/// `out` points at an output of `shape`'s size (checked), the tile belongs to the calling task alone, and the output
/// outlives the parallel loop.
unsafe fn store_tile(out: OutPtr, shape: &AttentionShape, (b, h, r0): (usize, usize, usize), context: &[f32]) {
    let (c, d) = (shape.width(), shape.head_dim);
    for (i, row) in context.chunks_exact(d).enumerate() {
        // SAFETY: row r0 + i of image b starts inside the output and head h's d columns end within its row
        // (caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(row.as_ptr(), out.get().add((b * shape.queries + r0 + i) * c + h * d), d)
        };
    }
}

/// W8A8 attention for the `int8-dyn` level: both products through the int8 GEMM. Per batch and head, keys are
/// quantized per key (row of K) and values per channel (row of V^T), symmetric absmax; queries are quantized per
/// row as each task gathers them, and the softmax quantizes its probabilities per row as it forms them
/// ([`super::softmax::softmax_row_quantized`]: the codes a separate pass would give, without storing the
/// probabilities). The softmax itself stays in f32. Same blocking and parallelism as [`attention`]; without AVX2,
/// [`attention_i8_scalar`].
pub fn attention_i8(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        return attention_i8_fused(q, k, v, shape, out);
    }
    attention_i8_scalar(q, k, v, shape, out)
}

/// Scalar reference of [`attention_i8`]: the same quantization in separate passes (the softmax's probabilities
/// stored, then quantized by the scalar int8 GEMM), the products through the scalar int8 GEMM. The softmax is
/// [`attention`]'s row kernel, so that only the int8 paths differ from [`attention_i8`].
pub fn attention_i8_scalar(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) -> Result<()> {
    attention_i8_with(q, k, v, shape, out, super::gemm_i8_dynamic_scalar)
}

/// K_h as `[keys, d]` and V_h^T as `[d, keys]` per (batch, head), quantized per row and packed for the int8 GEMM.
fn pack_heads(k: &[f32], v: &[f32], shape: AttentionShape) -> Result<Vec<(super::I8Panels, super::I8Panels)>> {
    let AttentionShape {
        keys,
        heads,
        head_dim,
        batch,
        ..
    } = shape;
    let c = shape.width();
    (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let column = |src: &[f32], j: usize, t: usize| src[(b * keys + j) * c + h * head_dim + t];
            let k_rows: Vec<f32> = (0..keys)
                .flat_map(|j| (0..head_dim).map(move |t| (j, t)))
                .map(|(j, t)| column(k, j, t))
                .collect();
            let v_cols: Vec<f32> = (0..head_dim)
                .flat_map(|t| (0..keys).map(move |j| (j, t)))
                .map(|(j, t)| column(v, j, t))
                .collect();
            let (kc, ks) = super::quantize_rows_i8(&k_rows, keys, head_dim)?;
            let (vc, vs) = super::quantize_rows_i8(&v_cols, head_dim, keys)?;
            Ok((
                super::I8Panels::pack(&kc, &ks, keys, head_dim)?,
                super::I8Panels::pack(&vc, &vs, head_dim, keys)?,
            ))
        })
        .collect()
}

/// [`attention_i8`] with the SIMD GEMM: each task quantizes its query rows straight from `q` (no gathered copy),
/// and its probabilities inside the softmax, into one per-thread code buffer the GEMM blocks read.
#[cfg(target_arch = "x86_64")]
fn attention_i8_fused(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) -> Result<()> {
    use super::as_uninit;
    use super::gemm_i8::{codes_shifted, gemm_codes_block, quantize_row_for_gemm};
    use super::softmax::softmax_row_quantized;
    shape.check(q.len(), k.len(), v.len(), out.len())?;
    let AttentionShape {
        batch,
        queries,
        keys,
        heads,
        head_dim,
    } = shape;
    let c = shape.width();
    let packed = pack_heads(k, v, shape)?;
    let shifted = codes_shifted();
    // Rows of codes are padded to four, as the packed weights' K.
    let (q_stride, p_stride) = (head_dim.div_ceil(4) * 4, keys.div_ceil(4) * 4);
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..batch * heads * shape.blocks()).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(codes, row_scales, scores, context): &mut (Vec<i8>, Vec<f32>, Vec<f32>, Vec<f32>), item| {
            let (b, h, r0, rows) = shape.task(item);
            let (k_packed, vt_packed) = &packed[b * heads + h];
            codes.resize(rows * q_stride.max(p_stride), 0);
            row_scales.resize(rows, 0.0);
            scores.resize(rows * keys, 0.0);
            context.resize(rows * head_dim, 0.0);
            for (i, s) in row_scales.iter_mut().enumerate() {
                let start = (b * queries + r0 + i) * c + h * head_dim;
                let dst = &mut codes[i * q_stride..i * q_stride + head_dim];
                *s = quantize_row_for_gemm(&q[start..start + head_dim], dst, shifted);
            }
            // SAFETY (both products): the GEMM writes initialized floats only.
            gemm_codes_block(codes, shifted, row_scales, rows, k_packed, None, unsafe {
                as_uninit(scores)
            });
            for (i, (row, s)) in scores.chunks_exact_mut(keys).zip(row_scales.iter_mut()).enumerate() {
                *s = softmax_row_quantized(row, scale, &mut codes[i * p_stride..i * p_stride + keys], shifted);
            }
            gemm_codes_block(codes, shifted, row_scales, rows, vt_packed, None, unsafe {
                as_uninit(context)
            });
            // SAFETY: rows r0.. of image b, columns of head h: this task's own tile of `out`, which outlives the loop.
            unsafe { store_tile(out_ptr, &shape, (b, h, r0), context) };
        },
    );
    Ok(())
}

fn attention_i8_with(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    out: &mut [f32],
    gemm_i8: super::gemm_i8::GemmI8Fn,
) -> Result<()> {
    shape.check(q.len(), k.len(), v.len(), out.len())?;
    let AttentionShape {
        batch,
        queries,
        keys,
        heads,
        head_dim,
    } = shape;
    let c = shape.width();
    let packed = pack_heads(k, v, shape)?;
    let blocks = shape.blocks();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let out_ptr = OutPtr(out.as_mut_ptr());
    (0..batch * heads * blocks).into_par_iter().try_for_each_init(
        || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(q_blk, scores, probs, context): &mut (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>), item| {
            let (b, h, r0, rows) = shape.task(item);
            let (k_packed, vt_packed) = &packed[b * heads + h];
            q_blk.clear();
            for r in r0..r0 + rows {
                let start = (b * queries + r) * c + h * head_dim;
                q_blk.extend_from_slice(&q[start..start + head_dim]);
            }
            scores.resize(rows * keys, 0.0);
            probs.resize(rows * keys, 0.0);
            context.resize(rows * head_dim, 0.0);
            gemm_i8(q_blk, rows, head_dim, k_packed, None, scores)?;
            for (s, p) in scores.chunks_exact(keys).zip(probs.chunks_exact_mut(keys)) {
                softmax_row(s, scale, p);
            }
            gemm_i8(probs, rows, keys, vt_packed, None, context)?;
            // SAFETY: rows r0.. of image b, columns of head h: this task's own tile of `out`, which outlives the loop.
            unsafe { store_tile(out_ptr, &shape, (b, h, r0), context) };
            Ok(())
        },
    )
}

/// Scalar reference of [`attention`]: the textbook loops, one query row at a time, same softmax arithmetic.
pub fn attention_scalar(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape, out: &mut [f32]) -> Result<()> {
    shape.check(q.len(), k.len(), v.len(), out.len())?;
    let AttentionShape {
        batch,
        queries,
        keys,
        heads,
        head_dim,
    } = shape;
    let c = shape.width();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let (mut scores, mut probs) = (vec![0f32; keys], vec![0f32; keys]);
    for b in 0..batch {
        for h in 0..heads {
            for r in 0..queries {
                let qrow = &q[(b * queries + r) * c + h * head_dim..][..head_dim];
                for (j, s) in scores.iter_mut().enumerate() {
                    let krow = &k[(b * keys + j) * c + h * head_dim..][..head_dim];
                    *s = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                }
                super::softmax::softmax_row_scalar(&scores, scale, &mut probs);
                let orow = &mut out[(b * queries + r) * c + h * head_dim..][..head_dim];
                orow.fill(0.0);
                for (j, &p) in probs.iter().enumerate() {
                    let vrow = &v[(b * keys + j) * c + h * head_dim..][..head_dim];
                    for (o, &x) in orow.iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm_i8::tests::dispatched_path as gemm_i8_path;
    use crate::kernels::test_util::{
        avx2_path, compared_against, compared_against_scalar, gemm_crate_path, random_vec,
    };

    /// Attention in f64, the ground truth both kernels are held to.
    fn attention_f64(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f64> {
        let c = s.width();
        let mut out = vec![0f64; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for r in 0..s.queries {
                    let qi = (b * s.queries + r) * c + h * s.head_dim;
                    let logits: Vec<f64> = (0..s.keys)
                        .map(|j| {
                            let ki = (b * s.keys + j) * c + h * s.head_dim;
                            (0..s.head_dim)
                                .map(|d| q[qi + d] as f64 * k[ki + d] as f64)
                                .sum::<f64>()
                                / (s.head_dim as f64).sqrt()
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..s.head_dim {
                        out[qi + d] = (0..s.keys)
                            .map(|j| e[j] / sum * v[(b * s.keys + j) * c + h * s.head_dim + d] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn fused_and_scalar_match_f64_on_awkward_sizes() {
        let shapes = [
            (1, 1, 1, 1, 1),
            (1, 5, 3, 1, 7),
            (2, 67, 13, 3, 5),
            (1, 130, 256, 1, 32),
            (2, 64, 64, 2, 32),
            (1, 200, 49, 5, 32),
        ];
        for (i, &(batch, queries, keys, heads, head_dim)) in shapes.iter().enumerate() {
            let s = AttentionShape {
                batch,
                queries,
                keys,
                heads,
                head_dim,
            };
            let c = heads * head_dim;
            let q = random_vec(batch * queries * c, 3 * i as u64 + 1, 2.0);
            let k = random_vec(batch * keys * c, 3 * i as u64 + 2, 2.0);
            let v = random_vec(batch * keys * c, 3 * i as u64 + 3, 1.0);
            let want = attention_f64(&q, &k, &v, s);
            let (mut fast, mut slow) = (vec![f32::NAN; q.len()], vec![f32::NAN; q.len()]);
            attention(&q, &k, &v, s, &mut fast).unwrap();
            attention_scalar(&q, &k, &v, s, &mut slow).unwrap();
            for (j, &w) in want.iter().enumerate() {
                let tol = 1e-5 * (1.0 + w.abs());
                assert!(
                    (fast[j] as f64 - w).abs() <= tol,
                    "fused {s:?} [{j}]: {} vs {w}",
                    fast[j]
                );
                assert!(
                    (slow[j] as f64 - w).abs() <= tol,
                    "scalar {s:?} [{j}]: {} vs {w}",
                    slow[j]
                );
            }
        }
        // The two products run on the gemm crate whatever SEGQ_SIMD says; the softmax is segq's own kernel, which
        // SEGQ_SIMD caps, so it is the path that must be a SIMD one here.
        let softmax: Vec<String> = avx2_path().iter().map(|p| format!("softmax {p}")).collect();
        compared_against(
            &format!(
                "attention (products: {})",
                gemm_crate_path().first().unwrap_or(&"gemm crate scalar")
            ),
            &softmax.iter().map(String::as_str).collect::<Vec<_>>(),
            "scalar and f64",
        );
    }

    #[test]
    fn int8_attention_matches_its_scalar_reference_and_stays_near_f32() {
        for (i, &(batch, queries, keys, heads, head_dim)) in [
            (1, 5, 3, 1, 7),
            (2, 67, 13, 3, 5),
            (1, 130, 256, 1, 32),
            (1, 200, 49, 5, 32),
        ]
        .iter()
        .enumerate()
        {
            let s = AttentionShape {
                batch,
                queries,
                keys,
                heads,
                head_dim,
            };
            let c = heads * head_dim;
            let q = random_vec(batch * queries * c, 50 + i as u64, 2.0);
            let k = random_vec(batch * keys * c, 60 + i as u64, 2.0);
            let v = random_vec(batch * keys * c, 70 + i as u64, 1.0);
            let (mut fast, mut slow, mut float) =
                (vec![f32::NAN; q.len()], vec![f32::NAN; q.len()], vec![0f32; q.len()]);
            attention_i8(&q, &k, &v, s, &mut fast).unwrap();
            // The fused quantization gives exactly what separate passes over stored probabilities give.
            let mut unfused = vec![f32::NAN; q.len()];
            attention_i8_with(&q, &k, &v, s, &mut unfused, crate::kernels::gemm_i8_dynamic).unwrap();
            assert_eq!(fast, unfused, "{s:?}");
            attention_i8_scalar(&q, &k, &v, s, &mut slow).unwrap();
            attention(&q, &k, &v, s, &mut float).unwrap();
            for j in 0..q.len() {
                assert!(
                    (fast[j] - slow[j]).abs() <= 1e-5 * (1.0 + slow[j].abs()),
                    "{s:?} [{j}]: {} vs {}",
                    fast[j],
                    slow[j]
                );
                // Quantization error: a few percent of the value range (|v| <= 1).
                assert!(
                    (fast[j] - float[j]).abs() <= 0.05,
                    "{s:?} [{j}]: int8 {} vs f32 {}",
                    fast[j],
                    float[j]
                );
            }
        }
        let paths: Vec<String> = gemm_i8_path()
            .iter()
            .map(|p| format!("int8 GEMM {p}"))
            .chain(avx2_path().iter().map(|p| format!("softmax {p}")))
            .collect();
        compared_against_scalar("attention_i8", &paths.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn rejects_mismatched_sizes() {
        let s = AttentionShape {
            batch: 1,
            queries: 2,
            keys: 3,
            heads: 1,
            head_dim: 4,
        };
        let mut out = vec![0f32; 8];
        assert!(attention(&[0.0; 8], &[0.0; 12], &[0.0; 11], s, &mut out).is_err());
        assert!(attention_scalar(&[0.0; 7], &[0.0; 12], &[0.0; 12], s, &mut out).is_err());
        let empty = AttentionShape { keys: 0, ..s };
        assert!(attention(&[0.0; 8], &[], &[], empty, &mut out).is_err());
    }
}
