//! Depthwise 3x3 convolution (stride 1, zero padding 1) with bias and optional fused exact GELU, for one
//! channels-last image (`[H*W, C]`, the token layout SegFormer's Mix-FFN holds). This is Mix-FFN's `dwconv` + `GELU`;
//! weights are PyTorch's `[C, 1, 3, 3]` flattened to `[C, 9]`.

use rayon::prelude::*;

use super::gemm_i8::QuantizedRows;
use crate::{Error, Result};

#[allow(clippy::too_many_arguments)]
fn check_shapes(
    what: &str,
    input: usize,
    channels: usize,
    height: usize,
    width: usize,
    weight: usize,
    bias: usize,
    out: usize,
) -> Result<()> {
    let plane = channels * height * width;
    if input != plane || out != plane || weight != channels * 9 || bias != channels {
        return Err(Error::internal(format!(
            "{what}: shapes disagree for C={channels} H={height} W={width}: input has {input} values, output \
             {out} (both should be {plane}), weight {weight} (should be {}), bias {bias} (should be {channels})",
            channels * 9
        )));
    }
    Ok(())
}

/// The valid taps of a 3x3 window at `(y, x)`: (offset of the input pixel in pixels, tap index 0..9).
#[inline]
fn taps_at(height: usize, width: usize, y: usize, x: usize) -> ([(usize, usize); 9], usize) {
    let mut taps = [(0usize, 0usize); 9];
    let mut n = 0;
    for dy in 0..3 {
        let Some(yy) = (y + dy).checked_sub(1).filter(|&yy| yy < height) else {
            continue;
        };
        for dx in 0..3 {
            let Some(xx) = (x + dx).checked_sub(1).filter(|&xx| xx < width) else {
                continue;
            };
            taps[n] = (yy * width + xx, dy * 3 + dx);
            n += 1;
        }
    }
    (taps, n)
}

/// Depthwise 3x3 conv in channels-last layout: `input` and `out` are `[H*W, C]` (a token matrix, as SegFormer's
/// Mix-FFN holds them), `weight` is `[C, 9]`: what PyTorch computes on the `[C, H, W]` transpose, without the two
/// transposes. Parallel over image rows; AVX2 across channels when the CPU has it.
#[allow(clippy::too_many_arguments)]
pub fn dwconv3x3_nhwc(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
    fuse_gelu: bool,
    out: &mut [f32],
) -> Result<()> {
    check_shapes(
        "dwconv3x3_nhwc",
        input.len(),
        channels,
        height,
        width,
        weight.len(),
        bias.len(),
        out.len(),
    )?;
    if channels * height * width == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        // Tap-major weights, [9, C], so eight channels of one tap are contiguous.
        let mut taps_weight = vec![0f32; 9 * channels];
        for c in 0..channels {
            for t in 0..9 {
                taps_weight[t * channels + c] = weight[c * 9 + t];
            }
        }
        out.par_chunks_mut(width * channels).enumerate().for_each(|(y, dst)| {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); shapes were checked.
            unsafe { avx2::nhwc_row(input, channels, height, width, &taps_weight, bias, fuse_gelu, y, dst) };
        });
        return Ok(());
    }
    dwconv3x3_nhwc_scalar(input, channels, height, width, weight, bias, fuse_gelu, out)
}

/// Scalar reference of [`dwconv3x3_nhwc`] (also the fallback on CPUs without AVX2).
#[allow(clippy::too_many_arguments)]
pub fn dwconv3x3_nhwc_scalar(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
    fuse_gelu: bool,
    out: &mut [f32],
) -> Result<()> {
    check_shapes(
        "dwconv3x3_nhwc",
        input.len(),
        channels,
        height,
        width,
        weight.len(),
        bias.len(),
        out.len(),
    )?;
    if channels * height * width == 0 {
        return Ok(());
    }
    out.par_chunks_mut(width * channels)
        .enumerate()
        .for_each(|(y, dst)| row_scalar(input, channels, height, width, weight, bias, fuse_gelu, y, dst));
    Ok(())
}

/// One output row `y` of [`dwconv3x3_nhwc_scalar`]; `weight` is `[C, 9]`.
#[allow(clippy::too_many_arguments)]
fn row_scalar(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
    fuse_gelu: bool,
    y: usize,
    dst: &mut [f32],
) {
    for x in 0..width {
        let (taps, n) = taps_at(height, width, y, x);
        for c in 0..channels {
            let mut acc = bias[c];
            for &(pix, t) in &taps[..n] {
                acc += weight[c * 9 + t] * input[pix * channels + c];
            }
            dst[x * channels + c] = if fuse_gelu { super::gelu::gelu_f32(acc) } else { acc };
        }
    }
}

/// Mix-FFN's depthwise 3x3 conv + exact GELU on `batch` channels-last images (`[batch, H*W, C]`), quantized per
/// pixel for the int8 GEMM of the `dense2` that reads it (level `int8-dyn`): each task computes one image row into a
/// per-thread buffer (it stays in cache) and quantizes its pixels from there, so the float map is never stored.
/// The codes and scales are exactly those of [`dwconv3x3_nhwc`] (with GELU) followed by
/// [`super::QuantizedRows::quantize`]. AVX2 when the CPU has it.
#[allow(clippy::too_many_arguments)]
pub fn dwconv3x3_gelu_nhwc_i8(
    input: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
) -> Result<QuantizedRows> {
    dwconv_gelu_i8_with(
        input,
        batch,
        channels,
        height,
        width,
        weight,
        bias,
        super::has_avx2_fma(),
    )
}

/// Scalar reference of [`dwconv3x3_gelu_nhwc_i8`]: the scalar conv and GELU, then the scalar row quantizer.
#[allow(clippy::too_many_arguments)]
pub fn dwconv3x3_gelu_nhwc_i8_scalar(
    input: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
) -> Result<QuantizedRows> {
    dwconv_gelu_i8_with(input, batch, channels, height, width, weight, bias, false)
}

#[allow(clippy::too_many_arguments)]
fn dwconv_gelu_i8_with(
    input: &[f32],
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
    simd: bool,
) -> Result<QuantizedRows> {
    let plane = channels * height * width;
    check_shapes(
        "dwconv3x3_gelu_nhwc_i8",
        input.len() / batch.max(1),
        channels,
        height,
        width,
        weight.len(),
        bias.len(),
        input.len() / batch.max(1),
    )?;
    if input.len() != batch * plane {
        return Err(Error::internal(format!(
            "dwconv3x3_gelu_nhwc_i8: {} input values for {batch} images of {plane}",
            input.len()
        )));
    }
    let mut q = QuantizedRows::zeros(batch * height * width, channels);
    if plane == 0 {
        return Ok(q);
    }
    let (shifted, stride) = (q.shifted(), q.stride());
    // Tap-major weights, [9, C], so eight channels of one tap are contiguous (the AVX2 row's layout).
    let mut taps_weight = vec![0f32; 9 * channels];
    for c in 0..channels {
        for t in 0..9 {
            taps_weight[t * channels + c] = weight[c * 9 + t];
        }
    }
    q.par_rows_mut(width)
        .enumerate()
        .for_each_init(Vec::new, |row, (by, (codes, scales))| {
            let (b, y) = (by / height, by % height);
            let image = &input[b * plane..(b + 1) * plane];
            row.resize(width * channels, 0f32);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the caller saw AVX2 and FMA on this CPU; shapes were checked.
                unsafe { avx2::nhwc_row(image, channels, height, width, &taps_weight, bias, true, y, row) };
                for (x, s) in scales.iter_mut().enumerate() {
                    let dst = &mut codes[x * stride..x * stride + channels];
                    *s = super::gemm_i8::quantize_row_for_gemm(&row[x * channels..(x + 1) * channels], dst, shifted);
                }
                return;
            }
            row_scalar(image, channels, height, width, weight, bias, true, y, row);
            for (x, s) in scales.iter_mut().enumerate() {
                let dst = &mut codes[x * stride..x * stride + channels];
                *s = super::gemm_i8::quantize_row_for_gemm_scalar(&row[x * channels..(x + 1) * channels], dst, shifted);
            }
        });
    Ok(q)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::gelu::{avx2::gelu8, gelu_f32};
    use super::taps_at;
    use std::arch::x86_64::*;

    /// One output row `y` of the channels-last conv; `taps_weight` is `[9, C]`. Blocks of eight channels slide
    /// along the row with their nine tap weights held in registers (one load per multiply-add instead of two), and
    /// GELU is applied to each block while it is in registers; every output gets the same operations in the same
    /// order as one pixel at a time (bias, then the valid taps in window order), so the results are the same.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; shapes must have been checked by the caller.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nhwc_row(
        input: &[f32],
        channels: usize,
        height: usize,
        width: usize,
        taps_weight: &[f32],
        bias: &[f32],
        fuse_gelu: bool,
        y: usize,
        dst: &mut [f32],
    ) {
        let vec_end = channels / 8 * 8;
        // Pixels whose whole 3x3 window is inside the image take the nine taps at fixed offsets.
        let interior_row = y >= 1 && y + 1 < height;
        let window: [isize; 9] = std::array::from_fn(|t| {
            let (dy, dx) = (t / 3, t % 3);
            (dy as isize - 1) * width as isize + dx as isize - 1
        });
        let mut c = 0;
        while c < vec_end {
            // SAFETY: c + 8 <= channels; pixel offsets are inside the image (interior windows, or `taps_at`), taps
            // inside [9, C]; the output pixel x lies in `dst` (one row of `width` pixels).
            unsafe {
                let w: [__m256; 9] =
                    std::array::from_fn(|t| _mm256_loadu_ps(taps_weight.as_ptr().add(t * channels + c)));
                let b = _mm256_loadu_ps(bias.as_ptr().add(c));
                for x in 0..width {
                    let mut acc = b;
                    if interior_row && x >= 1 && x + 1 < width {
                        let center = input.as_ptr().add((y * width + x) * channels + c);
                        for (wt, &off) in w.iter().zip(&window) {
                            let v = _mm256_loadu_ps(center.offset(off * channels as isize));
                            acc = _mm256_fmadd_ps(*wt, v, acc);
                        }
                    } else {
                        let (taps, n) = taps_at(height, width, y, x);
                        for &(pix, t) in &taps[..n] {
                            let v = _mm256_loadu_ps(input.as_ptr().add(pix * channels + c));
                            acc = _mm256_fmadd_ps(w[t], v, acc);
                        }
                    }
                    if fuse_gelu {
                        acc = gelu8(acc);
                    }
                    _mm256_storeu_ps(dst.as_mut_ptr().add(x * channels + c), acc);
                }
            }
            c += 8;
        }
        if vec_end < channels {
            for x in 0..width {
                let (taps, n) = taps_at(height, width, y, x);
                for c in vec_end..channels {
                    let mut acc = bias[c];
                    for &(pix, t) in &taps[..n] {
                        acc += taps_weight[t * channels + c] * input[pix * channels + c];
                    }
                    dst[x * channels + c] = if fuse_gelu { gelu_f32(acc) } else { acc };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{avx2_path, compared_against_scalar, random_vec};

    /// Convolution in f64 with the most literal loops, to judge both f32 versions.
    fn conv_f64(input: &[f32], c: usize, h: usize, w: usize, k: &[f32], b: &[f32]) -> Vec<f64> {
        let mut out = vec![0f64; c * h * w];
        for ch in 0..c {
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let mut acc = b[ch] as f64;
                    for dy in -1..=1i64 {
                        for dx in -1..=1i64 {
                            let (yy, xx) = (y + dy, x + dx);
                            if yy >= 0 && yy < h as i64 && xx >= 0 && xx < w as i64 {
                                acc += k[ch * 9 + ((dy + 1) * 3 + dx + 1) as usize] as f64
                                    * input[ch * h * w + (yy * w as i64 + xx) as usize] as f64;
                            }
                        }
                    }
                    out[ch * h * w + (y * w as i64 + x) as usize] = acc;
                }
            }
        }
        out
    }

    fn to_nhwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        let mut t = vec![0f32; x.len()];
        for ch in 0..c {
            for p in 0..hw {
                t[p * c + ch] = x[ch * hw + p];
            }
        }
        t
    }

    const SHAPES: [(usize, usize, usize); 9] = [
        (5, 7, 13),
        (3, 1, 1),
        (2, 1, 17),
        (4, 9, 1),
        (1, 10, 10),
        (9, 3, 9),
        (17, 11, 26),
        (8, 16, 16),
        (33, 5, 31),
    ];

    fn gelu_ref(x: f64) -> f64 {
        super::super::gelu::tests::gelu_f64(x)
    }

    #[test]
    fn nhwc_simd_and_scalar_match_nchw() {
        for (i, &(c, h, w)) in SHAPES.iter().enumerate() {
            let input = random_vec(c * h * w, 40 + i as u64, 2.0);
            let k = random_vec(c * 9, 50 + i as u64, 1.0);
            let b = random_vec(c, 60 + i as u64, 0.5);
            let want = to_nhwc(
                &conv_f64(&input, c, h, w, &k, &b)
                    .iter()
                    .map(|&v| v as f32)
                    .collect::<Vec<_>>(),
                c,
                h * w,
            );
            let input_nhwc = to_nhwc(&input, c, h * w);
            for gelu in [false, true] {
                let mut fast = vec![f32::NAN; c * h * w];
                let mut slow = vec![f32::NAN; c * h * w];
                dwconv3x3_nhwc(&input_nhwc, c, h, w, &k, &b, gelu, &mut fast).unwrap();
                dwconv3x3_nhwc_scalar(&input_nhwc, c, h, w, &k, &b, gelu, &mut slow).unwrap();
                for j in 0..want.len() {
                    let r = if gelu { gelu_ref(want[j] as f64) } else { want[j] as f64 };
                    let tol = 1e-5 * (1.0 + r.abs());
                    assert!(
                        (fast[j] as f64 - r).abs() < tol,
                        "simd C={c} H={h} W={w} gelu={gelu} [{j}]"
                    );
                    assert!(
                        (slow[j] as f64 - r).abs() < tol,
                        "scalar C={c} H={h} W={w} gelu={gelu} [{j}]"
                    );
                }
            }
        }
        compared_against_scalar("dwconv3x3_nhwc", &avx2_path());
    }

    #[test]
    fn quantized_gelu_conv_equals_conv_then_row_quantizer_on_awkward_sizes() {
        for (i, &(c, h, w)) in SHAPES.iter().enumerate() {
            for batch in [1usize, 2] {
                let input = random_vec(batch * c * h * w, 70 + i as u64, 2.0);
                let k = random_vec(c * 9, 80 + i as u64, 1.0);
                let b = random_vec(c, 90 + i as u64, 0.5);
                // The separate passes: the float map, then the GEMM's row quantizer.
                let mut map = vec![f32::NAN; input.len()];
                let plane = c * h * w;
                for (src, dst) in input.chunks_exact(plane).zip(map.chunks_exact_mut(plane)) {
                    dwconv3x3_nhwc(src, c, h, w, &k, &b, true, dst).unwrap();
                }
                let want = QuantizedRows::quantize(&map, batch * h * w, c).unwrap();
                let fast = dwconv3x3_gelu_nhwc_i8(&input, batch, c, h, w, &k, &b).unwrap();
                assert_eq!(fast, want, "C={c} H={h} W={w} batch {batch}");
                // The scalar reference: GELU may differ by an ulp, so a code by one step.
                let slow = dwconv3x3_gelu_nhwc_i8_scalar(&input, batch, c, h, w, &k, &b).unwrap();
                for r in 0..batch * h * w {
                    let (sf, ss) = (fast.scales()[r], slow.scales()[r]);
                    assert!((sf - ss).abs() <= 1e-5 * sf.abs().max(1e-6), "row {r}: {sf} vs {ss}");
                    for col in 0..c {
                        let (a, z) = (fast.code(r, col) as i32, slow.code(r, col) as i32);
                        assert!((a - z).abs() <= 1, "C={c} H={h} W={w} ({r},{col}): {a} vs {z}");
                    }
                }
            }
        }
        assert!(dwconv3x3_gelu_nhwc_i8(&[0.0; 12], 2, 1, 3, 4, &[0.0; 9], &[0.0]).is_err());
        compared_against_scalar("dwconv3x3_gelu_nhwc_i8", &avx2_path());
    }

    #[test]
    fn shape_mismatch_is_an_error_not_a_panic() {
        let mut out = vec![0f32; 12];
        let e = dwconv3x3_nhwc(&[0.0; 12], 1, 3, 4, &[0.0; 8], &[0.0], false, &mut out).unwrap_err();
        assert!(e.to_string().contains("weight 8"), "{e}");
        assert!(dwconv3x3_nhwc(&[0.0; 11], 1, 3, 4, &[0.0; 9], &[0.0], false, &mut out).is_err());
        assert!(dwconv3x3_nhwc(&[], 0, 3, 4, &[], &[], true, &mut []).is_ok());
    }
}
