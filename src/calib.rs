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
use crate::quant::{ModelStats, StatsNeeds};
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
}

/// How a dataset is addressed besides its source: what `resolve_source` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumns {
    pub subset: String,
    pub image_column: String,
    pub label_column: String,
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
}

/// A calibration's statistics and what it used.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub stats: ModelStats,
    pub info: CalibrationInfo,
}

/// Draws the calibration images from `spec`'s source and accumulates every layer's input statistics over them with
/// `loaded`'s model, in one streaming pass (one image at a time in memory). `eval` is the evaluated window, left out
/// of the draw when the calibration source resolves to the same dataset.
pub fn calibrate(
    loaded: &LoadedModel,
    spec: &CalibSpec,
    eval_source: &str,
    columns: &SourceColumns,
    loader_options: &LoaderOptions,
    protocol: Protocol,
    eval: Option<EvalWindow<'_>>,
    needs: StatsNeeds,
) -> Result<Calibration> {
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
    let preprocessor = &loaded.preprocessor;
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
    let stats = crate::model::probe::capture(&loaded.model, needs, HESSIAN_ROWS_PER_IMAGE, batches)?;
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
    };
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
        let run = |spec: &CalibSpec, window: Option<EvalWindow<'_>>| {
            calibrate(
                &loaded,
                spec,
                "embedded",
                &columns(),
                &options,
                Protocol::Transformers,
                window,
                needs(),
            )
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
    fn a_missing_default_split_says_what_to_pass() {
        let loaded = crate::model::load(&ModelSource::Embedded).unwrap();
        let dir = std::env::temp_dir().join(format!("segq-calib-nosplit-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images/validation")).unwrap();
        std::fs::create_dir_all(dir.join("annotations/validation")).unwrap();
        let mut request = spec(4, false);
        request.source = None;
        let err = calibrate(
            &loaded,
            &request,
            dir.to_str().unwrap(),
            &columns(),
            &LoaderOptions::default(),
            Protocol::Transformers,
            None,
            needs(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--calib DATASET") && err.contains("'train'"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
