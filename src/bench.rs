//! Speed of the model alone per quantization level (`segq bench`): a deterministic synthetic input of a chosen
//! size, warm-up passes, then timed forward passes; median, p95, images/s, weight bytes, memory, and per-stage times
//! when profiling. Returns typed results; the CLI prints them.
//!
//! The static activation levels (`int8-static`, and the simulated `w8a8-f8`, `w4a8`) need calibrated input scales
//! and the bench has no calibration set: it calibrates them on its own synthetic input (one float pass recording
//! each layer input's histogram, `minmax` thresholds). That fixes the kernels and their cost exactly as a real
//! calibration would; only the scale values differ, and speed does not depend on them.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::eval::results::quantile;
use crate::model::{self, ModelSource};
use crate::quant::{Recipe, UnbuildableLevel};
use crate::{Error, Result};

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub model: ModelSource,
    /// Recipes in order; an [`UnbuildableLevel`] makes [`run`] fail before loading the model.
    pub recipes: Vec<std::result::Result<Recipe, UnbuildableLevel>>,
    pub width: usize,
    pub height: usize,
    pub batch_size: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Time each encoder stage and the decode head separately.
    pub profile: bool,
}

/// How the bench calibrates the static levels' input scales (on its own input; see the module doc).
pub const BENCH_ACT_CALIB: crate::quant::act::ActCalib = crate::quant::act::ActCalib::MinMax;

/// One level's timings and memory.
#[derive(Debug, Clone, Serialize)]
pub struct BenchLevel {
    pub label: String,
    /// Per image (a batch's time divided by its size).
    pub median_ms: f64,
    pub p95_ms: f64,
    pub images_per_s: f64,
    pub weight_bytes: f64,
    pub ratio_to_f32: f64,
    pub bits_per_weight: f64,
    pub peak_rss_bytes: u64,
    /// Heap high-water mark of the passes above what was live before them.
    pub working_bytes: usize,
    /// What inference at this level needs: its weights plus the working memory of a forward pass.
    pub inference_bytes: f64,
    /// Mean ms per pass of each encoder stage, then the decode head (zeros unless profiling).
    pub stage_ms: Vec<f64>,
    /// True for a level whose activation quantization is simulated (`w8a8-f8`, `w4a8`): quantize-dequantize passes
    /// before float GEMMs, so its time is no kernel's speed.
    pub simulated: bool,
}

/// Everything `segq bench` measured, with the machine it ran on.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// `[width, height]`.
    pub size: [usize; 2],
    pub batch_size: usize,
    pub threads: usize,
    pub cpu: String,
    /// The SIMD kernels this CPU runs (e.g. "avx2+fma, int8: avx512-vnni").
    pub kernels: String,
    pub levels: Vec<BenchLevel>,
}

/// Parses `WIDTHxHEIGHT` (each side at least 32).
pub fn parse_size(text: &str) -> Result<(usize, usize)> {
    let bad = |why: &str| Error::config(format!("--size `{text}`"), why);
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| bad("expected WIDTHxHEIGHT"))?;
    let side = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| bad("expected WIDTHxHEIGHT in pixels"))
    };
    let (w, h) = (side(w)?, side(h)?);
    if w < 32 || h < 32 {
        return Err(bad("each side must be at least 32"));
    }
    Ok((w, h))
}

/// Most timed (and warm-up) passes per level: far more than a stable median needs.
pub const MAX_ITERS: usize = 1_000_000;

/// Refuses an input size or batch the machine cannot run, naming the flag at fault and the estimated memory.
fn check_sizes(config: &model::config::SegformerConfig, plan: &BenchPlan) -> Result<()> {
    let (w, h, b) = (plan.width, plan.height, plan.batch_size);
    let what = if h.max(w) > crate::limits::MAX_INPUT_SIDE {
        format!("--size {w}x{h}")
    } else if b > crate::limits::MAX_BATCH_SIZE || b > 1 {
        format!("--batch-size {b}")
    } else {
        format!("--size {w}x{h}")
    };
    model::check_forward_memory(config, h, w, b, &what)
}

/// A deterministic, image-like input: smooth gradients in normalised units.
fn synthetic_input(batch: usize, height: usize, width: usize) -> Result<Tensor> {
    let pixels: Vec<f32> = (0..batch * 3 * height * width)
        .map(|i| {
            (((i % width) as f32 / width as f32) - 0.5) * 2.0 + ((i / width % height) as f32 / height as f32) - 0.5
        })
        .collect();
    Ok(Tensor::from_vec(pixels, (batch, 3, height, width), &Device::Cpu)?)
}

/// Loads the model once and times every recipe of `plan` on it.
pub fn run(plan: &BenchPlan) -> Result<BenchReport> {
    if plan.iters == 0 || plan.batch_size == 0 {
        let key = if plan.iters == 0 { "--iters" } else { "--batch-size" };
        return Err(Error::config(key, "--iters and --batch-size must be at least 1"));
    }
    // A level asked for by name that no method builds is an argument error, before anything is loaded.
    if let Some(Err(UnbuildableLevel { reason, .. })) = plan.recipes.iter().find(|r| r.is_err()) {
        return Err(Error::config("--quant", reason.clone()));
    }
    if plan.iters > MAX_ITERS || plan.warmup > MAX_ITERS {
        let key = if plan.iters > MAX_ITERS { "--iters" } else { "--warmup" };
        return Err(Error::config(
            key,
            format!("{key} must be at most {MAX_ITERS} (a timing needs far fewer passes)"),
        ));
    }
    // Sizes are checked from the config alone first, so a hostile --size or --batch-size costs milliseconds, not a
    // model load; then again with the loaded model's config (a Hub model's is known only now).
    if let Some(config) = model::local_config(&plan.model)? {
        check_sizes(&config, plan)?;
    }
    let loaded = model::load(&plan.model)?;
    check_sizes(loaded.model.config(), plan)?;
    let f32_bytes = loaded.weight_bytes() as f64;
    let input = synthetic_input(plan.batch_size, plan.height, plan.width)?;
    // The static levels' histograms, recorded once on the bench's input when a static level is asked for.
    let mut act_stats: Option<crate::quant::ModelStats> = None;
    let mut levels = Vec::new();
    for recipe in &plan.recipes {
        let recipe = match recipe {
            Ok(r) => r,
            Err(UnbuildableLevel { level, reason }) => {
                // Refused above; kept for a plan built by hand.
                tracing::error!(level = level.name(), reason, "skipped");
                continue;
            }
        };
        let (m, report) = if recipe.level.needs_calibration() {
            let stats = match act_stats.take() {
                Some(stats) => stats,
                None => {
                    let needs = crate::quant::StatsNeeds {
                        hessian: false,
                        histogram: true,
                    };
                    crate::model::probe::capture(&loaded.model, needs, usize::MAX, [Ok(input.clone())])?
                }
            };
            let quantized = model::quantize_static(&loaded.model, recipe, &stats, BENCH_ACT_CALIB);
            act_stats = Some(stats);
            quantized?
        } else {
            model::quantize(&loaded.model, recipe)?
        };
        let bytes = m.weight_bytes() as f64;
        crate::sysinfo::reset_peak_rss();
        // Working memory: the heap high-water mark during the passes above what was live before them (the source
        // model, the input, this level's weights).
        let live_before = crate::sysinfo::heap_bytes();
        crate::sysinfo::reset_peak_heap();
        for _ in 0..plan.warmup {
            m.forward(&input)?;
        }
        let mut times = Vec::with_capacity(plan.iters);
        let mut stages = vec![Duration::ZERO; m.config().num_encoder_blocks + 1];
        for _ in 0..plan.iters {
            let start = Instant::now();
            if plan.profile {
                m.forward_profiled(&input, &mut |i, d| stages[i] += d)?;
            } else {
                m.forward(&input)?;
            }
            times.push(start.elapsed().as_secs_f64() * 1000.0 / plan.batch_size as f64);
        }
        let median = quantile(&times, 0.5);
        let working = crate::sysinfo::peak_heap_bytes().saturating_sub(live_before);
        tracing::info!(level = %report.label, median_ms = median, "benchmarked");
        levels.push(BenchLevel {
            label: report.label,
            median_ms: median,
            p95_ms: quantile(&times, 0.95),
            images_per_s: 1000.0 / median,
            weight_bytes: bytes,
            ratio_to_f32: bytes / f32_bytes,
            bits_per_weight: report.bits_per_weight,
            peak_rss_bytes: crate::sysinfo::peak_rss_bytes(),
            working_bytes: working,
            inference_bytes: bytes + working as f64,
            stage_ms: stages
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0 / plan.iters as f64)
                .collect(),
            simulated: recipe.level.simulated_activations(),
        });
    }
    Ok(BenchReport {
        model: plan.model.to_string(),
        size: [plan.width, plan.height],
        batch_size: plan.batch_size,
        threads: rayon::current_num_threads(),
        cpu: crate::sysinfo::cpu_model(),
        kernels: crate::kernels::cpu_features(),
        levels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Level;

    #[test]
    fn sizes_parse_and_bad_ones_name_the_flag() {
        assert_eq!(parse_size("64x48").unwrap(), (64, 48));
        for bad in ["64", "16x64", "ax64"] {
            assert!(parse_size(bad).unwrap_err().to_string().contains("--size"), "{bad}");
        }
    }

    #[test]
    fn bench_times_every_recipe_on_a_fixture() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny_a");
        let plan = BenchPlan {
            model: ModelSource::Local(dir),
            recipes: vec![
                Ok(Recipe::level_default(Level::F32)),
                Ok(Recipe::level_default(Level::Int8Dyn)),
                Ok(Recipe::level_default(Level::Int8Static)),
                Ok(Recipe::level_default(Level::W4A8)),
            ],
            width: 64,
            height: 48,
            batch_size: 2,
            warmup: 0,
            iters: 2,
            profile: true,
        };
        let report = run(&plan).unwrap();
        assert_eq!(report.size, [64, 48]);
        let labels: Vec<&str> = report.levels.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(labels, ["f32", "int8-dyn-rtn", "int8-static-rtn", "w4a8-rtn-g64"]);
        let simulated: Vec<bool> = report.levels.iter().map(|l| l.simulated).collect();
        assert_eq!(simulated, [false, false, false, true]);
        for level in &report.levels {
            assert!(level.median_ms > 0.0 && level.p95_ms >= level.median_ms, "{level:?}");
            assert!(
                level.stage_ms.iter().all(|&ms| ms > 0.0),
                "profiled stages: {:?}",
                level.stage_ms
            );
        }
        assert!(report.levels[1].weight_bytes < report.levels[0].weight_bytes);
    }
}
