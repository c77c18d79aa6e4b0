//! What one evaluation will do, decided from the configuration before any work starts: the model source, the
//! dataset and its row selection (shard resolved), the recipes of every level and method, the protocol and the
//! output folder. [`EvalPlan::from_config`] parses and checks everything the configuration can get wrong, so a
//! bad setting fails in a second instead of after the evaluation.

use std::path::PathBuf;

use crate::Result;
use crate::config::Config;
use crate::data::{DecodeOptions, LabelOptions, LoaderOptions, Selection, ShardSpec};
use crate::model::ModelSource;
use crate::preprocess::Protocol;
use crate::quant::{Recipe, SweepSpec, UnbuildableLevel};

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

/// One evaluation: every recipe over one dataset selection.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub model: ModelSource,
    pub dataset: DatasetPlan,
    /// f32 first, then each level x method; levels no method can build are kept as failed rows.
    pub recipes: Vec<std::result::Result<Recipe, UnbuildableLevel>>,
    /// Batching, decoding, error policy, labels and the rows to read (shard already resolved).
    pub loader: LoaderOptions,
    pub protocol: Protocol,
    /// The first `samples` examples are kept with every level's prediction (overlays, W&B images).
    pub samples: usize,
    /// Compute threads the process runs with (recorded in the results).
    pub threads: usize,
    pub output_dir: PathBuf,
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
        }
        .recipes();
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
            threads,
            output_dir: config.output.dir.clone(),
            config: config.clone(),
        })
    }

    /// This run's shard `(index, count)`, if it is one.
    pub fn shard(&self) -> Option<(usize, usize)> {
        self.loader.selection.shard
    }
}

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
        let labels: Vec<String> = plan.recipes.iter().map(|r| r.as_ref().unwrap().label()).collect();
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
    fn a_level_no_method_builds_is_a_failed_row() {
        let mut config = Config::default();
        config.quant.levels = vec![Level::F8E4m3, Level::Int4];
        config.quant.methods = vec![Method::Hqq];
        let plan = EvalPlan::from_config(&config, 1).unwrap();
        assert_eq!(plan.recipes.len(), 3);
        let failed = plan.recipes[1].as_ref().unwrap_err();
        assert_eq!(failed.level, Level::F8E4m3);
        assert!(failed.reason.contains("integer levels only"), "{}", failed.reason);
        assert_eq!(plan.recipes[2].as_ref().unwrap().label(), "int4-hqq-g64");
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
