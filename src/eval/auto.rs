//! Automatic mixed precision (`--quant auto:bits=3.5`, `auto:max-drop=0.5`): measures every layer's sensitivity on
//! the search images ([`crate::eval::sensitivity`]), chooses a level per layer with the knapsack of
//! [`crate::quant::search`], runs the chosen recipe on the same images to check it, and returns it for the
//! evaluation to run as a row like any other.
//!
//! The search assumes single-layer damages add up. They do not exactly (errors compound, or cancel), so the choice
//! is checked by a real pass: for `max-drop`, a choice whose measured drop exceeds the limit is searched again with
//! a tighter predicted allowance (at most [`MAX_ATTEMPTS`] times) and the cheapest choice that holds is kept.

use std::collections::BTreeMap;
use std::time::Instant;

use image::GrayImage;
use serde::{Deserialize, Serialize};

use crate::eval::metrics::ConfusionMatrix;
use crate::eval::sensitivity::{self, Granularity, SensitivityReport, SensitivitySpec};
use crate::model::{self, LoadedModel};
use crate::quant::search::{self, AutoTarget, LayerChoices, LayerOption};
use crate::quant::{LayerRule, Level, Method, Recipe};
use crate::segmenter::{ModelInput, forward_inputs};
use crate::{Error, Result};

/// Levels a layer can take in a search; f32 (32 bits, no damage) is always a further option.
pub const CANDIDATE_LEVELS: [Level; 3] = [Level::Int2, Level::Int4, Level::Int8];

/// Searches of `max-drop` that miss their limit on the search images are retried this many times in all.
pub const MAX_ATTEMPTS: usize = 5;

/// How a search row was chosen, recorded in results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoSearch {
    pub target: AutoTarget,
    pub method: Method,
    /// Images the sensitivity and the check ran on (the first of the selection).
    pub images: usize,
    pub layers: usize,
    pub candidates: Vec<Level>,
    /// Layers per chosen level (`int4` -> 40).
    pub layers_per_level: BTreeMap<String, usize>,
    /// Sum of the chosen levels' single-layer agreement-mIoU drops, in points: what the search minimised or bounded.
    pub predicted_drop: f64,
    /// The chosen recipe's agreement-mIoU drop against the float model on the search images, in points.
    pub search_images_drop: f64,
    pub bits_per_weight: f64,
    /// Searches run (more than one when a `max-drop` choice missed its limit and was tightened).
    pub attempts: usize,
    /// Whether the check on the search images met the target (always true for `bits`, which is a hard budget).
    pub target_met_on_search_images: bool,
    pub sensitivity_s: f64,
    pub search_s: f64,
}

/// What a set of searches shares: the method, group size and images.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoSpec {
    pub targets: Vec<AutoTarget>,
    pub method: Method,
    pub group_size: Option<usize>,
    pub batch_size: usize,
    /// Label value excluded from the check's agreement, as `segq eval` excludes it.
    pub ignore_index: u8,
}

/// Runs every search of `spec` on `inputs`, measuring the layers' sensitivity once for all of them. Returns each
/// target's recipe (named after it, e.g. `auto-bits3.5`) with how it was chosen. With `labels` (one per input),
/// the check measures agreement exactly as `segq eval` does: predictions at the label's size, ignored pixels left
/// out; without, at the logits' size.
pub fn search_all(
    loaded: &LoadedModel,
    inputs: &[ModelInput],
    labels: Option<&[GrayImage]>,
    spec: &AutoSpec,
) -> Result<Vec<(Recipe, AutoSearch)>> {
    if spec.targets.is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let sensitivity_spec = SensitivitySpec {
        granularity: Granularity::Layer,
        levels: CANDIDATE_LEVELS.to_vec(),
        method: spec.method,
        group_size: spec.group_size,
        symmetric: None,
        reverse: false,
        batch_size: spec.batch_size.max(1),
    };
    tracing::info!(
        "mixed-precision search: measuring {} layers at {} on {} images",
        loaded.model.layers().len(),
        CANDIDATE_LEVELS.map(|l| l.name()).join(", "),
        inputs.len()
    );
    let report = sensitivity::measure(loaded, inputs, &sensitivity_spec, &mut ())?;
    let sensitivity_s = started.elapsed().as_secs_f64();
    if labels.is_some_and(|l| l.len() != inputs.len()) {
        return Err(Error::internal("mixed-precision search: one label per image expected"));
    }
    let reference = Reference::new(&loaded.model, inputs, labels, spec.ignore_index)?;
    spec.targets
        .iter()
        .map(|&target| {
            let start = Instant::now();
            let (recipe, mut info) = search_one(loaded, &report, &reference, inputs, target, spec)?;
            info.sensitivity_s = sensitivity_s;
            info.search_s = start.elapsed().as_secs_f64();
            tracing::info!(
                "{target}: {} ({:.2} bits/weight, agreement mIoU drop {:.2} points on the search images{})",
                recipe.label_with_bits(info.bits_per_weight),
                info.bits_per_weight,
                info.search_images_drop,
                if info.target_met_on_search_images {
                    ""
                } else {
                    ", over the limit"
                }
            );
            Ok((recipe, info))
        })
        .collect()
}

/// The float model's predictions on the search images: what every choice is checked against.
struct Reference<'a> {
    predictions: Vec<Vec<u16>>,
    labels: Option<&'a [GrayImage]>,
    ignore_index: u8,
    classes: usize,
}

impl<'a> Reference<'a> {
    fn new(
        model: &crate::model::Segformer,
        inputs: &[ModelInput],
        labels: Option<&'a [GrayImage]>,
        ignore_index: u8,
    ) -> Result<Reference<'a>> {
        Ok(Reference {
            predictions: predictions(model, inputs, labels)?,
            labels,
            ignore_index,
            classes: model.config().num_labels(),
        })
    }

    /// Agreement-mIoU drop (points) of `model` against the float model on the search images.
    fn drop_of(&self, model: &crate::model::Segformer, inputs: &[ModelInput]) -> Result<f64> {
        let mut agreement = ConfusionMatrix::new(self.classes);
        for (i, (pred, reference)) in predictions(model, inputs, self.labels)?
            .iter()
            .zip(&self.predictions)
            .enumerate()
        {
            let label = self.labels.map(|l| l[i].as_raw().as_slice());
            agreement.add_agreement(pred, reference, label, self.ignore_index)?;
        }
        Ok(100.0 * (1.0 - agreement.agreement().miou))
    }
}

/// Each input's predicted classes: at its label's size as `segq eval` scores them, else at the logits' size.
fn predictions(
    model: &crate::model::Segformer,
    inputs: &[ModelInput],
    labels: Option<&[GrayImage]>,
) -> Result<Vec<Vec<u16>>> {
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let logits = forward_inputs(model, &[input])?.remove(0).logits;
            Ok(match labels {
                Some(labels) => logits.mask(labels[i].height() as usize, labels[i].width() as usize),
                None => logits.argmax(),
            })
        })
        .collect()
}

/// One layer's options as the knapsack sees them, with the level of each (f32 last).
struct LayerOptions {
    layer: String,
    levels: Vec<Level>,
    choices: LayerChoices,
}

/// Each layer's options: every candidate level with its stored bits and single-layer damage, and f32.
fn layer_options(loaded: &LoadedModel, report: &SensitivityReport) -> Result<Vec<LayerOptions>> {
    let weights: BTreeMap<String, u64> = loaded
        .model
        .layers()
        .into_iter()
        .map(|l| (l.name, l.shape.iter().product::<usize>() as u64))
        .collect();
    report
        .groups
        .iter()
        .map(|group| {
            let [layer] = group.weights.as_slice() else {
                return Err(Error::internal(format!(
                    "mixed-precision search: group {} holds {} layers, expected one",
                    group.name,
                    group.weights.len()
                )));
            };
            let layer = layer.trim_end_matches(".weight").to_string();
            let n = *weights
                .get(&layer)
                .ok_or_else(|| Error::internal(format!("mixed-precision search: no layer {layer}")))?;
            let mut levels = Vec::new();
            let mut options = Vec::new();
            for scores in &group.levels {
                levels.push(scores.level);
                options.push(LayerOption {
                    bits: (scores.bits_per_weight * n as f64).round() as u64,
                    // Agreement can only fall, but a layer whose damage rounds below zero counts as none.
                    damage: scores.damage().max(0.0),
                });
            }
            levels.push(Level::F32);
            options.push(LayerOption {
                bits: 32 * n,
                damage: 0.0,
            });
            Ok(LayerOptions {
                layer,
                levels,
                choices: LayerChoices { options },
            })
        })
        .collect()
}

/// The recipe of a choice: the most common level as the recipe's own, a rule per layer that differs.
fn recipe_of(layers: &[LayerOptions], choice: &[usize], spec: &AutoSpec, target: AutoTarget) -> Result<Recipe> {
    let chosen: Vec<Level> = layers.iter().zip(choice).map(|(l, &i)| l.levels[i]).collect();
    let mut counts: Vec<(Level, usize)> = Vec::new();
    for &level in &chosen {
        match counts.iter_mut().find(|(l, _)| *l == level) {
            Some((_, n)) => *n += 1,
            None => counts.push((level, 1)),
        }
    }
    // Most layers first; among equals the level that comes first in the candidates (deterministic).
    let base = counts
        .iter()
        .max_by_key(|(level, n)| (*n, std::cmp::Reverse(Level::ALL.iter().position(|l| l == level))))
        .map_or(Level::F32, |(level, _)| *level);
    let method_for = |level: Level| {
        if level.int_bits().is_some() {
            spec.method
        } else {
            Method::Rtn
        }
    };
    let group_for = |level: Level| level.int_bits().and(spec.group_size);
    let mut recipe = Recipe::new(base, method_for(base), group_for(base), None, Vec::new())?;
    let rules = layers
        .iter()
        .zip(&chosen)
        .filter(|(_, level)| **level != base)
        .map(|(l, &level)| {
            let mut rule = LayerRule::new(l.layer.clone(), level);
            rule.method = level.int_bits().map(|_| spec.method);
            rule.group_size = group_for(level);
            rule
        });
    recipe = recipe.with_rules(rules)?;
    recipe.name = Some(target.name());
    recipe.validate()?;
    Ok(recipe)
}

fn search_one(
    loaded: &LoadedModel,
    report: &SensitivityReport,
    reference: &Reference,
    inputs: &[ModelInput],
    target: AutoTarget,
    spec: &AutoSpec,
) -> Result<(Recipe, AutoSearch)> {
    let layers = layer_options(loaded, report)?;
    let choices: Vec<LayerChoices> = layers.iter().map(|l| l.choices.clone()).collect();
    let weights: u64 = layers
        .iter()
        .map(|l| l.choices.options.last().map_or(0, |o| o.bits / 32))
        .sum();
    let no_fit = |why: String| Error::config(format!("--quant {target}"), format!("--quant {target}: {why}"));
    let mut attempts = 0;
    let mut allowance = match target {
        AutoTarget::MaxDrop(drop) => drop,
        AutoTarget::Bits(_) => f64::NAN,
    };
    let mut best: Option<(Recipe, AutoSearch)> = None;
    while attempts < MAX_ATTEMPTS {
        attempts += 1;
        let selection = match target {
            AutoTarget::Bits(bits) => {
                let budget = (bits * weights as f64).floor() as u64;
                search::least_damage_within(&choices, budget)?.ok_or_else(|| {
                    no_fit(format!(
                        "even every layer at {} exceeds {bits} bits per weight",
                        CANDIDATE_LEVELS[0]
                    ))
                })?
            }
            AutoTarget::MaxDrop(_) => search::fewest_bits_within(&choices, allowance)?
                .ok_or_else(|| no_fit("no choice of levels predicts a drop that small".to_string()))?,
        };
        let recipe = recipe_of(&layers, &selection.choice, spec, target)?;
        let (model, quantized) = model::quantize(&loaded.model, &recipe)?;
        let measured = reference.drop_of(&model, inputs)?;
        let met = match target {
            AutoTarget::Bits(_) => true,
            AutoTarget::MaxDrop(drop) => measured <= drop,
        };
        let mut layers_per_level = BTreeMap::new();
        for (l, &i) in layers.iter().zip(&selection.choice) {
            *layers_per_level.entry(l.levels[i].name().to_string()).or_insert(0) += 1;
        }
        let info = AutoSearch {
            target,
            method: spec.method,
            images: inputs.len(),
            layers: layers.len(),
            candidates: CANDIDATE_LEVELS.to_vec(),
            layers_per_level,
            predicted_drop: selection.damage,
            search_images_drop: measured,
            bits_per_weight: quantized.bits_per_weight,
            attempts,
            target_met_on_search_images: met,
            sensitivity_s: 0.0,
            search_s: 0.0,
        };
        tracing::debug!(%target, attempts, predicted = selection.damage, measured, "search attempt");
        let AutoTarget::MaxDrop(drop) = target else {
            return Ok((recipe, info));
        };
        // Keep the cheapest choice that holds; while none holds, the latest (the tightest) one.
        let better = match &best {
            None => true,
            Some((_, b)) if !b.target_met_on_search_images => true,
            Some((_, b)) => met && info.bits_per_weight < b.bits_per_weight,
        };
        if better {
            best = Some((recipe, info));
        }
        if met {
            break;
        }
        // The layers' damages compounded: ask the table for a proportionally smaller predicted drop.
        allowance *= (drop / measured.max(f64::MIN_POSITIVE)).min(0.9);
    }
    let (recipe, mut info) = best.ok_or_else(|| Error::internal("mixed-precision search made no attempt"))?;
    info.attempts = attempts;
    Ok((recipe, info))
}
