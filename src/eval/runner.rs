//! The evaluation runner: one pass over the dataset in which every batch goes through every level's model, so
//! images are decoded once and each quantized prediction is compared with the float model's on the same pixels.
//! It owns timing, peak memory per level, sample overlays and interruption; scores go to `metrics` accumulators.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use image::{GrayImage, RgbImage};

use crate::data::{Example, Loader};
use crate::eval::metrics::ConfusionMatrix;
use crate::eval::results::{Counts, DatasetInfo, EvalResults, LevelResult, LevelStatus, MachineInfo, ModelInfo};
use crate::model::segformer::Segformer;
use crate::preprocess::{self, PreprocessorConfig, Protocol};
use crate::{Error, Result};

/// One model to evaluate: the float baseline or a quantized copy, or the reason it could not be built.
pub struct Variant {
    pub label: String,
    pub level: String,
    pub method: String,
    pub group_size: Option<usize>,
    pub bits_per_weight: f64,
    pub weight_bytes_memory: u64,
    pub weight_bytes_disk: Option<u64>,
    pub load_time_s: f64,
    pub quantize_time_s: f64,
    pub model: std::result::Result<Segformer, String>,
}

/// Options of one evaluation pass.
pub struct RunOptions {
    pub preprocessor: PreprocessorConfig,
    pub protocol: Protocol,
    pub ignore_index: u8,
    /// The first `samples` examples are kept (image, label, every level's prediction) for overlays and W&B.
    pub samples: usize,
    /// Set from a Ctrl-C handler: the runner stops after the current batch and marks the result incomplete.
    pub interrupt: Arc<AtomicBool>,
    pub show_progress: bool,
}

/// A kept example with every level's prediction, keyed by level label.
pub struct Sample {
    pub id: String,
    pub image: RgbImage,
    pub label: GrayImage,
    pub predictions: BTreeMap<String, Vec<u16>>,
}

/// What `run` gives back besides the result file.
pub struct RunOutput {
    pub results: EvalResults,
    pub samples: Vec<Sample>,
}

struct LevelState {
    variant: Variant,
    result: LevelResult,
    wall_s: f64,
}

/// Evaluates every variant over the loader's examples. The first variant must be the f32 baseline: its predictions
/// are the reference for every other level's agreement.
#[allow(clippy::too_many_arguments)]
pub fn run(
    variants: Vec<Variant>,
    loader: &mut Loader,
    options: &RunOptions,
    model_info: ModelInfo,
    dataset_info: DatasetInfo,
    machine: MachineInfo,
    config: serde_json::Value,
) -> Result<RunOutput> {
    let num_labels = model_info.num_labels;
    if variants.first().map(|v| v.level.as_str()) != Some("f32") {
        return Err(Error::Config(
            "internal: the f32 baseline must be the first level evaluated".into(),
        ));
    }
    let f32_bytes = variants[0].weight_bytes_memory.max(1) as f64;
    let mut levels: Vec<LevelState> = variants
        .into_iter()
        .map(|variant| {
            let status = match &variant.model {
                Ok(_) => LevelStatus::Ok,
                Err(reason) => LevelStatus::Failed { reason: reason.clone() },
            };
            let ok = variant.model.is_ok();
            let result = LevelResult {
                label: variant.label.clone(),
                level: variant.level.clone(),
                method: variant.method.clone(),
                group_size: variant.group_size,
                bits_per_weight: variant.bits_per_weight,
                status,
                confusion: ok.then(|| ConfusionMatrix::new(num_labels)),
                agreement: (ok && variant.level != "f32").then(|| ConfusionMatrix::new(num_labels)),
                weight_bytes_memory: variant.weight_bytes_memory,
                weight_bytes_disk: variant.weight_bytes_disk,
                ratio_to_f32: variant.weight_bytes_memory as f64 / f32_bytes,
                load_time_s: variant.load_time_s,
                quantize_time_s: variant.quantize_time_s,
                peak_rss_bytes: 0,
                model_latency_ms: Vec::new(),
                pipeline_latency_ms: Vec::new(),
                wall_time_s: 0.0,
                summary: None,
            };
            LevelState {
                variant,
                result,
                wall_s: 0.0,
            }
        })
        .collect();

    let progress = if options.show_progress {
        let bar = indicatif::ProgressBar::new(loader.total() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} images [{elapsed_precise} < {eta}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut complete = true;
    let mut wait_start = Instant::now();
    loop {
        if options.interrupt.load(Ordering::SeqCst) {
            tracing::warn!("interrupted: writing the results so far, marked incomplete");
            complete = false;
            break;
        }
        let Some(batch) = loader.next() else { break };
        let batch = batch?;
        let data_s = wait_start.elapsed().as_secs_f64();
        if batch.is_empty() {
            wait_start = Instant::now();
            continue;
        }
        evaluate_batch(&batch, &mut levels, options, data_s, &mut samples)?;
        progress.inc(batch.len() as u64);
        wait_start = Instant::now();
    }
    progress.finish_and_clear();
    let stats = loader.stats();
    let counts = Counts {
        read: stats.read as u64,
        evaluated: stats.decoded as u64,
        skipped: stats.skipped as u64,
        skip_reasons: stats.skip_reasons.clone(),
    };
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, first = ?stats.skip_reasons.first(), "examples skipped");
    }
    if stats.decoded + stats.skipped < stats.selected {
        complete = false;
    }
    let levels = levels
        .into_iter()
        .map(|mut s| {
            s.result.wall_time_s = s.wall_s;
            s.result
        })
        .collect();
    let mut results = EvalResults {
        segq_version: crate::VERSION.to_string(),
        created_utc: crate::eval::results::utc_now(),
        complete,
        config,
        model: model_info,
        dataset: dataset_info,
        machine,
        counts,
        levels,
    };
    results.refresh_summaries();
    Ok(RunOutput { results, samples })
}

fn evaluate_batch(
    batch: &[Example],
    levels: &mut [LevelState],
    options: &RunOptions,
    data_s: f64,
    samples: &mut Vec<Sample>,
) -> Result<()> {
    let n = batch.len();
    // Preprocess once for all levels; images of one size share a forward pass.
    let pre_start = Instant::now();
    let inputs: Vec<(Vec<f32>, usize, usize)> = batch
        .iter()
        .map(|ex| {
            let (w, h) = preprocess::target_size(
                &options.preprocessor,
                options.protocol,
                ex.image.width() as usize,
                ex.image.height() as usize,
            );
            (
                preprocess::preprocess(&ex.image, &options.preprocessor, options.protocol),
                h,
                w,
            )
        })
        .collect();
    let groups = group_by_size(&inputs);
    let shared_per_image_ms = (data_s + pre_start.elapsed().as_secs_f64()) * 1000.0 / n as f64;

    let mut reference: Vec<Vec<u16>> = Vec::new();
    let keep_from = samples.len();
    // The first `options.samples` examples of the run are kept, with every level's prediction added below.
    for ex in batch.iter().take(options.samples.saturating_sub(samples.len())) {
        samples.push(Sample {
            id: ex.id.clone(),
            image: ex.image.clone(),
            label: ex.label.clone(),
            predictions: BTreeMap::new(),
        });
    }
    for state in levels.iter_mut() {
        let Ok(model) = &state.variant.model else { continue };
        let level_start = Instant::now();
        crate::sysinfo::reset_peak_rss();
        let mut predictions: Vec<Vec<u16>> = vec![Vec::new(); n];
        let mut model_ms = vec![0f64; n];
        let mut failure = None;
        for group in &groups {
            let (_, h, w) = inputs[group[0]];
            let pixels: Vec<Vec<f32>> = group.iter().map(|&i| inputs[i].0.clone()).collect();
            let tensor = preprocess::batch_tensor(pixels, h, w)?;
            let start = Instant::now();
            let logits = match model.forward(&tensor) {
                Ok(l) => l,
                Err(e) => {
                    failure = Some(format!("forward pass failed: {e}"));
                    break;
                }
            };
            let forward_ms = start.elapsed().as_secs_f64() * 1000.0 / group.len() as f64;
            let (_, c, lh, lw) = logits.dims4()?;
            let flat = logits.flatten_all()?.to_vec1::<f32>()?;
            for (j, &i) in group.iter().enumerate() {
                let ex = &batch[i];
                let plane = &flat[j * c * lh * lw..(j + 1) * c * lh * lw];
                predictions[i] = preprocess::upsample_argmax(
                    plane,
                    c,
                    lh,
                    lw,
                    ex.label.height() as usize,
                    ex.label.width() as usize,
                );
                model_ms[i] = forward_ms;
            }
        }
        if let Some(reason) = failure {
            tracing::error!(level = %state.result.label, %reason, "level failed; the others go on");
            state.result.status = LevelStatus::Failed { reason };
            state.variant.model = Err("failed".into());
            continue;
        }
        let post_start = Instant::now();
        for (i, ex) in batch.iter().enumerate() {
            let pred = &predictions[i];
            if let Some(conf) = state.result.confusion.as_mut() {
                conf.add(pred, ex.label.as_raw(), options.ignore_index)?;
            }
            if let Some(agreement) = state.result.agreement.as_mut()
                && let Some(reference) = reference.get(i)
            {
                agreement.add_agreement(pred, reference, Some(ex.label.as_raw()), options.ignore_index)?;
            }
        }
        let post_ms = post_start.elapsed().as_secs_f64() * 1000.0 / n as f64;
        for ms in &model_ms {
            state.result.model_latency_ms.push(*ms);
            state
                .result
                .pipeline_latency_ms
                .push(shared_per_image_ms + ms + post_ms);
        }
        state.result.peak_rss_bytes = state.result.peak_rss_bytes.max(crate::sysinfo::peak_rss_bytes());
        state.wall_s += level_start.elapsed().as_secs_f64() + shared_per_image_ms * n as f64 / 1000.0;
        for (k, sample) in samples.iter_mut().enumerate().skip(keep_from) {
            let i = k - keep_from;
            sample
                .predictions
                .insert(state.result.label.clone(), predictions[i].clone());
        }
        if state.result.level == "f32" {
            reference = predictions;
        }
    }
    Ok(())
}

/// Indices of inputs grouped by (height, width), in first-seen order, so each group is one batched forward pass.
fn group_by_size(inputs: &[(Vec<f32>, usize, usize)]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, (_, h, w)) in inputs.iter().enumerate() {
        match groups.iter_mut().find(|g| inputs[g[0]].1 == *h && inputs[g[0]].2 == *w) {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups
}

/// Saves each sample's overlay per level under `dir/<level>/<id>.png`, plus the image and ground truth once.
pub fn save_sample_overlays(samples: &[Sample], dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for sample in samples {
        let truth: Vec<u16> = sample.label.as_raw().iter().map(|&v| v as u16).collect();
        let gt_dir = dir.join("ground_truth");
        std::fs::create_dir_all(&gt_dir).map_err(|e| Error::io(&gt_dir, e))?;
        let gt_path = gt_dir.join(format!("{}.png", sample.id));
        crate::report::overlay::overlay(&sample.image, &truth, 0.5)?
            .save(&gt_path)
            .map_err(|e| Error::Report(format!("{}: {e}", gt_path.display())))?;
        written.push(gt_path);
        for (label, pred) in &sample.predictions {
            let level_dir = dir.join(label);
            std::fs::create_dir_all(&level_dir).map_err(|e| Error::io(&level_dir, e))?;
            let path = level_dir.join(format!("{}.png", sample.id));
            crate::report::overlay::overlay(&sample.image, pred, 0.5)?
                .save(&path)
                .map_err(|e| Error::Report(format!("{}: {e}", path.display())))?;
            written.push(path);
        }
    }
    Ok(written)
}
