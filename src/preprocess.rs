//! Images to model input and logits back to masks, exactly as the Python pipeline does it:
//! `SegformerImageProcessor` (Pillow's antialiased bilinear resize on 8-bit pixels, rescale, normalise) on the way in;
//! PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` then argmax on the way out.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The keys of `preprocessor_config.json` that change pixels; defaults are transformers'.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreprocessorConfig {
    #[serde(default = "yes")]
    pub do_resize: bool,
    #[serde(default = "default_size")]
    pub size: ImageSize,
    #[serde(default = "default_resample")]
    pub resample: u32,
    #[serde(default = "yes")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "yes")]
    pub do_normalize: bool,
    #[serde(default = "default_mean")]
    pub image_mean: Vec<f64>,
    #[serde(default = "default_std")]
    pub image_std: Vec<f64>,
    #[serde(default)]
    pub do_reduce_labels: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

fn yes() -> bool {
    true
}
fn default_size() -> ImageSize {
    ImageSize {
        height: 512,
        width: 512,
    }
}
fn default_resample() -> u32 {
    2
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_mean() -> Vec<f64> {
    vec![0.485, 0.456, 0.406]
}
fn default_std() -> Vec<f64> {
    vec![0.229, 0.224, 0.225]
}

impl Default for PreprocessorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialise")
    }
}

impl PreprocessorConfig {
    /// Reads `preprocessor_config.json` (at most [`crate::model::config::MAX_CONFIG_BYTES`]); errors name the file
    /// and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::limits::read_text_capped(path, crate::model::config::MAX_CONFIG_BYTES)?;
        Self::from_json(&text).map_err(|e| e.within(path.display()))
    }

    /// Parses and checks `preprocessor_config.json` text; errors name the key at fault (callers add the file).
    /// `size` is bounded by [`crate::limits::MAX_INPUT_SIDE`] on each side.
    pub fn from_json(text: &str) -> Result<Self> {
        let malformed = |message: String| {
            Error::invalid(
                "preprocessor_config.json",
                format!("malformed preprocessor_config.json: {message}"),
            )
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| malformed(e.to_string()))?;
        if !value.is_object() {
            return Err(malformed("expected a JSON object".into()));
        }
        let c: PreprocessorConfig = serde_json::from_value(value.clone()).map_err(|e| {
            malformed(crate::model::config::culprit::<PreprocessorConfig>(&value).unwrap_or_else(|| e.to_string()))
        })?;
        if c.image_mean.len() != 3 || c.image_std.len() != 3 {
            return Err(Error::invalid(
                "image_mean",
                "image_mean and image_std must have 3 entries",
            ));
        }
        if c.image_std.contains(&0.0) {
            return Err(Error::invalid("image_std", "image_std has a zero entry"));
        }
        if c.resample != 2 {
            return Err(Error::unsupported(
                "resample",
                format!(
                    "resample = {} is not supported (segq implements Pillow BILINEAR = 2, SegFormer's default)",
                    c.resample
                ),
            ));
        }
        let max = crate::limits::MAX_INPUT_SIDE;
        for (key, side) in [("height", c.size.height), ("width", c.size.width)] {
            if side == 0 {
                return Err(Error::invalid("size", format!("size.{key} must be positive")));
            }
            if side > max {
                return Err(Error::unsupported(
                    "size",
                    format!("size.{key} = {side} is larger than segq accepts ({max} pixels a side)"),
                ));
            }
        }
        Ok(c)
    }
}

/// How images are sized for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// transformers': resize to the processor's size, ignoring aspect ratio.
    #[default]
    Transformers,
    /// mmsegmentation / SegFormer paper: keep-ratio resize to fit 2048x512, whole-image inference.
    Mmseg,
}

/// The size (width, height) an image is resized to under `protocol`.
pub fn target_size(config: &PreprocessorConfig, protocol: Protocol, width: usize, height: usize) -> (usize, usize) {
    match protocol {
        Protocol::Transformers if config.do_resize => (config.size.width, config.size.height),
        Protocol::Transformers => (width, height),
        Protocol::Mmseg => {
            // mmcv's rescale with keep_ratio: scale = min(long/long_side, short/short_side), sizes rounded.
            let (long, short) = (2048.0f64, 512.0f64);
            let scale = (long / width.max(height) as f64).min(short / width.min(height) as f64);
            let w = (width as f64 * scale + 0.5).floor() as usize;
            let h = (height as f64 * scale + 0.5).floor() as usize;
            (w.max(1), h.max(1))
        }
    }
}

/// Refuses a `width x height` image whose model input under `protocol` would have a side shorter than `min_side`
/// (the model's [`min_input_side`](crate::model::config::SegformerConfig::min_input_side)): the model cannot run on
/// it. The message gives both sizes; the caller names the image.
pub fn check_input_size(
    config: &PreprocessorConfig,
    protocol: Protocol,
    width: usize,
    height: usize,
    min_side: usize,
) -> std::result::Result<(), String> {
    let (w, h) = target_size(config, protocol, width, height);
    if w.min(h) < min_side {
        let protocol = match protocol {
            Protocol::Transformers => "transformers",
            Protocol::Mmseg => "mmseg",
        };
        return Err(format!(
            "image is {width}x{height}, which the {protocol} protocol resizes to {w}x{h}; the model needs at least \
             {min_side} pixels on each side"
        ));
    }
    Ok(())
}

/// [`check_input_size`] as the data loader's per-image check, so a too-small image is failed or skipped (and
/// counted) with its file named, like any other bad example.
pub fn input_size_check(config: &PreprocessorConfig, protocol: Protocol, min_side: usize) -> crate::data::ImageCheck {
    let config = config.clone();
    crate::data::ImageCheck(std::sync::Arc::new(move |width, height| {
        check_input_size(&config, protocol, width as usize, height as usize, min_side)
    }))
}

/// Turns an RGB image into normalised pixels [3, H, W] (float32, C order).
pub fn preprocess(image: &RgbImage, config: &PreprocessorConfig, protocol: Protocol) -> Vec<f32> {
    let (w, h) = target_size(config, protocol, image.width() as usize, image.height() as usize);
    let resized;
    let img = if (w, h) != (image.width() as usize, image.height() as usize) {
        resized = resize_bilinear_pillow(image, w, h);
        &resized
    } else {
        image
    };
    normalize(img, config)
}

/// Rescale and normalise as transformers does in float32: (f32(v * factor) - mean) / std.
pub fn normalize(image: &RgbImage, config: &PreprocessorConfig) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    // The result depends only on the channel and the 8-bit value: one table per channel, filled by the formula.
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| normalize_value(v as u8, c, config)));
    let mut out = Vec::with_capacity(3 * w * h);
    for (c, table) in tables.iter().enumerate() {
        out.extend(raw.iter().skip(c).step_by(3).map(|&v| table[usize::from(v)]));
    }
    out
}

/// One value of [`normalize`] (channel `c`), as transformers computes it.
fn normalize_value(value: u8, c: usize, config: &PreprocessorConfig) -> f32 {
    let mut x = value as f64;
    if config.do_rescale {
        x *= config.rescale_factor;
    }
    let mut x = x as f32;
    if config.do_normalize {
        x = (x - config.image_mean[c] as f32) / config.image_std[c] as f32;
    }
    x
}

/// Stacks preprocessed images of one size into a batch tensor [B, 3, H, W].
pub fn batch_tensor(pixels: Vec<Vec<f32>>, height: usize, width: usize) -> Result<Tensor> {
    let b = pixels.len();
    let flat: Vec<f32> = if b == 1 {
        pixels.into_iter().next().unwrap_or_default()
    } else {
        pixels.concat()
    };
    Ok(Tensor::from_vec(flat, (b, 3, height, width), &Device::Cpu)?)
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's per-output-pixel filter taps for one axis: (first input index, taps) in fixed point.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// libImaging/Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter (support 1).
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut taps = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; the clamp at 0 makes that equal to floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax - xmin;
        let mut total = 0.0;
        for (x, tap) in taps.iter_mut().enumerate().take(count) {
            let w = bilinear_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *tap = w;
            total += w;
        }
        for x in 0..count {
            let w = if total != 0.0 { taps[x] / total } else { taps[x] };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coefficients { bounds, ksize, weights }
}

/// Pillow accumulates in 32 bits too: with non-negative bilinear weights summing to 2^22 (plus at most half a unit
/// per tap from rounding), 255 x the weights plus the rounding half stays below 2^31 for any image segq accepts.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((w, h), Image.BILINEAR)` on an RGB image, bit for bit: fixed-point coefficients and two
/// separable passes, each rounded to 8 bits. Pillow 13 runs the vertical pass first when the image loses more than
/// twice as many rows as columns (read from its `ImagingResampleInner`), otherwise the horizontal pass first over
/// only the rows the vertical pass needs.
pub fn resize_bilinear_pillow(image: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return image.clone();
    }
    let src = image.as_raw();
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    let vertical_first = need_horizontal
        && need_vertical
        && in_h > out_h
        && (in_h as i64 - out_h as i64) > 2 * (in_w as i64 - out_w as i64);
    let out = if vertical_first {
        let vert = precompute_coeffs(in_h, out_h);
        let temp = vertical_pass(src, in_w, &vert, out_h, 0);
        horizontal_pass(&temp, in_w, 0, out_h, &precompute_coeffs(in_w, out_w), out_w)
    } else {
        let vert = need_vertical.then(|| precompute_coeffs(in_h, out_h));
        // The horizontal pass covers only the source rows the vertical pass reads.
        let (first_row, last_row) = match &vert {
            Some(v) => (v.bounds[0].0, v.bounds[out_h - 1].0 + v.bounds[out_h - 1].1),
            None => (0, in_h),
        };
        let temp = if need_horizontal {
            horizontal_pass(src, in_w, first_row, last_row, &precompute_coeffs(in_w, out_w), out_w)
        } else {
            src[first_row * in_w * 3..last_row * in_w * 3].to_vec()
        };
        match &vert {
            Some(v) => vertical_pass(&temp, out_w, v, out_h, first_row),
            None => temp,
        }
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("size matches")
}

/// Resamples rows `first_row..last_row` of an RGB buffer `in_w` wide to `out_w` columns.
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    first_row: usize,
    last_row: usize,
    coeffs: &Coefficients,
    out_w: usize,
) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; (last_row - first_row) * out_w * 3];
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(r, row)| {
        let y = r + first_row;
        let line = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for xx in 0..out_w {
            let (xmin, count) = coeffs.bounds[xx];
            let k = &coeffs.weights[xx * coeffs.ksize..xx * coeffs.ksize + count];
            let mut acc = [half; 3];
            for (pixel, &kw) in line[xmin * 3..(xmin + count) * 3].chunks_exact(3).zip(k) {
                for c in 0..3 {
                    acc[c] += pixel[c] as i32 * kw;
                }
            }
            for c in 0..3 {
                row[xx * 3 + c] = clip8(acc[c]);
            }
        }
    });
    out
}

/// Resamples an RGB buffer `width` wide to `out_h` rows; `row_offset` is the source row of the buffer's first row.
/// Each output row accumulates whole source rows (tap by tap, the order Pillow sums in), so the inner loop runs
/// along the row and vectorises.
fn vertical_pass(src: &[u8], width: usize, coeffs: &Coefficients, out_h: usize, row_offset: usize) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let len = width * 3;
    let mut out = vec![0u8; len * out_h];
    out.par_chunks_mut(len).enumerate().for_each_init(
        || vec![0i32; len],
        |acc, (yy, row)| {
            let (ymin, count) = coeffs.bounds[yy];
            let ymin = ymin - row_offset;
            let k = &coeffs.weights[yy * coeffs.ksize..yy * coeffs.ksize + count];
            acc.fill(half);
            for (y, &kw) in k.iter().enumerate() {
                let line = &src[(ymin + y) * len..(ymin + y + 1) * len];
                for (a, &v) in acc.iter_mut().zip(line) {
                    *a += v as i32 * kw;
                }
            }
            for (value, &a) in row.iter_mut().zip(acc.iter()) {
                *value = clip8(a);
            }
        },
    );
    out
}

/// PyTorch's source coordinate and weights for bilinear, align_corners=False, computed in f32 as its CPU kernel does.
fn linear_taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|dst| {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(in_size - 1);
            let l1 = src - i0 as f32;
            let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Class index per pixel at (out_h, out_w) from logits [C, h, w]: bilinear upsampling (align_corners=False) fused
/// with argmax, so the C x H x W upsampled logits are never materialised. Ties go to the lowest class, as torch.argmax.
///
/// Bit-identical to [`upsample_argmax_scalar`]: each value is the same `(t0 * wx0 + t1 * wx1) * wy0 + (b0 * wx0 + b1 *
/// wx1) * wy1` with the same roundings (no fused multiply-add). It works on bands of output rows, computing each
/// class's horizontally interpolated source rows once per band instead of once per output row, then the vertical
/// blend and the running maximum eight output pixels at a time.
pub fn upsample_argmax(logits: &[f32], classes: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<u16> {
    upsample_argmax_with(logits, classes, h, w, out_h, out_w, crate::kernels::has_avx2_fma())
}

/// Output rows per band of [`upsample_argmax`]: a band's interpolated source rows, best values and classes stay in
/// cache while every class passes over them.
const ARGMAX_BAND: usize = 16;

fn upsample_argmax_with(
    logits: &[f32],
    classes: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    avx2: bool,
) -> Vec<u16> {
    let mut out = vec![0u16; out_h * out_w];
    if out.is_empty() || classes == 0 {
        return out;
    }
    let ys = linear_taps(h, out_h);
    let xs = HorizontalTaps::new(w, out_w);
    let plane = h * w;
    out.par_chunks_mut(ARGMAX_BAND * out_w)
        .enumerate()
        .for_each(|(band, rows)| {
            let first = band * ARGMAX_BAND;
            let n = rows.len() / out_w;
            // Source rows are monotone in the output row, so the band reads one contiguous range of them.
            let src_first = ys[first].0;
            let src_rows = ys[first + n - 1].1 + 1 - src_first;
            let group_len = src_rows * out_w;
            let mut horizontal = vec![0f32; ARGMAX_CLASS_GROUP * group_len];
            let mut best = vec![f32::NEG_INFINITY; n * out_w];
            let mut best_class = vec![0i32; n * out_w];
            let mut sources: Vec<&[f32]> = Vec::with_capacity(ARGMAX_CLASS_GROUP * src_rows);
            for group_first in (0..classes).step_by(ARGMAX_CLASS_GROUP) {
                let group = ARGMAX_CLASS_GROUP.min(classes - group_first);
                sources.clear();
                for c in group_first..group_first + group {
                    let y = c * plane + src_first * w;
                    sources.extend(logits[y..y + src_rows * w].chunks_exact(w));
                }
                xs.interpolate(&sources, &mut horizontal[..group * group_len], avx2);
                let group = ClassGroup {
                    horizontal: &horizontal[..group * group_len],
                    group_len,
                    first_class: group_first as i32,
                };
                for k in 0..n {
                    let (y0, y1, wy0, wy1) = ys[first + k];
                    let rows = VerticalTaps {
                        top: (y0 - src_first) * out_w,
                        bottom: (y1 - src_first) * out_w,
                        wy0,
                        wy1,
                    };
                    let best = &mut best[k * out_w..(k + 1) * out_w];
                    let best_class = &mut best_class[k * out_w..(k + 1) * out_w];
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: `avx2` is true only when the CPU has AVX2 (kernels::has_avx2_fma).
                        unsafe { avx2::blend_max(&group, &rows, best, best_class) };
                        continue;
                    }
                    blend_max_scalar(&group, &rows, best, best_class, 0);
                }
            }
            for (o, &c) in rows.iter_mut().zip(&best_class) {
                *o = c as u16;
            }
        });
    out
}

/// Classes whose interpolated rows a band holds at once: each output pixel's running maximum stays in a register
/// while they pass over it.
const ARGMAX_CLASS_GROUP: usize = 8;

/// The horizontally interpolated source rows of a band for consecutive classes: class `first_class + j` at
/// `horizontal[j * group_len..]`, one row of the output's width per source row.
struct ClassGroup<'a> {
    horizontal: &'a [f32],
    group_len: usize,
    first_class: i32,
}

/// Where one output row's two source rows start within a class's rows, and their weights.
struct VerticalTaps {
    top: usize,
    bottom: usize,
    wy0: f32,
    wy1: f32,
}

/// The running argmax over the group's classes, in class order, of `top * wy0 + bottom * wy1` from pixel `from` on.
fn blend_max_scalar(group: &ClassGroup, rows: &VerticalTaps, best: &mut [f32], best_class: &mut [i32], from: usize) {
    for (j, class_rows) in group.horizontal.chunks_exact(group.group_len).enumerate() {
        let top = &class_rows[rows.top..rows.top + best.len()];
        let bottom = &class_rows[rows.bottom..rows.bottom + best.len()];
        for i in from..best.len() {
            let v = top[i] * rows.wy0 + bottom[i] * rows.wy1;
            // NaN never wins, as in the scalar reference.
            if v > best[i] {
                best[i] = v;
                best_class[i] = group.first_class + j as i32;
            }
        }
    }
}

/// [`linear_taps`] along the width, with what the AVX2 path needs to gather eight outputs' two source values with
/// one load and one in-register permutation each: per block of eight outputs, the first source index of each tap and
/// each output's offset from it (only for blocks whose taps lie within eight loadable values).
struct HorizontalTaps {
    taps: Vec<(usize, usize, f32, f32)>,
    /// Per block of 8 outputs: `Some((base0, base1))` when `x0 - base0` and `x1 - base1` are all in 0..8 and both
    /// eight-value loads stay inside the row.
    blocks: Vec<Option<(usize, usize)>>,
    offsets0: Vec<i32>,
    offsets1: Vec<i32>,
    wx0: Vec<f32>,
    wx1: Vec<f32>,
}

impl HorizontalTaps {
    fn new(w: usize, out_w: usize) -> HorizontalTaps {
        let taps = linear_taps(w, out_w);
        let mut blocks = Vec::with_capacity(out_w / 8);
        let (mut offsets0, mut offsets1) = (vec![0i32; out_w], vec![0i32; out_w]);
        for (b, block) in taps.chunks_exact(8).enumerate() {
            let (base0, base1) = (block[0].0, block[0].1);
            let fits = block
                .iter()
                .all(|&(x0, x1, _, _)| x0 - base0 < 8 && x1 >= base1 && x1 - base1 < 8)
                && base0 + 8 <= w
                && base1 + 8 <= w;
            for (i, &(x0, x1, _, _)) in block.iter().enumerate() {
                offsets0[b * 8 + i] = (x0 - base0) as i32;
                offsets1[b * 8 + i] = x1.wrapping_sub(base1) as i32;
            }
            blocks.push(fits.then_some((base0, base1)));
        }
        HorizontalTaps {
            wx0: taps.iter().map(|t| t.2).collect(),
            wx1: taps.iter().map(|t| t.3).collect(),
            taps,
            blocks,
            offsets0,
            offsets1,
        }
    }

    /// `out[ox] = row[x0] * wx0 + row[x1] * wx1` for every output column of every row of `rows`, written to
    /// consecutive rows of `out`.
    fn interpolate(&self, rows: &[&[f32]], out: &mut [f32], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: `avx2` is true only when the CPU has AVX2.
            unsafe { avx2::interpolate(self, rows, out) };
            return;
        }
        for (row, out) in rows.iter().zip(out.chunks_exact_mut(self.taps.len())) {
            self.interpolate_scalar(row, out, 0..self.taps.len());
        }
    }

    fn interpolate_scalar(&self, row: &[f32], out: &mut [f32], columns: std::ops::Range<usize>) {
        for ox in columns {
            let (x0, x1, wx0, wx1) = self.taps[ox];
            out[ox] = row[x0] * wx0 + row[x1] * wx1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ClassGroup, HorizontalTaps, VerticalTaps};

    /// [`HorizontalTaps::interpolate_scalar`] eight outputs at a time where the block's taps allow it, block by
    /// block over all rows so that each block's offsets and weights are loaded once.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interpolate(taps: &HorizontalTaps, rows: &[&[f32]], out: &mut [f32]) {
        let out_w = taps.taps.len();
        assert!(out.len() >= rows.len() * out_w);
        for (b, block) in taps.blocks.iter().enumerate() {
            let at = b * 8;
            let Some((base0, base1)) = *block else {
                for (r, row) in rows.iter().enumerate() {
                    taps.interpolate_scalar(row, &mut out[r * out_w..(r + 1) * out_w], at..at + 8);
                }
                continue;
            };
            // SAFETY: `at + 8 <= out_w`, the length of every tap table.
            let (offsets0, offsets1, wx0, wx1) = unsafe {
                (
                    _mm256_loadu_si256(taps.offsets0.as_ptr().add(at).cast()),
                    _mm256_loadu_si256(taps.offsets1.as_ptr().add(at).cast()),
                    _mm256_loadu_ps(taps.wx0.as_ptr().add(at)),
                    _mm256_loadu_ps(taps.wx1.as_ptr().add(at)),
                )
            };
            for (r, row) in rows.iter().enumerate() {
                assert!(base0.max(base1) + 8 <= row.len());
                // SAFETY: both eight-value loads lie inside the row (asserted), and the store inside `out`'s row r.
                unsafe {
                    let a = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row.as_ptr().add(base0)), offsets0);
                    let c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(row.as_ptr().add(base1)), offsets1);
                    let v = _mm256_add_ps(_mm256_mul_ps(a, wx0), _mm256_mul_ps(c, wx1));
                    _mm256_storeu_ps(out.as_mut_ptr().add(r * out_w + at), v);
                }
            }
        }
        for (r, row) in rows.iter().enumerate() {
            taps.interpolate_scalar(row, &mut out[r * out_w..(r + 1) * out_w], taps.blocks.len() * 8..out_w);
        }
    }

    /// [`super::blend_max_scalar`] eight pixels at a time, each block's maximum kept in registers over the group.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn blend_max(group: &ClassGroup, rows: &VerticalTaps, best: &mut [f32], best_class: &mut [i32]) {
        let n = best.len();
        let classes = group.horizontal.len() / group.group_len;
        assert!(best_class.len() >= n && rows.top.max(rows.bottom) + n <= group.group_len);
        let (w0, w1) = (_mm256_set1_ps(rows.wy0), _mm256_set1_ps(rows.wy1));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n; every class's rows hold `top + n` and `bottom + n` values (asserted above), and
            // `best`/`best_class` at least n.
            unsafe {
                let mut max = _mm256_loadu_ps(best.as_ptr().add(i));
                let mut class = _mm256_loadu_si256(best_class.as_ptr().add(i).cast());
                for j in 0..classes {
                    let base = group.horizontal.as_ptr().add(j * group.group_len + i);
                    let v = _mm256_add_ps(
                        _mm256_mul_ps(_mm256_loadu_ps(base.add(rows.top)), w0),
                        _mm256_mul_ps(_mm256_loadu_ps(base.add(rows.bottom)), w1),
                    );
                    // Ordered greater-than: false when either is NaN, as `v > best` is.
                    let wins = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, max));
                    // maxps(v, max) is `v > max ? v : max` (max when v is NaN; equal values are equal).
                    max = _mm256_max_ps(v, max);
                    let c = _mm256_set1_epi32(group.first_class + j as i32);
                    class = _mm256_blendv_epi8(class, c, wins);
                }
                _mm256_storeu_ps(best.as_mut_ptr().add(i), max);
                _mm256_storeu_si256(best_class.as_mut_ptr().add(i).cast(), class);
            }
            i += 8;
        }
        super::blend_max_scalar(group, rows, best, best_class, i);
    }
}

/// The plain reference of [`upsample_argmax`]: every output pixel's value per class computed directly.
pub fn upsample_argmax_scalar(
    logits: &[f32],
    classes: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<u16> {
    let ys = linear_taps(h, out_h);
    let xs = linear_taps(w, out_w);
    let plane = h * w;
    let mut out = vec![0u16; out_h * out_w];
    for (oy, row) in out.chunks_mut(out_w.max(1)).enumerate() {
        let (y0, y1, wy0, wy1) = ys[oy];
        let mut best = vec![f32::NEG_INFINITY; out_w];
        for c in 0..classes {
            let base = &logits[c * plane..(c + 1) * plane];
            let r0 = &base[y0 * w..(y0 + 1) * w];
            let r1 = &base[y1 * w..(y1 + 1) * w];
            for (ox, &(x0, x1, wx0, wx1)) in xs.iter().enumerate() {
                let v = (r0[x0] * wx0 + r0[x1] * wx1) * wy0 + (r1[x0] * wx0 + r1[x1] * wx1) * wy1;
                // NaN never wins, as torch.argmax would pick it; logits here are finite.
                if v > best[ox] {
                    best[ox] = v;
                    row[ox] = c as u16;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_resize_is_a_copy() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_bilinear_pillow(&img, 5, 4), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(13, 7, image::Rgb([200, 17, 99]));
        for (w, h) in [(64, 64), (3, 2), (13, 20), (40, 7)] {
            let out = resize_bilinear_pillow(&img, w, h);
            assert!(out.pixels().all(|p| p.0 == [200, 17, 99]), "{w}x{h}");
        }
    }

    #[test]
    fn upsample_argmax_same_size_is_argmax() {
        // 2 classes on a 2x2 map, output at the same size: plain argmax with ties to class 0.
        let logits = [1.0, 0.0, 3.0, 5.0, 2.0, 0.0, 3.0, 4.0];
        assert_eq!(upsample_argmax(&logits, 2, 2, 2, 2, 2), vec![1, 0, 0, 0]);
    }

    /// The banded and vectorised upsample + argmax equals the scalar reference exactly, on every path this CPU
    /// runs, for upsampling, downsampling and odd sizes (tails not a multiple of 8, bands not a multiple of 16),
    /// with ties (quantised logits) and a NaN.
    #[test]
    fn upsample_argmax_matches_scalar_on_awkward_sizes() {
        let cases = [
            (3, 5, 7, 19, 23),
            (150, 16, 16, 47, 61),
            (7, 13, 11, 389, 517),
            (5, 32, 32, 17, 9),
            (4, 1, 1, 3, 5),
            (2, 9, 40, 9, 40),
            (6, 20, 3, 130, 31),
        ];
        for (classes, h, w, out_h, out_w) in cases {
            let mut logits = crate::kernels::test_util::random_vec(classes * h * w, (h * 31 + w) as u64, 4.0);
            // Coarse values make ties between classes common.
            for v in logits.iter_mut().step_by(3) {
                *v = v.round();
            }
            logits[classes * h * w / 2] = f32::NAN;
            let want = upsample_argmax_scalar(&logits, classes, h, w, out_h, out_w);
            let mut paths = vec![false];
            if crate::kernels::has_avx2_fma() {
                paths.push(true);
            }
            for avx2 in paths {
                let got = upsample_argmax_with(&logits, classes, h, w, out_h, out_w, avx2);
                assert_eq!(got, want, "{classes} classes {h}x{w} -> {out_h}x{out_w}, avx2 {avx2}");
            }
        }
    }

    #[test]
    fn normalize_applies_the_formula_per_value() {
        let img = RgbImage::from_fn(7, 3, |x, y| {
            image::Rgb([x as u8 * 40, y as u8 * 120, (x * y) as u8 * 9 + 1])
        });
        let configs = [
            PreprocessorConfig::default(),
            PreprocessorConfig {
                do_rescale: false,
                ..Default::default()
            },
            PreprocessorConfig {
                do_normalize: false,
                ..Default::default()
            },
        ];
        for config in configs {
            let out = normalize(&img, &config);
            for (i, p) in img.pixels().enumerate() {
                for c in 0..3 {
                    let mut x = p.0[c] as f64;
                    if config.do_rescale {
                        x *= config.rescale_factor;
                    }
                    let mut x = x as f32;
                    if config.do_normalize {
                        x = (x - config.image_mean[c] as f32) / config.image_std[c] as f32;
                    }
                    assert_eq!(
                        out[c * 21 + i].to_bits(),
                        x.to_bits(),
                        "{config:?} pixel {i} channel {c}"
                    );
                }
            }
        }
    }

    #[test]
    fn mmseg_size_fits_2048x512() {
        let c = PreprocessorConfig::default();
        assert_eq!(target_size(&c, Protocol::Mmseg, 683, 512), (683, 512));
        assert_eq!(target_size(&c, Protocol::Mmseg, 4000, 1000), (2048, 512));
        assert_eq!(target_size(&c, Protocol::Transformers, 683, 512), (512, 512));
    }
}
