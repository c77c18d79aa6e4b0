//! Float32 GEMMs for `nn.Linear`, 1x1 and strided convolutions on channels-last tokens, with the bias (and a
//! residual) written into the output before the product accumulates onto it: one write pass instead of a zeroed
//! output, the product, then a bias/residual pass. The products run through the `gemm` crate (runtime-dispatched
//! SIMD micro-kernels, strided operands); the convolution gathers its patches (im2col) one block of output pixels at
//! a time into a per-thread buffer that stays in cache.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::{Error, Result};

/// A vector of `rows * n` values, each row written once by `fill(row, dst)` in parallel (no zeroing pass first).
pub(crate) fn filled_rows(rows: usize, n: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * n);
    if n > 0 {
        out.spare_capacity_mut()[..rows * n]
            .par_chunks_mut(n)
            .with_min_len(64)
            .enumerate()
            .for_each(|(r, dst)| fill(r, dst));
    }
    // SAFETY: every one of the rows * n values was written by `fill` above (each chunk is a full row, and `fill`
    // must write all of it: the callers below copy a full row into it).
    unsafe { out.set_len(rows * n) };
    out
}

/// Writes `bias (+ residual row)` into `dst`; zeros when there is no bias.
fn init_row(dst: &mut [MaybeUninit<f32>], bias: Option<&[f32]>, residual: Option<&[f32]>) {
    match (bias, residual) {
        (Some(b), Some(r)) => dst.iter_mut().zip(b.iter().zip(r)).for_each(|(d, (b, r))| {
            d.write(b + r);
        }),
        (Some(b), None) => dst.iter_mut().zip(b).for_each(|(d, &b)| {
            d.write(b);
        }),
        (None, Some(r)) => dst.iter_mut().zip(r).for_each(|(d, &r)| {
            d.write(r);
        }),
        (None, None) => dst.iter_mut().for_each(|d| {
            d.write(0.0);
        }),
    }
}

fn check_linear(
    x: usize,
    rows: usize,
    k: usize,
    w: usize,
    n: usize,
    bias: Option<usize>,
    res: Option<usize>,
) -> Result<()> {
    if x != rows * k || w != n * k || bias.is_some_and(|b| b != n) || res.is_some_and(|r| r != rows * n) {
        return Err(Error::internal(format!(
            "linear: x {x} values for {rows}x{k}, weight {w} for {n}x{k}, bias {bias:?} (want {n}), residual {res:?} \
             (want {})",
            rows * n
        )));
    }
    Ok(())
}

/// `x [rows, k] * W^T + bias (+ residual)` with `W` row-major `[n, k]` (PyTorch's Linear layout): `[rows, n]`.
pub fn linear_f32(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_linear(
        x.len(),
        rows,
        k,
        w.len(),
        n,
        bias.map(<[f32]>::len),
        residual.map(<[f32]>::len),
    )?;
    let mut out = filled_rows(rows, n, |r, dst| {
        init_row(dst, bias, residual.map(|res| &res[r * n..(r + 1) * n]))
    });
    if rows * n * k == 0 {
        return Ok(out);
    }
    // SAFETY: x is rows x k (row stride k), W^T element (kk, j) is w[j * k + kk] (column stride k), out is rows x n;
    // all sizes checked above.
    unsafe {
        gemm::gemm(
            rows,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            true,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            // Small products (a band of the decode head, run inside a parallel task) stay on the calling thread.
            if rows * n * k < 1 << 22 {
                gemm::Parallelism::None
            } else {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            },
        );
    }
    Ok(out)
}

fn check_matmul(a: usize, m: usize, k: usize, b: usize, n: usize, dst: usize) -> Result<()> {
    if a != m * k || b != k * n || dst != m * n {
        return Err(Error::internal(format!(
            "matmul_accumulate: a {a} values for {m}x{k}, b {b} for {k}x{n}, dst {dst} for {m}x{n}"
        )));
    }
    Ok(())
}

/// `a [m, k] * b [k, n]` as a new `[m, n]`, all row-major and contiguous (the decode head's per-stage products).
/// Parallel over the thread pool. The `gemm` call is the one candle's CPU matmul makes (output not read, alpha 0,
/// beta 1), so the results are the same values candle gave when the head multiplied tensors.
pub fn matmul(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut dst = vec![0f32; m * n];
    check_matmul(a.len(), m, k, b.len(), n, dst.len())?;
    if m * n * k == 0 {
        return Ok(dst);
    }
    let threads = rayon::current_num_threads();
    // SAFETY: the three operands are contiguous row-major matrices of the checked sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
    Ok(dst)
}

/// Scalar reference of [`matmul`].
pub fn matmul_scalar(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut dst = vec![0f32; m * n];
    matmul_accumulate_scalar(a, m, k, b, n, &mut dst)?;
    Ok(dst)
}

/// `dst [m, n] += a [m, k] * b [k, n]`, all row-major and contiguous, on the calling thread (for callers that
/// already work on one block per task, such as the decode head's bands).
pub fn matmul_accumulate(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, dst: &mut [f32]) -> Result<()> {
    check_matmul(a.len(), m, k, b.len(), n, dst.len())?;
    if m * n * k == 0 {
        return Ok(());
    }
    // SAFETY: the three operands are contiguous row-major matrices of the checked sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// Scalar reference of [`matmul_accumulate`].
pub fn matmul_accumulate_scalar(a: &[f32], m: usize, k: usize, b: &[f32], n: usize, dst: &mut [f32]) -> Result<()> {
    check_matmul(a.len(), m, k, b.len(), n, dst.len())?;
    for i in 0..m {
        for j in 0..n {
            dst[i * n + j] += (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum::<f32>();
        }
    }
    Ok(())
}

/// Scalar reference of [`linear_f32`].
pub fn linear_f32_scalar(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    check_linear(
        x.len(),
        rows,
        k,
        w.len(),
        n,
        bias.map(<[f32]>::len),
        residual.map(<[f32]>::len),
    )?;
    let mut out = vec![0f32; rows * n];
    for r in 0..rows {
        for j in 0..n {
            let dot: f32 = x[r * k..(r + 1) * k]
                .iter()
                .zip(&w[j * k..(j + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
            out[r * n + j] = dot + bias.map_or(0.0, |b| b[j]) + residual.map_or(0.0, |res| res[r * n + j]);
        }
    }
    Ok(out)
}

/// A dense 2-D convolution (groups = 1) on one channels-last image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// Output `(height, width)`, as PyTorch's Conv2d computes it (dilation 1).
    pub fn out_size(&self) -> (usize, usize) {
        let out = |n: usize| (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride.max(1) + 1;
        (out(self.height), out(self.width))
    }

    /// Values in one gathered patch: kernel x kernel x in_channels.
    fn patch(&self) -> usize {
        self.kernel * self.kernel * self.in_channels
    }

    fn check(&self, x: usize, w: usize, bias: Option<usize>) -> Result<()> {
        let ok = self.kernel > 0
            && self.stride > 0
            && self.height + 2 * self.padding >= self.kernel
            && self.width + 2 * self.padding >= self.kernel
            && x == self.height * self.width * self.in_channels
            && w == self.out_channels * self.patch()
            && bias.is_none_or(|b| b == self.out_channels);
        if !ok {
            return Err(Error::internal(format!(
                "conv2d {self:?}: input {x} values, weight {w}, bias {bias:?} (want input H*W*C_in, weight \
                 C_out*K*K*C_in, bias C_out, kernel within the padded input)"
            )));
        }
        Ok(())
    }
}

/// Gathers the patches of output pixels `p0..p0 + rows` into `col` (`[rows, K*K*C_in]`, zeros where the kernel
/// overlaps the padding). A run of kernel columns inside the image is one contiguous copy in channels-last layout.
fn im2col_block(x: &[f32], s: &ConvShape, out_w: usize, p0: usize, rows: usize, col: &mut [f32]) {
    let (k, cin) = (s.kernel, s.in_channels);
    for (i, dst) in col.chunks_exact_mut(s.patch()).take(rows).enumerate() {
        let (oy, ox) = ((p0 + i) / out_w, (p0 + i) % out_w);
        for ky in 0..k {
            let row = &mut dst[ky * k * cin..(ky + 1) * k * cin];
            let iy = (oy * s.stride + ky) as isize - s.padding as isize;
            if iy < 0 || iy >= s.height as isize {
                row.fill(0.0);
                continue;
            }
            let ix0 = (ox * s.stride) as isize - s.padding as isize;
            // Kernel columns [lo, hi) fall inside the image.
            let lo = (-ix0).clamp(0, k as isize) as usize;
            let hi = (s.width as isize - ix0).clamp(0, k as isize) as usize;
            row[..lo * cin].fill(0.0);
            if hi > lo {
                let start = (iy as usize * s.width + (ix0 + lo as isize) as usize) * cin;
                row[lo * cin..hi * cin].copy_from_slice(&x[start..start + (hi - lo) * cin]);
            }
            row[hi.max(lo) * cin..].fill(0.0);
        }
    }
}

/// Conv2d on one channels-last image `x [H, W, C_in]` with `weight [C_out, K, K, C_in]` (PyTorch's `[C_out, C_in,
/// K, K]` permuted so a patch row is contiguous): returns `[H_out * W_out, C_out]` (tokens, channels last). im2col
/// per block of output pixels into a per-thread buffer, then one GEMM per block accumulating onto the bias;
/// parallel over blocks.
pub fn conv2d_nhwc(x: &[f32], s: ConvShape, weight: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>> {
    s.check(x.len(), weight.len(), bias.map(<[f32]>::len))?;
    let (n, patch) = (s.out_channels, s.patch());
    let (out_h, out_w) = s.out_size();
    let mut out = filled_rows(out_h * out_w, n, |_, dst| init_row(dst, bias, None));
    conv_blocks(x, &s, &mut out, |col, rows, dst| {
        // SAFETY: col is rows x patch, W^T element (kk, j) is weight[j * patch + kk], dst is rows x n.
        unsafe {
            gemm::gemm(
                rows,
                n,
                patch,
                dst.as_mut_ptr(),
                1,
                n as isize,
                true,
                col.as_ptr(),
                1,
                patch as isize,
                weight.as_ptr(),
                patch as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        Ok(())
    })?;
    Ok(out)
}

/// [`conv2d_nhwc`] for level `int8-dyn`: the same im2col blocks, each quantized per patch at run time and multiplied
/// by int8 weights packed in `[K, K, C_in]` column order ([`super::gemm_i8_dynamic`]).
pub fn conv2d_nhwc_i8(x: &[f32], s: ConvShape, weight: &super::I8Panels, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    conv2d_nhwc_i8_with(x, s, weight, bias, super::gemm_i8_dynamic)
}

/// Scalar reference of [`conv2d_nhwc_i8`] (the products through the scalar int8 GEMM).
pub fn conv2d_nhwc_i8_scalar(
    x: &[f32],
    s: ConvShape,
    weight: &super::I8Panels,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    conv2d_nhwc_i8_with(x, s, weight, bias, super::gemm_i8_dynamic_scalar)
}

/// [`conv2d_nhwc_i8`] for level `int8-static`: every patch quantized with the one calibrated scale of the
/// convolution's input ([`super::gemm_i8_static`]; padding zeros quantize to zero codes), no absmax pass.
pub fn conv2d_nhwc_i8_static(
    x: &[f32],
    s: ConvShape,
    weight: &super::I8Panels,
    act_scale: f32,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    conv2d_nhwc_i8_with(x, s, weight, bias, |col, rows, k, w, b, dst| {
        super::gemm_i8_static(col, rows, k, w, act_scale, b, dst)
    })
}

/// Scalar reference of [`conv2d_nhwc_i8_static`] (the products through the scalar int8 GEMM).
pub fn conv2d_nhwc_i8_static_scalar(
    x: &[f32],
    s: ConvShape,
    weight: &super::I8Panels,
    act_scale: f32,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    conv2d_nhwc_i8_with(x, s, weight, bias, |col, rows, k, w, b, dst| {
        super::gemm_i8::gemm_i8_static_scalar(col, rows, k, w, act_scale, b, dst)
    })
}

fn conv2d_nhwc_i8_with(
    x: &[f32],
    s: ConvShape,
    weight: &super::I8Panels,
    bias: Option<&[f32]>,
    gemm_i8: impl Fn(&[f32], usize, usize, &super::I8Panels, Option<&[f32]>, &mut [f32]) -> Result<()> + Sync,
) -> Result<Vec<f32>> {
    s.check(x.len(), weight.n() * weight.k(), bias.map(<[f32]>::len))?;
    if weight.n() != s.out_channels || weight.k() != s.patch() {
        return Err(Error::internal(format!(
            "conv2d {s:?}: int8 weight is {}x{} (want C_out x K*K*C_in)",
            weight.n(),
            weight.k()
        )));
    }
    let (out_h, out_w) = s.out_size();
    let mut out = vec![0f32; out_h * out_w * s.out_channels];
    conv_blocks(x, &s, &mut out, |col, rows, dst| {
        gemm_i8(col, rows, s.patch(), weight, bias, dst)
    })?;
    Ok(out)
}

/// Runs `product(patches, rows, out_rows)` for every block of output pixels, in parallel: `patches` is the block's
/// im2col matrix `[rows, K*K*C_in]` (a per-thread buffer), `out_rows` the block's rows of `out` (`[rows, C_out]`).
fn conv_blocks(
    x: &[f32],
    s: &ConvShape,
    out: &mut [f32],
    product: impl Fn(&[f32], usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    let (_, out_w) = s.out_size();
    let (n, patch) = (s.out_channels, s.patch());
    if out.is_empty() || n == 0 {
        return Ok(());
    }
    // About 256 KiB of gathered patches per block, at least 16 rows.
    let block = (65_536 / patch.max(1)).clamp(16, 256);
    out.par_chunks_mut(block * n)
        .enumerate()
        .try_for_each_init(Vec::new, |col: &mut Vec<f32>, (b, dst)| {
            let rows = dst.len() / n;
            col.resize(rows * patch, 0.0);
            im2col_block(x, s, out_w, b * block, rows, col);
            product(col, rows, dst)
        })
}

/// Scalar reference of [`conv2d_nhwc`]: the direct sum over the kernel window.
pub fn conv2d_nhwc_scalar(x: &[f32], s: ConvShape, weight: &[f32], bias: Option<&[f32]>) -> Result<Vec<f32>> {
    s.check(x.len(), weight.len(), bias.map(<[f32]>::len))?;
    let (out_h, out_w) = s.out_size();
    let (k, cin, n) = (s.kernel, s.in_channels, s.out_channels);
    let mut out = vec![0f32; out_h * out_w * n];
    for oy in 0..out_h {
        for ox in 0..out_w {
            for co in 0..n {
                let mut acc = bias.map_or(0.0, |b| b[co]);
                for ky in 0..k {
                    for kx in 0..k {
                        let iy = (oy * s.stride + ky) as isize - s.padding as isize;
                        let ix = (ox * s.stride + kx) as isize - s.padding as isize;
                        if iy < 0 || ix < 0 || iy >= s.height as isize || ix >= s.width as isize {
                            continue;
                        }
                        for ci in 0..cin {
                            acc += x[(iy as usize * s.width + ix as usize) * cin + ci]
                                * weight[((co * k + ky) * k + kx) * cin + ci];
                        }
                    }
                }
                out[(oy * out_w + ox) * n + co] = acc;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm_i8::tests::dispatched_path as gemm_i8_path;
    use crate::kernels::test_util::{compared_against_scalar, gemm_crate_compared, random_vec};

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{what} [{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn linear_matches_scalar_with_bias_and_residual() {
        for (rows, k, n) in [(1, 1, 1), (7, 3, 5), (65, 33, 17), (300, 64, 256)] {
            let x = random_vec(rows * k, 1, 1.0);
            let w = random_vec(n * k, 2, 0.5);
            let b = random_vec(n, 3, 0.2);
            let r = random_vec(rows * n, 4, 1.0);
            for (bias, res) in [
                (None, None),
                (Some(&b[..]), None),
                (Some(&b[..]), Some(&r[..])),
                (None, Some(&r[..])),
            ] {
                let fast = linear_f32(&x, rows, k, &w, n, bias, res).unwrap();
                let slow = linear_f32_scalar(&x, rows, k, &w, n, bias, res).unwrap();
                assert_close(&fast, &slow, &format!("linear {rows}x{k}x{n}"));
            }
        }
        assert!(linear_f32(&[0.0; 6], 2, 3, &[0.0; 5], 2, None, None).is_err());
        assert!(linear_f32(&[0.0; 6], 2, 3, &[0.0; 6], 2, Some(&[0.0; 3]), None).is_err());
        gemm_crate_compared("linear_f32");
    }

    #[test]
    fn matmul_accumulate_matches_scalar() {
        for (m, k, n) in [(1, 1, 1), (5, 3, 7), (70, 32, 256), (33, 160, 17)] {
            let a = random_vec(m * k, 5, 1.0);
            let b = random_vec(k * n, 6, 0.5);
            let start = random_vec(m * n, 7, 1.0);
            let (mut fast, mut slow) = (start.clone(), start);
            matmul_accumulate(&a, m, k, &b, n, &mut fast).unwrap();
            matmul_accumulate_scalar(&a, m, k, &b, n, &mut slow).unwrap();
            assert_close(&fast, &slow, &format!("matmul_accumulate {m}x{k}x{n}"));
        }
        assert!(matmul_accumulate(&[0.0; 6], 2, 3, &[0.0; 6], 2, &mut [0.0; 3]).is_err());
        gemm_crate_compared("matmul_accumulate");
    }

    #[test]
    fn conv_matches_scalar_on_awkward_shapes() {
        // (H, W, C_in, C_out, K, stride, padding): SegFormer's patch embeddings (7/4/3, 3/2/1) and spatial
        // reductions (K = stride, no padding) on odd sizes, plus a 1x1 and a kernel larger than the input.
        let shapes = [
            (13, 11, 3, 8, 7, 4, 3),
            (9, 10, 5, 6, 3, 2, 1),
            (16, 12, 4, 4, 8, 8, 0),
            (17, 15, 6, 7, 4, 4, 0),
            (5, 4, 3, 2, 1, 1, 0),
            (2, 3, 2, 3, 7, 4, 3),
            (40, 33, 3, 32, 7, 4, 3),
        ];
        for (i, &(height, width, in_channels, out_channels, kernel, stride, padding)) in shapes.iter().enumerate() {
            let s = ConvShape {
                height,
                width,
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            };
            let x = random_vec(height * width * in_channels, 10 + i as u64, 1.0);
            let w = random_vec(out_channels * kernel * kernel * in_channels, 20 + i as u64, 0.3);
            let b = random_vec(out_channels, 30 + i as u64, 0.1);
            for bias in [None, Some(&b[..])] {
                let fast = conv2d_nhwc(&x, s, &w, bias).unwrap();
                let slow = conv2d_nhwc_scalar(&x, s, &w, bias).unwrap();
                let (oh, ow) = s.out_size();
                assert_eq!(fast.len(), oh * ow * out_channels);
                assert_close(&fast, &slow, &format!("conv {s:?}"));
            }
        }
        gemm_crate_compared("conv2d_nhwc");
    }

    #[test]
    fn int8_conv_matches_its_scalar_reference_and_stays_near_f32() {
        for (i, &(height, width, in_channels, out_channels, kernel, stride, padding)) in
            [(13, 11, 3, 8, 7, 4, 3), (16, 12, 4, 4, 8, 8, 0), (9, 10, 5, 6, 3, 2, 1)]
                .iter()
                .enumerate()
        {
            let s = ConvShape {
                height,
                width,
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            };
            let x = random_vec(height * width * in_channels, 40 + i as u64, 1.0);
            let patch = kernel * kernel * in_channels;
            let w = random_vec(out_channels * patch, 50 + i as u64, 0.3);
            let b = random_vec(out_channels, 60 + i as u64, 0.1);
            let (codes, scales) = crate::kernels::quantize_rows_i8(&w, out_channels, patch).unwrap();
            let packed = crate::kernels::I8Panels::pack(&codes, &scales, out_channels, patch).unwrap();
            let fast = conv2d_nhwc_i8(&x, s, &packed, Some(&b)).unwrap();
            let slow = conv2d_nhwc_i8_scalar(&x, s, &packed, Some(&b)).unwrap();
            assert_close(&fast, &slow, &format!("int8 conv {s:?}"));
            let float = conv2d_nhwc(&x, s, &w, Some(&b)).unwrap();
            let range = float.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, (q, f)) in fast.iter().zip(&float).enumerate() {
                assert!((q - f).abs() <= 0.02 * range, "int8 conv {s:?} [{j}]: {q} vs f32 {f}");
            }
        }
        compared_against_scalar("conv2d_nhwc_i8", &gemm_i8_path());
    }

    #[test]
    fn static_int8_conv_matches_its_scalar_reference_and_stays_near_f32() {
        for (i, &(height, width, in_channels, out_channels, kernel, stride, padding)) in [
            (13, 11, 3, 8, 7, 4, 3),
            (16, 12, 4, 4, 8, 8, 0),
            (9, 10, 5, 19, 3, 2, 1),
            (5, 4, 33, 17, 1, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let s = ConvShape {
                height,
                width,
                in_channels,
                out_channels,
                kernel,
                stride,
                padding,
            };
            let x = random_vec(height * width * in_channels, 70 + i as u64, 1.0);
            let patch = kernel * kernel * in_channels;
            let w = random_vec(out_channels * patch, 80 + i as u64, 0.3);
            let b = random_vec(out_channels, 90 + i as u64, 0.1);
            let (codes, scales) = crate::kernels::quantize_rows_i8(&w, out_channels, patch).unwrap();
            let packed = crate::kernels::I8Panels::pack(&codes, &scales, out_channels, patch).unwrap();
            // The scale of the whole input's absmax: nothing clips.
            let act_scale = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let fast = conv2d_nhwc_i8_static(&x, s, &packed, act_scale, Some(&b)).unwrap();
            let slow = conv2d_nhwc_i8_static_scalar(&x, s, &packed, act_scale, Some(&b)).unwrap();
            assert_eq!(fast, slow, "static int8 conv {s:?}");
            let float = conv2d_nhwc(&x, s, &w, Some(&b)).unwrap();
            let range = float.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (j, (q, f)) in fast.iter().zip(&float).enumerate() {
                assert!(
                    (q - f).abs() <= 0.03 * range,
                    "static int8 conv {s:?} [{j}]: {q} vs f32 {f}"
                );
            }
            // A zero scale quantizes every patch to zero codes: the bias alone.
            let zero = conv2d_nhwc_i8_static(&x, s, &packed, 0.0, Some(&b)).unwrap();
            assert!(zero.chunks_exact(out_channels).all(|px| px == &b[..]));
        }
        compared_against_scalar("conv2d_nhwc_i8_static", &gemm_i8_path());
    }

    #[test]
    fn conv_rejects_bad_sizes() {
        let s = ConvShape {
            height: 4,
            width: 4,
            in_channels: 2,
            out_channels: 3,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        assert!(conv2d_nhwc(&[0.0; 31], s, &[0.0; 54], None).is_err());
        assert!(conv2d_nhwc(&[0.0; 32], s, &[0.0; 53], None).is_err());
        assert!(conv2d_nhwc(&[0.0; 32], ConvShape { stride: 0, ..s }, &[0.0; 54], None).is_err());
        assert!(conv2d_nhwc_scalar(&[0.0; 32], s, &[0.0; 54], Some(&[0.0; 2])).is_err());
    }

    #[test]
    fn matmul_matches_scalar_and_candle_bit_for_bit() {
        use candle_core::{Device, Tensor};
        for (m, k, n) in [(1, 1, 1), (5, 3, 7), (70, 32, 256), (1024, 160, 256), (33, 160, 17)] {
            let a = random_vec(m * k, 8, 1.0);
            let b = random_vec(k * n, 9, 0.5);
            let fast = matmul(&a, m, k, &b, n).unwrap();
            assert_close(
                &fast,
                &matmul_scalar(&a, m, k, &b, n).unwrap(),
                &format!("matmul {m}x{k}x{n}"),
            );
            // The decode head used candle's matmul before it had this kernel: the same values, bit for bit.
            let ta = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
            let tb = Tensor::from_slice(&b, (k, n), &Device::Cpu).unwrap();
            let candle = ta.matmul(&tb).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                fast.iter().zip(&candle).all(|(x, y)| x.to_bits() == y.to_bits()),
                "matmul {m}x{k}x{n} differs from candle's"
            );
        }
        assert!(matmul(&[0.0; 6], 2, 3, &[0.0; 5], 2).is_err());
    }
}
