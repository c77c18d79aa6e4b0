//! Speed of the model alone per quantization level (`segq bench`): a deterministic synthetic input of a chosen
//! size, warm-up passes, then timed forward passes; median, p95, images/s, weight bytes, memory, and per-stage times
//! when profiling. Returns typed results; the CLI prints them.
//!
//! With images ([`run_pipeline`], `segq bench --image`), it times instead what `segq predict` does per image, stage
//! by stage: decoding the file, preprocessing (Pillow-exact resize, normalise), batching the input and unbatching
//! the logits, the model's forward pass, postprocessing (bilinear upsampling to the image's size fused with argmax),
//! and writing the outputs (through the caller's writer: the CLI writes the mask and overlay PNGs as `segq predict`
//! does); everything but the forward pass is the pipeline's fixed part.
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

/// What `segq bench --image` times: the whole predict pipeline on real image files.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub model: ModelSource,
    /// Recipes in order, as for [`BenchPlan::recipes`].
    pub recipes: Vec<std::result::Result<Recipe, UnbuildableLevel>>,
    pub images: Vec<std::path::PathBuf>,
    pub protocol: crate::preprocess::Protocol,
    pub decode: crate::data::DecodeOptions,
    pub warmup: usize,
    pub iters: usize,
}

/// Median milliseconds of each stage of the predict pipeline for one image at one level.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineStages {
    /// Reading and decoding the image file.
    pub decode_ms: f64,
    /// Resizing and normalising to the model's input.
    pub preprocess_ms: f64,
    /// Copying the input into a batch tensor and the logits out of the output tensor.
    pub batching_ms: f64,
    /// The model's forward pass.
    pub forward_ms: f64,
    /// Bilinear upsampling of the logits to the image's size fused with argmax.
    pub postprocess_ms: f64,
    /// Writing the outputs (the mask and overlay PNGs from `segq bench --image`).
    pub write_ms: f64,
}

/// One image at one level through the whole pipeline.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineRow {
    pub label: String,
    pub image: String,
    /// The image's `[width, height]`.
    pub image_size: [usize; 2],
    /// The model input's `[width, height]`.
    pub input_size: [usize; 2],
    pub stages: PipelineStages,
    /// Median of the whole pipeline per pass.
    pub total_ms: f64,
    /// Median of everything but the forward pass per pass.
    pub fixed_ms: f64,
    /// `fixed_ms` as a percentage of the median forward pass.
    pub fixed_percent_of_forward: f64,
}

/// Everything `segq bench --image` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub model: String,
    pub threads: usize,
    pub cpu: String,
    pub kernels: String,
    pub rows: Vec<PipelineRow>,
}

/// How the pipeline's last stage writes one image's outputs: given the image, its mask and the model's number of
/// labels (`segq bench --image` writes the mask and overlay PNGs as `segq predict` does, into a scratch folder).
pub type WriteOutputs<'a> = &'a dyn Fn(&image::RgbImage, &[u16], usize) -> Result<()>;

/// Loads the model once and, per recipe and image, runs the predict pipeline `warmup + iters` times, timing each
/// stage; `write` is the output stage.
pub fn run_pipeline(plan: &PipelinePlan, write: WriteOutputs<'_>) -> Result<PipelineReport> {
    use crate::segmenter::{Segmenter, forward_inputs};
    if plan.iters == 0 {
        return Err(Error::config("--iters", "--iters must be at least 1"));
    }
    if plan.iters > MAX_ITERS || plan.warmup > MAX_ITERS {
        let key = if plan.iters > MAX_ITERS { "--iters" } else { "--warmup" };
        return Err(Error::config(
            key,
            format!("{key} must be at most {MAX_ITERS} (a timing needs far fewer passes)"),
        ));
    }
    if let Some(Err(UnbuildableLevel { reason, .. })) = plan.recipes.iter().find(|r| r.is_err()) {
        return Err(Error::config("--quant", reason.clone()));
    }
    // Every image must decode and fit the model before anything is timed.
    let loaded = model::load(&plan.model)?;
    let min_side = loaded.model.config().min_input_side();
    for path in &plan.images {
        let image = crate::data::decode::read_rgb_with(path, &plan.decode)?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        crate::preprocess::check_input_size(&loaded.preprocessor, plan.protocol, w, h, min_side)
            .map_err(|why| Error::invalid(path.display().to_string(), why))?;
        let (iw, ih) = crate::preprocess::target_size(&loaded.preprocessor, plan.protocol, w, h);
        model::check_forward_memory(loaded.model.config(), ih, iw, 1, &path.display().to_string())?;
    }
    let mut rows = Vec::new();
    let num_labels = loaded.model.config().num_labels();
    for recipe in plan.recipes.iter().flatten() {
        if recipe.level.needs_calibration() {
            return Err(Error::config(
                "--quant",
                format!(
                    "{} needs calibrated activation scales; bench --image times levels that need no calibration",
                    recipe.label()
                ),
            ));
        }
        let (m, report) = model::quantize(&loaded.model, recipe)?;
        let label = report.label;
        let segmenter = Segmenter::new(m, loaded.preprocessor.clone(), plan.protocol);
        for path in &plan.images {
            let mut samples: [Vec<f64>; 7] = Default::default();
            let mut sizes = ([0; 2], [0; 2]);
            for pass in 0..plan.warmup + plan.iters {
                let start = Instant::now();
                let image = crate::data::decode::read_rgb_with(path, &plan.decode)?;
                let decoded = Instant::now();
                let input = segmenter.prepare(&image);
                let prepared = Instant::now();
                let timed = forward_inputs(segmenter.model(), &[&input])?.remove(0);
                let forwarded = Instant::now();
                let (width, height) = (image.width() as usize, image.height() as usize);
                let mask = timed.logits.mask(height, width);
                let postprocessed = Instant::now();
                write(&image, &mask, num_labels)?;
                let written = Instant::now();
                sizes = ([width, height], [input.width, input.height]);
                if pass < plan.warmup {
                    continue;
                }
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
                let forward = timed.forward_ms;
                let stages = [
                    ms(start, decoded),
                    ms(decoded, prepared),
                    (ms(prepared, forwarded) - forward).max(0.0),
                    forward,
                    ms(forwarded, postprocessed),
                    ms(postprocessed, written),
                ];
                let total = ms(start, written);
                for (all, value) in samples.iter_mut().zip(stages.into_iter().chain([total])) {
                    all.push(value);
                }
            }
            // The fixed part per pass, so that its median is one pass's, not a sum of medians.
            let fixed = {
                let per_pass: Vec<f64> = (0..plan.iters).map(|i| samples[6][i] - samples[3][i]).collect();
                quantile(&per_pass, 0.5)
            };
            let [decode, preprocess, batching, forward, postprocess, write, total] =
                samples.map(|all| quantile(&all, 0.5));
            tracing::info!(level = %label, image = %path.display(), total_ms = total, fixed_ms = fixed, "benchmarked");
            rows.push(PipelineRow {
                label: label.clone(),
                image: path.display().to_string(),
                image_size: sizes.0,
                input_size: sizes.1,
                stages: PipelineStages {
                    decode_ms: decode,
                    preprocess_ms: preprocess,
                    batching_ms: batching,
                    forward_ms: forward,
                    postprocess_ms: postprocess,
                    write_ms: write,
                },
                total_ms: total,
                fixed_ms: fixed,
                fixed_percent_of_forward: fixed / forward * 100.0,
            });
        }
    }
    Ok(PipelineReport {
        model: plan.model.to_string(),
        threads: rayon::current_num_threads(),
        cpu: crate::sysinfo::cpu_model(),
        kernels: crate::kernels::cpu_features(),
        rows,
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

    #[test]
    fn pipeline_times_every_stage_on_a_fixture_image() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let plan = PipelinePlan {
            model: ModelSource::Local(root.join("models/tiny_a")),
            recipes: vec![
                Ok(Recipe::level_default(Level::F32)),
                Ok(Recipe::level_default(Level::Int8Dyn)),
            ],
            images: vec![root.join("images/photo_61x47.jpg")],
            protocol: crate::preprocess::Protocol::Transformers,
            decode: crate::data::DecodeOptions::default(),
            warmup: 0,
            iters: 2,
        };
        let scratch = std::env::temp_dir().join(format!("segq-bench-pipeline-test-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let write = |image: &image::RgbImage, mask: &[u16], num_labels: usize| {
            crate::report::overlay::write_prediction_pngs(
                image,
                mask,
                num_labels,
                &scratch.join("m.png"),
                &scratch.join("o.png"),
            )
        };
        let report = run_pipeline(&plan, &write).unwrap();
        std::fs::remove_dir_all(&scratch).unwrap();
        let labels: Vec<&str> = report.rows.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["f32", "int8-dyn-rtn"]);
        for row in &report.rows {
            assert_eq!(row.image_size, [61, 47]);
            let s = &row.stages;
            for (name, ms) in [
                ("decode", s.decode_ms),
                ("preprocess", s.preprocess_ms),
                ("forward", s.forward_ms),
                ("postprocess", s.postprocess_ms),
                ("write", s.write_ms),
            ] {
                assert!(ms > 0.0, "{name}: {row:?}");
            }
            assert!(row.total_ms >= s.forward_ms && row.fixed_ms > 0.0, "{row:?}");
        }
    }
}
