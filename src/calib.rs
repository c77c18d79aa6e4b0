//! Calibration: which images calibrate a model (`--calib`, `--calib-size`, `--calib-seed`), kept apart from the
//! images being evaluated unless the user allows otherwise (`--calib-allow-overlap`), and the one streaming pass
//! that turns them into every layer's input statistics ([`ModelStats`], see `model::probe`) for the calibrated
//! methods (`gptq`, `awq`) and the static activation levels. Labels are not read into the statistics.
//!
//! The sample is `size` rows drawn uniformly without replacement (fixed by the seed) from the calibration source,
//! so it spans the whole dataset: Scene Parse 150's rows are ordered by scene, and a contiguous window would be one
//! kind of scene. When the calibration source is the evaluated dataset itself, the evaluated window (offset and
//! limit, before sharding: every shard calibrates identically) is left out of the draw.

use std::ops::Range;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{DatasetSpec, Loader, LoaderOptions, Selection};
use crate::model::LoadedModel;
use crate::preprocess::{self, Protocol};
use crate::quant::act::ActCalib;
use crate::quant::{Level, ModelStats, Recipe, StatsNeeds};
use crate::segmenter::ModelInput;
use crate::{Error, Result};

/// Rows per image and layer that enter a layer's Hessian (evenly strided over the map): bounds the cost of `X^T X` on
/// high-resolution maps (a 512x512 image gives 16,384 stage-1 tokens) while magnitudes and histograms see every row.
pub const HESSIAN_ROWS_PER_IMAGE: usize = 4096;

/// What to calibrate on, as the user asked (flags and `quant.calib*` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibSpec {
    /// A dataset source as `--dataset` takes it; `None`: the evaluated dataset's `train` split.
    pub source: Option<String>,
    /// The split of the calibration source (`train` by default).
    pub split: String,
    /// Images to draw.
    pub size: usize,
    pub seed: u64,
    /// Draw from the evaluated images too (reported as overlap).
    pub allow_overlap: bool,
    /// Reuse statistics saved by an earlier run of the same model on the same images (and save new ones) in
    /// `segq_cache_dir()/calib/`.
    pub cache: bool,
}

/// How a dataset is addressed besides its source: what `resolve_source` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumns {
    pub subset: String,
    pub image_column: String,
    pub label_column: String,
}

/// Where calibration images are drawn from besides the request: the evaluated dataset's source (the default
/// calibration source), how its files are addressed and read, the resize protocol, and the evaluated window to
/// leave out.
#[derive(Debug, Clone, Copy)]
pub struct DrawFrom<'a> {
    pub eval_source: &'a str,
    pub columns: &'a SourceColumns,
    pub loader_options: &'a LoaderOptions,
    pub protocol: Protocol,
    pub eval: Option<EvalWindow<'a>>,
}

/// The images being evaluated, which calibration must not use: the resolved dataset and its window of rows.
#[derive(Debug, Clone, Copy)]
pub struct EvalWindow<'a> {
    pub spec: &'a DatasetSpec,
    pub selection: Selection,
}

/// What a calibration used, for results.json, reports and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// The calibration source as resolved (description) and its split.
    pub source: String,
    pub split: String,
    /// Images asked for and images whose statistics were accumulated.
    pub requested: usize,
    pub images: usize,
    pub seed: u64,
    /// Rows of the calibration source it has (the population of the draw, before the evaluated rows are removed).
    pub dataset_rows: usize,
    /// Calibration images that are also evaluated (0 unless `--calib-allow-overlap`).
    pub overlap: usize,
    /// Calibration rows left out because they could not be read (`--on-error skip`).
    #[serde(default)]
    pub skipped: usize,
    /// What was accumulated (the Hessian for gptq/awq, histograms for static activations).
    pub statistics: StatsNeeds,
    /// The first 16 hex digits of the SHA-256 over the source, split and drawn rows: the identity of the set.
    pub set_id: String,
    pub seconds: f64,
    /// True when the statistics were read from the cache of an earlier run (`seconds` is then the time to read
    /// them).
    #[serde(default)]
    pub cached: bool,
    /// How the static levels' activation scales were chosen from the histograms (when a static level ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_calib: Option<ActCalib>,
    /// SmoothQuant's migration strength applied to the int8-dyn and int8-static rows (when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smooth: Option<f32>,
}

/// The cache key of a calibration: segq's version, the float model's tensors, the preprocessing, the protocol, the
/// Hessian's row sampling and the calibration set. What is accumulated is checked when reading (a file with more
/// statistics than asked for serves too).
fn cache_key(loaded: &ModelToCalibrate<'_>, set_id: &str, protocol: Protocol) -> String {
    let mut h = Sha256::new();
    h.update(crate::VERSION.as_bytes());
    h.update(set_id.as_bytes());
    h.update(format!("{protocol:?} {HESSIAN_ROWS_PER_IMAGE}").as_bytes());
    h.update(serde_json::to_vec(loaded.preprocessor).unwrap_or_default());
    for (name, tensor) in crate::model::save::state_dict(loaded.model) {
        h.update(name.as_bytes());
        match tensor {
            crate::model::save::StateTensor::Float { shape, values } => {
                h.update(format!("{shape:?}").as_bytes());
                for v in values {
                    h.update(v.to_le_bytes());
                }
            }
            crate::model::save::StateTensor::Quantized(q) => {
                for (_, _, shape, bytes) in q.to_tensors(&name) {
                    h.update(format!("{shape:?}").as_bytes());
                    h.update(&bytes);
                }
            }
        }
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The calibration cache file: one safetensors file per (model, set), per layer `{layer}.hessian` (F64 `[c, c]`),
/// `{layer}.abs_sum` (F64 `[c]`), `{layer}.abs_max` (F32 `[c]`), `{layer}.histogram` (U64 bins), and in its
/// metadata the counts of every layer and the [`CalibrationInfo`].
mod cache {
    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;

    use safetensors::{Dtype, SafeTensors};
    use serde::{Deserialize, Serialize};

    use super::CalibrationInfo;
    use crate::quant::act::{AbsHistogram, HISTOGRAM_BINS};
    use crate::quant::{LayerStats, ModelStats, StatsNeeds};
    use crate::{Error, Result};

    #[derive(Serialize, Deserialize)]
    struct LayerCounts {
        cols: usize,
        rows: u64,
        hessian_rows: u64,
        /// `(range, max, count)` of the histogram, when kept.
        histogram: Option<(f32, f32, u64)>,
    }

    pub(super) fn write(path: &Path, stats: &ModelStats, info: &CalibrationInfo) -> Result<()> {
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut counts = BTreeMap::new();
        for (name, s) in stats {
            let c = s.cols;
            if let Some(h) = &s.hessian {
                tensors.push((format!("{name}.hessian"), Dtype::F64, vec![c, c], bytes_f64(h)));
            }
            tensors.push((format!("{name}.abs_sum"), Dtype::F64, vec![c], bytes_f64(&s.abs_sum)));
            let abs_max = s.abs_max.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((format!("{name}.abs_max"), Dtype::F32, vec![c], abs_max));
            if let Some(hist) = &s.histogram {
                let bins = hist.bins.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.push((format!("{name}.histogram"), Dtype::U64, vec![hist.bins.len()], bins));
            }
            counts.insert(
                name.clone(),
                LayerCounts {
                    cols: c,
                    rows: s.rows,
                    hessian_rows: s.hessian_rows,
                    histogram: s.histogram.as_ref().map(|h| (h.range, h.max, h.count)),
                },
            );
        }
        let json = |v: serde_json::Result<String>| v.map_err(|e| Error::internal(e.to_string()));
        let metadata = HashMap::from([
            ("layers".to_string(), json(serde_json::to_string(&counts))?),
            ("info".to_string(), json(serde_json::to_string(info))?),
        ]);
        let views = tensors
            .iter()
            .map(|(n, d, s, b)| {
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::internal(format!("calibration tensor {n}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        crate::model::save::write_atomically(path, |out| crate::model::save::write_safetensors(out, &views, metadata))
    }

    fn bytes_f64(values: &[f64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The cached statistics when the file exists and holds at least `needs`; `Ok(None)` when there is none to use.
    pub(super) fn read(path: &Path, needs: StatsNeeds) -> Result<Option<(ModelStats, CalibrationInfo)>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |why: String| Error::invalid(path.display().to_string(), why);
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| meta.get(key).ok_or_else(|| bad(format!("metadata '{key}' is missing")));
        let info: CalibrationInfo = serde_json::from_str(get("info")?).map_err(|e| bad(e.to_string()))?;
        if !info.statistics.covers(needs) {
            return Ok(None);
        }
        let counts: BTreeMap<String, LayerCounts> =
            serde_json::from_str(get("layers")?).map_err(|e| bad(e.to_string()))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let tensor = |name: String, dtype: Dtype, shape: Vec<usize>| -> Result<Vec<u8>> {
            let t = file.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
            if t.dtype() != dtype || t.shape() != shape.as_slice() {
                return Err(bad(format!(
                    "{name}: expected {dtype:?} {shape:?}, found {:?} {:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().to_vec())
        };
        let f64s = |b: Vec<u8>| -> Vec<f64> {
            b.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect()
        };
        let mut stats = ModelStats::new();
        for (name, c) in counts {
            let cols = c.cols;
            let hessian = if info.statistics.hessian {
                Some(f64s(tensor(format!("{name}.hessian"), Dtype::F64, vec![cols, cols])?))
            } else {
                None
            };
            let abs_sum = f64s(tensor(format!("{name}.abs_sum"), Dtype::F64, vec![cols])?);
            let abs_max = tensor(format!("{name}.abs_max"), Dtype::F32, vec![cols])?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect();
            let histogram = match c.histogram {
                Some((range, max, count)) => {
                    let bins = tensor(format!("{name}.histogram"), Dtype::U64, vec![HISTOGRAM_BINS])?
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect();
                    Some(AbsHistogram {
                        bins,
                        range,
                        max,
                        count,
                    })
                }
                None => None,
            };
            if needs.histogram && histogram.is_none() {
                return Ok(None);
            }
            stats.insert(
                name,
                LayerStats {
                    cols,
                    rows: c.rows,
                    hessian_rows: c.hessian_rows,
                    hessian,
                    abs_sum,
                    abs_max,
                    histogram,
                },
            );
        }
        Ok(Some((stats, info)))
    }
}

/// A calibration's statistics and what it used.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub stats: ModelStats,
    pub info: CalibrationInfo,
}

/// Whether SmoothQuant applies to a level: the int8 levels whose activations are quantized (`int8-dyn`,
/// `int8-static`).
pub fn smooths(level: Level) -> bool {
    matches!(level, Level::Int8Dyn | Level::Int8Static)
}

/// A float model smoothed by SmoothQuant (`--smooth ALPHA`), with the statistics recaptured on it when a static
/// level needs its activation histograms (smoothing changes them).
#[derive(Debug, Clone)]
pub struct Smoothed {
    pub model: crate::model::Segformer,
    pub report: crate::model::segformer::SmoothReport,
    pub stats: Option<ModelStats>,
}

/// Calibration as quantization uses it: the float model's statistics, how static activation scales are chosen,
/// and the smoothed model when SmoothQuant is asked for.
#[derive(Debug, Clone)]
pub struct CalibratedModels {
    pub calibration: Calibration,
    pub act_calib: ActCalib,
    pub smoothed: Option<Smoothed>,
}

impl CalibratedModels {
    /// Quantizes `float` (the model that was calibrated) by `recipe`: from the smoothed model for the levels
    /// SmoothQuant applies to, with the matching statistics.
    pub fn quantize(
        &self,
        float: &crate::model::Segformer,
        recipe: &Recipe,
    ) -> Result<(crate::model::Segformer, crate::model::QuantizeReport)> {
        let (model, stats) = match self.smoothed.as_ref().filter(|_| smooths(recipe.level)) {
            Some(s) => (&s.model, s.stats.as_ref().unwrap_or(&self.calibration.stats)),
            None => (float, &self.calibration.stats),
        };
        crate::model::quantize_calibrated(
            model,
            recipe,
            Some(crate::model::Calibrated {
                stats,
                act_calib: self.act_calib,
            }),
        )
    }

    /// True when `recipe`'s model is built from the smoothed model.
    pub fn smoothed_for(&self, recipe: &Recipe) -> bool {
        self.smoothed.is_some() && smooths(recipe.level)
    }
}

/// What a set of recipes needs from calibration: the union of their methods' and levels' statistics, and whether
/// any needs calibrating at all (`smooth`: SmoothQuant on an int8 level reads the magnitudes every calibration
/// keeps). `None` when nothing does.
pub fn needs_of(recipes: &[Recipe], smooth: Option<f32>) -> Option<StatsNeeds> {
    let parts: Vec<Recipe> = recipes.iter().flat_map(Recipe::uniform_parts).collect();
    let needs = parts.iter().fold(StatsNeeds::default(), |n, r| {
        n.union(r.method.stats_needs()).union(r.level.stats_needs())
    });
    let any = parts
        .iter()
        .any(|r| r.method.needs_calibration() || r.level.needs_calibration())
        || (smooth.is_some() && recipes.iter().any(|r| smooths(r.level)));
    any.then_some(needs)
}

/// Calibrates for `recipes` ([`calibrate`] with their [`needs_of`]), then smooths the float model when `smooth` is
/// set and an int8 level will use it, capturing the statistics again on the smoothed model for static levels.
/// `None` when no recipe needs calibration.
pub fn calibrate_for_recipes(
    loaded: &LoadedModel,
    recipes: &[Recipe],
    spec: &CalibSpec,
    act_calib: ActCalib,
    smooth: Option<f32>,
    from: &DrawFrom<'_>,
) -> Result<Option<CalibratedModels>> {
    let Some(needs) = needs_of(recipes, smooth) else {
        return Ok(None);
    };
    let run = |model: ModelToCalibrate<'_>, needs| calibrate(&model, spec, from, needs);
    let mut calibration = run(loaded.into(), needs)?;
    calibration.info.act_calib = recipes.iter().any(|r| r.level.needs_calibration()).then_some(act_calib);
    let smoothed = match smooth {
        Some(alpha) if recipes.iter().any(|r| smooths(r.level)) => {
            let mut model = loaded.model.clone();
            let report = crate::model::segformer::smooth(&mut model, &calibration.stats, alpha)?;
            tracing::info!("SmoothQuant alpha {alpha}: {} LayerNorms folded", report.norms.len());
            let stats = if recipes.iter().any(|r| smooths(r.level) && r.level.needs_calibration()) {
                let smoothed_input = ModelToCalibrate {
                    model: &model,
                    preprocessor: &loaded.preprocessor,
                };
                Some(run(smoothed_input, needs)?.stats)
            } else {
                None
            };
            calibration.info.smooth = Some(alpha);
            Some(Smoothed { model, report, stats })
        }
        _ => None,
    };
    Ok(Some(CalibratedModels {
        calibration,
        act_calib,
        smoothed,
    }))
}

/// The model a calibration runs: the float model (or a smoothed copy of it) and its preprocessing.
#[derive(Debug, Clone, Copy)]
pub struct ModelToCalibrate<'a> {
    pub model: &'a crate::model::Segformer,
    pub preprocessor: &'a crate::preprocess::PreprocessorConfig,
}

impl<'a> From<&'a LoadedModel> for ModelToCalibrate<'a> {
    fn from(loaded: &'a LoadedModel) -> Self {
        ModelToCalibrate {
            model: &loaded.model,
            preprocessor: &loaded.preprocessor,
        }
    }
}

/// Draws the calibration images from `spec`'s source and accumulates every layer's input statistics over them with
/// `loaded`'s model, in one streaming pass (one image at a time in memory). `eval` is the evaluated window, left out
/// of the draw when the calibration source resolves to the same dataset.
pub fn calibrate(
    loaded: &ModelToCalibrate<'_>,
    spec: &CalibSpec,
    from: &DrawFrom<'_>,
    needs: StatsNeeds,
) -> Result<Calibration> {
    let DrawFrom {
        eval_source,
        columns,
        loader_options,
        protocol,
        eval,
    } = *from;
    let start = Instant::now();
    if spec.size == 0 {
        return Err(Error::config("quant.calib_size", "calibration needs at least 1 image"));
    }
    let (source, defaulted) = match &spec.source {
        Some(s) => (s.as_str(), false),
        None => (eval_source, true),
    };
    let whole = Selection::default();
    let resolved = crate::data::resolve_source(
        source,
        &spec.split,
        &columns.subset,
        &columns.image_column,
        &columns.label_column,
        &whole,
    );
    let (data, description) = match resolved {
        Ok(r) => r,
        Err(e) if defaulted => {
            return Err(Error::config(
                "--calib",
                format!(
                    "the calibrated methods and static levels need calibration images; the evaluated dataset has no \
                     usable '{}' split ({e}): pass --calib DATASET (any dataset source) and --calib-split",
                    spec.split
                ),
            ));
        }
        Err(e) => return Err(e),
    };
    // Index the source (no pixels read) for its row count.
    let mut probe_options = loader_options.clone();
    probe_options.selection = whole;
    probe_options.rows = Some(Vec::new());
    probe_options.skip_first = 0;
    let dataset_rows = Loader::new(&data, probe_options)?.dataset_rows();
    let evaluated: Option<Range<usize>> = eval.filter(|w| *w.spec == data).map(|w| {
        Selection {
            shard: None,
            ..w.selection
        }
        .rows(dataset_rows)
    });
    let exclude = evaluated.clone().filter(|_| !spec.allow_overlap);
    let rows = crate::data::shard::sample_rows(dataset_rows, spec.size, spec.seed, exclude.clone());
    if rows.is_empty() {
        let why = if exclude.is_some() {
            format!(
                "every one of its {dataset_rows} rows is evaluated; calibrate on other images (--calib DATASET), \
                 evaluate fewer (--offset/--limit), or pass --calib-allow-overlap"
            )
        } else {
            "it has no rows".to_string()
        };
        return Err(Error::config(
            "--calib",
            format!("no calibration images in {description}: {why}"),
        ));
    }
    let overlap = evaluated.map_or(0, |w| rows.iter().filter(|r| w.contains(r)).count());
    if overlap > 0 {
        tracing::warn!(
            "calibrating on {overlap} of the evaluated images (--calib-allow-overlap): their scores are not held out"
        );
    }
    if rows.len() < spec.size {
        tracing::warn!(
            "calibration asked for {} images; {description} has only {} to draw from",
            spec.size,
            rows.len()
        );
    }
    let set_id = {
        let mut h = Sha256::new();
        h.update(description.as_bytes());
        h.update([0]);
        h.update(spec.split.as_bytes());
        for r in &rows {
            h.update((*r as u64).to_le_bytes());
        }
        let digest = h.finalize();
        digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let cache_file = spec.cache.then(|| {
        let key = cache_key(loaded, &set_id, protocol);
        crate::hub::segq_cache_dir()
            .join("calib")
            .join(format!("{key}.safetensors"))
    });
    if let Some(path) = &cache_file {
        match cache::read(path, needs) {
            Ok(Some((stats, mut info))) => {
                tracing::info!(
                    "calibration statistics of set {set_id} reused from {} ({} images)",
                    path.display(),
                    info.images
                );
                info.overlap = overlap;
                info.requested = spec.size;
                info.seconds = start.elapsed().as_secs_f64();
                info.cached = true;
                return Ok(Calibration { stats, info });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the calibration cache: {e}"),
        }
    }
    tracing::info!(
        "calibrating on {} images of {description} (seed {}, set {set_id})",
        rows.len(),
        spec.seed
    );
    let mut options = loader_options.clone();
    options.selection = whole;
    options.rows = Some(rows.clone());
    options.skip_first = 0;
    options.batch_size = 1;
    let mut loader = Loader::new(&data, options)?;
    let preprocessor = loaded.preprocessor;
    let mut images = 0usize;
    let batches = std::iter::from_fn(|| {
        loop {
            let examples = match loader.next()? {
                Ok(examples) => examples,
                Err(e) => return Some(Err(e)),
            };
            // A batch emptied by skipped examples has nothing to run.
            let Some(first) = examples.first() else {
                continue;
            };
            let input = ModelInput::new(&first.image, preprocessor, protocol);
            images += 1;
            return Some(preprocess::batch_tensor(vec![input.pixels], input.height, input.width));
        }
    });
    let stats = crate::model::probe::capture(loaded.model, needs, HESSIAN_ROWS_PER_IMAGE, batches)?;
    let skipped = loader.stats().skipped;
    if images == 0 {
        return Err(Error::invalid(
            description,
            "no calibration image could be read (all were skipped)",
        ));
    }
    let info = CalibrationInfo {
        source: description,
        split: spec.split.clone(),
        requested: spec.size,
        images,
        seed: spec.seed,
        dataset_rows,
        overlap,
        skipped,
        statistics: needs,
        set_id,
        seconds: start.elapsed().as_secs_f64(),
        cached: false,
        act_calib: None,
        smooth: None,
    };
    if let Some(path) = &cache_file {
        match cache::write(path, &stats, &info) {
            Ok(()) => tracing::info!(
                "calibration statistics cached in {} ({:.0} MB; quant.calib_cache = false turns this off)",
                path.display(),
                std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / 1e6)
            ),
            Err(e) => tracing::warn!("calibration statistics not cached: {e}"),
        }
    }
    tracing::info!(
        "calibration: {} images, {} layers, {:.1} s",
        info.images,
        stats.len(),
        info.seconds
    );
    Ok(Calibration { stats, info })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSource;

    fn columns() -> SourceColumns {
        SourceColumns {
            subset: String::new(),
            image_column: crate::data::DEFAULT_IMAGE_COLUMN.into(),
            label_column: crate::data::DEFAULT_LABEL_COLUMN.into(),
        }
    }

    fn spec(size: usize, allow_overlap: bool) -> CalibSpec {
        CalibSpec {
            source: Some("embedded".into()),
            split: "train".into(),
            size,
            seed: 3,
            allow_overlap,
            cache: false,
        }
    }

    fn needs() -> StatsNeeds {
        StatsNeeds {
            hessian: true,
            histogram: true,
        }
    }

    #[test]
    fn calibration_leaves_the_evaluated_rows_out_unless_allowed() {
        let loaded = crate::model::load(&ModelSource::Embedded).unwrap();
        let (demo, _) = crate::data::resolve_source(
            "embedded",
            "validation",
            "",
            "image",
            "annotation",
            &Selection::default(),
        )
        .unwrap();
        let options = LoaderOptions::default();
        // Rows 0..10 are evaluated (sharded: every shard leaves the whole window out): 2 rows remain.
        let window = EvalWindow {
            spec: &demo,
            selection: Selection {
                shard: Some((1, 3)),
                offset: 0,
                limit: Some(10),
            },
        };
        let columns = columns();
        let run = |spec: &CalibSpec, window: Option<EvalWindow<'_>>| {
            let from = DrawFrom {
                eval_source: "embedded",
                columns: &columns,
                loader_options: &options,
                protocol: Protocol::Transformers,
                eval: window,
            };
            calibrate(&(&loaded).into(), spec, &from, needs())
        };
        let held_out = run(&spec(4, false), Some(window)).unwrap();
        assert_eq!(held_out.info.images, 2);
        assert_eq!(held_out.info.overlap, 0);
        assert_eq!(held_out.info.dataset_rows, 12);
        let shared = run(&spec(4, true), Some(window)).unwrap();
        assert_eq!(shared.info.images, 4);
        assert!(shared.info.overlap >= 2, "{:?}", shared.info);
        assert_ne!(held_out.info.set_id, shared.info.set_id);
        // The same request draws the same set and the same statistics.
        let again = run(&spec(4, false), Some(window)).unwrap();
        assert_eq!(again.info.set_id, held_out.info.set_id);
        assert_eq!(again.stats, held_out.stats);

        // Every Linear and dense convolution has statistics; depthwise convolutions none.
        let layers = loaded.model.layers();
        let dense: Vec<&str> = layers
            .iter()
            .filter(|l| !l.name.ends_with("dwconv.dwconv"))
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(
            held_out.stats.keys().map(String::as_str).collect::<Vec<_>>().len(),
            dense.len()
        );
        for name in dense {
            let s = &held_out.stats[name];
            assert!(s.rows > 0 && s.hessian_rows > 0, "{name}");
            let h = s.hessian.as_ref().unwrap();
            let n = s.cols;
            assert!((0..n).all(|i| h[i * n + i] >= 0.0), "{name}");
            assert!(
                (0..n)
                    .all(|i| (0..i).all(|j| (h[i * n + j] - h[j * n + i]).abs() <= 1e-6 * (1.0 + h[i * n + j].abs()))),
                "{name}: X^T X is not symmetric"
            );
            assert_eq!(s.histogram.as_ref().unwrap().count, s.rows * s.cols as u64, "{name}");
        }

        let everything = EvalWindow {
            spec: &demo,
            selection: Selection::default(),
        };
        let err = run(&spec(4, false), Some(everything)).unwrap_err().to_string();
        assert!(
            err.contains("--calib-allow-overlap") && err.contains("12 rows"),
            "{err}"
        );
    }

    #[test]
    fn cached_statistics_read_back_identically_and_only_when_they_suffice() {
        let dir = std::env::temp_dir().join(format!("segq-calib-cache-{}", std::process::id()));
        let path = dir.join("calib").join("k.safetensors");
        let mut stats = ModelStats::new();
        for (name, cols) in [("a.query", 3usize), ("b.proj", 2)] {
            let mut s = crate::quant::LayerStats::new(cols, needs());
            let x: Vec<f32> = (0..cols * 5).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
            let mut gram = vec![0f32; cols * cols];
            for row in x.chunks(cols) {
                for i in 0..cols {
                    for j in 0..cols {
                        gram[i * cols + j] += row[i] * row[j];
                    }
                }
            }
            s.observe(&x, Some(&gram));
            stats.insert(name.to_string(), s);
        }
        let info = CalibrationInfo {
            source: "demo".into(),
            split: "train".into(),
            requested: 5,
            images: 5,
            seed: 1,
            dataset_rows: 12,
            overlap: 0,
            skipped: 0,
            statistics: needs(),
            set_id: "abc".into(),
            seconds: 1.0,
            cached: false,
            act_calib: None,
            smooth: None,
        };
        cache::write(&path, &stats, &info).unwrap();
        let (read, read_info) = cache::read(&path, needs()).unwrap().unwrap();
        assert_eq!(read, stats);
        assert_eq!(read_info, info);
        // A file without histograms does not serve a request for them.
        let hessian_only = StatsNeeds {
            hessian: true,
            histogram: false,
        };
        let mut less = info.clone();
        less.statistics = hessian_only;
        let mut stripped = stats.clone();
        stripped.values_mut().for_each(|s| s.histogram = None);
        cache::write(&path, &stripped, &less).unwrap();
        assert!(cache::read(&path, needs()).unwrap().is_none());
        assert!(cache::read(&path, hessian_only).unwrap().is_some());
        // A damaged file is an error (the caller warns and recalibrates), a missing one nothing.
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(cache::read(&path, needs()).is_err());
        assert!(cache::read(&dir.join("none.safetensors"), needs()).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_default_split_says_what_to_pass() {
        let loaded = crate::model::load(&ModelSource::Embedded).unwrap();
        let dir = std::env::temp_dir().join(format!("segq-calib-nosplit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images/validation")).unwrap();
        std::fs::create_dir_all(dir.join("annotations/validation")).unwrap();
        let mut request = spec(4, false);
        request.source = None;
        let (columns, options) = (columns(), LoaderOptions::default());
        let from = DrawFrom {
            eval_source: dir.to_str().unwrap(),
            columns: &columns,
            loader_options: &options,
            protocol: Protocol::Transformers,
            eval: None,
        };
        let err = calibrate(&(&loaded).into(), &request, &from, needs())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--calib DATASET") && err.contains("'train'"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
