//! What one evaluation will do, decided from the configuration before any work starts: the model source, the
//! dataset and its row selection (shard resolved), the recipes of every level and method, the protocol and the
//! output folder. [`EvalPlan::from_config`] parses and checks everything the configuration can get wrong, so a
//! bad setting fails in a second instead of after the evaluation.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::data::{DecodeOptions, LabelOptions, LoaderOptions, Selection, ShardSpec};
use crate::eval::results::EvalResults;
use crate::model::ModelSource;
use crate::preprocess::Protocol;
use crate::quant::{Recipe, SweepSpec, UnbuildableLevel};
use crate::{Error, Result};

/// Where the examples come from, as configured; resolved to files (and downloaded) when the evaluation starts.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetPlan {
    /// "embedded", a Hub dataset id, a Parquet file or folder, an ADE folder, `IMAGES_DIR,MASKS_DIR` or a list file.
    pub source: String,
    pub split: String,
    pub subset: String,
    pub image_column: String,
    pub label_column: String,
}

/// `recipes` followed by those of the `--recipe` files, each read and checked now; a file whose recipe is already
/// in the list is refused (its row would be a duplicate).
pub fn with_recipe_files(mut recipes: Vec<Recipe>, files: &[PathBuf]) -> Result<Vec<Recipe>> {
    for path in files {
        let recipe = Recipe::read_file(path)?;
        if let Some(same) = recipes.iter().find(|r| **r == recipe || r.label() == recipe.label()) {
            return Err(Error::config(
                "quant.recipes",
                format!("{}: its recipe ({}) is already evaluated", path.display(), same.label()),
            ));
        }
        recipes.push(recipe);
    }
    Ok(recipes)
}

/// One evaluation: every recipe over one dataset selection.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub model: ModelSource,
    pub dataset: DatasetPlan,
    /// f32 first, then each level x method.
    pub recipes: Vec<Recipe>,
    /// Batching, decoding, error policy, labels and the rows to read (shard already resolved).
    pub loader: LoaderOptions,
    pub protocol: Protocol,
    /// The first `samples` examples are kept with every level's prediction (overlays, W&B images).
    pub samples: usize,
    /// Per quantized level, how many of the images that disagree most with the reference are kept (0: none).
    pub worst_images: usize,
    /// Compute threads the process runs with (recorded in the results).
    pub threads: usize,
    pub output_dir: PathBuf,
    /// How often partial results are handed to the observers ([`crate::eval::EvalObserver::checkpoint`]).
    pub checkpoint_every: Duration,
    /// A selection of zero examples is accepted instead of being an error.
    pub allow_empty: bool,
    /// The partial results of an interrupted run of this same plan, to continue from (`eval --resume`).
    pub resume: Option<Box<EvalResults>>,
    /// The effective configuration, recorded in results.json.
    pub config: Config,
}

impl EvalPlan {
    /// Builds the plan of `config`, resolving `--shard auto` from the cluster's environment. `threads` is the
    /// size of the compute pool the caller set up.
    pub fn from_config(config: &Config, threads: usize) -> Result<EvalPlan> {
        config.validate()?;
        let quant = &config.quant;
        let recipes = SweepSpec {
            levels: &quant.levels,
            methods: &quant.methods,
            group_size: quant.group_size,
            symmetric: quant.symmetric,
            skip: &quant.skip,
            rules: &quant.rules,
        }
        .recipes()
        .into_iter()
        .map(|recipe| {
            // Asked for by name and impossible: an argument error now, not a failed row after the evaluation.
            recipe.map_err(|UnbuildableLevel { reason, .. }| Error::config("quant.levels", reason))
        })
        .collect::<Result<Vec<_>>>()?;
        let recipes = with_recipe_files(recipes, &quant.recipes)?;
        let d = &config.dataset;
        let label_map = config.label_map()?;
        let loader = LoaderOptions {
            selection: Selection {
                shard: resolve_shard(config.eval.shard)?,
                offset: config.eval.offset,
                limit: config.eval.limit,
            },
            batch_size: config.eval.batch_size,
            workers: if d.workers == 0 {
                crate::sysinfo::logical_cores()
            } else {
                d.workers
            },
            prefetch_batches: 2,
            rows: None,
            skip_first: 0,
            on_error: d.on_error,
            labels: LabelOptions {
                reduce_labels: d.reduce_labels,
                ignore_index: d.ignore_index,
                label_map: (!label_map.is_empty()).then_some(label_map),
            },
            decode: DecodeOptions {
                max_image_pixels: d.max_image_pixels,
                exif_orientation: d.exif_orientation,
            },
            image_check: None,
        };
        Ok(EvalPlan {
            model: ModelSource::parse(Some(&config.model.source))?,
            dataset: DatasetPlan {
                source: d.source.clone(),
                split: d.split.clone(),
                subset: d.subset.clone(),
                image_column: d.image_column.clone(),
                label_column: d.label_column.clone(),
            },
            recipes,
            loader,
            protocol: config.eval.protocol,
            samples: config.eval.samples,
            worst_images: config.eval.worst_images,
            threads,
            output_dir: config.output.dir.clone(),
            checkpoint_every: Duration::from_secs(config.eval.checkpoint_seconds),
            allow_empty: config.eval.allow_empty,
            resume: None,
            config: config.clone(),
        })
    }

    /// The plan that continues `partial`, the results an interrupted run of `config` left in `output_dir`.
    /// `config` must be that run's configuration (flags given again must agree with it); only where the results
    /// go and how many threads compute may differ.
    pub fn resuming(config: &Config, threads: usize, partial: EvalResults) -> Result<EvalPlan> {
        if partial.complete {
            return Err(Error::invalid(
                "--resume",
                "that run is complete: there is nothing to resume (its results.json is final)",
            ));
        }
        let recorded: Config = serde_json::from_value(partial.config.clone()).map_err(|e| {
            Error::invalid(
                "--resume",
                format!("the results file's configuration cannot be read: {e}"),
            )
        })?;
        let (mut asked, mut was) = (
            serde_json::to_value(config).map_err(|e| Error::internal(e.to_string()))?,
            serde_json::to_value(&recorded).map_err(|e| Error::internal(e.to_string()))?,
        );
        crate::eval::merge::remove_keys(&mut asked, RESUME_MAY_DIFFER);
        crate::eval::merge::remove_keys(&mut was, RESUME_MAY_DIFFER);
        if let Some(key) = crate::eval::merge::first_difference(&was, &asked, String::new()) {
            return Err(Error::config(
                key,
                "differs from the interrupted run's configuration: --resume continues the same run (drop the flag \
                 or start a new run in another folder)",
            ));
        }
        let mut plan = EvalPlan::from_config(config, threads)?;
        plan.loader.skip_first = (partial.counts.evaluated + partial.counts.skipped) as usize;
        plan.resume = Some(Box::new(partial));
        Ok(plan)
    }

    /// This run's shard `(index, count)`, if it is one.
    pub fn shard(&self) -> Option<(usize, usize)> {
        self.loader.selection.shard
    }
}

/// Configuration keys a resumed run may change: where its results go, threads, and how often it saves them.
const RESUME_MAY_DIFFER: &[&str] = &["output", "threads", "checkpoint_seconds"];

/// `--shard` as (index, count): "I/N", or "auto" from the cluster's environment.
fn resolve_shard(spec: Option<ShardSpec>) -> Result<Option<(usize, usize)>> {
    match spec {
        None => Ok(None),
        Some(ShardSpec::Part { index, count }) => Ok(Some((index, count))),
        Some(ShardSpec::Auto) => {
            let shard = crate::eval::merge::shard_from_env()?;
            if shard.is_none() {
                tracing::warn!("--shard auto: no SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX; evaluating everything");
            }
            Ok(shard)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Level, Method};

    #[test]
    fn plan_of_the_default_config() {
        let plan = EvalPlan::from_config(&Config::default(), 2).unwrap();
        assert_eq!(plan.model, ModelSource::Embedded);
        let labels: Vec<String> = plan.recipes.iter().map(Recipe::label).collect();
        assert_eq!(
            labels,
            [
                "f32",
                "f16",
                "f8",
                "int8-rtn",
                "int8-hqq",
                "int4-rtn-g64",
                "int4-hqq-g64",
                "int2-rtn-g32",
                "int2-hqq-g32"
            ]
        );
        assert_eq!(plan.loader.selection, Selection::default());
        assert_eq!(plan.protocol, Protocol::Transformers);
    }

    #[test]
    fn a_level_no_method_builds_is_an_argument_error() {
        let mut config = Config::default();
        config.quant.levels = vec![Level::F8E4m3, Level::Int4];
        config.quant.methods = vec![Method::Hqq];
        let error = EvalPlan::from_config(&config, 1).unwrap_err().to_string();
        assert!(error.contains("quant.levels") && error.contains("f8"), "{error}");
        assert!(error.contains("integer levels only"), "{error}");
        config.quant.methods = vec![Method::Hqq, Method::Rtn];
        let plan = EvalPlan::from_config(&config, 1).unwrap();
        assert_eq!(plan.recipes.len(), 4);
    }

    #[test]
    fn shard_and_selection_come_from_the_config() {
        let mut config = Config::default();
        config.set("eval.shard=1/3").unwrap();
        config.eval.offset = 2;
        config.eval.limit = Some(5);
        let plan = EvalPlan::from_config(&config, 1).unwrap();
        assert_eq!(plan.shard(), Some((1, 3)));
        assert_eq!(plan.loader.selection.offset, 2);
        assert_eq!(plan.loader.selection.limit, Some(5));
    }
}
