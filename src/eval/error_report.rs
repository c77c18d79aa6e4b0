//! How far each quantization recipe moves a model's output from the float model's, on a few images: relative
//! error of the weights and of the logits, and the fraction of output pixels whose class (argmax) is unchanged.
//! `segq quantize --error-report` writes it; scripts/compare_quanto.py compares it with optimum-quanto's.

use image::RgbImage;
use serde::Serialize;

use crate::Result;
use crate::model::{self, LoadedModel};
use crate::preprocess::Protocol;
use crate::quant::{Level, Method, Recipe};
use crate::segmenter::{self, Logits, ModelInput};

/// One recipe's error against the float model.
#[derive(Debug, Clone, Serialize)]
pub struct RecipeError {
    pub label: String,
    pub level: Level,
    pub method: Method,
    pub bits_per_weight: f64,
    /// sqrt(sum ||W - deq(Q(W))||^2 / sum ||W||^2) over the quantized weights.
    pub weight_rel_error: f64,
    /// sqrt(sum ||L_q - L||^2 / sum ||L||^2) over every image's logits; NaN without images.
    pub logits_rel_error: f64,
    /// Fraction of logit pixels whose argmax class equals the float model's; NaN without images.
    pub pixel_agreement: f64,
    /// Mean IoU of the argmax classes against the float model's taken as ground truth, over the classes either
    /// predicts (as `evaluate`'s mean_iou skips classes with an empty union), at the logits' resolution.
    pub agreement_miou: f64,
    /// Layers a calibrated method left to a calibration-free one.
    pub fallback_layers: usize,
    pub quantized_layers: usize,
}

/// The report over all recipes.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub model: String,
    pub images: Vec<String>,
    pub recipes: Vec<RecipeError>,
}

/// Quantizes `loaded` with each recipe and measures it against the float model on `images` (named by `names`),
/// preprocessed under `protocol`. `calibration`: for the calibrated methods and static levels.
pub fn error_report(
    loaded: &LoadedModel,
    recipes: &[Recipe],
    calibration: Option<&crate::calib::CalibratedModels>,
    images: &[RgbImage],
    names: Vec<String>,
    protocol: Protocol,
) -> Result<ErrorReport> {
    let inputs: Vec<ModelInput> = images
        .iter()
        .map(|image| ModelInput::new(image, &loaded.preprocessor, protocol))
        .collect();
    let logits_of = |m: &crate::model::segformer::Segformer| -> Result<Vec<Logits>> {
        // One image per pass, as the float reference was computed.
        inputs
            .iter()
            .map(|input| Ok(segmenter::forward_inputs(m, &[input])?.remove(0).logits))
            .collect()
    };
    let reference = logits_of(&loaded.model)?;
    let reference_classes: Vec<Vec<u16>> = reference.iter().map(Logits::argmax).collect();
    let mut rows = Vec::with_capacity(recipes.len());
    for recipe in recipes {
        let (quantized, report) = match calibration {
            Some(c) => c.quantize(&loaded.model, recipe)?,
            None => model::quantize(&loaded.model, recipe)?,
        };
        let (mut err, mut norm, mut agree, mut pixels) = (0f64, 0f64, 0usize, 0usize);
        let classes = reference.first().map_or(0, |l| l.classes);
        let (mut intersection, mut union) = (vec![0u64; classes], vec![0u64; classes]);
        for ((q, r), r_classes) in logits_of(&quantized)?.iter().zip(&reference).zip(&reference_classes) {
            err += q
                .data
                .iter()
                .zip(&r.data)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            norm += r.data.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            let q_classes = q.argmax();
            agree += q_classes.iter().zip(r_classes).filter(|(a, b)| a == b).count();
            pixels += q_classes.len();
            for (&a, &b) in q_classes.iter().zip(r_classes) {
                let (a, b) = (a as usize, b as usize);
                if a == b {
                    intersection[a] += 1;
                    union[a] += 1;
                } else {
                    union[a] += 1;
                    union[b] += 1;
                }
            }
        }
        rows.push(RecipeError {
            label: report.label,
            level: recipe.level,
            method: recipe.method,
            bits_per_weight: report.bits_per_weight,
            weight_rel_error: report.weight_rel_error,
            logits_rel_error: if norm > 0.0 { (err / norm).sqrt() } else { f64::NAN },
            pixel_agreement: if pixels > 0 {
                agree as f64 / pixels as f64
            } else {
                f64::NAN
            },
            agreement_miou: {
                let ious: Vec<f64> = intersection
                    .iter()
                    .zip(&union)
                    .filter(|(_, u)| **u > 0)
                    .map(|(i, u)| *i as f64 / *u as f64)
                    .collect();
                if ious.is_empty() {
                    f64::NAN
                } else {
                    ious.iter().sum::<f64>() / ious.len() as f64
                }
            },
            fallback_layers: report.fallbacks.len(),
            quantized_layers: report.quantized_layers,
        });
    }
    Ok(ErrorReport {
        model: loaded.source.to_string(),
        images: names,
        recipes: rows,
    })
}
