//! Turns an evaluation's results into W&B runs (one per level and method, all in one group): config, metrics as
//! history and summary, a per-class IoU table, sample images with ground-truth and predicted masks, and the
//! level's worst images (a table, and their overlay pictures as in `samples/worst/`, which `segq merge` reads back
//! from the files it copied, so merged runs log what an unsharded eval logs); and
//! [`WandbPublisher`], the evaluation observer that logs them when the run is over (and `segq merge`'s publisher
//! of merged shards), with what it tells the user on the console.
//!
//! Sharded runs: one shard's scores are partial, so by default a shard logs nothing and the merge of all shards
//! publishes the final runs, named and configured exactly as an unsharded evaluation's. With
//! `tracking.shard_runs` a shard also logs its partial runs, named `<level>-shard-I-of-N`, tagged `shard-I-of-N`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::eval::results::EvalResults;
use crate::eval::worst::WorstOfLevel;
use crate::eval::{EvalObserver, EvalOutput, Sample};
use crate::report::overlay::worst_overlay;
use crate::track::{MaskedImage, RunLog, Table, TrackOutcome, TrackingMode, TrackingSettings};

/// The overlay picture of a level's `rank`-th (0-based) worst image, as in `samples/worst/<level>/`.
#[derive(Debug, Clone)]
pub struct WorstPicture {
    pub label: String,
    pub rank: usize,
    pub picture: image::RgbImage,
}

/// Draws the overlays of an evaluation's worst images (the pictures `ReportWriter` saves).
pub fn worst_pictures(worst: &[WorstOfLevel]) -> crate::Result<Vec<WorstPicture>> {
    let mut pictures = Vec::new();
    for level in worst {
        for (rank, entry) in level.entries.iter().enumerate() {
            let Some(pixels) = &entry.pixels else { continue };
            pictures.push(WorstPicture {
                label: level.label.clone(),
                rank,
                picture: worst_overlay(pixels, &entry.image, &level.label, &level.reference_label)?,
            });
        }
    }
    Ok(pictures)
}

/// Reads back the overlays `results` lists from the folder `dir` (a merge's, after
/// [`crate::report::copy_worst_overlays`]); files that are missing or unreadable are skipped with a warning.
pub fn worst_pictures_in(results: &EvalResults, dir: &std::path::Path) -> Vec<WorstPicture> {
    let mut pictures = Vec::new();
    for level in &results.levels {
        for (rank, image) in level.worst_images.iter().enumerate() {
            let Some(relative) = &image.overlay else { continue };
            let path = dir.join(relative);
            match image::open(&path) {
                Ok(picture) => pictures.push(WorstPicture {
                    label: level.label.clone(),
                    rank,
                    picture: picture.to_rgb8(),
                }),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "worst-image overlay not logged to W&B"),
            }
        }
    }
    pictures
}

fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// One `RunLog` per evaluated level (failed levels are logged too, with exit code 1 and their reason), named by
/// the level's label (the `tracking.name` prefix is added by the tracker). A shard's runs are named
/// `<label>-shard-I-of-N` and tagged `shard-I-of-N` (I 0-based, as `--shard I/N`).
pub fn run_logs(
    results: &EvalResults,
    samples: &[Sample],
    worst: &[WorstPicture],
    group: &str,
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
            // Mixed rows: their per-layer rules, and for searched ones how they were chosen.
            if let Some(recipe) = &level.recipe {
                config.insert("recipe".into(), json!(recipe));
            }
            if let Some(auto) = &level.auto {
                config.insert("auto".into(), json!(auto));
            }
            // Calibrated rows: the images their statistics came from, and the layers left to another method.
            if let (true, Some(calibration)) = (level.is_calibrated(), &results.calibration) {
                config.insert("calibration".into(), json!(calibration));
                config.insert("fallback_layers".into(), json!(level.fallbacks.len()));
            }
            config.insert("threads".into(), json!(results.machine.threads));
            config.insert("segq_version".into(), json!(results.segq_version));
            config.insert("examples".into(), json!(results.counts.evaluated));
            if let Some(bootstrap) = results.bootstrap {
                config.insert("bootstrap_resamples".into(), json!(bootstrap.resamples));
                config.insert("bootstrap_seed".into(), json!(bootstrap.seed));
            }
            if let Some((index, count)) = results.dataset.shard {
                config.insert("shard".into(), json!(format!("{index}/{count}")));
            }
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
            // The 95% bootstrap intervals (results.json's `bootstrap` says how they were drawn).
            let summary = level.summary.as_ref();
            for (key, interval) in [
                ("delta_mean_iou_vs_f32", summary.and_then(|s| s.delta_miou_ci)),
                ("agreement/mean_iou", summary.and_then(|s| s.agreement_miou_ci)),
            ] {
                if let Some([low, high]) = interval {
                    metrics.insert(format!("{key}_ci95_low"), finite(low));
                    metrics.insert(format!("{key}_ci95_high"), finite(high));
                }
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
            if !level.worst_images.is_empty() {
                tables.push(Table {
                    key: "worst_images".into(),
                    columns: [
                        "rank",
                        "row",
                        "image",
                        "loss",
                        "pixel_agreement",
                        "disagreeing_pixels",
                        "pixels",
                    ]
                    .map(String::from)
                    .to_vec(),
                    rows: level
                        .worst_images
                        .iter()
                        .enumerate()
                        .map(|(rank, w)| {
                            vec![
                                json!(rank + 1),
                                json!(w.index),
                                json!(w.id),
                                finite(w.loss),
                                finite(w.pixel_agreement),
                                json!(w.disagreeing_pixels),
                                json!(w.pixels),
                            ]
                        })
                        .collect(),
                });
            }
            let worst_images = worst.iter().filter(|w| w.label == level.label).filter_map(|w| {
                let image = level.worst_images.get(w.rank)?;
                Some(MaskedImage {
                    key: format!("worst/{:02}_{}", w.rank + 1, image.id),
                    caption: format!(
                        "#{} {}: {:.2}% of pixels differ from the reference",
                        w.rank + 1,
                        image.id,
                        image.loss * 100.0
                    ),
                    rgb: w.picture.clone(),
                    masks: Vec::new(),
                    class_labels: BTreeMap::new(),
                })
            });
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
                .chain(worst_images)
                .collect();
            let mut tags = tags.to_vec();
            let name = match results.dataset.shard {
                Some((index, count)) => {
                    let shard = format!("shard-{index}-of-{count}");
                    tags.push(shard.clone());
                    format!("{}-{shard}", level.label)
                }
                None => level.label.clone(),
            };
            RunLog {
                name,
                group: group.to_string(),
                tags,
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

/// Logs a finished evaluation (or a merge of shards) to Weights & Biases. Settings are resolved and checked when
/// it is made (segq.toml's `[tracking]` < `WANDB_*` variables < the command line), so a bad setting, a missing key
/// or an unwritable run folder fails before the evaluation.
pub struct WandbPublisher {
    settings: TrackingSettings,
}

impl WandbPublisher {
    /// `None` when tracking is disabled, or when `shard` is a shard of a sharded evaluation and
    /// `tracking.shard_runs` is off (then one line says that the merge publishes). Run folders go to `output_dir`
    /// unless `WANDB_DIR` or `tracking.dir` say otherwise. A shard that logs its runs needs `tracking.group` (or
    /// `WANDB_RUN_GROUP`): the default group is per process, so the shards and the merge would land apart.
    pub fn new(
        configured: &TrackingSettings,
        mode_override: Option<TrackingMode>,
        output_dir: &std::path::Path,
        shard: Option<(usize, usize)>,
    ) -> crate::Result<Option<WandbPublisher>> {
        let mut settings = TrackingSettings::from_env_over(configured.clone())?;
        if let Some(mode) = mode_override {
            settings.mode = Some(mode);
        }
        if settings.mode == Some(TrackingMode::Disabled) {
            return Ok(None);
        }
        if let Some((index, count)) = shard {
            if !settings.shard_runs.unwrap_or(false) {
                tracing::info!(
                    "W&B: shard {index}/{count} logs no runs; `segq merge --wandb` of all {count} shards publishes the \
                     merged runs (tracking.shard_runs=true logs this shard's partial runs too)"
                );
                return Ok(None);
            }
            if settings.group.is_none() {
                return Err(crate::Error::config(
                    "tracking.shard_runs",
                    "tracking.shard_runs logs each shard's runs in a group shared with the other shards and the \
                     merge: set WANDB_RUN_GROUP or tracking.group (e.g. WANDB_RUN_GROUP=segq-$SLURM_ARRAY_JOB_ID)",
                ));
            }
        }
        if settings.dir.is_none() {
            settings.dir = Some(output_dir.to_path_buf());
        }
        crate::track::check_settings(&settings)?;
        Ok(Some(WandbPublisher { settings }))
    }

    /// Logs one run per level. The console gets at most one line per run: offline, one line for all runs (where
    /// they are, the `wandb sync` command, and why they are offline when no key was found); online, each run's
    /// URL, or for a failed upload the reason and the run folder to sync. `Error::Interrupted` when a stop request
    /// cut the uploads short (every run is on disk).
    pub fn publish(&self, results: &EvalResults, samples: &[Sample], worst: &[WorstPicture]) -> crate::Result<()> {
        let group = self.group(|| format!("segq-eval-{}", results.created_utc.replace([':', '-'], "")));
        let runs = run_logs(results, samples, worst, &group, &self.tags());
        self.publish_runs(&runs)
    }

    /// The configured run group (`tracking.group`, `WANDB_RUN_GROUP`), else `default()`.
    pub fn group(&self, default: impl FnOnce() -> String) -> String {
        self.settings.group.clone().unwrap_or_else(default)
    }

    /// The configured tags.
    pub fn tags(&self) -> Vec<String> {
        self.settings.tags.clone().unwrap_or_default()
    }

    /// Logs `runs` and tells the console what happened, as [`WandbPublisher::publish`] does (other commands'
    /// runs, such as `segq sensitivity`'s, go through here).
    pub fn publish_runs(&self, runs: &[RunLog]) -> crate::Result<()> {
        let outcome = crate::track::log_runs(&self.settings, runs)?;
        for line in console_lines(&outcome) {
            if line.warning {
                tracing::warn!("{}", line.text);
            } else {
                tracing::info!("{}", line.text);
            }
        }
        if outcome.interrupted {
            return Err(crate::Error::Interrupted);
        }
        Ok(())
    }
}

/// One line for the console.
#[derive(Debug, PartialEq)]
pub struct ConsoleLine {
    pub warning: bool,
    pub text: String,
}

/// What the user is told about a publication: each uploaded run's URL, each failed upload (reason and folder to
/// sync, from the tracker), and one line for the runs written offline by choice or for lack of a key.
pub fn console_lines(outcome: &TrackOutcome) -> Vec<ConsoleLine> {
    let mut lines = Vec::new();
    let mut offline = 0;
    for run in &outcome.runs {
        match (&run.url, &run.upload_error, run.mode) {
            (Some(url), _, _) => lines.push(ConsoleLine {
                warning: false,
                text: format!("W&B run {}: {url}", run.name),
            }),
            (None, Some(error), _) => lines.push(ConsoleLine {
                warning: true,
                text: error.clone(),
            }),
            (None, None, TrackingMode::Offline) => offline += 1,
            _ => {}
        }
    }
    if offline > 0 {
        let dir = outcome.wandb_dir.display();
        let why = outcome.notice.as_deref().map(|n| format!("{n}: ")).unwrap_or_default();
        let runs = if offline == 1 { "run" } else { "runs" };
        lines.push(ConsoleLine {
            warning: outcome.notice.is_some(),
            text: format!(
                "W&B: {why}{offline} {runs} kept offline in {dir}; upload with `wandb sync {dir}/offline-run-*`"
            ),
        });
    }
    lines
}

impl EvalObserver for WandbPublisher {
    fn finished(&mut self, output: &EvalOutput) -> crate::Result<()> {
        self.publish(&output.results, &output.samples, &worst_pictures(&output.worst)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::worst::{WorstEntry, WorstPixels};
    use crate::track::RunOutcome;

    #[test]
    fn worst_images_are_logged_as_a_table_and_as_their_overlays() {
        let results = crate::eval::results::test_support::run(0..10, 10, None);
        let int4 = &results.levels[2];
        assert!(!int4.worst_images.is_empty());
        let pixels = WorstPixels {
            image: image::RgbImage::new(3, 2),
            scored: image::GrayImage::from_pixel(3, 2, image::Luma([255])),
            reference: vec![0, 1, 2, 3, 4, 5],
            prediction: vec![0, 1, 2, 3, 4, 300],
        };
        let worst = [WorstOfLevel {
            label: int4.label.clone(),
            reference_label: "f32".into(),
            entries: vec![WorstEntry {
                image: int4.worst_images[0].clone(),
                pixels: Some(pixels),
            }],
        }];
        let pictures = worst_pictures(&worst).unwrap();
        assert_eq!(pictures.len(), 1);
        let runs = run_logs(&results, &[], &pictures, "g", &[]);
        let table = runs[2]
            .tables
            .iter()
            .find(|t| t.key == "worst_images")
            .expect("a worst_images table");
        assert_eq!(table.rows.len(), int4.worst_images.len());
        assert_eq!(table.rows[0][1], json!(int4.worst_images[0].index));
        assert_eq!(runs[2].images.len(), 1);
        let image = &runs[2].images[0];
        assert_eq!(image.key, format!("worst/01_{}", int4.worst_images[0].id));
        assert_eq!(image.rgb, pictures[0].picture, "the overlay as saved in samples/worst/");
        // The reference row lists none; without pictures the table is still logged.
        assert!(runs[0].tables.iter().all(|t| t.key != "worst_images"));
        let bare = run_logs(&results, &[], &[], "g", &[]);
        assert!(bare[2].images.is_empty());
        assert!(bare[2].tables.iter().any(|t| t.key == "worst_images"));
        // A merge reads the pictures back from the files: the same pixels.
        let dir = std::env::temp_dir().join(format!("segq-worst-wandb-{}", std::process::id()));
        let mut listed = results.clone();
        listed.levels[2].worst_images.truncate(1);
        let path = dir.join(listed.levels[2].worst_images[0].overlay.as_ref().unwrap());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        pictures[0].picture.save(&path).unwrap();
        let read = worst_pictures_in(&listed, &dir);
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].rank, read[0].picture == pictures[0].picture), (0, true));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn run(name: &str, mode: TrackingMode, url: Option<&str>, error: Option<&str>) -> RunOutcome {
        RunOutcome {
            name: name.into(),
            run_id: "abc12345".into(),
            mode,
            offline_dir: Some(format!("out/wandb/offline-run-x-{name}").into()),
            url: url.map(String::from),
            upload_error: error.map(String::from),
        }
    }

    #[test]
    fn level_runs_carry_the_bootstrap_intervals() {
        let mut results = crate::eval::results::test_support::run(0..6, 6, None);
        results.refresh_summaries();
        let logs = run_logs(&results, &[], &[], "group", &[]);
        let int4 = logs.iter().find(|l| l.name == "int4-hqq-g64").unwrap();
        let [low, high] = results.levels[2].summary.as_ref().unwrap().delta_miou_ci.unwrap();
        assert_eq!(int4.summary["delta_mean_iou_vs_f32_ci95_low"], json!(low));
        assert_eq!(int4.summary["delta_mean_iou_vs_f32_ci95_high"], json!(high));
        assert!(int4.summary["agreement/mean_iou_ci95_low"].as_f64().unwrap() <= 1.0);
        assert_eq!(int4.config["bootstrap_resamples"], json!(200));
        assert_eq!(int4.config["bootstrap_seed"], json!(42));
        // The reference row: its [0, 0] difference, and no agreement interval.
        let f32 = logs.iter().find(|l| l.name == "f32").unwrap();
        assert_eq!(f32.summary["delta_mean_iou_vs_f32_ci95_high"], json!(0.0));
        assert!(!f32.summary.contains_key("agreement/mean_iou_ci95_low"));
    }

    #[test]
    fn offline_runs_get_one_line_and_online_runs_one_each() {
        let offline = TrackOutcome {
            runs: vec![
                run("f32", TrackingMode::Offline, None, None),
                run("int8-rtn", TrackingMode::Offline, None, None),
            ],
            notice: Some("no API key found (WANDB_API_KEY or netrc)".into()),
            wandb_dir: "out/wandb".into(),
            interrupted: false,
        };
        let lines = console_lines(&offline);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].warning);
        assert_eq!(
            lines[0].text,
            "W&B: no API key found (WANDB_API_KEY or netrc): 2 runs kept offline in out/wandb; upload with \
             `wandb sync out/wandb/offline-run-*`"
        );
        let mixed = TrackOutcome {
            runs: vec![
                run("f32", TrackingMode::Online, Some("https://w/r/1"), None),
                run(
                    "int8-rtn",
                    TrackingMode::Offline,
                    None,
                    Some("upload failed; wandb sync x"),
                ),
            ],
            notice: None,
            wandb_dir: "out/wandb".into(),
            interrupted: false,
        };
        let lines = console_lines(&mixed);
        assert_eq!(
            lines,
            [
                ConsoleLine {
                    warning: false,
                    text: "W&B run f32: https://w/r/1".into()
                },
                ConsoleLine {
                    warning: true,
                    text: "upload failed; wandb sync x".into()
                }
            ]
        );
    }
}
