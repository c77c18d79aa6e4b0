//! SmoothQuant's migration (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
//! Large Language Models") as a transformation of a float [`Segformer`]: per channel, activation range moves from a
//! LayerNorm's output into the weights of the layers it feeds, so that int8 activations lose less to a few large
//! channels while the float function stays the same.
//!
//! Each LayerNorm that feeds Linear layers (or a convolution) directly is smoothed with the layers it feeds:
//! - `layer_norm_1` of every encoder block feeds `attention.self.query` and, without spatial reduction, `key` and
//!   `value`; with it (sr_ratio > 1) `query` and the `attention.self.sr` convolution;
//! - the spatial reduction's `attention.self.layer_norm` feeds `key` and `value`;
//! - `layer_norm_2` feeds `mlp.dense1`.
//!
//! For channel `j`: `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`, `max|X_j|` from the calibration statistics of the
//! fed layers (they all see the same input; a convolution's im2col columns of channel `j` together), `max|W_j|` over
//! every fed weight's input channel `j` (for a convolution, all its kernel positions). The LayerNorm's weight and
//! bias are divided by `s_j` and the fed weights' input channel `j` multiplied by it. `s` is clamped to
//! [[`MIN_SCALE`], [`MAX_SCALE`]]; channels whose activation or weight maximum is zero (or not finite) keep `s = 1`
//! and are counted as skipped. Patch embeddings' LayerNorms feed the residual stream, not a layer, and stay as they
//! are.
//!
//! The model must be float (smooth first, then quantize): afterwards the caller quantizes it again and
//! prepares it (`model::quantize` does both); the float model itself stays ready to run, since its kernels and the
//! decode head (not touched here) do not depend on these weights.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::super::layers::{LayerNorm, Param, ParamMut};
use super::super::plan::MatMul;
use super::Segformer;
use crate::quant::{LayerStats, ModelStats};
use crate::{Error, Result};

/// Smallest per-channel factor applied (a channel's LayerNorm output grows at most 1 / MIN_SCALE times).
pub const MIN_SCALE: f32 = 1e-3;
/// Largest per-channel factor applied.
pub const MAX_SCALE: f32 = 1e3;

/// What [`smooth`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmoothReport {
    /// The migration strength: 0.5 (SmoothQuant's default) equalises each channel's activation and weight maxima;
    /// larger values move more of the activations' range into the weights.
    pub alpha: f32,
    /// Every LayerNorm smoothed, in model order.
    pub norms: Vec<SmoothedNorm>,
}

impl SmoothReport {
    /// Channels smoothed over all LayerNorms.
    pub fn channels_smoothed(&self) -> usize {
        self.norms.iter().map(|n| n.smoothed).sum()
    }
}

/// One LayerNorm and the layers it feeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmoothedNorm {
    /// The LayerNorm's path (`segformer.encoder.block.0.0.layer_norm_1`).
    pub norm: String,
    /// The paths of the layers it feeds.
    pub layers: Vec<String>,
    /// Channels scaled.
    pub smoothed: usize,
    /// Channels left as they were (zero activation or weight maximum).
    pub skipped: usize,
}

/// A weight fed by the LayerNorm being smoothed.
struct Fed<'a> {
    path: String,
    weight: &'a mut MatMul,
    shape: Vec<usize>,
}

fn fed<'a>(path: String, params: Vec<(&'static str, ParamMut<'a>)>) -> Result<Fed<'a>> {
    for (name, param) in params {
        if let ("weight", ParamMut::Weight(weight, shape)) = (name, param) {
            return Ok(Fed {
                path,
                weight,
                shape: shape.to_vec(),
            });
        }
    }
    Err(Error::internal(format!("{path} has no weight")))
}

/// Migrates activation range from every block's LayerNorms into the layers they feed (see the module
/// documentation). `stats` are the float model's calibration statistics (`abs_max` per input column), by layer path.
pub fn smooth(model: &mut Segformer, stats: &ModelStats, alpha: f32) -> Result<SmoothReport> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(Error::invalid(
            "smoothquant alpha",
            format!("{alpha} is not between 0 and 1"),
        ));
    }
    // On a copy (weights are shared until replaced), so that an error leaves the model as it was.
    let mut smoothed = model.clone();
    let mut norms = Vec::new();
    for stage in &mut smoothed.encoder.stages {
        let index = stage.index;
        for (j, block) in stage.block.iter_mut().enumerate() {
            let prefix = format!("segformer.encoder.block.{index}.{j}");
            let at = |suffix: &str| format!("{prefix}.{suffix}");
            let attention = &mut block.attention.self_attention;
            let query = fed(at("attention.self.query"), attention.query.params_mut())?;
            match attention.reduction.as_mut() {
                None => {
                    let key = fed(at("attention.self.key"), attention.key.params_mut())?;
                    let value = fed(at("attention.self.value"), attention.value.params_mut())?;
                    norms.push(smooth_norm(
                        at("layer_norm_1"),
                        &mut block.layer_norm_1,
                        vec![query, key, value],
                        stats,
                        alpha,
                    )?);
                }
                Some(reduction) => {
                    let sr = fed(at("attention.self.sr"), reduction.sr.params_mut())?;
                    norms.push(smooth_norm(
                        at("layer_norm_1"),
                        &mut block.layer_norm_1,
                        vec![query, sr],
                        stats,
                        alpha,
                    )?);
                    let key = fed(at("attention.self.key"), attention.key.params_mut())?;
                    let value = fed(at("attention.self.value"), attention.value.params_mut())?;
                    norms.push(smooth_norm(
                        at("attention.self.layer_norm"),
                        &mut reduction.layer_norm,
                        vec![key, value],
                        stats,
                        alpha,
                    )?);
                }
            }
            let dense1 = fed(at("mlp.dense1"), block.mlp.dense1.params_mut())?;
            norms.push(smooth_norm(
                at("layer_norm_2"),
                &mut block.layer_norm_2,
                vec![dense1],
                stats,
                alpha,
            )?);
        }
    }
    *model = smoothed;
    let report = SmoothReport { alpha, norms };
    tracing::debug!(
        alpha,
        norms = report.norms.len(),
        channels = report.channels_smoothed(),
        "smoothquant migration applied"
    );
    Ok(report)
}

/// Per input channel, `max |x|` from the first fed layer that has statistics (a convolution's kernel positions of a
/// channel together).
fn activation_max(fed: &[Fed<'_>], stats: &ModelStats, channels: usize) -> Result<Vec<f32>> {
    let (path, layer): (&str, &LayerStats) = fed
        .iter()
        .find_map(|f| stats.get(&f.path).map(|s| (f.path.as_str(), s)))
        .ok_or_else(|| {
            let paths: Vec<&str> = fed.iter().map(|f| f.path.as_str()).collect();
            Error::not_found(
                paths.join(", "),
                "no calibration statistics for these layers (smoothquant needs their inputs' maxima)",
            )
        })?;
    if channels == 0 || layer.cols % channels != 0 || layer.abs_max.len() != layer.cols {
        return Err(Error::invalid(
            path,
            format!(
                "calibration statistics have {} input columns, the layer {channels} input channels",
                layer.cols
            ),
        ));
    }
    let per_channel = layer.cols / channels;
    Ok(layer
        .abs_max
        .chunks(per_channel)
        .map(|c| c.iter().fold(0f32, |m, v| m.max(*v)))
        .collect())
}

fn smooth_norm(
    norm_path: String,
    norm: &mut LayerNorm,
    fed: Vec<Fed<'_>>,
    stats: &ModelStats,
    alpha: f32,
) -> Result<SmoothedNorm> {
    let channels = fed.first().and_then(|f| f.shape.get(1).copied()).unwrap_or(0);
    let norm_lengths: Vec<usize> = norm
        .params()
        .iter()
        .filter_map(|(_, p)| match p {
            Param::Vector(v) => Some(v.len()),
            _ => None,
        })
        .collect();
    if norm_lengths.iter().any(|&n| n != channels) {
        return Err(Error::internal(format!(
            "{norm_path}: {norm_lengths:?} values for {channels} channels"
        )));
    }
    let x_max = activation_max(&fed, stats, channels)?;
    // The fed weights' values (float, [out, channels, ...]) and the per-channel weight maximum over all of them.
    let mut w_max = vec![0f32; channels];
    let mut originals = Vec::with_capacity(fed.len());
    for f in &fed {
        let MatMul::F32(values) = &*f.weight else {
            return Err(Error::unsupported(
                &f.path,
                format!(
                    "smoothquant needs float weights, this one is {} (smooth the float model, then quantize)",
                    f.weight.format_name()
                ),
            ));
        };
        let cols: usize = f.shape.iter().skip(1).product();
        if f.shape.get(1) != Some(&channels) || values.len() != f.shape.iter().product::<usize>() {
            return Err(Error::internal(format!(
                "{}: weight {:?} is not fed by {channels} channels",
                f.path, f.shape
            )));
        }
        let per_channel = cols / channels;
        for row in values.chunks(cols) {
            for (m, c) in w_max.iter_mut().zip(row.chunks(per_channel)) {
                *m = c.iter().fold(*m, |m, v| m.max(v.abs()));
            }
        }
        originals.push((Arc::clone(values), per_channel));
    }
    let usable: Vec<bool> = x_max
        .iter()
        .zip(&w_max)
        .map(|(x, w)| *x > 0.0 && *w > 0.0 && x.is_finite() && w.is_finite())
        .collect();
    let scales: Vec<f32> = x_max
        .iter()
        .zip(&w_max)
        .zip(&usable)
        .map(|((&x, &w), &usable)| {
            if !usable {
                return 1.0;
            }
            let s = (x as f64).powf(alpha as f64) / (w as f64).powf(1.0 - alpha as f64);
            (s as f32).clamp(MIN_SCALE, MAX_SCALE)
        })
        .collect();
    for (_, param) in norm.params_mut() {
        if let ParamMut::Vector(v) = param {
            v.iter_mut().zip(&scales).for_each(|(g, s)| *g /= s);
        }
    }
    let mut layers = Vec::with_capacity(fed.len());
    for (f, (values, per_channel)) in fed.into_iter().zip(originals) {
        let mut scaled = values.as_ref().clone();
        for row in scaled.chunks_mut(per_channel * channels) {
            for (c, s) in row.chunks_mut(per_channel).zip(&scales) {
                c.iter_mut().for_each(|v| *v *= s);
            }
        }
        *f.weight = MatMul::F32(Arc::new(scaled));
        layers.push(f.path);
    }
    let skipped = usable.iter().filter(|u| !**u).count();
    Ok(SmoothedNorm {
        norm: norm_path,
        layers,
        smoothed: channels - skipped,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::fixture;
    use super::*;
    use crate::model;
    use crate::quant::testing::SplitMix;
    use crate::quant::{Level, Recipe, StatsNeeds};
    use candle_core::{Device, Tensor};

    fn pixels(h: usize, w: usize) -> Tensor {
        let noise = crate::kernels::test_util::random_vec(3 * h * w, 3, 0.3);
        let v: Vec<f32> = (0..3 * h * w)
            .map(|i| ((i % w) as f32 / w as f32 - 0.5) * 2.0 + ((i / w) % h) as f32 / h as f32 + noise[i])
            .collect();
        Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Statistics for every encoder Linear and convolution: per column `max |x|` log-uniform over 1e-2 .. 1e2, every
    /// 7th column zero (a dead channel).
    fn synthetic_stats(m: &Segformer, seed: u64) -> ModelStats {
        let mut rng = SplitMix(seed);
        let mut stats = ModelStats::new();
        for layer in m.layers() {
            let cols: usize = layer.shape.iter().skip(1).product();
            let mut s = LayerStats::new(cols, StatsNeeds::default());
            s.rows = 1;
            s.abs_max = (0..cols)
                .map(|j| {
                    if j % 7 == 5 {
                        0.0
                    } else {
                        10f64.powf(4.0 * rng.uniform() - 2.0) as f32
                    }
                })
                .collect();
            stats.insert(layer.name, s);
        }
        stats
    }

    fn norm_weight(n: &LayerNorm) -> Vec<f32> {
        match &n.params()[0].1 {
            Param::Vector(v) => v.to_vec(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn smoothing_keeps_the_float_function() {
        for name in ["tiny_a", "tiny_b_bin", "tiny_c"] {
            let original = fixture(name);
            let input = pixels(45, 52);
            let reference = values(&original.forward(&input).unwrap());
            let stats = synthetic_stats(&original, 1);
            for alpha in [0.5, 0.8] {
                let mut m = original.clone();
                let report = smooth(&mut m, &stats, alpha).unwrap();
                m.prepare(Level::F32).unwrap();
                let logits = values(&m.forward(&input).unwrap());
                let max_ref = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
                let diff = logits
                    .iter()
                    .zip(&reference)
                    .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    diff <= 1e-4 * max_ref,
                    "{name} alpha {alpha}: logits moved by {diff} (max {max_ref})"
                );
                // Every block's two LayerNorms, plus the reduction's where sr_ratio > 1.
                let config = original.config();
                let expected: usize = (0..config.num_encoder_blocks)
                    .map(|i| config.depths[i] * if config.sr_ratios[i] > 1 { 3 } else { 2 })
                    .sum();
                assert_eq!(report.norms.len(), expected, "{name}");
                assert_eq!(report.alpha, alpha);
                assert!(report.norms.iter().all(|n| n.skipped > 0 && n.smoothed > 0), "{name}");
            }
        }
    }

    /// At alpha = 0.5, a channel's activation and weight maxima come out equal (SmoothQuant's balance), zero-stat
    /// channels are untouched, and the fed weights' columns are scaled by the factor the LayerNorm was divided by.
    #[test]
    fn half_migration_balances_activation_and_weight_maxima() {
        let original = fixture("tiny_a");
        let stats = synthetic_stats(&original, 2);
        let mut m = original.clone();
        let report = smooth(&mut m, &stats, 0.5).unwrap();
        let (before, after) = (&original.encoder.stages[0].block[0], &m.encoder.stages[0].block[0]);
        assert_eq!(
            report.norms[0].layers,
            [
                "segformer.encoder.block.0.0.attention.self.query",
                "segformer.encoder.block.0.0.attention.self.sr"
            ]
        );
        let mlp = &report.norms[2];
        assert_eq!(mlp.norm, "segformer.encoder.block.0.0.layer_norm_2");
        let x_max = &stats["segformer.encoder.block.0.0.mlp.dense1"].abs_max;
        let (g0, g1) = (norm_weight(&before.layer_norm_2), norm_weight(&after.layer_norm_2));
        let (w0, w1) = (before.mlp.dense1.weight().values(), after.mlp.dense1.weight().values());
        let channels = g0.len();
        let col_max = |w: &[f32], j: usize| w.chunks(channels).fold(0f32, |m, r| m.max(r[j].abs()));
        for j in 0..channels {
            if x_max[j] == 0.0 {
                assert_eq!(g1[j], g0[j], "channel {j}");
                assert_eq!(col_max(&w1, j), col_max(&w0, j));
                continue;
            }
            let s = g0[j] / g1[j];
            let (x_after, w_after) = (x_max[j] / s, col_max(&w1, j));
            assert!((col_max(&w0, j) * s / w_after - 1.0).abs() < 1e-5, "channel {j}");
            if (MIN_SCALE * 1.01..MAX_SCALE * 0.99).contains(&s) {
                assert!(
                    (x_after / w_after - 1.0).abs() < 1e-4,
                    "channel {j}: {x_after} vs {w_after}"
                );
            }
        }
    }

    #[test]
    fn bad_alpha_missing_stats_and_quantized_models_are_refused() {
        let original = fixture("tiny_a");
        let stats = synthetic_stats(&original, 3);
        let mut m = original.clone();
        let err = smooth(&mut m, &stats, 1.5).unwrap_err().to_string();
        assert_eq!(err, "smoothquant alpha: 1.5 is not between 0 and 1");
        let mut partial = stats.clone();
        partial.retain(|k, _| !k.contains("block.1.0"));
        let err = smooth(&mut m, &partial, 0.5).unwrap_err().to_string();
        assert!(
            err.starts_with("segformer.encoder.block.1.0.attention.self.query, segformer.encoder.block.1.0.attention.self.sr: no calibration statistics"),
            "{err}"
        );
        // Nothing changed on error (the first stage was smoothed on a copy only).
        assert_eq!(
            norm_weight(&m.encoder.stages[0].block[0].layer_norm_1),
            norm_weight(&original.encoder.stages[0].block[0].layer_norm_1)
        );
        let (mut q, _) = model::quantize(&original, &Recipe::level_default(Level::Int8)).unwrap();
        let err = smooth(&mut q, &stats, 0.5).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "segformer.encoder.block.0.0.attention.self.query: smoothquant needs float weights, this one is int8"
            ),
            "{err}"
        );
    }
}
