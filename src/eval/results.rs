//! The result file of one evaluation run (`results.json`): plain serde data written once, then read by reports,
//! trackers and `segq merge`. Raw material is kept (confusion matrices, per-image latencies) so that every derived
//! figure can be recomputed exactly after merging shards; the derived figures are added to the file for readers
//! but never read back.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::eval::bootstrap::{BootstrapSettings, LevelIntervals};
use crate::eval::metrics::{Agreement, ConfusionMatrix, MeanIou, nan_as_null};
use crate::eval::per_image::ImageCounts;
use crate::eval::worst::WorstImage;
use crate::quant::{Level, Method};
use crate::{Error, Result};

/// The level of the float baseline row that deltas are measured against.
pub const BASELINE_LEVEL: Level = Level::F32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    pub segq_version: String,
    /// When the run finished, `YYYY-MM-DDTHH:MM:SSZ` (see [`utc_now`]).
    pub created_utc: String,
    /// False when the run stopped early or a merge lacked shards: the scores cover a subset of the selection.
    pub complete: bool,
    /// The effective configuration (segq.toml merged with environment and command line).
    pub config: serde_json::Value,
    pub model: ModelInfo,
    pub dataset: DatasetInfo,
    pub machine: MachineInfo,
    pub counts: Counts,
    /// How the confidence intervals are drawn (`eval.bootstrap_resamples`, `eval.bootstrap_seed`); absent when
    /// the run kept no per-image counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSettings>,
    /// The calibration images the calibrated methods and static levels used (one set for every level); absent when
    /// no level needed calibration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calib::CalibrationInfo>,
    pub levels: Vec<LevelResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Where the model came from: Hub id (with revision), local path or URL.
    pub source: String,
    pub num_labels: usize,
    /// Class names by id (`id2label`); may be empty when the model has none.
    pub class_names: Vec<String>,
    pub parameters: u64,
    pub f32_weight_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub source: String,
    pub split: String,
    /// `(index, count)` of this run's shard, `None` for a whole (or merged) run.
    pub shard: Option<(usize, usize)>,
    pub offset: usize,
    pub limit: Option<usize>,
    /// Examples this run was asked to evaluate (after offset, limit and sharding).
    pub examples_total_selected: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    pub cpu_model: String,
    pub logical_cores: usize,
    pub threads: usize,
    pub os: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub read: u64,
    pub evaluated: u64,
    pub skipped: u64,
    /// One line per skipped example, naming it and the reason.
    pub skip_reasons: Vec<String>,
    /// Parquet files skipped whole because their footer could not be read: their rows are unknown, so they are
    /// not in `skipped`, and a run with any is not `complete`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreadable_files: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LevelStatus {
    Ok,
    Failed { reason: String },
}

/// How a row's weights were made, written in results.json (and shown) as `none` (the float model), `rtn`, `hqq`,
/// `as loaded (<recipe label>)` (a quantized checkpoint evaluated as it is: the run's reference row),
/// `<method>, requantized from <recipe label>` (a level made from a quantized checkpoint's dequantized weights,
/// `--requantize`) or `-` (a level no method could build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum LevelMethod {
    None,
    Method(Method),
    AsLoaded { recipe: String },
    Requantized { method: Method, from: String },
    Unbuildable,
}

/// Separates the method from the source recipe in a requantized row's method text.
const REQUANTIZED_FROM: &str = ", requantized from ";

impl LevelMethod {
    /// True for the row every other is compared with: the float model, or a quantized checkpoint as loaded.
    pub fn is_reference(&self) -> bool {
        matches!(self, LevelMethod::None | LevelMethod::AsLoaded { .. })
    }
}

impl std::fmt::Display for LevelMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LevelMethod::None => f.write_str("none"),
            LevelMethod::Method(m) => write!(f, "{m}"),
            LevelMethod::AsLoaded { recipe } => write!(f, "as loaded ({recipe})"),
            LevelMethod::Requantized { method, from } => write!(f, "{method}{REQUANTIZED_FROM}{from}"),
            LevelMethod::Unbuildable => f.write_str("-"),
        }
    }
}

impl From<LevelMethod> for String {
    fn from(method: LevelMethod) -> String {
        method.to_string()
    }
}

impl TryFrom<String> for LevelMethod {
    type Error = Error;
    fn try_from(text: String) -> Result<LevelMethod> {
        Ok(match text.as_str() {
            "none" => LevelMethod::None,
            "-" => LevelMethod::Unbuildable,
            _ => match text.strip_prefix("as loaded (").and_then(|t| t.strip_suffix(')')) {
                Some(recipe) => LevelMethod::AsLoaded {
                    recipe: recipe.to_string(),
                },
                None => match text.split_once(REQUANTIZED_FROM) {
                    Some((method, from)) => LevelMethod::Requantized {
                        method: Method::parse(method)?,
                        from: from.to_string(),
                    },
                    None => LevelMethod::Method(Method::parse(&text)?),
                },
            },
        })
    }
}

/// One quantization level evaluated over the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelResult {
    /// Display name, e.g. `int4-hqq-g64`; unique within a run.
    pub label: String,
    /// `f32`, `f16`, `bf16`, `f8`, `int8`, `int4`, `int2` (its canonical name in the file).
    pub level: Level,
    /// Quantization method (`none`, `rtn`, `hqq`, `as loaded (...)`, `-`).
    pub method: LevelMethod,
    pub group_size: Option<usize>,
    /// The whole recipe of a mixed-precision row (its per-layer rules); absent for uniform levels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<crate::quant::Recipe>,
    /// How an `auto:` row's recipe was searched (target, images, predicted and measured drop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<crate::eval::auto::AutoSearch>,
    /// Average stored bits per quantized weight, scales and zero points included.
    #[serde(with = "nan_as_null")]
    pub bits_per_weight: f64,
    pub status: LevelStatus,
    /// Scores against the dataset's labels.
    pub confusion: Option<ConfusionMatrix>,
    /// Scores against the f32 model's predictions (none for the f32 level itself).
    pub agreement: Option<ConfusionMatrix>,
    pub weight_bytes_memory: u64,
    pub weight_bytes_disk: Option<u64>,
    #[serde(with = "nan_as_null")]
    pub ratio_to_f32: f64,
    #[serde(with = "nan_as_null")]
    pub load_time_s: f64,
    #[serde(with = "nan_as_null")]
    pub quantize_time_s: f64,
    /// Layers a calibrated method left to a calibration-free one (no statistics: depthwise convolutions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<crate::quant::Fallback>,
    pub peak_rss_bytes: u64,
    /// Heap high-water mark of this level's forward passes above what was live before them (activations and
    /// scratch; 0 where the binary counts no heap). With `weight_bytes_memory` it is the level's own inference
    /// memory, which the process's peak RSS (every level, the loader and the source model) cannot tell apart.
    #[serde(default)]
    pub working_bytes: u64,
    /// Forward pass alone, one entry per image, in evaluation order.
    pub model_latency_ms: Vec<f64>,
    /// Decode + preprocess + forward + postprocess + scoring, one entry per image.
    pub pipeline_latency_ms: Vec<f64>,
    /// Wall-clock time of the whole level (for merged runs: summed over shards, i.e. worker-seconds).
    #[serde(with = "nan_as_null")]
    pub wall_time_s: f64,
    /// Class counts of every scored image, by ascending image index (see [`crate::eval::per_image`]): what the
    /// bootstrap resamples. Empty when the run keeps none (`eval.bootstrap_resamples = 0`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_image: Vec<ImageCounts>,
    /// The images whose prediction disagrees most with the reference row's, worst first (`eval.worst_images`
    /// of them at most; see [`crate::eval::worst`]). Empty for the reference row, for failed levels, and for a
    /// level that agrees with the reference on every scored pixel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worst_images: Vec<WorstImage>,
    /// Derived figures written for readers of the JSON; recomputed on every write, ignored on read.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub summary: Option<LevelSummary>,
}

/// Figures derived from a [`LevelResult`]'s raw data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LevelSummary {
    pub metrics: Option<MeanIou>,
    pub agreement: Option<Agreement>,
    #[serde(serialize_with = "nan_as_null::serialize")]
    pub delta_miou_vs_f32: f64,
    /// 95% bootstrap interval of `delta_miou_vs_f32`, `[low, high]` (see [`crate::eval::bootstrap`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_miou_ci: Option<[f64; 2]>,
    /// False when `delta_miou_ci` includes 0: the difference to the reference is not significant on these images.
    /// Absent for the reference row and without an interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta_miou_significant: Option<bool>,
    /// 95% bootstrap interval of the agreement mIoU, `[low, high]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement_miou_ci: Option<[f64; 2]>,
    #[serde(serialize_with = "nan_as_null::serialize")]
    pub model_median_ms: f64,
    #[serde(serialize_with = "nan_as_null::serialize")]
    pub model_p95_ms: f64,
    #[serde(serialize_with = "nan_as_null::serialize")]
    pub images_per_s_model: f64,
    #[serde(serialize_with = "nan_as_null::serialize")]
    pub images_per_s_pipeline: f64,
}

impl LevelResult {
    /// True when this row's model was built from calibration statistics (a calibrated method).
    pub fn is_calibrated(&self) -> bool {
        self.level.needs_calibration()
            || matches!(&self.method, LevelMethod::Method(m) | LevelMethod::Requantized { method: m, .. } if m.needs_calibration())
    }
    pub fn is_ok(&self) -> bool {
        self.status == LevelStatus::Ok
    }

    /// Scores against the labels, if the level ran.
    pub fn metrics(&self) -> Option<MeanIou> {
        self.confusion.as_ref().map(ConfusionMatrix::metrics)
    }

    /// mIoU against the labels; NaN when the level has no scores.
    pub fn miou(&self) -> f64 {
        self.metrics().map_or(f64::NAN, |m| m.mean_iou)
    }

    /// Agreement with the float model's predictions.
    pub fn agreement_metrics(&self) -> Option<Agreement> {
        self.agreement.as_ref().map(ConfusionMatrix::agreement)
    }

    /// Images scored by this level (one latency entry each).
    pub fn images(&self) -> usize {
        self.model_latency_ms.len()
    }

    pub fn model_median_ms(&self) -> f64 {
        quantile(&self.model_latency_ms, 0.5)
    }

    pub fn model_p95_ms(&self) -> f64 {
        quantile(&self.model_latency_ms, 0.95)
    }

    pub fn pipeline_median_ms(&self) -> f64 {
        quantile(&self.pipeline_latency_ms, 0.5)
    }

    pub fn pipeline_p95_ms(&self) -> f64 {
        quantile(&self.pipeline_latency_ms, 0.95)
    }

    /// This level's inference memory: its weights plus the working heap of its forward passes (NaN when no heap
    /// was counted, e.g. results written before segq measured it).
    pub fn inference_bytes(&self) -> f64 {
        if self.working_bytes > 0 {
            (self.weight_bytes_memory + self.working_bytes) as f64
        } else {
            f64::NAN
        }
    }

    /// Throughput of the forward pass alone: images / summed model latency.
    pub fn images_per_s_model(&self) -> f64 {
        let total_ms: f64 = self.model_latency_ms.iter().sum();
        if total_ms > 0.0 {
            self.images() as f64 / (total_ms / 1000.0)
        } else {
            f64::NAN
        }
    }

    /// Throughput of the whole pipeline: images / wall time (per worker, for merged runs).
    pub fn images_per_s_pipeline(&self) -> f64 {
        if self.wall_time_s > 0.0 {
            self.images() as f64 / self.wall_time_s
        } else {
            f64::NAN
        }
    }

    fn summarize(&self, baseline_miou: f64, intervals: LevelIntervals) -> LevelSummary {
        let metrics = self.metrics();
        let miou = metrics.as_ref().map_or(f64::NAN, |m| m.mean_iou);
        let reference = self.method.is_reference();
        LevelSummary {
            delta_miou_vs_f32: miou - baseline_miou,
            delta_miou_ci: intervals.delta_miou,
            delta_miou_significant: intervals
                .delta_miou
                .filter(|_| !reference)
                .map(|[low, high]| !(low <= 0.0 && 0.0 <= high)),
            agreement_miou_ci: intervals.agreement_miou,
            metrics,
            agreement: self.agreement_metrics(),
            model_median_ms: self.model_median_ms(),
            model_p95_ms: self.model_p95_ms(),
            images_per_s_model: self.images_per_s_model(),
            images_per_s_pipeline: self.images_per_s_pipeline(),
        }
    }
}

impl EvalResults {
    /// The reference row, if the run has one: the float model (level `f32`), or a quantized checkpoint as loaded.
    /// Deltas and agreement are measured against it.
    pub fn baseline(&self) -> Option<&LevelResult> {
        self.levels.iter().find(|l| l.method.is_reference())
    }

    /// A level by its display label.
    pub fn level(&self, label: &str) -> Option<&LevelResult> {
        self.levels.iter().find(|l| l.label == label)
    }

    /// `level`'s mIoU minus the f32 row's; NaN without a baseline or without scores.
    pub fn delta_miou(&self, level: &LevelResult) -> f64 {
        level.miou() - self.baseline().map_or(f64::NAN, LevelResult::miou)
    }

    /// Per-class IoU of `level` minus the baseline's, `None` where either is undefined.
    pub fn class_iou_delta(&self, level: &LevelResult) -> Vec<Option<f64>> {
        let (Some(base), Some(this)) = (self.baseline().and_then(LevelResult::metrics), level.metrics()) else {
            return Vec::new();
        };
        base.per_category_iou
            .iter()
            .zip(&this.per_category_iou)
            .map(|(b, t)| Some((*t)? - (*b)?))
            .collect()
    }

    /// Name of class `id` (its number when the model has no names).
    pub fn class_name(&self, id: usize) -> String {
        self.model
            .class_names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("class {id}"))
    }

    /// Fills every level's derived [`LevelSummary`] from the raw data, confidence intervals included, and
    /// recomputes each worst image's loss from its pixel counts (a float read back from JSON may differ in its
    /// last bit).
    pub fn refresh_summaries(&mut self) {
        let baseline_miou = self.baseline().map_or(f64::NAN, LevelResult::miou);
        let intervals = self.confidence_intervals();
        for (level, intervals) in self.levels.iter_mut().zip(intervals) {
            level.summary = Some(level.summarize(baseline_miou, intervals));
            level.worst_images.iter_mut().for_each(WorstImage::refresh);
        }
    }

    /// Every level's bootstrap intervals against the reference row (none without settings, per-image counts or a
    /// reference that ran; none for a failed level).
    pub fn confidence_intervals(&self) -> Vec<LevelIntervals> {
        let none = vec![LevelIntervals::default(); self.levels.len()];
        let (Some(settings), Some(reference)) = (self.bootstrap, self.baseline().filter(|b| b.is_ok())) else {
            return none;
        };
        let levels: Vec<Option<&[ImageCounts]>> = self
            .levels
            .iter()
            .map(|l| (l.is_ok() && l.confusion.is_some()).then_some(l.per_image.as_slice()))
            .collect();
        crate::eval::bootstrap::paired_intervals(&reference.per_image, &levels, self.model.num_labels, settings)
    }

    /// Reads a `results.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut results: EvalResults = serde_json::from_str(&text)
            .map_err(|e| Error::invalid(path.display().to_string(), format!("not a segq results file: {e}")))?;
        results.validate().map_err(|e| e.within(path.display()))?;
        results.refresh_summaries();
        Ok(results)
    }

    /// Writes `results.json` (pretty-printed, derived summaries included) atomically
    /// ([`crate::outputs::write_atomically`]), so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut with_summaries = self.clone();
        with_summaries.refresh_summaries();
        let text = serde_json::to_string_pretty(&with_summaries)
            .map_err(|e| Error::write(path, format!("cannot serialise results: {e}")))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        crate::outputs::write_atomically(path, |temporary| {
            std::fs::write(temporary, text + "\n").map_err(|e| Error::io(temporary, e))
        })?;
        tracing::debug!(path = %path.display(), levels = self.levels.len(), "wrote results");
        Ok(())
    }

    /// Consistency checks a hand-edited or truncated file could fail: unique labels, matrices sized for the model,
    /// per-image counts that add up to the matrices, a bounded number of resamples.
    pub fn validate(&self) -> Result<()> {
        if let Some(settings) = self.bootstrap
            && settings.resamples > crate::eval::bootstrap::MAX_RESAMPLES
        {
            return Err(Error::invalid(
                "bootstrap.resamples",
                format!(
                    "bootstrap.resamples is {}, more than the {} segq draws",
                    settings.resamples,
                    crate::eval::bootstrap::MAX_RESAMPLES
                ),
            ));
        }
        for (index, level) in self.levels.iter().enumerate() {
            if let Some(bad) = level
                .worst_images
                .iter()
                .find(|w| w.pixels == 0 || w.disagreeing_pixels > w.pixels)
            {
                return Err(Error::invalid(
                    format!("level {:?}", level.label),
                    format!(
                        "worst image {:?} has {} disagreeing of {} scored pixels",
                        bad.id, bad.disagreeing_pixels, bad.pixels
                    ),
                ));
            }
            if self.levels[..index].iter().any(|l| l.label == level.label) {
                let origin = format!("level label {:?}", level.label);
                return Err(Error::invalid(&origin, format!("{origin} appears twice")));
            }
            for (name, matrix) in [("confusion", &level.confusion), ("agreement", &level.agreement)] {
                if let Some(matrix) = matrix
                    && matrix.num_labels() != self.model.num_labels
                {
                    return Err(Error::invalid(
                        format!("level {:?}", level.label),
                        format!(
                            "{name} matrix has {} labels but the model has {}",
                            matrix.num_labels(),
                            self.model.num_labels
                        ),
                    ));
                }
            }
            crate::eval::per_image::validate(
                &format!("level {:?}", level.label),
                &level.per_image,
                self.model.num_labels,
                level.confusion.as_ref(),
                level.agreement.as_ref(),
            )?;
        }
        Ok(())
    }
}

/// Quantile with linear interpolation between order statistics (numpy's default); NaN for no values.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let position = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lower = position.floor() as usize;
    let upper = position.ceil() as usize;
    let fraction = position - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(seconds)
}

/// Formats seconds since the Unix epoch as an ISO 8601 UTC timestamp (proleptic Gregorian calendar).
pub fn format_utc(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let second_of_day = unix_seconds % 86_400;
    // Civil date from a day count, using 400-year eras that start on March 1st (leap day last).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Synthetic runs for tests of results, merging and reports: per-image data depends only on the image's row,
/// so a shard's result is exactly the unsharded run restricted to its rows.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::eval::worst::{WorstPixels, WorstTracker, disagreement};

    pub const NUM_LABELS: usize = 6;
    /// Worst images kept per level.
    pub const WORST: usize = 4;
    pub const LEVELS: [(&str, Level, LevelMethod, f64); 3] = [
        ("f32", Level::F32, LevelMethod::None, 32.0),
        ("int8", Level::Int8, LevelMethod::Method(Method::Rtn), 8.25),
        ("int4-hqq-g64", Level::Int4, LevelMethod::Method(Method::Hqq), 4.5),
    ];

    fn pseudo_random(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move |bound| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        }
    }

    /// Label and per-level predictions of dataset row `row` (level 0 = f32).
    pub fn image(row: usize) -> (Vec<u8>, Vec<Vec<u16>>) {
        let mut next = pseudo_random(row as u64 + 1);
        let pixels = 40 + (row % 5) * 7;
        let label: Vec<u8> = (0..pixels)
            .map(|_| {
                if next(10) == 0 {
                    255
                } else {
                    next(NUM_LABELS as u64) as u8
                }
            })
            .collect();
        let float: Vec<u16> = label
            .iter()
            .map(|&l| {
                if l == 255 || next(5) == 0 {
                    next(NUM_LABELS as u64) as u16
                } else {
                    u16::from(l)
                }
            })
            .collect();
        let noisy = |next: &mut dyn FnMut(u64) -> u64, one_in: u64| -> Vec<u16> {
            float
                .iter()
                .map(|&p| {
                    if next(one_in) == 0 {
                        next(NUM_LABELS as u64 + 1) as u16
                    } else {
                        p
                    }
                })
                .collect()
        };
        let int8 = noisy(&mut next, 20);
        let int4 = noisy(&mut next, 4);
        (label, vec![float, int8, int4])
    }

    /// The result of evaluating rows `rows` of a 0..total dataset, as shard `shard`.
    pub fn run(rows: std::ops::Range<usize>, total: usize, shard: Option<(usize, usize)>) -> EvalResults {
        let mut levels: Vec<LevelResult> = LEVELS
            .iter()
            .map(|(label, level, method, bits)| (*label, *level, method.clone(), *bits))
            .map(|(label, level, method, bits)| LevelResult {
                label: label.into(),
                level,
                method,
                group_size: (level == Level::Int4).then_some(64),
                recipe: None,
                auto: None,
                bits_per_weight: bits,
                status: LevelStatus::Ok,
                confusion: Some(ConfusionMatrix::new(NUM_LABELS)),
                agreement: (level != Level::F32).then(|| ConfusionMatrix::new(NUM_LABELS)),
                weight_bytes_memory: (14_000_000.0 * bits / 32.0) as u64,
                weight_bytes_disk: Some((14_100_000.0 * bits / 32.0) as u64),
                ratio_to_f32: bits / 32.0,
                load_time_s: 0.5 + rows.start as f64 * 0.01,
                quantize_time_s: if level == Level::F32 { 0.0 } else { 1.5 },
                fallbacks: Vec::new(),
                peak_rss_bytes: 200_000_000 + rows.start as u64 * 1000,
                working_bytes: 30_000_000 + rows.start as u64 * 100,
                model_latency_ms: Vec::new(),
                pipeline_latency_ms: Vec::new(),
                wall_time_s: 0.25,
                per_image: Vec::new(),
                worst_images: Vec::new(),
                summary: None,
            })
            .collect();
        let mut worst: Vec<WorstTracker> = levels.iter().map(|_| WorstTracker::new(WORST)).collect();
        for row in rows.clone() {
            let (label, predictions) = image(row);
            for (index, level) in levels.iter_mut().enumerate() {
                let prediction = &predictions[index];
                level.confusion.as_mut().unwrap().add(prediction, &label, 255).unwrap();
                if let Some(agreement) = level.agreement.as_mut() {
                    agreement
                        .add_agreement(prediction, &predictions[0], Some(&label), 255)
                        .unwrap();
                    let counts = disagreement(prediction, &predictions[0], &label, 255).unwrap();
                    worst[index].offer(row, &format!("row{row}"), counts, || WorstPixels {
                        image: image::RgbImage::new(1, 1),
                        scored: image::GrayImage::new(1, 1),
                        reference: vec![0],
                        prediction: vec![0],
                    });
                }
                let reference = (index > 0).then_some(predictions[0].as_slice());
                level.per_image.push(
                    crate::eval::per_image::ImageCounts::score(row, NUM_LABELS, prediction, &label, reference, 255)
                        .unwrap(),
                );
                let latency = 100.0 + ((row * 37 + index * 11) % 53) as f64 / 4.0;
                level.model_latency_ms.push(latency);
                level.pipeline_latency_ms.push(latency * 1.5);
                level.wall_time_s += latency * 1.5 / 1000.0;
            }
        }
        for (level, worst) in levels.iter_mut().zip(&worst) {
            level.worst_images = worst.list(&level.label);
        }
        EvalResults {
            segq_version: crate::VERSION.into(),
            created_utc: "2025-01-02T03:04:05Z".into(),
            complete: true,
            config: serde_json::json!({
                "model": {"source": "nvidia/segformer-b0-finetuned-ade-512-512"},
                "eval": {"levels": ["f32", "int8", "int4-hqq-g64"], "shard": shard.map(|(i, n)| format!("{i}/{n}"))},
                "out": format!("results/shard-{}", shard.map_or(0, |s| s.0)),
            }),
            model: ModelInfo {
                source: "nvidia/segformer-b0-finetuned-ade-512-512".into(),
                num_labels: NUM_LABELS,
                class_names: ["wall", "building", "sky", "floor", "tree", "ceiling"]
                    .map(String::from)
                    .to_vec(),
                parameters: 3_752_694,
                f32_weight_bytes: 15_010_776,
            },
            dataset: DatasetInfo {
                source: "1aurent/ADE20K".into(),
                split: "validation".into(),
                shard,
                offset: 0,
                limit: Some(total),
                examples_total_selected: rows.len(),
            },
            machine: MachineInfo {
                cpu_model: "AMD EPYC".into(),
                logical_cores: 2,
                threads: 2,
                os: "linux".into(),
            },
            counts: Counts {
                read: rows.len() as u64,
                evaluated: rows.len() as u64,
                skipped: 0,
                skip_reasons: Vec::new(),
                unreadable_files: 0,
            },
            bootstrap: Some(BOOTSTRAP),
            calibration: None,
            levels,
        }
    }

    /// The bootstrap of synthetic runs: few resamples keep tests fast.
    pub const BOOTSTRAP: BootstrapSettings = BootstrapSettings {
        resamples: 200,
        seed: 42,
    };
}

#[cfg(test)]
mod tests {
    use super::test_support::run;
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        let values = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&values, 0.5), 3.0);
        assert_eq!(quantile(&values, 0.95), 4.8);
        assert_eq!(quantile(&values, 0.0), 1.0);
        assert_eq!(quantile(&[7.0], 0.95), 7.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.5), 1.5);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_735_787_045), "2025-01-02T03:04:05Z");
        assert_eq!(format_utc(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(utc_now().len(), 20);
    }

    #[test]
    fn derived_figures() {
        let results = run(0..10, 10, None);
        let int4 = results.level("int4-hqq-g64").unwrap();
        let base = results.baseline().unwrap();
        assert_eq!(base.label, "f32");
        assert_eq!(results.delta_miou(base), 0.0);
        let delta = results.delta_miou(int4);
        assert!(delta < 0.0, "noisier predictions must score lower: {delta}");
        assert_eq!(delta, int4.miou() - base.miou());
        let total_ms: f64 = int4.model_latency_ms.iter().sum();
        assert_eq!(int4.images_per_s_model(), 10.0 / (total_ms / 1000.0));
        assert_eq!(int4.images_per_s_pipeline(), 10.0 / int4.wall_time_s);
        assert_eq!(int4.model_median_ms(), quantile(&int4.model_latency_ms, 0.5));
        let agreement = int4.agreement_metrics().unwrap();
        assert!(agreement.pixel_agreement > 0.5 && agreement.pixel_agreement < 1.0);
        assert!(base.agreement_metrics().is_none());
        let deltas = results.class_iou_delta(int4);
        assert_eq!(deltas.len(), test_support::NUM_LABELS);
        assert_eq!(results.class_name(2), "sky");
        assert_eq!(results.class_name(99), "class 99");
    }

    #[test]
    fn bootstrap_intervals_are_paired_deterministic_and_seeded() {
        let mut results = run(0..30, 30, None);
        results.refresh_summaries();
        let summary = |r: &EvalResults, i: usize| r.levels[i].summary.clone().unwrap();
        // The reference against itself: every resample's difference is exactly 0.
        assert_eq!(summary(&results, 0).delta_miou_ci, Some([0.0, 0.0]));
        assert_eq!(summary(&results, 0).delta_miou_significant, None);
        assert_eq!(summary(&results, 0).agreement_miou_ci, None);
        // A level identical to the reference: [0, 0] too, and agreement [1, 1].
        let mut same = results.clone();
        same.levels[1].confusion = same.levels[0].confusion.clone();
        let reference_images = same.levels[0].per_image.clone();
        let mut agreement = crate::eval::metrics::ConfusionMatrix::new(test_support::NUM_LABELS);
        for (mine, reference) in same.levels[1].per_image.iter_mut().zip(&reference_images) {
            let (label, predictions) = test_support::image(reference.index);
            mine.labels = reference.labels.clone();
            let counts = ImageCounts::score(
                0,
                test_support::NUM_LABELS,
                &predictions[0],
                &label,
                Some(&predictions[0]),
                255,
            )
            .unwrap();
            agreement
                .add_agreement(&predictions[0], &predictions[0], Some(&label), 255)
                .unwrap();
            mine.agreement = counts.agreement;
        }
        same.levels[1].agreement = Some(agreement);
        same.validate().unwrap();
        let intervals = same.confidence_intervals();
        assert_eq!(intervals[1].delta_miou, Some([0.0, 0.0]));
        assert_eq!(intervals[1].agreement_miou, Some([1.0, 1.0]));

        // The noisy level: an interval around its point value, below 0.
        let int4 = summary(&results, 2);
        let [low, high] = int4.delta_miou_ci.unwrap();
        assert!(
            low < int4.delta_miou_vs_f32 && int4.delta_miou_vs_f32 < high,
            "{low} {high}"
        );
        assert!(high < 0.0, "int4 loses mIoU on every resample: [{low}, {high}]");
        assert_eq!(int4.delta_miou_significant, Some(true));
        let [a_low, a_high] = int4.agreement_miou_ci.unwrap();
        let agreement = int4.agreement.unwrap().miou;
        assert!(a_low < agreement && agreement < a_high && a_high <= 1.0);

        // Same seed, same intervals, whatever the thread count; another seed, other intervals.
        let on_threads = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| results.confidence_intervals())
        };
        assert_eq!(on_threads(1), on_threads(3));
        assert_eq!(on_threads(1), results.confidence_intervals());
        let mut reseeded = results.clone();
        reseeded.bootstrap = Some(BootstrapSettings {
            seed: 43,
            ..test_support::BOOTSTRAP
        });
        assert_ne!(reseeded.confidence_intervals()[2], results.confidence_intervals()[2]);
        // Off: no intervals.
        reseeded.bootstrap = None;
        assert!(
            reseeded
                .confidence_intervals()
                .iter()
                .all(|i| *i == LevelIntervals::default())
        );
    }

    #[test]
    fn per_image_counts_that_do_not_add_up_are_refused_with_the_level() {
        let dir = std::env::temp_dir().join(format!("segq-results-per-image-{}", std::process::id()));
        let mut results = run(0..5, 5, None);
        results.levels[1].per_image.remove(2);
        let path = dir.join("results.json");
        results.write(&path).unwrap();
        let error = EvalResults::read(&path).unwrap_err().to_string();
        assert!(error.contains("int8") && error.contains("per-image counts"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_then_read_round_trips_with_nan_as_null() {
        let dir = std::env::temp_dir().join(format!("segq-results-{}", std::process::id()));
        let path = dir.join("nested").join("results.json");
        let mut results = run(0..4, 4, Some((1, 3)));
        results.levels[2].status = LevelStatus::Failed {
            reason: "out of memory".into(),
        };
        results.levels[2].confusion = None;
        results.levels[2].agreement = None;
        results.levels[1].ratio_to_f32 = f64::NAN;
        results.write(&path).unwrap();

        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(json["levels"][1]["ratio_to_f32"].is_null());
        assert_eq!(
            json["levels"][2]["status"],
            serde_json::json!({"state": "failed", "reason": "out of memory"})
        );
        assert_eq!(json["levels"][0]["status"], serde_json::json!({"state": "ok"}));
        assert!(json["levels"][0]["summary"]["metrics"]["mean_iou"].as_f64().unwrap() > 0.0);
        assert_eq!(json["dataset"]["shard"], serde_json::json!([1, 3]));

        let back = EvalResults::read(&path).unwrap();
        assert!(back.levels[1].ratio_to_f32.is_nan());
        let mut expected = results.clone();
        expected.levels[1].ratio_to_f32 = 0.0;
        let mut got = back.clone();
        got.levels[1].ratio_to_f32 = 0.0;
        for level in &mut got.levels {
            level.summary = None;
        }
        assert_eq!(got, expected);
        assert!(back.levels[0].summary.is_some(), "summaries are recomputed on read");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_rejects_bad_files_with_the_path() {
        let dir = std::env::temp_dir().join(format!("segq-results-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.json");
        std::fs::write(&garbage, "{not json").unwrap();
        let error = EvalResults::read(&garbage).unwrap_err().to_string();
        assert!(error.contains("garbage.json"), "{error}");

        let mut results = run(0..2, 2, None);
        results.levels[1].label = "f32".into();
        let duplicate = dir.join("duplicate.json");
        results.write(&duplicate).unwrap();
        let error = EvalResults::read(&duplicate).unwrap_err().to_string();
        assert!(error.contains("duplicate.json") && error.contains("twice"), "{error}");
        assert!(
            EvalResults::read(&dir.join("missing.json"))
                .unwrap_err()
                .to_string()
                .contains("missing.json")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
