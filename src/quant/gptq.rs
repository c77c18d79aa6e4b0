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
