//! Turns an evaluation's results into W&B runs (one per level and method, all in one group): config, metrics as
//! history and summary, a per-class IoU table, and sample images with ground-truth and predicted masks; and
//! [`WandbPublisher`], the evaluation observer that logs them when the run is over.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::eval::results::EvalResults;
use crate::eval::{EvalObserver, EvalOutput, Sample};
use crate::track::{MaskedImage, RunLog, Table, TrackingMode, TrackingSettings};

fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// One `RunLog` per evaluated level (failed levels are logged too, with exit code 1 and their reason).
pub fn run_logs(
    results: &EvalResults,
    samples: &[Sample],
    group: &str,
    name_prefix: Option<&str>,
    tags: &[String],
) -> Vec<RunLog> {
    let class_names = &results.model.class_names;
    let class_labels: BTreeMap<u32, String> = class_names
        .iter()
        .enumerate()
        .map(|(i, n)| (i as u32, n.clone()))
        .collect();
    let baseline = results.baseline().and_then(|b| b.metrics());
    results
        .levels
        .iter()
        .map(|level| {
            let mut config = Map::new();
            config.insert("model".into(), json!(results.model.source));
            config.insert("dataset".into(), json!(results.dataset.source));
            config.insert("split".into(), json!(results.dataset.split));
            config.insert("level".into(), json!(level.level));
            config.insert("method".into(), json!(level.method));
            config.insert("group_size".into(), json!(level.group_size));
            config.insert("threads".into(), json!(results.machine.threads));
            config.insert("segq_version".into(), json!(results.segq_version));
            config.insert("examples".into(), json!(results.counts.evaluated));
            let mut metrics = Map::new();
            let mut tables = Vec::new();
            if let Some(m) = level.metrics() {
                metrics.insert("mean_iou".into(), finite(m.mean_iou));
                metrics.insert("mean_accuracy".into(), finite(m.mean_accuracy));
                metrics.insert("overall_accuracy".into(), finite(m.overall_accuracy));
                metrics.insert("delta_mean_iou_vs_f32".into(), finite(results.delta_miou(level)));
                let mut rows = Vec::new();
                for (id, iou) in m.per_category_iou.iter().enumerate() {
                    let name = class_names.get(id).cloned().unwrap_or_else(|| format!("class_{id}"));
                    let acc = m.per_category_accuracy.get(id).copied().flatten();
                    let base = baseline
                        .as_ref()
                        .and_then(|b| b.per_category_iou.get(id).copied().flatten());
                    if let Some(v) = iou {
                        metrics.insert(format!("class_iou/{name}"), finite(*v));
                    }
                    rows.push(vec![
                        json!(id),
                        json!(name),
                        iou.map(finite).unwrap_or(Value::Null),
                        acc.map(finite).unwrap_or(Value::Null),
                        base.map(finite).unwrap_or(Value::Null),
                        match (iou, base) {
                            (Some(a), Some(b)) => finite(a - b),
                            _ => Value::Null,
                        },
                    ]);
                }
                tables.push(Table {
                    key: "per_class_iou".into(),
                    columns: ["class_id", "class", "iou", "accuracy", "iou_f32", "delta_iou"]
                        .map(String::from)
                        .to_vec(),
                    rows,
                });
            }
            if let Some(a) = level.agreement_metrics() {
                metrics.insert("agreement/pixel".into(), finite(a.pixel_agreement));
                metrics.insert("agreement/mean_iou".into(), finite(a.miou));
            }
            metrics.insert("images_per_s".into(), finite(level.images_per_s_model()));
            metrics.insert("images_per_s_pipeline".into(), finite(level.images_per_s_pipeline()));
            metrics.insert("latency_ms/median".into(), finite(level.model_median_ms()));
            metrics.insert("latency_ms/p95".into(), finite(level.model_p95_ms()));
            metrics.insert("weight_mb".into(), finite(level.weight_bytes_memory as f64 / 1e6));
            metrics.insert("weight_ratio_to_f32".into(), finite(level.ratio_to_f32));
            metrics.insert("bits_per_weight".into(), finite(level.bits_per_weight));
            metrics.insert("load_time_s".into(), finite(level.load_time_s));
            metrics.insert("peak_rss_mb".into(), finite(level.peak_rss_bytes as f64 / 1e6));
            let failed = !level.is_ok();
            if let crate::eval::results::LevelStatus::Failed { reason } = &level.status {
                metrics.insert("failure".into(), json!(reason));
            }
            let images = samples
                .iter()
                .filter_map(|s| {
                    let pred = s.predictions.get(&level.label)?;
                    let (w, h) = (s.image.width(), s.image.height());
                    let pred_mask = image::GrayImage::from_fn(w, h, |x, y| {
                        image::Luma([pred[(y * w + x) as usize].min(255) as u8])
                    });
                    Some(MaskedImage {
                        key: format!("samples/{}", s.id),
                        caption: s.id.clone(),
                        rgb: s.image.clone(),
                        masks: vec![
                            ("ground_truth".into(), s.label.clone()),
                            ("predictions".into(), pred_mask),
                        ],
                        class_labels: class_labels.clone(),
                    })
                })
                .collect();
            let name = match name_prefix {
                Some(p) => format!("{p}-{}", level.label),
                None => level.label.clone(),
            };
            RunLog {
                name,
                group: group.to_string(),
                tags: tags.to_vec(),
                config,
                history: vec![metrics.clone()],
                summary: metrics,
                tables,
                images,
                exit_code: i32::from(failed),
            }
        })
        .collect()
}

/// Logs a finished evaluation to Weights & Biases. Settings are resolved and checked when it is made (segq.toml's
/// `[tracking]` < `WANDB_*` variables < the command line), so a bad setting, a missing key or an unwritable run
/// folder fails before the evaluation.
pub struct WandbPublisher {
    settings: TrackingSettings,
}

impl WandbPublisher {
    /// `None` when tracking is disabled. Run folders go to `output_dir` unless `WANDB_DIR` or `tracking.dir` say
    /// otherwise.
    pub fn new(
        configured: &TrackingSettings,
        mode_override: Option<TrackingMode>,
        output_dir: &std::path::Path,
    ) -> crate::Result<Option<WandbPublisher>> {
        let mut settings = TrackingSettings::from_env_over(configured.clone())?;
        if let Some(mode) = mode_override {
            settings.mode = Some(mode);
        }
        if settings.mode == Some(TrackingMode::Disabled) {
            return Ok(None);
        }
        if settings.dir.is_none() {
            settings.dir = Some(output_dir.to_path_buf());
        }
        crate::track::check_settings(&settings)?;
        Ok(Some(WandbPublisher { settings }))
    }

    /// Logs one run per level; a notice shared by every run is shown once, each failed upload in one line, offline
    /// runs in one sync hint. `Error::Interrupted` when a stop request cut the uploads short (every run is on disk).
    pub fn publish(&self, results: &EvalResults, samples: &[Sample]) -> crate::Result<()> {
        let settings = &self.settings;
        let group = settings
            .group
            .clone()
            .unwrap_or_else(|| format!("segq-eval-{}", results.created_utc.replace([':', '-'], "")));
        let tags = settings.tags.clone().unwrap_or_default();
        let runs = run_logs(results, samples, &group, settings.name.as_deref(), &tags);
        let outcome = crate::track::log_runs(settings, &runs)?;
        let mut shown: Vec<&String> = Vec::new();
        let mut offline = 0;
        for run in &outcome.runs {
            for w in &run.warnings {
                if w.contains("wandb sync") {
                    tracing::info!(run = %run.name, "{w}");
                } else if !shown.contains(&w) {
                    tracing::warn!("{w}");
                    shown.push(w);
                }
            }
            if let Some(line) = &run.upload_error {
                tracing::warn!("{line}");
            }
            match (&run.url, &run.offline_dir) {
                (Some(url), _) => tracing::info!(run = %run.name, %url, "logged to W&B"),
                (None, Some(dir)) => {
                    offline += 1;
                    tracing::info!(run = %run.name, dir = %dir.display(), "W&B run written offline")
                }
                _ => {}
            }
        }
        if offline > 0 {
            let dir = settings.dir_or_default().join("wandb");
            tracing::warn!(
                "{offline} W&B run(s) kept offline in {}; upload them with `wandb sync {}/offline-run-*`",
                dir.display(),
                dir.display()
            );
        }
        if outcome.interrupted {
            return Err(crate::Error::Interrupted);
        }
        Ok(())
    }
}

impl EvalObserver for WandbPublisher {
    fn finished(&mut self, output: &EvalOutput) -> crate::Result<()> {
        self.publish(&output.results, &output.samples)
    }
}
