//! GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
//! Transformers"): the `gptq` method.

use super::{LayerStats, QuantTensor, Recipe};
use crate::{Error, Result};

/// Quantizes a row-major `[rows, cols]` weight with GPTQ, given the layer's input statistics.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    stats: Option<&LayerStats>,
) -> Result<QuantTensor> {
    let _ = (w, rows, cols, recipe, stats);
    Err(Error::unsupported("gptq", "not implemented yet"))
}

/// Tuning of GPTQ's column-by-column rounding. Placeholder on this branch so that `awq+gptq` compiles; the GPTQ
/// branch defines the real options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GptqOptions {}

/// GPTQ on a row-major `[rows, cols]` weight given the layer's mean Hessian `hessian = 2 X^T X / n`
/// (`[cols * cols]`, row-major). Placeholder on this branch (the GPTQ branch implements it).
pub fn quantize_with_hessian(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    hessian: &[f64],
    options: &GptqOptions,
) -> Result<QuantTensor> {
    let _ = (w, rows, cols, recipe, hessian, options);
    Err(Error::unsupported("gptq", "not implemented yet"))
}
