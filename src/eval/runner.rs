//! The evaluation runner: one pass over the dataset in which every batch goes through every level's model, so
//! images are decoded once and each quantized prediction is compared with the float model's on the same pixels.
//! [`evaluate`] loads the model, builds every level, runs them and hands progress and the finished run to an
//! [`EvalObserver`] (progress bars, interruption, report writers and trackers are observers). It owns timing and
//! peak memory per level; scores go to `metrics` accumulators.

use std::collections::BTreeMap;
use std::time::Instant;

use image::{GrayImage, RgbImage};

use crate::data::{Example, Loader};
use crate::eval::auto::{AutoSearch, AutoSpec};
use crate::eval::bootstrap::BootstrapSettings;
use crate::eval::metrics::ConfusionMatrix;
use crate::eval::per_image::ImageCounts;
use crate::eval::plan::EvalPlan;
use crate::eval::results::{
    Counts, DatasetInfo, EvalResults, LevelMethod, LevelResult, LevelStatus, MachineInfo, ModelInfo,
};
use crate::eval::worst::{WorstOfLevel, WorstPixels, WorstTracker, disagreement};
use crate::model::segformer::Segformer;
use crate::model::{self, LoadedModel};
use crate::preprocess::PreprocessorConfig;
use crate::quant::{Level, Recipe};
use crate::segmenter::{self, ModelInput};
use crate::{Error, Result};

/// Receives an evaluation's progress and its end. Every method has a default that does nothing.
pub trait EvalObserver {
    /// The model, the dataset and every level are ready; `examples` are about to be evaluated.
    fn started(&mut self, _examples: usize) {}
    /// A batch of `images` went through every level.
    fn batch_done(&mut self, _images: usize) {}
    /// Asked before each batch: true stops the run there (the results are marked incomplete).
    fn should_stop(&self) -> bool {
        false
    }
    /// The results so far (incomplete), every `EvalPlan::checkpoint_every`: save them so that a killed run loses
    /// at most that much work.
    fn checkpoint(&mut self, _partial: &EvalResults) -> Result<()> {
        Ok(())
    }
    /// The run is over, complete or not: publish it. Errors end [`evaluate`] with that error, after the observers
    /// before this one have published.
    fn finished(&mut self, _output: &EvalOutput) -> Result<()> {
        Ok(())
    }
}

/// No observer.
impl EvalObserver for () {}

/// Several observers, called in order (e.g. write the files first, then upload).
impl EvalObserver for Vec<Box<dyn EvalObserver + '_>> {
    fn started(&mut self, examples: usize) {
        self.iter_mut().for_each(|o| o.started(examples));
    }
    fn batch_done(&mut self, images: usize) {
        self.iter_mut().for_each(|o| o.batch_done(images));
    }
    fn should_stop(&self) -> bool {
        self.iter().any(|o| o.should_stop())
    }
    fn checkpoint(&mut self, partial: &EvalResults) -> Result<()> {
        self.iter_mut().try_for_each(|o| o.checkpoint(partial))
    }
    fn finished(&mut self, output: &EvalOutput) -> Result<()> {
        self.iter_mut().try_for_each(|o| o.finished(output))
    }
}

/// One model to evaluate: the float baseline or a quantized copy; `None` once it could not be built or has failed
/// (the reason is in `result.status`).
struct Variant {
    model: Option<Segformer>,
    result: LevelResult,
    /// The images that disagree most with the reference (capacity 0 for the reference itself).
    worst: WorstTracker,
}

impl Variant {
    /// The result row so far, with its worst-image list (none once the level has failed).
    fn snapshot(&self) -> LevelResult {
        let mut row = self.result.clone();
        if row.is_ok() {
            row.worst_images = self.worst.list(&row.label);
        }
        row
    }

    /// The finished row; the worst images with their pixels go to `worst` (levels that ran and list some).
    fn finish(self, reference_label: &str, worst: &mut Vec<WorstOfLevel>) -> LevelResult {
        let mut row = self.result;
        if row.is_ok() {
            let entries = self.worst.into_entries(&row.label);
            row.worst_images = entries.iter().map(|e| e.image.clone()).collect();
            if !entries.is_empty() {
                worst.push(WorstOfLevel {
                    label: row.label.clone(),
                    reference_label: reference_label.to_string(),
                    entries,
                });
            }
        }
        row
    }
}

/// A kept example with every level's prediction, keyed by level label.
pub struct Sample {
    pub id: String,
    pub image: RgbImage,
    pub label: GrayImage,
    pub predictions: BTreeMap<String, Vec<u16>>,
}

/// A finished evaluation: the result file's contents, the kept samples, and each level's worst images with the
/// pixels of their overlays.
pub struct EvalOutput {
    pub results: EvalResults,
    pub samples: Vec<Sample>,
    pub worst: Vec<WorstOfLevel>,
}

/// Runs `plan`: loads the model and the dataset, builds every level, evaluates them all in one pass over the
/// examples, and calls `observer.finished` with the output before returning it. Every level is built before the
/// first forward pass, so an argument that cannot work fails in seconds. Partial results go to
/// `observer.checkpoint` every `plan.checkpoint_every`; a plan that resumes an interrupted run starts from its
/// counts and reads only the examples it had not reached.
pub fn evaluate(plan: &EvalPlan, observer: &mut dyn EvalObserver) -> Result<EvalOutput> {
    let loaded = model::load(&plan.model)?;
    let mut recipes = recipes_for(&loaded, plan)?;
    let d = &plan.dataset;
    let OpenedDataset {
        spec,
        description: dataset_description,
        options: loader_options,
        mut loader,
    } = open_dataset(plan, &loaded)?;
    // Mixed-precision searches run before any level is built: their recipes are rows like the others.
    let searched = search_recipes(&loaded, plan, &loader_options)?;
    recipes.extend(searched.iter().map(|(recipe, _)| recipe.clone()));
    let calibration = calibrate_for(&loaded, plan, &recipes, &loader_options, Some(&spec))?;
    let selected = loader.total() + plan.loader.skip_first;
    tracing::info!("dataset ready: {dataset_description}, {selected} examples");
    let selection = &plan.loader.selection;
    // An empty shard of a non-empty selection (more shards than examples) is legitimate: its merge is exact.
    let unsharded = crate::data::Selection {
        shard: None,
        ..*selection
    }
    .rows(loader.dataset_rows())
    .len();
    if selected == 0 && unsharded > 0 {
        tracing::warn!(shard = ?selection.shard, "this shard selects no examples (more shards than examples)");
    } else if selected == 0 && !plan.allow_empty {
        return Err(Error::config(
            "dataset selection",
            format!(
                "no examples selected from {dataset_description} ({} rows; offset {}, limit {}, shard {}); pass \
                 --allow-empty (eval.allow_empty) to accept an empty run",
                loader.dataset_rows(),
                selection.offset,
                selection.limit.map_or("none".to_string(), |l| l.to_string()),
                selection.shard.map_or("none".to_string(), |(i, n)| format!("{i}/{n}")),
            ),
        ));
    }
    let model_info = ModelInfo {
        source: plan.model.to_string(),
        num_labels: loaded.model.config().num_labels(),
        class_names: loaded.class_names(),
        parameters: loaded.model.layers().iter().map(|l| l.parameters as u64).sum(),
        f32_weight_bytes: loaded.weight_bytes() as u64,
    };
    let dataset_info = DatasetInfo {
        source: dataset_description,
        split: d.split.clone(),
        shard: plan.shard(),
        offset: plan.loader.selection.offset,
        limit: plan.loader.selection.limit,
        examples_total_selected: selected,
    };
    let machine = MachineInfo {
        cpu_model: crate::sysinfo::cpu_model(),
        logical_cores: crate::sysinfo::logical_cores(),
        threads: plan.threads,
        os: std::env::consts::OS.to_string(),
    };
    // Levels are built and held a group at a time (eval.levels_at_once); each group is one pass over the examples,
    // with the reference model in every pass for agreement. One group (the default) is one pass.
    let groups = level_groups(recipes.len(), plan.config.eval.levels_at_once);
    let passes = groups.len();
    if passes > 1 && plan.resume.is_some() {
        return Err(Error::config(
            "eval.levels_at_once",
            "a run of several passes cannot be resumed: resume with eval.levels_at_once = 0",
        ));
    }
    // Ratios are to the float model's size: the model as loaded, unless that is a quantized checkpoint, whose float
    // size is its parameter count at 4 bytes.
    let f32_bytes = match &loaded.recipe {
        None => loaded.weight_bytes().max(1) as f64,
        Some(_) => (loaded.model.layers().iter().map(|l| l.parameters).sum::<usize>() * 4).max(1) as f64,
    };
    let worst_capacity = plan.worst_images;
    let mut variants = build_variants(
        &loaded,
        &recipes[..groups[0].end],
        calibration.as_ref(),
        model_info.num_labels,
        f32_bytes,
        worst_capacity,
    )?;
    attach_searches(&mut variants, &searched);
    let mut earlier = Counts::default();
    if let Some(partial) = plan.resume.as_deref() {
        continue_from(partial, &mut variants, &model_info, &dataset_info, worst_capacity)?;
        earlier = partial.counts.clone();
        tracing::info!(
            done = earlier.evaluated + earlier.skipped,
            of = selected,
            "resuming the interrupted run"
        );
    }
    let run = RunInfo {
        plan,
        model: &model_info,
        dataset: &dataset_info,
        machine: &machine,
        earlier: &earlier,
        calibration: calibration.as_ref().map(|c| &c.calibration.info),
    };
    observer.started(loader.total() * passes);
    let mut samples: Vec<Sample> = Vec::new();
    let mut stopped = false;
    let mut rows: Vec<LevelResult> = Vec::new();
    let mut worst: Vec<WorstOfLevel> = Vec::new();
    let reference_label = variants[0].result.label.clone();
    let mut first_pass_stats = None;
    for (pass, group) in groups.iter().enumerate() {
        if pass > 0 {
            tracing::info!(pass = pass + 1, of = passes, "next group of levels");
            variants.truncate(1);
            variants.extend(build_variants(
                &loaded,
                &recipes[group.clone()],
                calibration.as_ref(),
                model_info.num_labels,
                f32_bytes,
                worst_capacity,
            )?);
            attach_searches(&mut variants, &searched);
            loader = Loader::new(&spec, loader_options.clone())?;
        }
        let mut wait_start = Instant::now();
        let mut last_checkpoint = Instant::now();
        let mut seen = 0usize;
        // The next batch is decoded and preprocessed while the models run this one.
        let mut batches = PreparedBatches::start(loader, loaded.preprocessor.clone(), plan.protocol)?;
        // The loader's counts as of the last batch taken: a batch prepared ahead but not evaluated is not counted.
        let mut taken_stats: Option<crate::data::LoadStats> = None;
        loop {
            if observer.should_stop() || crate::interrupt::stop_requested() {
                tracing::warn!("interrupted: writing the results so far, marked incomplete");
                stopped = true;
                break;
            }
            let Some(prepared) = batches.next() else { break };
            taken_stats = Some(prepared.stats);
            let (batch, inputs) = prepared.batch?;
            let data_s = wait_start.elapsed().as_secs_f64();
            if batch.is_empty() {
                wait_start = Instant::now();
                continue;
            }
            let at = BatchAt { pass, first: seen };
            evaluate_batch(&batch, &inputs, &mut variants, plan, data_s, &mut samples, at)?;
            seen += batch.len();
            observer.batch_done(batch.len());
            // Partial results are resumable only from a single pass.
            if passes == 1 && last_checkpoint.elapsed() >= plan.checkpoint_every {
                let stats = taken_stats.clone().unwrap_or_default();
                let partial = run.results(variants.iter().map(Variant::snapshot).collect(), &stats, false)?;
                observer.checkpoint(&partial)?;
                last_checkpoint = Instant::now();
            }
            wait_start = Instant::now();
        }
        let (returned, ended) = batches.finish()?;
        loader = returned;
        // Run to its end, the loader's own counts are complete; stopped early, they are those of the batches taken.
        let stats = match (ended, taken_stats) {
            (false, Some(taken)) => taken,
            _ => loader.stats(),
        };
        if pass == 0 {
            first_pass_stats = Some(stats);
        }
        rows.extend(variants.drain(1..).map(|v| v.finish(&reference_label, &mut worst)));
        if stopped {
            break;
        }
    }
    rows.insert(0, variants.remove(0).finish(&reference_label, &mut worst));
    let stats = first_pass_stats.unwrap_or_else(|| loader.stats());
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, first = ?stats.skip_reasons.first(), "examples skipped");
    }
    if stats.unreadable_files > 0 {
        tracing::warn!(
            files = stats.unreadable_files,
            "Parquet files could not be read and their rows are unknown: the run is marked incomplete"
        );
    }
    let results = run.results(rows, &stats, !stopped)?;
    let output = EvalOutput {
        results,
        samples,
        worst,
    };
    observer.finished(&output)?;
    Ok(output)
}

/// A plan's dataset opened for one model: files resolved (downloaded when remote), a loader over the selected
/// rows, and a description for results and logs.
pub struct OpenedDataset {
    pub spec: crate::data::DatasetSpec,
    pub description: String,
    /// The plan's loader options with the model's input-size check: a new [`Loader`] over the same rows.
    pub options: crate::data::LoaderOptions,
    pub loader: Loader,
}

/// Opens `plan`'s dataset for `loaded`: images the model cannot run on are refused (named, or skipped and counted)
/// by the loader, and a batch the machine cannot hold is refused before any is read. `segq eval` and
/// `segq sensitivity` read their examples through this.
pub fn open_dataset(plan: &EvalPlan, loaded: &LoadedModel) -> Result<OpenedDataset> {
    let d = &plan.dataset;
    let (spec, description) = crate::data::resolve_source(
        &d.source,
        &d.split,
        &d.subset,
        &d.image_column,
        &d.label_column,
        &plan.loader.selection,
    )?;
    let mut options = plan.loader.clone();
    options.image_check = Some(crate::preprocess::input_size_check(
        &loaded.preprocessor,
        plan.protocol,
        loaded.model.config().min_input_side(),
    ));
    // The largest model input a batch can hold: the processor's size, or mmseg's 2048x512 fit.
    let (input_width, input_height) = match plan.protocol {
        crate::preprocess::Protocol::Mmseg => (2048, 512),
        crate::preprocess::Protocol::Transformers => {
            let size = &loaded.preprocessor.size;
            (size.width, size.height)
        }
    };
    model::check_forward_memory(
        loaded.model.config(),
        input_height,
        input_width,
        plan.loader.batch_size,
        &format!("--batch-size {}", plan.loader.batch_size),
    )?;
    let loader = Loader::new(&spec, options.clone())?;
    Ok(OpenedDataset {
        spec,
        description,
        options,
        loader,
    })
}

/// What every results file of one run shares, with the counts of the run it resumes.
struct RunInfo<'a> {
    plan: &'a EvalPlan,
    model: &'a ModelInfo,
    dataset: &'a DatasetInfo,
    machine: &'a MachineInfo,
    earlier: &'a Counts,
    calibration: Option<&'a crate::calib::CalibrationInfo>,
}

impl RunInfo<'_> {
    /// The results so far. `finished`: the loader has been run to its end (or to an error), rather than stopped
    /// or checkpointed mid-way. Complete only when finished and every selected example was evaluated or skipped.
    fn results(
        &self,
        mut levels: Vec<LevelResult>,
        stats: &crate::data::LoadStats,
        finished: bool,
    ) -> Result<EvalResults> {
        // The loader hands examples out in row order; sorting keeps the per-image counts' invariant regardless.
        for level in &mut levels {
            level.per_image.sort_by_key(|image| image.index);
        }
        let mut skip_reasons = self.earlier.skip_reasons.clone();
        skip_reasons.extend(stats.skip_reasons.iter().cloned());
        let consumed = (stats.decoded + stats.skipped) as u64;
        let counts = Counts {
            // Mid-run the reader is ahead of what was scored; a checkpoint counts only what its scores include.
            read: self.earlier.read + if finished { stats.read as u64 } else { consumed },
            evaluated: self.earlier.evaluated + stats.decoded as u64,
            skipped: self.earlier.skipped + stats.skipped as u64,
            skip_reasons,
            unreadable_files: self.earlier.unreadable_files.max(stats.unreadable_files as u64),
        };
        let accounted = counts.evaluated + counts.skipped == self.dataset.examples_total_selected as u64;
        let mut results = EvalResults {
            segq_version: crate::VERSION.to_string(),
            created_utc: crate::eval::results::utc_now(),
            complete: finished && accounted && counts.unreadable_files == 0,
            config: serde_json::to_value(&self.plan.config).map_err(|e| Error::internal(e.to_string()))?,
            model: self.model.clone(),
            dataset: self.dataset.clone(),
            machine: self.machine.clone(),
            counts,
            bootstrap: bootstrap_settings(self.plan),
            calibration: self.calibration.cloned(),
            levels,
        };
        results.refresh_summaries();
        Ok(results)
    }
}

/// The run's bootstrap (`eval.bootstrap_*`); `None` when it is off, and then no per-image counts are kept.
fn bootstrap_settings(plan: &EvalPlan) -> Option<BootstrapSettings> {
    let eval = &plan.config.eval;
    (eval.bootstrap_resamples > 0).then_some(BootstrapSettings {
        resamples: eval.bootstrap_resamples,
        seed: eval.bootstrap_seed,
    })
}

/// Starts `variants` from the scores an interrupted run left in `partial`, after checking that it is the same
/// model, dataset selection and list of levels.
fn continue_from(
    partial: &EvalResults,
    variants: &mut [Variant],
    model: &ModelInfo,
    dataset: &DatasetInfo,
    worst_capacity: usize,
) -> Result<()> {
    let origin = "--resume";
    if partial.model != *model {
        return Err(Error::invalid(
            origin,
            format!(
                "the model differs from the interrupted run's ({})",
                partial.model.source
            ),
        ));
    }
    let (a, b) = (&partial.dataset, dataset);
    if (
        &a.source,
        &a.split,
        a.shard,
        a.offset,
        a.limit,
        a.examples_total_selected,
    ) != (
        &b.source,
        &b.split,
        b.shard,
        b.offset,
        b.limit,
        b.examples_total_selected,
    ) {
        return Err(Error::invalid(
            origin,
            format!(
                "the dataset selection differs from the interrupted run's ({} {}, {} examples now {})",
                a.source, a.split, a.examples_total_selected, b.examples_total_selected
            ),
        ));
    }
    let labels = |levels: &mut dyn Iterator<Item = &LevelResult>| levels.map(|l| l.label.clone()).collect::<Vec<_>>();
    let (was, now) = (
        labels(&mut partial.levels.iter()),
        labels(&mut variants.iter().map(|v| &v.result)),
    );
    if was != now {
        return Err(Error::invalid(
            origin,
            format!(
                "the levels differ from the interrupted run's: {} vs {}",
                now.join(","),
                was.join(",")
            ),
        ));
    }
    for (variant, done) in variants.iter_mut().zip(&partial.levels) {
        let result = &mut variant.result;
        if let LevelStatus::Failed { .. } = &done.status {
            variant.model = None;
            result.status = done.status.clone();
            result.confusion = None;
            result.agreement = None;
        } else {
            result.confusion = done.confusion.clone();
            result.agreement = done.agreement.clone();
            result.per_image = done.per_image.clone();
            if !result.method.is_reference() {
                variant.worst = WorstTracker::continuing(worst_capacity, &done.worst_images);
            }
        }
        result.model_latency_ms = done.model_latency_ms.clone();
        result.pipeline_latency_ms = done.pipeline_latency_ms.clone();
        result.wall_time_s = done.wall_time_s;
        result.peak_rss_bytes = done.peak_rss_bytes;
        result.working_bytes = done.working_bytes;
    }
    Ok(())
}

/// The passes over the examples: ranges of `recipes` indices (the reference, index 0, runs in every pass), each of
/// at most `at_once` quantized levels; one range with every level when `at_once` is 0 or not smaller.
fn level_groups(recipes: usize, at_once: usize) -> Vec<std::ops::Range<usize>> {
    let levels = recipes.saturating_sub(1);
    if at_once == 0 || at_once >= levels {
        return std::iter::once(1..recipes.max(1)).collect();
    }
    (1..recipes)
        .step_by(at_once)
        .map(|start| start..(start + at_once).min(recipes))
        .collect()
}

/// Where a batch is in the run: which pass, and how many examples of that pass came before it.
#[derive(Clone, Copy)]
struct BatchAt {
    pass: usize,
    first: usize,
}

/// The recipes to evaluate on `loaded`: the plan's, unless the model is a quantized checkpoint. That is evaluated
/// as loaded, alone: quantizing it again would report levels of an already-rounded model as if they were the float
/// model's. Levels asked for explicitly are refused unless the plan says to requantize; the default list is
/// dropped with a notice.
fn recipes_for(loaded: &LoadedModel, plan: &EvalPlan) -> Result<Vec<Recipe>> {
    let Some(header) = &loaded.recipe else {
        return Ok(plan.recipes.clone());
    };
    let others: Vec<String> = plan
        .recipes
        .iter()
        .filter(|r| !r.is_float_baseline())
        .map(Recipe::label)
        .collect();
    let quant = &plan.config.quant;
    if quant.requantize {
        tracing::warn!(
            recipe = %header.label,
            "requantizing a quantized checkpoint: the other levels are made from its dequantized weights and \
             compared with it, not with the float model"
        );
        return Ok(plan.recipes.clone());
    }
    if !others.is_empty() && quant.levels != crate::config::QuantConfig::default().levels {
        return Err(Error::config(
            "quant.levels",
            format!(
                "{} is a quantized checkpoint ({}): it is evaluated as loaded; {} would quantize already-rounded \
                 weights. Pass the float model to compare levels, or --requantize (quant.requantize) to quantize \
                 this one again",
                plan.model,
                header.label,
                others.join(",")
            ),
        ));
    }
    tracing::info!(
        recipe = %header.label,
        "the model is a quantized checkpoint: evaluating it as loaded (pass the float model to compare levels)"
    );
    Ok(plan.recipes.iter().filter(|r| r.is_float_baseline()).cloned().collect())
}

/// The recipes of the configuration's `auto:` searches, measured on the first `quant.auto_images` examples of the
/// selection before sharding (so every shard searches the same images and finds the same recipes).
fn search_recipes(
    loaded: &LoadedModel,
    plan: &EvalPlan,
    loader_options: &crate::data::LoaderOptions,
) -> Result<Vec<(Recipe, AutoSearch)>> {
    let quant = &plan.config.quant;
    if quant.auto.is_empty() {
        return Ok(Vec::new());
    }
    let mut options = loader_options.clone();
    let selection = plan.loader.selection;
    options.selection = crate::data::Selection {
        shard: None,
        offset: selection.offset,
        limit: Some(selection.limit.map_or(quant.auto_images, |l| l.min(quant.auto_images))),
    };
    options.skip_first = 0;
    // Resolved for these rows: a shard's own files (Hub Parquet) may not hold the first ones.
    let d = &plan.dataset;
    let (spec, _) = crate::data::resolve_source(
        &d.source,
        &d.split,
        &d.subset,
        &d.image_column,
        &d.label_column,
        &options.selection,
    )?;
    let (mut inputs, mut labels) = (Vec::new(), Vec::new());
    for batch in Loader::new(&spec, options)? {
        for ex in batch? {
            inputs.push(ModelInput::new(&ex.image, &loaded.preprocessor, plan.protocol));
            labels.push(ex.label);
        }
    }
    if inputs.is_empty() {
        return Err(Error::config(
            "quant.auto",
            "the mixed-precision search has no images: the selection is empty",
        ));
    }
    // hqq rounds int2/int4 better than rtn: the search uses it when the sweep compares it. The search measures
    // sensitivity with calibration-free methods only.
    let method = if quant.methods.contains(&crate::quant::Method::Hqq) {
        crate::quant::Method::Hqq
    } else {
        crate::quant::Method::Rtn
    };
    let auto_spec = AutoSpec {
        targets: quant.auto.clone(),
        method,
        group_size: quant.group_size,
        batch_size: plan.loader.batch_size,
        ignore_index: plan.loader.labels.ignore_index,
    };
    crate::eval::auto::search_all(loaded, &inputs, Some(&labels), &auto_spec)
}

/// Calibrates once for every recipe that needs it (`None` when none does), as `plan.config.quant` says
/// (`calib*`, `act_calib`, `smooth`). `evaluated`: the dataset being evaluated, whose window (`plan`'s offset and
/// limit) the draw leaves out (see [`crate::calib`]).
pub fn calibrate_for(
    loaded: &LoadedModel,
    plan: &EvalPlan,
    recipes: &[Recipe],
    loader_options: &crate::data::LoaderOptions,
    evaluated: Option<&crate::data::DatasetSpec>,
) -> Result<Option<crate::calib::CalibratedModels>> {
    let d = &plan.dataset;
    let quant = &plan.config.quant;
    let columns = crate::calib::SourceColumns {
        subset: d.subset.clone(),
        image_column: d.image_column.clone(),
        label_column: d.label_column.clone(),
    };
    let window = evaluated.map(|spec| crate::calib::EvalWindow {
        spec,
        selection: plan.loader.selection,
    });
    let from = crate::calib::DrawFrom {
        eval_source: &d.source,
        columns: &columns,
        loader_options,
        protocol: plan.protocol,
        eval: window,
    };
    crate::calib::calibrate_for_recipes(
        loaded,
        recipes,
        &quant.calib_spec(),
        quant.act_calib,
        quant.smooth,
        &from,
    )
}

/// Records on each searched row how its recipe was found.
fn attach_searches(variants: &mut [Variant], searched: &[(Recipe, AutoSearch)]) {
    for v in variants {
        let found = v
            .result
            .recipe
            .as_ref()
            .and_then(|r| searched.iter().find(|(s, _)| s == r));
        if let Some((_, info)) = found {
            v.result.auto = Some(info.clone());
        }
    }
}

/// Builds the model of every recipe from the loaded model, with its result row. The first row is the f32
/// baseline: its predictions are the reference for every other level's agreement. A recipe that cannot be built
/// for this model is an error naming it, before any example is read. Ratios are to `f32_bytes`, the float size.
/// Every level but the reference keeps its `worst_capacity` worst images.
fn build_variants(
    loaded: &LoadedModel,
    recipes: &[Recipe],
    calibration: Option<&crate::calib::CalibratedModels>,
    num_labels: usize,
    f32_bytes: f64,
    worst_capacity: usize,
) -> Result<Vec<Variant>> {
    let mut variants: Vec<Variant> = recipes
        .iter()
        .map(|recipe| {
            let built = match calibration {
                Some(c) => c.quantize(&loaded.model, recipe),
                None => model::quantize(&loaded.model, recipe),
            };
            let (m, report) =
                built.map_err(|e| Error::config("quant.levels", format!("{} cannot be built: {e}", recipe.label())))?;
            let baseline = recipe.is_float_baseline();
            // The reference row is the model as loaded: from a quantized checkpoint that is not float, and the row
            // says what it is (label, level, bits) rather than claim 32 bits per weight.
            let mut row = match (&loaded.recipe, baseline) {
                (Some(header), true) => {
                    let mut row = level_row(
                        header.label.clone(),
                        header.recipe.level,
                        LevelMethod::AsLoaded {
                            recipe: header.label.clone(),
                        },
                        num_labels,
                    );
                    row.bits_per_weight = m.bits_per_weight();
                    row
                }
                (None, true) => {
                    let mut row = level_row(report.label.clone(), recipe.level, LevelMethod::None, num_labels);
                    row.bits_per_weight = report.bits_per_weight;
                    row
                }
                (Some(header), false) => {
                    let method = LevelMethod::Requantized {
                        method: recipe.method,
                        from: header.label.clone(),
                    };
                    let mut row = level_row(format!("{}-requant", report.label), recipe.level, method, num_labels);
                    row.bits_per_weight = report.bits_per_weight;
                    row
                }
                (None, false) => {
                    let method = LevelMethod::Method(recipe.method);
                    let mut row = level_row(report.label.clone(), recipe.level, method, num_labels);
                    row.bits_per_weight = report.bits_per_weight;
                    row
                }
            };
            // SmoothQuant rows say so: the same recipe without it would be another row.
            if let Some(alpha) = calibration
                .filter(|c| c.smoothed_for(recipe))
                .and_then(|c| c.calibration.info.smooth)
            {
                row.label = format!("{}-sq{alpha}", row.label);
            }
            row.group_size = recipe.requested_group_size();
            row.recipe = recipe.is_custom().then(|| recipe.clone());
            row.weight_bytes_memory = m.weight_bytes() as u64;
            row.weight_bytes_disk = Some(crate::model::checkpoint::stored_bytes(&m));
            row.load_time_s = loaded.load_time.as_secs_f64();
            row.quantize_time_s = report.seconds;
            row.fallbacks = report.fallbacks;
            let worst = WorstTracker::new(if baseline { 0 } else { worst_capacity });
            Ok(Variant {
                model: Some(m),
                result: row,
                worst,
            })
        })
        .collect::<Result<_>>()?;
    for v in &mut variants {
        v.result.ratio_to_f32 = v.result.weight_bytes_memory as f64 / f32_bytes;
    }
    Ok(variants)
}

/// A result row with no scores yet: accumulators for levels that run, none for failed ones.
fn level_row(label: String, level: Level, method: LevelMethod, num_labels: usize) -> LevelResult {
    let reference = method.is_reference();
    LevelResult {
        label,
        level,
        method,
        group_size: None,
        recipe: None,
        auto: None,
        bits_per_weight: f64::NAN,
        status: LevelStatus::Ok,
        confusion: Some(ConfusionMatrix::new(num_labels)),
        agreement: (!reference).then(|| ConfusionMatrix::new(num_labels)),
        weight_bytes_memory: 0,
        weight_bytes_disk: None,
        ratio_to_f32: f64::NAN,
        load_time_s: f64::NAN,
        quantize_time_s: f64::NAN,
        fallbacks: Vec::new(),
        peak_rss_bytes: 0,
        working_bytes: 0,
        model_latency_ms: Vec::new(),
        pipeline_latency_ms: Vec::new(),
        wall_time_s: 0.0,
        per_image: Vec::new(),
        worst_images: Vec::new(),
        summary: None,
    }
}

/// A batch with its model inputs (preprocessed once for all levels), and the loader's counts right after it.
struct PreparedBatch {
    batch: Result<(Vec<Example>, Vec<ModelInput>)>,
    stats: crate::data::LoadStats,
}

/// The loader run on a background thread that also preprocesses each batch, one batch ahead of the models: the
/// rendezvous channel lets the thread prepare batch k + 1 while batch k is evaluated, and no further. Batches
/// arrive in the loader's order with its results unchanged; only where the preprocessing runs moves.
struct PreparedBatches {
    receiver: Option<crossbeam_channel::Receiver<PreparedBatch>>,
    thread: Option<std::thread::JoinHandle<(Loader, bool)>>,
}

impl PreparedBatches {
    fn start(
        mut loader: Loader,
        preprocessor: PreprocessorConfig,
        protocol: crate::preprocess::Protocol,
    ) -> Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded(0);
        let thread = std::thread::Builder::new()
            .name("segq-prepare".into())
            .spawn(move || {
                // One thread of its own: the resize's parallel loops run here in turn instead of taking the
                // model's threads from it.
                let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().ok();
                let prepare = |batch: Vec<Example>| {
                    let inputs = batch
                        .iter()
                        .map(|ex| ModelInput::new(&ex.image, &preprocessor, protocol))
                        .collect();
                    (batch, inputs)
                };
                loop {
                    let Some(batch) = loader.next() else {
                        return (loader, true);
                    };
                    let batch = batch.map(|b| match &pool {
                        Some(pool) => pool.install(|| prepare(b)),
                        None => prepare(b),
                    });
                    let stats = loader.stats();
                    if sender.send(PreparedBatch { batch, stats }).is_err() {
                        // The run stopped taking batches.
                        return (loader, false);
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the batch preparing thread: {e}")))?;
        Ok(PreparedBatches {
            receiver: Some(receiver),
            thread: Some(thread),
        })
    }

    fn next(&mut self) -> Option<PreparedBatch> {
        self.receiver.as_ref()?.recv().ok()
    }

    /// Stops the thread and returns the loader, with whether it was run to its end.
    fn finish(mut self) -> Result<(Loader, bool)> {
        self.receiver = None;
        let thread = self
            .thread
            .take()
            .ok_or_else(|| Error::internal("the batch preparing thread is gone"))?;
        thread
            .join()
            .map_err(|_| Error::internal("the batch preparing thread panicked"))
    }
}

impl Drop for PreparedBatches {
    fn drop(&mut self) {
        // Closing the channel ends the thread at its next batch; waiting for it lets the loader shut down cleanly.
        self.receiver = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn evaluate_batch(
    batch: &[Example],
    inputs: &[ModelInput],
    variants: &mut [Variant],
    plan: &EvalPlan,
    data_s: f64,
    samples: &mut Vec<Sample>,
    at: BatchAt,
) -> Result<()> {
    let n = batch.len();
    let ignore_index = plan.loader.labels.ignore_index;
    let per_image = bootstrap_settings(plan).is_some();
    // Images of one size share a forward pass. The inputs were preprocessed while the previous batch ran: what
    // the run waited for them is the time shared by every level.
    let inputs: Vec<&ModelInput> = inputs.iter().collect();
    let shared_per_image_ms = data_s * 1000.0 / n as f64;

    let mut reference: Vec<Vec<u16>> = Vec::new();
    // The first `plan.samples` examples of the run are kept (in the first pass), with every level's prediction
    // added below; batch item `k` is sample `at.first + k`.
    if at.pass == 0 {
        for ex in batch.iter().take(plan.samples.saturating_sub(samples.len())) {
            samples.push(Sample {
                id: ex.id.clone(),
                image: ex.image.clone(),
                label: ex.label.clone(),
                predictions: BTreeMap::new(),
            });
        }
    }
    for variant in variants.iter_mut() {
        let Some(model) = &variant.model else { continue };
        // After the first pass the reference runs only to be agreed with: its scores and timings are counted once.
        if at.pass > 0 && variant.result.method.is_reference() {
            let logits = segmenter::forward_inputs(model, &inputs)?;
            reference = logits
                .iter()
                .zip(batch)
                .map(|(l, ex)| l.logits.mask(ex.label.height() as usize, ex.label.width() as usize))
                .collect();
            continue;
        }
        let level_start = Instant::now();
        crate::sysinfo::reset_peak_rss();
        // This level's working memory: the heap high-water mark of its forward passes above what was live before
        // (every level's weights, the batch). The loader's threads decode ahead meanwhile, so it can be over by
        // the images in flight, never under.
        let live_before = crate::sysinfo::heap_bytes();
        crate::sysinfo::reset_peak_heap();
        let logits = match segmenter::forward_inputs(model, &inputs) {
            Ok(l) => l,
            Err(e) => {
                let reason = format!("forward pass failed: {e}");
                tracing::error!(level = %variant.result.label, %reason, "level failed; the others go on");
                variant.result.status = LevelStatus::Failed { reason };
                variant.model = None;
                continue;
            }
        };
        let working = crate::sysinfo::peak_heap_bytes().saturating_sub(live_before) as u64;
        let predictions: Vec<Vec<u16>> = logits
            .iter()
            .zip(batch)
            .map(|(l, ex)| l.logits.mask(ex.label.height() as usize, ex.label.width() as usize))
            .collect();
        let post_start = Instant::now();
        let result = &mut variant.result;
        for (i, ex) in batch.iter().enumerate() {
            let pred = &predictions[i];
            if let Some(conf) = result.confusion.as_mut() {
                conf.add(pred, ex.label.as_raw(), ignore_index)?;
            }
            if let Some(agreement) = result.agreement.as_mut()
                && let Some(reference) = reference.get(i)
            {
                agreement.add_agreement(pred, reference, Some(ex.label.as_raw()), ignore_index)?;
            }
            if per_image && let Some(conf) = &result.confusion {
                let reference = result.agreement.as_ref().and(reference.get(i));
                result.per_image.push(ImageCounts::score(
                    ex.index,
                    conf.num_labels(),
                    pred,
                    ex.label.as_raw(),
                    reference.map(Vec::as_slice),
                    ignore_index,
                )?);
            }
            if variant.worst.is_on()
                && let Some(reference) = reference.get(i)
            {
                let counts = disagreement(pred, reference, ex.label.as_raw(), ignore_index)?;
                variant.worst.offer(ex.index, &ex.id, counts, || WorstPixels {
                    image: ex.image.clone(),
                    scored: GrayImage::from_fn(ex.label.width(), ex.label.height(), |x, y| {
                        image::Luma([if ex.label.get_pixel(x, y).0[0] == ignore_index {
                            0
                        } else {
                            255
                        }])
                    }),
                    reference: reference.clone(),
                    prediction: pred.clone(),
                });
            }
        }
        let post_ms = post_start.elapsed().as_secs_f64() * 1000.0 / n as f64;
        for timed in &logits {
            result.model_latency_ms.push(timed.forward_ms);
            result
                .pipeline_latency_ms
                .push(shared_per_image_ms + timed.forward_ms + post_ms);
        }
        result.peak_rss_bytes = result.peak_rss_bytes.max(crate::sysinfo::peak_rss_bytes());
        result.working_bytes = result.working_bytes.max(working);
        result.wall_time_s += level_start.elapsed().as_secs_f64() + shared_per_image_ms * n as f64 / 1000.0;
        for (k, prediction) in predictions.iter().enumerate() {
            if let Some(sample) = samples.get_mut(at.first + k) {
                sample.predictions.insert(result.label.clone(), prediction.clone());
            }
        }
        if result.method.is_reference() {
            reference = predictions;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::level_groups;

    #[test]
    fn level_groups_cover_every_level_once_with_the_reference_apart() {
        assert_eq!(level_groups(9, 0), vec![1..9]);
        assert_eq!(level_groups(9, 8), vec![1..9]);
        assert_eq!(level_groups(9, 20), vec![1..9]);
        assert_eq!(level_groups(9, 3), vec![1..4, 4..7, 7..9]);
        assert_eq!(level_groups(4, 1), vec![1..2, 2..3, 3..4]);
        assert_eq!(level_groups(1, 1), vec![1..1], "f32 alone: one pass");
    }
}

#[cfg(test)]
mod prepared_batches_tests {
    use super::*;
    use crate::data::{DatasetSpec, LoaderOptions};
    use crate::preprocess::Protocol;

    fn demo_spec() -> DatasetSpec {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/ade");
        crate::data::resolve_local(root.to_str().unwrap(), "validation", "image", "annotation").unwrap()
    }

    fn options() -> LoaderOptions {
        LoaderOptions {
            batch_size: 5,
            workers: 2,
            prefetch_batches: 1,
            ..Default::default()
        }
    }

    /// The background thread hands out the loader's batches in order with the inputs `ModelInput::new` gives, and
    /// the loader's counts after each; run to its end, the loader comes back complete.
    #[test]
    fn prepared_batches_equal_the_loaders_with_their_inputs() {
        let preprocessor = PreprocessorConfig::default();
        let mut direct = Loader::new(&demo_spec(), options()).unwrap();
        let mut prepared = PreparedBatches::start(
            Loader::new(&demo_spec(), options()).unwrap(),
            preprocessor.clone(),
            Protocol::Transformers,
        )
        .unwrap();
        let mut batches = 0;
        while let Some(batch) = prepared.next() {
            let (examples, inputs) = batch.batch.unwrap();
            let want = direct.next().unwrap().unwrap();
            assert_eq!(batch.stats.selected, direct.stats().selected);
            assert_eq!(
                examples.iter().map(|e| e.index).collect::<Vec<_>>(),
                want.iter().map(|e| e.index).collect::<Vec<_>>()
            );
            for (ex, input) in want.iter().zip(&inputs) {
                assert_eq!(
                    *input,
                    ModelInput::new(&ex.image, &preprocessor, Protocol::Transformers)
                );
            }
            batches += 1;
        }
        assert!(direct.next().is_none());
        assert_eq!(batches, 3, "12 demo images in batches of 5");
        let (loader, ended) = prepared.finish().unwrap();
        assert!(ended);
        assert_eq!(loader.stats().skipped, direct.stats().skipped);
    }

    /// Stopped after one batch, the thread ends with the next batch prepared but not handed out.
    #[test]
    fn prepared_batches_stop_when_the_run_stops_taking_them() {
        let mut prepared = PreparedBatches::start(
            Loader::new(&demo_spec(), options()).unwrap(),
            PreprocessorConfig::default(),
            Protocol::Transformers,
        )
        .unwrap();
        assert_eq!(prepared.next().unwrap().batch.unwrap().0.len(), 5);
        let (_, ended) = prepared.finish().unwrap();
        assert!(!ended);
    }
}
