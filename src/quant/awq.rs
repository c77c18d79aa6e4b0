//! AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"): the
//! `awq` and `awq+gptq` methods.

use super::{LayerStats, QuantTensor, Recipe};
use crate::{Error, Result};

/// Quantizes a row-major `[rows, cols]` weight with AWQ scales, given the layer's input statistics.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    stats: Option<&LayerStats>,
) -> Result<QuantTensor> {
    let _ = (w, rows, cols, recipe, stats);
    Err(Error::unsupported("awq", "not implemented yet"))
}
