//! Per-layer sensitivity (`segq sensitivity`): for each layer, encoder block, stage or the decode head, how much
//! quantizing only that group (or, reversed, everything except it) changes the float model's output on the same
//! images, at each level: agreement mIoU and pixel agreement of the argmax (the agreement [`ConfusionMatrix`]) and
//! the mean KL divergence of the per-pixel softmax ([`KlDivergence`]), both at the model's output resolution.
//!
//! This module owns the groups ([`layer_groups`]), the variants' recipes (one rule per weight of the group, built
//! by `model::quantize` like any recipe), the reuse of computation and the report ([`SensitivityReport`], plain
//! serde data). [`measure`] takes preprocessed images, so the evaluation pipeline can call it on the examples it
//! already has; it writes no files.
//!
//! Reuse: the float model runs once per image and keeps the activations at every point a pass can start from (each
//! stage's patch embedding, each encoder block's input, the stage outputs the head reads; see
//! [`crate::model::segformer::resume`]). A variant differs from the float model only from its group's first
//! layer on, so its pass starts there from the saved activations: the unchanged prefix is never run again. Each
//! variant is quantized once (weights it does not change are shared with the float model) and then runs every
//! image. Reversed, the saved activations are those of the fully quantized model of the level, which every
//! variant of that level shares up to its float group.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::eval::divergence::{KlDivergence, SoftmaxReference};
use crate::eval::metrics::{ConfusionMatrix, nan_as_null};
use crate::model::segformer::{ResumePoint, SavedActivations, Segformer};
use crate::model::{self, LoadedModel};
use crate::quant::{Level, Method, Recipe};
use crate::segmenter::{Logits, ModelInput};
use crate::{Error, Result};

/// What one sensitivity group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    /// Every Linear and Conv2d layer alone (72 in SegFormer-B0).
    #[default]
    Layer,
    /// Each encoder block (`segformer.encoder.block.S.B`), each stage's patch embedding, and the decode head.
    Block,
    /// Each encoder stage (its patch embedding, blocks and LayerNorm), and the decode head.
    Stage,
}

impl Granularity {
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Layer => "layer",
            Granularity::Block => "block",
            Granularity::Stage => "stage",
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(text: &str) -> Result<Granularity> {
        match text.trim().to_ascii_lowercase().as_str() {
            "layer" | "layers" => Ok(Granularity::Layer),
            "block" | "blocks" => Ok(Granularity::Block),
            "stage" | "stages" => Ok(Granularity::Stage),
            other => Err(Error::config(
                "--granularity",
                format!("--granularity '{other}': expected layer, block or stage"),
            )),
        }
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct SensitivitySpec {
    pub granularity: Granularity,
    /// Levels each group is quantized to (f32 measures nothing: its scores are exactly those of the float model).
    pub levels: Vec<Level>,
    pub method: Method,
    pub group_size: Option<usize>,
    pub symmetric: Option<bool>,
    /// Everything quantized except the group, instead of only the group.
    pub reverse: bool,
    /// Images of one size per forward pass.
    pub batch_size: usize,
}

impl Default for SensitivitySpec {
    fn default() -> Self {
        SensitivitySpec {
            granularity: Granularity::Layer,
            levels: vec![Level::Int8, Level::Int4, Level::Int2],
            method: Method::Rtn,
            group_size: None,
            symmetric: None,
            reverse: false,
            batch_size: 8,
        }
    }
}

impl SensitivitySpec {
    /// The uniform recipe of every level (validated: a level the method cannot build is an error naming both).
    pub fn recipes(&self) -> Result<Vec<Recipe>> {
        if self.levels.is_empty() {
            return Err(Error::config("--quant", "no quantization level to measure"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("--batch-size", "the batch size must be at least 1"));
        }
        self.levels
            .iter()
            .map(|&level| {
                Recipe::new(level, self.method, self.group_size, self.symmetric, Vec::new())
                    .map_err(|e| Error::config("--quant", e.to_string()))
            })
            .collect()
    }
}

/// Layers measured together, with the point a pass of a variant starts from (its first layer's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroup {
    pub name: String,
    pub start: ResumePoint,
    /// Layer paths (weight names without `.weight`).
    pub layers: Vec<String>,
}

impl LayerGroup {
    /// The names of the group's weight tensors.
    pub fn weight_names(&self) -> Vec<String> {
        self.layers.iter().map(|l| format!("{l}.weight")).collect()
    }
}

/// The groups of `model` at `granularity`, in forward order.
pub fn layer_groups(model: &Segformer, granularity: Granularity) -> Result<Vec<LayerGroup>> {
    let sections = model.sections()?;
    let mut groups: Vec<LayerGroup> = Vec::new();
    for section in sections.into_iter().filter(|s| !s.layers.is_empty()) {
        match granularity {
            Granularity::Layer => groups.extend(section.layers.iter().map(|layer| LayerGroup {
                name: layer.clone(),
                start: section.start,
                layers: vec![layer.clone()],
            })),
            Granularity::Block => groups.push(LayerGroup {
                name: section.path.clone(),
                start: section.start,
                layers: section.layers,
            }),
            Granularity::Stage => {
                let name = match section.start {
                    ResumePoint::Stage { stage } | ResumePoint::Block { stage, .. } => format!("encoder stage {stage}"),
                    ResumePoint::Head => section.path.clone(),
                };
                match groups.last_mut() {
                    Some(last) if last.name == name => last.layers.extend(section.layers),
                    _ => groups.push(LayerGroup {
                        name,
                        start: section.start,
                        layers: section.layers,
                    }),
                }
            }
        }
    }
    Ok(groups)
}

/// The recipe of one variant: `level`'s recipe applied to the group's weights only, the rest float; reversed,
/// `level`'s recipe everywhere except the group's weights, which stay float. One rule per weight.
pub fn variant_recipe(level: &Recipe, group: &LayerGroup, reverse: bool) -> Recipe {
    let rule = |pattern: String| {
        let mut rule = crate::quant::LayerRule::new(pattern, if reverse { Level::F32 } else { level.level });
        if !reverse {
            rule.method = Some(level.method);
            rule.group_size = level.group_size;
            rule.symmetric = level.symmetric;
        }
        rule
    };
    let mut recipe = if reverse {
        level.clone()
    } else {
        Recipe::level_default(Level::F32)
    };
    recipe.rules = group.weight_names().into_iter().map(rule).collect();
    recipe
}

/// The three measures of one model against the float model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub level: Level,
    /// The level's recipe label (`int4-rtn-g64`).
    pub label: String,
    /// Agreement mIoU against the float model's argmax, 0..1 (1: identical predictions).
    #[serde(with = "nan_as_null")]
    pub agreement_miou: f64,
    /// Share of pixels whose argmax equals the float model's, 0..1.
    #[serde(with = "nan_as_null")]
    pub pixel_agreement: f64,
    /// Mean over pixels of KL(p_f32 || p_quantized) of the softmax over classes, in nats.
    #[serde(with = "nan_as_null")]
    pub kl_divergence: f64,
    /// Stored bits per weight of the group's weights in this variant (scales and zero points included).
    #[serde(with = "nan_as_null")]
    pub bits_per_weight: f64,
}

impl Scores {
    /// Agreement mIoU lost, in percentage points: the damage the table ranks and the chart draws.
    pub fn damage(&self) -> f64 {
        100.0 * (1.0 - self.agreement_miou)
    }
}

/// One group's sensitivity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSensitivity {
    pub name: String,
    /// Where its variants' passes start (`block 0.1`, `decode head`).
    pub starts_at: String,
    pub weights: Vec<String>,
    /// Weights and biases of the group's layers.
    pub parameters: u64,
    /// Per level, in the order of the spec.
    pub levels: Vec<Scores>,
}

impl GroupSensitivity {
    /// The largest damage over the levels, then the largest KL: what the ranking sorts by (worst first).
    pub fn worst(&self) -> (f64, f64) {
        self.levels.iter().fold((0.0, 0.0), |(d, k), s| {
            (d.max(s.damage().max(0.0)), k.max(s.kl_divergence.max(0.0)))
        })
    }
}

/// The dataset a report was measured on (filled in by the caller: [`measure`] sees only pixels).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityDataset {
    pub source: String,
    pub split: String,
    pub offset: usize,
    pub limit: Option<usize>,
}

/// Where the time went, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SensitivityTiming {
    /// Float passes (saving activations) and, reversed, the fully quantized bases.
    pub reference_s: f64,
    /// Building the variants with `model::quantize`.
    pub quantize_s: f64,
    /// The variants' passes, from their start points.
    pub forward_s: f64,
    /// Softmax, KL and agreement counts.
    pub scoring_s: f64,
    pub total_s: f64,
    /// A full float pass per image, in ms (what each variant pass would cost without reuse).
    pub full_pass_ms_per_image: f64,
    /// A variant's pass per image, in ms, on average.
    pub variant_pass_ms_per_image: f64,
}

/// What was computed once and shared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReuse {
    /// Activations saved per image at the start points, plus the float model's softmax, in bytes.
    pub saved_bytes_per_image: u64,
    /// All of it, for every image (held for the whole run).
    pub saved_bytes: u64,
    /// Variants built (groups x levels), each quantized once and run on every image.
    pub variants: u64,
    /// Encoder parts (patch embeddings and blocks) run by the variants' passes, over all images.
    pub encoder_parts_run: u64,
    /// Encoder parts skipped because the saved activations stood in for them.
    pub encoder_parts_skipped: u64,
    pub note: String,
}

/// The sensitivity of every group at every level: `sensitivity.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensitivityReport {
    pub segq_version: String,
    pub created_utc: String,
    pub model: String,
    pub dataset: Option<SensitivityDataset>,
    pub granularity: Granularity,
    /// Each variant is everything quantized except its group.
    pub reverse: bool,
    pub method: Method,
    pub group_size: Option<usize>,
    pub images: usize,
    /// Distinct model input sizes `[height, width]`; the measures are taken on the logits (1/4 of each side).
    pub input_sizes: Vec<[usize; 2]>,
    /// Every layer quantized at each level, against the float model (the scale the groups' damage compares with).
    pub whole_model: Vec<Scores>,
    /// In forward order.
    pub groups: Vec<GroupSensitivity>,
    pub timing: SensitivityTiming,
    pub reuse: SensitivityReuse,
}

impl SensitivityReport {
    /// The groups worst first (largest damage over the levels, then largest KL; forward order among equals).
    pub fn ranked(&self) -> Vec<&GroupSensitivity> {
        let mut groups: Vec<&GroupSensitivity> = self.groups.iter().collect();
        groups.sort_by(|a, b| {
            let (a, b) = (a.worst(), b.worst());
            b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1))
        });
        groups
    }

    /// Writes the report as JSON to `path`.
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::internal(e.to_string()))?;
        crate::outputs::write_atomically(path, |tmp| std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e)))
    }

    /// Reads a report written by [`SensitivityReport::write`].
    pub fn read(path: &std::path::Path) -> Result<SensitivityReport> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::invalid(path.display().to_string(), e.to_string()))
    }
}

/// Receives a measurement's progress. Every method has a default that does nothing.
pub trait SensitivityObserver {
    /// `images` image passes are about to run (variants and bases, each over every image).
    fn started(&mut self, _images: usize) {}
    fn images_done(&mut self, _images: usize) {}
    /// Asked between variants: true stops the measurement with [`Error::Interrupted`].
    fn should_stop(&self) -> bool {
        false
    }
}

impl SensitivityObserver for () {}

/// Images of one size, run together.
struct Batch {
    height: usize,
    width: usize,
    /// Indices into the inputs.
    images: Vec<usize>,
}

/// The float model's output for one image.
struct Reference {
    softmax: SoftmaxReference,
    argmax: Vec<u16>,
}

/// Measures the sensitivity of every group of `loaded`'s float model at every level of `spec` on `inputs`
/// (preprocessed images). Errors: a quantized checkpoint as the model (there is no float model to compare
/// with), no images, a level the method cannot build, saved activations that would not fit in memory.
pub fn measure(
    loaded: &LoadedModel,
    inputs: &[ModelInput],
    spec: &SensitivitySpec,
    observer: &mut dyn SensitivityObserver,
) -> Result<SensitivityReport> {
    let started = Instant::now();
    if let Some(header) = &loaded.recipe {
        return Err(Error::config(
            "--model",
            format!(
                "{} is a quantized checkpoint ({}): sensitivity is measured against the float model; pass the \
                 float model",
                loaded.source, header.label
            ),
        ));
    }
    if inputs.is_empty() {
        return Err(Error::config("dataset selection", "no images to measure on"));
    }
    let recipes = spec.recipes()?;
    let float = &loaded.model;
    let groups = layer_groups(float, spec.granularity)?;
    let encoder_parts: Vec<ResumePoint> = float
        .sections()?
        .into_iter()
        .map(|s| s.start)
        .filter(|s| *s != ResumePoint::Head)
        .collect();
    let batches = batches(inputs, spec.batch_size);
    let classes = float.config().num_labels();
    let mut timing = SensitivityTiming::default();
    let variants = groups.len() * recipes.len();
    // The float pass, one whole-model pass per level (reversed: the one that saves the level's activations), and
    // every variant, each over every image.
    observer.started(inputs.len() * (1 + recipes.len() + variants));

    // The float pass: the reference outputs, and (forward mode) the activations every variant starts from.
    let clock = Instant::now();
    let (references, float_saved) = reference_pass(float, inputs, &batches, classes)?;
    observer.images_done(inputs.len());
    timing.reference_s += clock.elapsed().as_secs_f64();
    timing.full_pass_ms_per_image = timing.reference_s * 1000.0 / inputs.len() as f64;
    let saved_per_image = float_saved.iter().map(SavedActivations::bytes).sum::<usize>() / inputs.len()
        + references.first().map_or(0, |r| r.softmax.bytes() + r.argmax.len() * 2);
    let saved_total = (saved_per_image * inputs.len()) as u64;
    tracing::info!(
        images = inputs.len(),
        groups = groups.len(),
        levels = recipes.len(),
        saved_mb = saved_total as f64 / 1e6,
        "float pass done; measuring each group from its first layer on"
    );
    let mut reuse = SensitivityReuse {
        saved_bytes_per_image: saved_per_image as u64,
        saved_bytes: saved_total,
        variants: variants as u64,
        ..SensitivityReuse::default()
    };
    let mut scores: Vec<Vec<Option<Scores>>> = vec![vec![None; recipes.len()]; groups.len()];
    let mut whole_model = Vec::with_capacity(recipes.len());
    let mut variant_images = 0usize;
    for (l, level) in recipes.iter().enumerate() {
        // Reversed, every variant of this level starts from the fully quantized model's activations.
        let clock = Instant::now();
        let (whole, _) = model::quantize(float, level)?;
        timing.quantize_s += clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let mut level_saved = Vec::new();
        let mut whole_score = Accumulators::new(classes);
        for batch in &batches {
            let tensor = batch_tensor(inputs, batch)?;
            let logits = if spec.reverse {
                let (logits, saved) = whole.forward_saving(&tensor)?;
                level_saved.push(saved);
                logits
            } else {
                whole.forward(&tensor)?
            };
            whole_score.add(&split_logits(&logits)?, batch, &references)?;
        }
        observer.images_done(inputs.len());
        timing.reference_s += clock.elapsed().as_secs_f64();
        whole_model.push(whole_score.scores(level, whole.bits_per_weight()));
        drop(whole);
        let saved = if spec.reverse { &level_saved } else { &float_saved };
        for (g, group) in groups.iter().enumerate() {
            if observer.should_stop() || crate::interrupt::stop_requested() {
                return Err(Error::Interrupted);
            }
            let recipe = variant_recipe(level, group, spec.reverse);
            let clock = Instant::now();
            // model::quantize logs a line per model: one per variant would bury the run's own lines.
            let quiet = tracing::subscriber::NoSubscriber::default();
            let (variant, _) = tracing::subscriber::with_default(quiet, || model::quantize(float, &recipe))
                .map_err(|e| Error::config("--quant", format!("{} of {}: {e}", level.label(), group.name)))?;
            timing.quantize_s += clock.elapsed().as_secs_f64();
            let mut acc = Accumulators::new(classes);
            for (batch, saved) in batches.iter().zip(saved) {
                let clock = Instant::now();
                let logits = variant.forward_from(group.start, saved)?;
                timing.forward_s += clock.elapsed().as_secs_f64();
                let clock = Instant::now();
                acc.add(&split_logits(&logits)?, batch, &references)?;
                timing.scoring_s += clock.elapsed().as_secs_f64();
                observer.images_done(batch.images.len());
            }
            variant_images += inputs.len();
            let skipped = encoder_parts.iter().filter(|p| **p < group.start).count();
            reuse.encoder_parts_skipped += (skipped * inputs.len()) as u64;
            reuse.encoder_parts_run += ((encoder_parts.len() - skipped) * inputs.len()) as u64;
            scores[g][l] = Some(acc.scores(level, group_bits(&variant, group)));
        }
    }
    timing.variant_pass_ms_per_image = timing.forward_s * 1000.0 / variant_images.max(1) as f64;
    let layer_parameters: std::collections::HashMap<String, usize> =
        float.layers().into_iter().map(|l| (l.name, l.parameters)).collect();
    let groups = groups
        .iter()
        .zip(scores)
        .map(|(group, levels)| GroupSensitivity {
            name: group.name.clone(),
            starts_at: group.start.to_string(),
            weights: group.weight_names(),
            parameters: group
                .layers
                .iter()
                .map(|l| layer_parameters.get(l).copied().unwrap_or(0) as u64)
                .sum(),
            levels: levels.into_iter().flatten().collect(),
        })
        .collect();
    reuse.note = format!(
        "the {} pass ran once per image and kept its activations at every block boundary ({:.1} MB per image, \
         {:.0} MB in all, with the float softmax); each of the {} variants was quantized once and ran from its \
         group's first block, skipping {} of {} encoder parts",
        if spec.reverse {
            "float pass and each level's fully quantized"
        } else {
            "float"
        },
        saved_per_image as f64 / 1e6,
        saved_total as f64 / 1e6,
        variants,
        reuse.encoder_parts_skipped,
        reuse.encoder_parts_skipped + reuse.encoder_parts_run,
    );
    let mut sizes: Vec<[usize; 2]> = batches.iter().map(|b| [b.height, b.width]).collect();
    sizes.sort();
    sizes.dedup();
    timing.total_s = started.elapsed().as_secs_f64();
    Ok(SensitivityReport {
        segq_version: crate::VERSION.to_string(),
        created_utc: crate::eval::results::utc_now(),
        model: loaded.source.to_string(),
        dataset: None,
        granularity: spec.granularity,
        reverse: spec.reverse,
        method: spec.method,
        group_size: spec.group_size,
        images: inputs.len(),
        input_sizes: sizes,
        whole_model,
        groups,
        timing,
        reuse,
    })
}

/// `segq sensitivity`'s one library call: loads `plan`'s model, reads the examples of its selection (through the
/// evaluation's dataset plumbing; the labels are read but not used), preprocesses them as the evaluation does and
/// [`measure`]s them. The report names the dataset.
pub fn run(
    plan: &crate::eval::EvalPlan,
    spec: &SensitivitySpec,
    observer: &mut dyn SensitivityObserver,
) -> Result<SensitivityReport> {
    spec.recipes()?;
    let loaded = model::load(&plan.model)?;
    let mut opened = crate::eval::open_dataset(plan, &loaded)?;
    let mut inputs = Vec::new();
    for batch in opened.loader.by_ref() {
        if observer.should_stop() || crate::interrupt::stop_requested() {
            return Err(Error::Interrupted);
        }
        for example in batch? {
            inputs.push(ModelInput::new(&example.image, &loaded.preprocessor, plan.protocol));
        }
    }
    let stats = opened.loader.stats();
    if stats.skipped > 0 {
        tracing::warn!(skipped = stats.skipped, first = ?stats.skip_reasons.first(), "examples skipped");
    }
    tracing::info!("dataset ready: {}, {} images", opened.description, inputs.len());
    let mut report = measure(&loaded, &inputs, spec, observer)?;
    let selection = &plan.loader.selection;
    report.dataset = Some(SensitivityDataset {
        source: opened.description,
        split: plan.dataset.split.clone(),
        offset: selection.offset,
        limit: selection.limit,
    });
    Ok(report)
}

/// Inputs of one size in batches of at most `size`, in first-seen order of sizes.
fn batches(inputs: &[ModelInput], size: usize) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let open = out
            .iter_mut()
            .rev()
            .find(|b| (b.height, b.width) == (input.height, input.width) && b.images.len() < size.max(1));
        match open {
            Some(b) => b.images.push(i),
            None => out.push(Batch {
                height: input.height,
                width: input.width,
                images: vec![i],
            }),
        }
    }
    out
}

fn batch_tensor(inputs: &[ModelInput], batch: &Batch) -> Result<candle_core::Tensor> {
    let pixels = batch.images.iter().map(|&i| inputs[i].pixels.clone()).collect();
    crate::preprocess::batch_tensor(pixels, batch.height, batch.width)
}

/// Batched logits `[B, classes, h, w]` as one [`Logits`] per image.
fn split_logits(logits: &candle_core::Tensor) -> Result<Vec<Logits>> {
    let (batch, classes, height, width) = logits.dims4()?;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    let plane = classes * height * width;
    Ok((0..batch)
        .map(|b| Logits {
            data: flat[b * plane..(b + 1) * plane].to_vec(),
            classes,
            height,
            width,
        })
        .collect())
}

/// The float model over every batch: each image's softmax and argmax, and each batch's saved activations. Refuses
/// (after the first batch) a selection whose saved activations would not fit in memory.
fn reference_pass(
    float: &Segformer,
    inputs: &[ModelInput],
    batches: &[Batch],
    classes: usize,
) -> Result<(Vec<Reference>, Vec<SavedActivations>)> {
    let mut references: Vec<Option<Reference>> = (0..inputs.len()).map(|_| None).collect();
    let mut saved = Vec::with_capacity(batches.len());
    for (b, batch) in batches.iter().enumerate() {
        let (logits, activations) = float.forward_saving(&batch_tensor(inputs, batch)?)?;
        for (&i, image) in batch.images.iter().zip(split_logits(&logits)?) {
            references[i] = Some(Reference {
                softmax: SoftmaxReference::new(&image.data, classes)?,
                argmax: image.argmax(),
            });
        }
        if b == 0 {
            let first = references[batch.images[0]]
                .as_ref()
                .map_or(0, |r| r.softmax.bytes() + 2 * r.argmax.len());
            let per_image = activations.bytes() / activations.batch().max(1) + first;
            let total = (per_image * inputs.len()) as u64;
            crate::limits::check_fits_in_memory(
                "--limit",
                total,
                &format!(
                    "the float activations of {} images need about {}; measure fewer images (--limit)",
                    inputs.len(),
                    crate::limits::human_bytes(total)
                ),
            )?;
        }
        saved.push(activations);
    }
    let references = references
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::internal("an image got no reference output")))
        .collect::<Result<Vec<_>>>()?;
    Ok((references, saved))
}

/// Stored bits per weight over the group's layers as `variant` holds them.
fn group_bits(variant: &Segformer, group: &LayerGroup) -> f64 {
    let (bits, count) =
        variant
            .layers()
            .iter()
            .filter(|l| group.layers.contains(&l.name))
            .fold((0.0, 0usize), |(bits, count), l| {
                let n: usize = l.shape.iter().product();
                (bits + l.bits_per_weight * n as f64, count + n)
            });
    bits / count.max(1) as f64
}

/// Agreement counts and KL of one variant over the images.
struct Accumulators {
    agreement: ConfusionMatrix,
    kl: KlDivergence,
}

impl Accumulators {
    fn new(classes: usize) -> Accumulators {
        Accumulators {
            agreement: ConfusionMatrix::new(classes),
            kl: KlDivergence::new(),
        }
    }

    fn add(&mut self, logits: &[Logits], batch: &Batch, references: &[Reference]) -> Result<()> {
        for (&i, image) in batch.images.iter().zip(logits) {
            let reference = &references[i];
            self.agreement
                .add_agreement(&image.argmax(), &reference.argmax, None, 0)?;
            self.kl.add(&reference.softmax, &image.data)?;
        }
        Ok(())
    }

    fn scores(&self, level: &Recipe, bits_per_weight: f64) -> Scores {
        let agreement = self.agreement.agreement();
        Scores {
            level: level.level,
            label: level.label(),
            agreement_miou: agreement.miou,
            pixel_agreement: agreement.pixel_agreement,
            kl_divergence: self.kl.mean(),
            bits_per_weight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSource;

    fn fixture(name: &str) -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name);
        model::load(&ModelSource::Local(dir)).unwrap()
    }

    /// Smooth image-like inputs with noise, `count` of them, of two sizes (so batching by size is exercised).
    fn inputs(count: usize) -> Vec<ModelInput> {
        (0..count)
            .map(|k| {
                let (h, w) = if k % 3 == 2 { (40, 36) } else { (48, 48) };
                let noise = crate::kernels::test_util::random_vec(3 * h * w, 11 + k as u64, 0.4);
                let pixels = (0..3 * h * w)
                    .map(|i| ((i % w) as f32 / w as f32 - 0.5) * 2.0 + ((i / w) % h) as f32 / h as f32 + noise[i])
                    .collect();
                ModelInput {
                    pixels,
                    height: h,
                    width: w,
                }
            })
            .collect()
    }

    /// Batches of one image: the plain forward passes they are compared with run one image at a time, and the
    /// GEMMs' last bits depend on how many rows a batch has.
    fn spec(levels: &[Level], granularity: Granularity, reverse: bool) -> SensitivitySpec {
        SensitivitySpec {
            granularity,
            levels: levels.to_vec(),
            reverse,
            batch_size: 1,
            ..SensitivitySpec::default()
        }
    }

    /// The scores of `model` against `float` computed the plain way: full forward passes, image by image.
    fn scores_by_full_forward(float: &Segformer, model: &Segformer, inputs: &[ModelInput], level: &Recipe) -> Scores {
        let classes = float.config().num_labels();
        let mut acc = Accumulators::new(classes);
        let mut references = Vec::new();
        let mut outputs = Vec::new();
        for input in inputs {
            let tensor =
                crate::preprocess::batch_tensor(vec![input.pixels.clone()], input.height, input.width).unwrap();
            let reference = split_logits(&float.forward(&tensor).unwrap()).unwrap().remove(0);
            references.push(Reference {
                softmax: SoftmaxReference::new(&reference.data, classes).unwrap(),
                argmax: reference.argmax(),
            });
            outputs.push(split_logits(&model.forward(&tensor).unwrap()).unwrap().remove(0));
        }
        for (i, logits) in outputs.iter().enumerate() {
            let one = Batch {
                height: 0,
                width: 0,
                images: vec![i],
            };
            acc.add(std::slice::from_ref(logits), &one, &references).unwrap();
        }
        acc.scores(level, f64::NAN)
    }

    #[test]
    fn groups_of_segformer_b0_at_each_granularity() {
        let demo = model::load(&ModelSource::Embedded).unwrap();
        let layers = layer_groups(&demo.model, Granularity::Layer).unwrap();
        assert_eq!(layers.len(), 72);
        let names: Vec<String> = demo.model.layers().into_iter().map(|l| l.name).collect();
        assert_eq!(layers.iter().map(|g| g.name.clone()).collect::<Vec<_>>(), names);
        let blocks = layer_groups(&demo.model, Granularity::Block).unwrap();
        assert_eq!(blocks.len(), 4 + 8 + 1, "patch embeddings, blocks, head");
        assert_eq!(blocks[0].name, "segformer.encoder.patch_embeddings.0");
        assert_eq!(blocks[1].name, "segformer.encoder.block.0.0");
        assert_eq!(blocks[1].start, ResumePoint::Block { stage: 0, block: 0 });
        assert_eq!(blocks[12].name, "decode_head");
        assert_eq!(blocks[12].layers.len(), 6);
        let stages = layer_groups(&demo.model, Granularity::Stage).unwrap();
        assert_eq!(
            stages.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            [
                "encoder stage 0",
                "encoder stage 1",
                "encoder stage 2",
                "encoder stage 3",
                "decode_head"
            ]
        );
        assert_eq!(stages[0].start, ResumePoint::Stage { stage: 0 });
        assert_eq!(stages[3].layers.len(), 15, "stage 3 has no spatial reduction");
        assert_eq!(stages.iter().map(|g| g.layers.len()).sum::<usize>(), 72);
        assert_eq!(
            layers[3].weight_names(),
            ["segformer.encoder.block.0.0.attention.self.value.weight"]
        );
    }

    #[test]
    fn a_group_kept_in_f32_has_exactly_zero_sensitivity() {
        let loaded = fixture("tiny_a");
        for reverse in [false, true] {
            let mut spec = spec(&[Level::F32], Granularity::Layer, reverse);
            // Two sizes: a batch of two images and a batch of one.
            spec.batch_size = 2;
            let report = measure(&loaded, &inputs(3), &spec, &mut ()).unwrap();
            assert_eq!(report.input_sizes, vec![[40, 36], [48, 48]]);
            assert!(!report.groups.is_empty());
            for g in &report.groups {
                let s = &g.levels[0];
                assert_eq!(
                    (s.agreement_miou, s.pixel_agreement, s.kl_divergence),
                    (1.0, 1.0, 0.0),
                    "{} (reverse {reverse})",
                    g.name
                );
            }
        }
    }

    #[test]
    fn one_layer_variants_predict_what_a_one_rule_recipe_predicts() {
        let loaded = fixture("tiny_a");
        let images = inputs(3);
        let report = measure(
            &loaded,
            &images,
            &spec(&[Level::Int2], Granularity::Layer, false),
            &mut (),
        )
        .unwrap();
        let int2 = Recipe::level_default(Level::Int2);
        let groups = layer_groups(&loaded.model, Granularity::Layer).unwrap();
        // One layer at the start of a stage, one inside a block, one in the decode head. (Not a key projection:
        // with a single key token after spatial reduction, attention ignores the keys.)
        let dense1 = groups.iter().rposition(|g| g.name.ends_with("mlp.dense1")).unwrap();
        let picked = [0, dense1, groups.len() - 1];
        let mut damaged = 0;
        for &g in &picked {
            let name = &groups[g].layers[0];
            let mut recipe = Recipe::level_default(Level::F32);
            recipe.rules = vec![{
                let mut rule = crate::quant::LayerRule::new(format!("{name}.weight"), Level::Int2);
                rule.method = Some(Method::Rtn);
                rule
            }];
            let (one_rule, _) = model::quantize(&loaded.model, &recipe).unwrap();
            let expected = scores_by_full_forward(&loaded.model, &one_rule, &images, &int2);
            let got = &report.groups[g].levels[0];
            assert_eq!(
                (got.agreement_miou, got.pixel_agreement, got.kl_divergence),
                (
                    expected.agreement_miou,
                    expected.pixel_agreement,
                    expected.kl_divergence
                ),
                "{name}"
            );
            damaged += usize::from(got.kl_divergence > 0.0);
        }
        assert_eq!(damaged, picked.len(), "int2 on one layer changes the output");
        let whole = &report.whole_model[0];
        assert!(whole.kl_divergence > 0.0 && whole.agreement_miou < 1.0);
    }

    #[test]
    fn reversed_variants_predict_what_the_recipe_with_one_float_rule_predicts() {
        let loaded = fixture("tiny_a");
        let images = inputs(2);
        let report = measure(
            &loaded,
            &images,
            &spec(&[Level::Int4], Granularity::Block, true),
            &mut (),
        )
        .unwrap();
        let int4 = Recipe::level_default(Level::Int4);
        let groups = layer_groups(&loaded.model, Granularity::Block).unwrap();
        for g in [1, groups.len() - 1] {
            let recipe = variant_recipe(&int4, &groups[g], true);
            let (model, _) = model::quantize(&loaded.model, &recipe).unwrap();
            let expected = scores_by_full_forward(&loaded.model, &model, &images, &int4);
            let got = &report.groups[g].levels[0];
            assert_eq!(
                (got.agreement_miou, got.kl_divergence),
                (expected.agreement_miou, expected.kl_divergence),
                "{}",
                groups[g].name
            );
        }
        assert!(report.reuse.encoder_parts_skipped > 0);
    }

    #[test]
    fn ranking_puts_the_largest_damage_first_and_levels_are_checked_early() {
        let loaded = fixture("tiny_a");
        let report = measure(
            &loaded,
            &inputs(2),
            &spec(&[Level::Int8, Level::Int2], Granularity::Block, false),
            &mut (),
        )
        .unwrap();
        let ranked = report.ranked();
        assert_eq!(ranked.len(), report.groups.len());
        for pair in ranked.windows(2) {
            assert!(
                pair[0].worst() >= pair[1].worst(),
                "{:?} before {:?}",
                pair[0].worst(),
                pair[1].worst()
            );
        }
        let mut bad = spec(&[Level::F8E4m3], Granularity::Layer, false);
        bad.method = Method::Hqq;
        let error = measure(&loaded, &inputs(1), &bad, &mut ()).unwrap_err().to_string();
        assert!(error.contains("f8") && error.contains("hqq"), "{error}");
        assert!("blocks".parse::<Granularity>().is_ok());
        let error = "layers2".parse::<Granularity>().unwrap_err().to_string();
        assert!(error.contains("--granularity 'layers2'"), "{error}");
    }
}
