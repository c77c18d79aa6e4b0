//! Weight quantization: the [`QuantTensor`] type every quantized weight is stored in (one format per tensor, codes
//! packed at their real width, scales and zero points beside them), the table of methods that produce it
//! ([`quantize_weight`]), and its safetensors representation.
//!
//! Weights arrive as row-major `[out, in]` matrices (convolutions flattened to `[out, in * kh * kw]`); scales and
//! zero points are per output row, or per group of `group_size` consecutive inputs within a row.

pub mod act;
pub mod awq;
pub mod f8;
pub mod gptq;
pub mod hqq;
pub mod int;
pub mod quanto;
pub mod recipe;
pub mod rtn;
pub mod search;
pub mod stats;

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub use recipe::{LayerRule, Level, Method, Recipe, SweepSpec, UnbuildableLevel};
pub use stats::{LayerStats, ModelStats, StatsNeeds};

use crate::{Error, Result};

/// How the codes of a [`QuantTensor`] are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    /// Plain float32 (no quantization).
    #[serde(rename = "f32")]
    F32,
    /// IEEE half precision codes.
    #[serde(rename = "f16")]
    F16,
    /// bfloat16 codes.
    #[serde(rename = "bf16")]
    Bf16,
    /// float8 e4m3fn codes with a scale per row.
    #[serde(rename = "f8e4m3fn")]
    F8E4m3,
    /// float8 e5m2 codes with a scale per row.
    #[serde(rename = "f8e5m2")]
    F8E5m2,
    /// 8-bit integer codes.
    #[serde(rename = "int8")]
    Int8,
    /// 4-bit integer codes, two per byte.
    #[serde(rename = "int4")]
    Int4,
    /// 2-bit integer codes, four per byte.
    #[serde(rename = "int2")]
    Int2,
}

impl Format {
    /// The storage format of a level's weights (`int8-dyn` and `int8-static` store int8 weights, `w8a8-f8` e4m3,
    /// `w4a8` and `int4-dyn` int4).
    pub fn of_level(level: Level) -> Format {
        match level {
            Level::F32 => Format::F32,
            Level::F16 => Format::F16,
            Level::Bf16 => Format::Bf16,
            Level::F8E4m3 => Format::F8E4m3,
            Level::F8E5m2 => Format::F8E5m2,
            Level::Int8 | Level::Int8Dyn | Level::Int8Static => Format::Int8,
            Level::W8A8F8 => Format::F8E4m3,
            Level::Int4 | Level::Int4Dyn | Level::W4A8 => Format::Int4,
            Level::Int2 => Format::Int2,
        }
    }

    /// Bits per stored code.
    pub fn code_bits(self) -> u32 {
        match self {
            Format::F32 => 32,
            Format::F16 | Format::Bf16 => 16,
            Format::F8E4m3 | Format::F8E5m2 | Format::Int8 => 8,
            Format::Int4 => 4,
            Format::Int2 => 2,
        }
    }

    /// True for the integer formats (grouped, optionally affine).
    pub fn is_int(self) -> bool {
        matches!(self, Format::Int8 | Format::Int4 | Format::Int2)
    }

    /// True for formats that carry scales.
    pub fn has_scales(self) -> bool {
        !matches!(self, Format::F32 | Format::F16 | Format::Bf16)
    }

    /// The format's name as written in metadata and reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Bf16 => "bf16",
            Format::F8E4m3 => "f8e4m3fn",
            Format::F8E5m2 => "f8e5m2",
            Format::Int8 => "int8",
            Format::Int4 => "int4",
            Format::Int2 => "int2",
        }
    }
}

/// The storage type of scales and zero points (chosen per tensor: f16 unless a value would not fit it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamDtype {
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "f32")]
    F32,
}

impl ParamDtype {
    /// Bytes per stored value.
    pub fn bytes(self) -> usize {
        match self {
            ParamDtype::F16 => 2,
            ParamDtype::F32 => 4,
        }
    }

    /// Rounds a value to what this type stores (round to nearest even for f16).
    pub fn round(self, v: f32) -> f32 {
        match self {
            ParamDtype::F16 => half::f16::from_f32(v).to_f32(),
            ParamDtype::F32 => v,
        }
    }

    /// Little-endian stored values back to floats.
    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            ParamDtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            ParamDtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }

    fn safetensors_dtype(self) -> Dtype {
        match self {
            ParamDtype::F16 => Dtype::F16,
            ParamDtype::F32 => Dtype::F32,
        }
    }
}

/// Where an affine integer format's zero point enters the dequantization. Both conventions are kept as stored, so
/// that a weight dequantizes to exactly the floats of the tool that wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ZeroPoint {
    /// `(q - zero) * scale`, the zero point in code units (segq's methods, HQQ, quanto's integer zero points).
    #[default]
    #[serde(rename = "codes")]
    Codes,
    /// `q * scale - shift`, the shift in weight units (optimum-quanto's float `_shift`).
    #[serde(rename = "shift")]
    Shift,
}

impl ZeroPoint {
    /// True for the default convention (left out of checkpoint metadata, which then reads as before).
    pub fn is_codes(&self) -> bool {
        *self == ZeroPoint::Codes
    }
}

/// A quantized (or float-cast) weight matrix: codes at their real width plus scales and zero points.
///
/// Layout of `data` by format: f32 little-endian floats; f16/bf16 little-endian 16-bit codes; f8 one code per
/// byte; int8/int4/int2 codes packed row by row as described in [`int`]. `scales` (and `zeros` for affine integer
/// formats) hold `rows * groups_per_row` values, row-major, already rounded to `param_dtype`. Float8 and integer
/// values dequantize to `decode(code) * scale`, `q * scale` (symmetric) or, affine, `(q - zero) * scale` or
/// `q * scale - shift` as [`ZeroPoint`] says (`zeros` holds the zero points or the shifts).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantTensor {
    pub format: Format,
    /// Integer formats: codes are signed without zero point; always true for float formats.
    pub symmetric: bool,
    /// How an affine tensor's `zeros` enter the dequantization (ignored when symmetric).
    pub zero_point: ZeroPoint,
    pub rows: usize,
    pub cols: usize,
    /// Elements per group along a row (`cols` when per channel); the last group of a row may be shorter.
    pub group_size: usize,
    pub param_dtype: ParamDtype,
    pub data: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
    /// Per input column, a multiplier applied to the dequantized values (AWQ's inverse activation scale `1 / s_j`,
    /// folded into the weight so that no other layer changes), rounded to `param_dtype`; empty when the tensor has
    /// none.
    pub col_scales: Vec<f32>,
}

/// What must be known besides the stored tensors to rebuild a [`QuantTensor`]; serialised in checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantTensorMeta {
    pub format: Format,
    pub symmetric: bool,
    #[serde(default, skip_serializing_if = "ZeroPoint::is_codes")]
    pub zero_point: ZeroPoint,
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub param_dtype: ParamDtype,
    /// True when the tensor carries per-column multipliers ([`QuantTensor::col_scales`], stored as `name.col_scale`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub col_scales: bool,
}

/// One tensor to store: (name, dtype, shape, little-endian bytes).
pub type StoredTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Version of the stored layout written beside the recipe; readers reject versions they do not know.
pub const STORAGE_VERSION: u32 = 1;
/// Safetensors metadata key holding the recipe header (JSON).
pub const RECIPE_METADATA_KEY: &str = "quantization_recipe";
/// Safetensors metadata key holding the map of quantized weight names to their [`QuantTensorMeta`] (JSON).
pub const MAP_METADATA_KEY: &str = "quantization_map";

/// The recipe as stored in checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeHeader {
    pub version: u32,
    pub label: String,
    pub recipe: Recipe,
}

impl QuantTensor {
    /// Elements (rows * cols).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True for an empty matrix.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Groups per row (1 per row for float8, 0 for unscaled float formats).
    pub fn groups_per_row(&self) -> usize {
        if !self.format.has_scales() {
            return 0;
        }
        int::GroupLayout {
            cols: self.cols,
            group_size: self.group_size,
        }
        .groups_per_row()
    }

    /// Bytes of one stored row of codes.
    pub fn row_bytes(&self) -> usize {
        int::row_bytes(self.cols, self.format.code_bits())
    }

    /// The metadata that [`QuantTensor::from_tensors`] needs.
    pub fn meta(&self) -> QuantTensorMeta {
        QuantTensorMeta {
            format: self.format,
            symmetric: self.symmetric,
            zero_point: self.zero_point,
            rows: self.rows,
            cols: self.cols,
            group_size: self.group_size,
            param_dtype: self.param_dtype,
            col_scales: !self.col_scales.is_empty(),
        }
    }

    /// A short name such as `int4-g64-affine`, `int8-sym`, `f8e4m3fn`, `f16`.
    pub fn format_name(&self) -> String {
        let base = self.format.name();
        if !self.format.is_int() {
            return base.to_string();
        }
        let kind = match (self.symmetric, self.zero_point) {
            (true, _) => "sym",
            (false, ZeroPoint::Codes) => "affine",
            (false, ZeroPoint::Shift) => "shift",
        };
        let awq = if self.col_scales.is_empty() { "" } else { "-awq" };
        if self.group_size < self.cols {
            format!("{base}-g{}-{kind}{awq}", self.group_size)
        } else {
            format!("{base}-{kind}{awq}")
        }
    }

    /// Bytes as stored: codes plus scales, zero points and column scales.
    pub fn weight_bytes(&self) -> usize {
        self.data.len() + (self.scales.len() + self.zeros.len() + self.col_scales.len()) * self.param_dtype.bytes()
    }

    /// Stored bits per weight, scales, zero points, column scales and row padding included.
    pub fn bits_per_weight(&self) -> f64 {
        if self.is_empty() {
            0.0
        } else {
            self.weight_bytes() as f64 * 8.0 / self.len() as f64
        }
    }

    /// The float matrix the codes stand for, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        // The range is the whole tensor, so this cannot fail.
        let _ = self.dequantize_rows_into(0, &mut out);
        out
    }

    /// Dequantizes rows `row_start .. row_start + out.len() / cols` into `out` (for tiled consumers). Column `j`
    /// is multiplied by `col_scales[j]` when the tensor has column scales.
    pub fn dequantize_rows_into(&self, row_start: usize, out: &mut [f32]) -> Result<()> {
        let cols = self.cols;
        if cols == 0 {
            return Ok(());
        }
        if !self.col_scales.is_empty() && self.col_scales.len() != cols {
            return Err(Error::invalid(
                "dequantize",
                format!(
                    "{} column scales for a [{}, {cols}] {} tensor",
                    self.col_scales.len(),
                    self.rows,
                    self.format_name()
                ),
            ));
        }
        let n_rows = out.len() / cols;
        if !out.len().is_multiple_of(cols) || row_start + n_rows > self.rows {
            return Err(Error::invalid(
                "dequantize",
                format!(
                    "{} values from row {row_start} do not fit a [{}, {cols}] {} tensor",
                    out.len(),
                    self.rows,
                    self.format_name()
                ),
            ));
        }
        let rb = self.row_bytes();
        let groups = self.groups_per_row();
        // Weight-only levels dequantize every layer on every forward pass: spread the rows over the thread pool.
        out.par_chunks_mut(cols)
            .with_min_len(8)
            .enumerate()
            .for_each(|(i, dst)| {
                let r = row_start + i;
                let packed = &self.data[r * rb..(r + 1) * rb];
                match self.format {
                    Format::F32 => {
                        for (d, b) in dst.iter_mut().zip(packed.chunks_exact(4)) {
                            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                        }
                    }
                    Format::F16 => {
                        for (d, b) in dst.iter_mut().zip(packed.chunks_exact(2)) {
                            *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                        }
                    }
                    Format::Bf16 => {
                        for (d, b) in dst.iter_mut().zip(packed.chunks_exact(2)) {
                            *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                        }
                    }
                    Format::F8E4m3 | Format::F8E5m2 => {
                        let table = if self.format == Format::F8E4m3 {
                            f8::e4m3fn_table()
                        } else {
                            f8::e5m2_table()
                        };
                        let s = self.scales[r];
                        for (d, &c) in dst.iter_mut().zip(packed) {
                            *d = table[c as usize] * s;
                        }
                    }
                    Format::Int8 | Format::Int4 | Format::Int2 => {
                        let params = &self.scales[r * groups..(r + 1) * groups];
                        let zeros =
                            (!self.symmetric).then(|| (&self.zeros[r * groups..(r + 1) * groups], self.zero_point));
                        let g = self.group_size;
                        match self.format {
                            Format::Int8 => dequantize_int_row::<8>(packed, params, zeros, g, dst),
                            Format::Int4 => dequantize_int_row::<4>(packed, params, zeros, g, dst),
                            _ => dequantize_int_row::<2>(packed, params, zeros, g, dst),
                        }
                    }
                }
                if !self.col_scales.is_empty() {
                    dst.iter_mut().zip(&self.col_scales).for_each(|(d, s)| *d *= s);
                }
            });
        Ok(())
    }

    /// The tensors that store this weight under `name`: `name.qdata` (codes; dtype F32/F16/BF16/F8_E4M3/F8_E5M2,
    /// I8 for symmetric int8, U8 otherwise; shape `[rows, cols]`, or `[rows, row_bytes]` for packed int4/int2),
    /// `name.scale` and, for affine formats, `name.zero` (shape `[rows, groups]`, dtype f16 or f32), and with column
    /// scales `name.col_scale` (shape `[cols]`, same dtype).
    pub fn to_tensors(&self, name: &str) -> Vec<StoredTensor> {
        let (dtype, shape) = self.qdata_dtype_shape();
        let mut out = vec![(format!("{name}.qdata"), dtype, shape, self.data.clone())];
        let param_shape = vec![self.rows, self.groups_per_row()];
        let affine = self.format.is_int() && !self.symmetric;
        for (suffix, values, stored, shape) in [
            ("scale", &self.scales, self.format.has_scales(), &param_shape),
            ("zero", &self.zeros, affine, &param_shape),
            (
                "col_scale",
                &self.col_scales,
                !self.col_scales.is_empty(),
                &vec![self.cols],
            ),
        ] {
            if !stored {
                continue;
            }
            let bytes = match self.param_dtype {
                ParamDtype::F16 => values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                ParamDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            out.push((
                format!("{name}.{suffix}"),
                self.param_dtype.safetensors_dtype(),
                shape.clone(),
                bytes,
            ));
        }
        out
    }

    fn qdata_dtype_shape(&self) -> (Dtype, Vec<usize>) {
        let full = vec![self.rows, self.cols];
        match self.format {
            Format::F32 => (Dtype::F32, full),
            Format::F16 => (Dtype::F16, full),
            Format::Bf16 => (Dtype::BF16, full),
            Format::F8E4m3 => (Dtype::F8_E4M3, full),
            Format::F8E5m2 => (Dtype::F8_E5M2, full),
            Format::Int8 if self.symmetric => (Dtype::I8, full),
            Format::Int8 => (Dtype::U8, full),
            Format::Int4 | Format::Int2 => (Dtype::U8, vec![self.rows, self.row_bytes()]),
        }
    }

    /// Rebuilds what [`QuantTensor::to_tensors`] stored under `name`; `lookup` returns a stored tensor's dtype,
    /// shape and bytes. Errors name the tensor and the expected against the found dtype or shape.
    pub fn from_tensors<'a>(
        name: &str,
        meta: &QuantTensorMeta,
        lookup: impl Fn(&str) -> Option<(Dtype, Vec<usize>, &'a [u8])>,
    ) -> Result<QuantTensor> {
        let mut tensor = QuantTensor {
            format: meta.format,
            symmetric: meta.symmetric || !meta.format.is_int(),
            zero_point: meta.zero_point,
            rows: meta.rows,
            cols: meta.cols,
            group_size: meta.group_size,
            param_dtype: meta.param_dtype,
            data: Vec::new(),
            scales: Vec::new(),
            zeros: Vec::new(),
            col_scales: Vec::new(),
        };
        if meta.format.has_scales() && (meta.group_size == 0 || meta.group_size > meta.cols.max(1)) {
            return Err(Error::invalid(
                name,
                format!(
                    "group size {} is invalid for rows of {} elements",
                    meta.group_size, meta.cols
                ),
            ));
        }
        if meta.format.is_float_without_groups() && meta.group_size != meta.cols {
            return Err(Error::invalid(
                name,
                format!(
                    "{} stores one scale per row, but the metadata says group size {} for rows of {}",
                    meta.format.name(),
                    meta.group_size,
                    meta.cols
                ),
            ));
        }
        let fetch = |tensor_name: String, dtype: Dtype, shape: Vec<usize>| -> Result<Vec<u8>> {
            let (found_dtype, found_shape, bytes) =
                lookup(&tensor_name).ok_or_else(|| Error::not_found(&tensor_name, "missing from the checkpoint"))?;
            if found_dtype != dtype || found_shape != shape {
                return Err(Error::invalid(
                    &tensor_name,
                    format!("expected {dtype:?} {shape:?}, found {found_dtype:?} {found_shape:?}"),
                ));
            }
            let expected_bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            if bytes.len() != expected_bytes {
                return Err(Error::invalid(
                    &tensor_name,
                    format!("expected {expected_bytes} bytes, found {}", bytes.len()),
                ));
            }
            Ok(bytes.to_vec())
        };
        let (dtype, shape) = tensor.qdata_dtype_shape();
        tensor.data = fetch(format!("{name}.qdata"), dtype, shape)?;
        if meta.format.has_scales() {
            let shape = vec![meta.rows, tensor.groups_per_row()];
            let dtype = meta.param_dtype.safetensors_dtype();
            let decode = |bytes: Vec<u8>| meta.param_dtype.decode(&bytes);
            tensor.scales = decode(fetch(format!("{name}.scale"), dtype, shape.clone())?);
            if meta.format.is_int() && !tensor.symmetric {
                tensor.zeros = decode(fetch(format!("{name}.zero"), dtype, shape)?);
            }
        }
        if meta.col_scales {
            let tensor_name = format!("{name}.col_scale");
            let bytes = fetch(
                tensor_name.clone(),
                meta.param_dtype.safetensors_dtype(),
                vec![meta.cols],
            )?;
            let values = meta.param_dtype.decode(&bytes);
            // A zero or non-finite multiplier would silently zero or poison a whole input column.
            if let Some(j) = values.iter().position(|v| !v.is_finite() || *v == 0.0) {
                return Err(Error::invalid(
                    &tensor_name,
                    format!(
                        "column scale {j} is {} (column scales must be finite and non-zero)",
                        values[j]
                    ),
                ));
            }
            tensor.col_scales = values;
        }
        Ok(tensor)
    }
}

impl Format {
    fn is_float_without_groups(self) -> bool {
        matches!(self, Format::F8E4m3 | Format::F8E5m2)
    }
}

/// The signature every method implements: quantize a row-major `[rows, cols]` weight under a validated recipe,
/// given the calibration statistics of the layer's input when there are any (calibration-free methods ignore them).
pub type QuantizeFn = fn(&[f32], usize, usize, &Recipe, Option<&LayerStats>) -> Result<QuantTensor>;

/// The function implementing `method`.
pub fn quantizer(method: Method) -> QuantizeFn {
    match method {
        Method::Rtn => rtn::quantize,
        Method::Hqq => hqq::quantize,
        Method::Gptq => gptq::quantize,
        Method::Awq | Method::AwqGptq => awq::quantize,
    }
}

/// A weight quantized by another method than its recipe's, and why (a calibrated method on a layer without
/// statistics, such as a depthwise convolution).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub layer: String,
    pub method: Method,
    pub reason: String,
}

/// The method a calibrated method falls back to on a layer it cannot use: hqq for affine formats, rtn otherwise.
pub fn fallback_method(recipe: &Recipe) -> Method {
    if recipe.level.int_bits().is_some() && !recipe.is_symmetric() {
        Method::Hqq
    } else {
        Method::Rtn
    }
}

/// Quantizes the weight `name` (row-major `[rows, cols]`) with the recipe's method. Checks the shape, finiteness and
/// recipe first so that errors name the weight. A calibrated method needs `stats` (an error otherwise).
pub fn quantize_weight(name: &str, w: &[f32], rows: usize, cols: usize, recipe: &Recipe) -> Result<QuantTensor> {
    quantize_weight_with(name, w, rows, cols, recipe, None, false).map(|(q, _)| q)
}

/// [`quantize_weight`] with the layer's calibration statistics. Without statistics a calibrated method is an error,
/// unless `allow_fallback`: then the weight is quantized by [`fallback_method`] and the [`Fallback`] says so.
pub fn quantize_weight_with(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    stats: Option<&LayerStats>,
    allow_fallback: bool,
) -> Result<(QuantTensor, Option<Fallback>)> {
    if w.len() != rows * cols {
        return Err(Error::invalid(
            name,
            format!("{} values for shape [{rows}, {cols}]", w.len()),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            name,
            format!(
                "weight at row {}, column {} is {} (cannot quantize non-finite values)",
                i / cols.max(1),
                i % cols.max(1),
                w[i]
            ),
        ));
    }
    if let Some(s) = stats
        && s.cols != cols
    {
        return Err(Error::invalid(
            name,
            format!(
                "calibration statistics have {} input columns, the weight {cols}",
                s.cols
            ),
        ));
    }
    recipe.validate().map_err(|e| e.within(name))?;
    let usable = stats.filter(|s| s.rows > 0 && (!recipe.method.stats_needs().hessian || s.hessian.is_some()));
    let (method, fallback) = match (recipe.method.needs_calibration(), usable) {
        (true, None) if allow_fallback => {
            let method = fallback_method(recipe);
            let reason = "no calibration statistics for this layer".to_string();
            let fallback = Fallback {
                layer: name.to_string(),
                method,
                reason,
            };
            (method, Some(fallback))
        }
        (true, None) => {
            return Err(Error::invalid(
                name,
                format!(
                    "{} needs calibration statistics of the layer's inputs (pass a calibration set)",
                    recipe.method
                ),
            ));
        }
        _ => (recipe.method, None),
    };
    let effective = Recipe {
        method,
        ..recipe.clone()
    };
    let tensor = quantizer(method)(w, rows, cols, &effective, usable).map_err(|e| e.within(name))?;
    tracing::debug!(
        weight = name,
        format = %tensor.format_name(),
        bits_per_weight = tensor.bits_per_weight(),
        "quantized"
    );
    Ok((tensor, fallback))
}

/// Relative Frobenius error `||a - b|| / ||a||` (0 when both are zero).
pub fn relative_error(reference: &[f32], approx: &[f32]) -> f64 {
    let (num, den) = reference.iter().zip(approx).fold((0f64, 0f64), |(n, d), (&a, &b)| {
        let e = (a - b) as f64;
        (n + e * e, d + (a as f64) * (a as f64))
    });
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// Safetensors metadata for a checkpoint of quantized weights: the recipe header (`label` as rows show it) under [`RECIPE_METADATA_KEY`] and
/// each weight's [`QuantTensorMeta`] under [`MAP_METADATA_KEY`].
pub fn checkpoint_metadata<'a>(
    recipe: &Recipe,
    label: &str,
    tensors: impl IntoIterator<Item = (&'a str, &'a QuantTensor)>,
) -> Result<HashMap<String, String>> {
    let header = RecipeHeader {
        version: STORAGE_VERSION,
        label: label.to_string(),
        recipe: recipe.clone(),
    };
    let map: BTreeMap<&str, QuantTensorMeta> = tensors.into_iter().map(|(n, t)| (n, t.meta())).collect();
    let json = |what: &str, r: serde_json::Result<String>| {
        r.map_err(|e| Error::internal(format!("cannot serialise the {what}: {e}")))
    };
    Ok(HashMap::from([
        (
            RECIPE_METADATA_KEY.to_string(),
            json("quantization recipe", serde_json::to_string(&header))?,
        ),
        (
            MAP_METADATA_KEY.to_string(),
            json("quantization map", serde_json::to_string(&map))?,
        ),
    ]))
}

/// Reads what [`checkpoint_metadata`] wrote; `source` (a file name) goes into error messages.
pub fn read_checkpoint_metadata(
    source: &str,
    metadata: &HashMap<String, String>,
) -> Result<(RecipeHeader, BTreeMap<String, QuantTensorMeta>)> {
    let get = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| Error::not_found(source, format!("metadata key '{key}' is missing")))
    };
    let header: RecipeHeader = serde_json::from_str(get(RECIPE_METADATA_KEY)?)
        .map_err(|e| Error::invalid(source, format!("metadata '{RECIPE_METADATA_KEY}' is invalid: {e}")))?;
    if header.version != STORAGE_VERSION {
        return Err(Error::unsupported(
            source,
            format!(
                "quantization storage version {} is not supported (this build reads {STORAGE_VERSION})",
                header.version
            ),
        ));
    }
    header.recipe.validate().map_err(|e| e.within(source))?;
    let map: BTreeMap<String, QuantTensorMeta> = serde_json::from_str(get(MAP_METADATA_KEY)?)
        .map_err(|e| Error::invalid(source, format!("metadata '{MAP_METADATA_KEY}' is invalid: {e}")))?;
    Ok((header, map))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Deterministic synthetic weights for the quantization tests.

    /// SplitMix64: a tiny deterministic generator, enough for test matrices.
    pub struct SplitMix(pub u64);

    impl SplitMix {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1).
        pub fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        /// Standard normal (Box-Muller).
        pub fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }

        /// Student-t with `dof` degrees of freedom (integer dof: normal / sqrt(chi2 / dof)).
        pub fn student_t(&mut self, dof: u32) -> f64 {
            let chi2: f64 = (0..dof).map(|_| self.normal().powi(2)).sum();
            self.normal() / (chi2 / dof as f64).sqrt()
        }
    }

    /// A trained-looking `[rows, cols]` weight: Student-t (4 dof) entries, a per-row scale that varies by 4x, and
    /// two outliers of 8-15 standard deviations per row.
    pub fn trained_like(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        let mut w = Vec::with_capacity(rows * cols);
        for _ in 0..rows {
            let row_scale = 0.02 * (0.5 + 1.5 * rng.uniform());
            let start = w.len();
            for _ in 0..cols {
                w.push((rng.student_t(4) * row_scale) as f32);
            }
            for _ in 0..2 {
                let at = start + (rng.next_u64() as usize % cols);
                let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                w[at] = (sign * row_scale * (8.0 + 7.0 * rng.uniform())) as f32;
            }
        }
        w
    }
}

/// Codes unpacked at a time by [`dequantize_int_row`], on the stack (a multiple of every format's codes per byte).
const UNPACK_CHUNK: usize = 256;

/// One row of packed `BITS`-bit codes (low bits first within a byte, as [`int::pack`] writes them) to floats:
/// `code * scale` (symmetric, codes sign-extended), `(code - zero) * scale` or `code * scale - shift` per group.
/// Weight-only levels run this on every weight of every forward pass, so the codes of a row are first unpacked
/// byte by byte, [`UNPACK_CHUNK`] at a time, into a small buffer, then converted group piece by group piece in
/// straight loops, both of which the compiler vectorises; the arithmetic per value is
/// [`dequantize_int_row_scalar`]'s, so the floats are bit-identical.
fn dequantize_int_row<const BITS: u32>(
    packed: &[u8],
    scales: &[f32],
    zeros: Option<(&[f32], ZeroPoint)>,
    group_size: usize,
    dst: &mut [f32],
) {
    let per_byte = (8 / BITS) as usize;
    let group_size = group_size.max(1);
    let mut codes = [0u8; UNPACK_CHUNK];
    for (i, chunk) in dst.chunks_mut(UNPACK_CHUNK).enumerate() {
        // A chunk starts on a byte (UNPACK_CHUNK is a multiple of the codes per byte), wherever groups start.
        let start = i * UNPACK_CHUNK;
        let (first, bytes) = (start / per_byte, chunk.len().div_ceil(per_byte));
        int::unpack_row(&packed[first..first + bytes], BITS, &mut codes[..bytes * per_byte]);
        // The chunk's pieces, one per group it overlaps.
        let mut at = 0;
        while at < chunk.len() {
            let g = (start + at) / group_size;
            let end = ((g + 1) * group_size - start).min(chunk.len());
            let (out, codes) = (&mut chunk[at..end], &codes[at..end]);
            let s = scales[g];
            match zeros {
                None => out
                    .iter_mut()
                    .zip(codes)
                    .for_each(|(d, &c)| *d = int::sign_extend(c, BITS) as f32 * s),
                Some((z, ZeroPoint::Codes)) => {
                    let z = z[g];
                    out.iter_mut().zip(codes).for_each(|(d, &c)| *d = (c as f32 - z) * s);
                }
                Some((z, ZeroPoint::Shift)) => {
                    let z = z[g];
                    out.iter_mut().zip(codes).for_each(|(d, &c)| *d = c as f32 * s - z);
                }
            }
            at = end;
        }
    }
}

/// Scalar reference of [`dequantize_int_row`]: each code read with its own shift and mask.
#[cfg(test)]
fn dequantize_int_row_scalar<const BITS: u32>(
    packed: &[u8],
    scales: &[f32],
    zeros: Option<(&[f32], ZeroPoint)>,
    group_size: usize,
    dst: &mut [f32],
) {
    let per_byte = (8 / BITS) as usize;
    let mask = ((1u16 << BITS) - 1) as u8;
    let code = |c: usize| (packed[c / per_byte] >> ((c % per_byte) as u32 * BITS)) & mask;
    for (g, out) in dst.chunks_mut(group_size.max(1)).enumerate() {
        let (s, start) = (scales[g], g * group_size);
        match zeros {
            None => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, d)| *d = int::sign_extend(code(start + i), BITS) as f32 * s),
            Some((z, ZeroPoint::Codes)) => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, d)| *d = (code(start + i) as f32 - z[g]) * s),
            // quanto's order of operations: scale first, then subtract the shift (two roundings, as torch does).
            Some((z, ZeroPoint::Shift)) => out
                .iter_mut()
                .enumerate()
                .for_each(|(i, d)| *d = code(start + i) as f32 * s - z[g]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_recipes() -> Vec<Recipe> {
        let mut out = Vec::new();
        for level in Level::ALL {
            out.push(Recipe::level_default(level));
        }
        for (level, g, sym) in [
            (Level::Int8, Some(64), Some(false)),
            (Level::Int4, Some(128), Some(true)),
            (Level::Int2, None, Some(true)),
            (Level::Int4, Some(1), None),
        ] {
            out.push(Recipe::new(level, Method::Rtn, g, sym, vec![]).unwrap());
        }
        for level in [Level::Int8, Level::Int4, Level::Int2] {
            out.push(Recipe::new(level, Method::Hqq, None, None, vec![]).unwrap());
        }
        out
    }

    #[test]
    fn safetensors_round_trip_is_bit_identical() {
        let (rows, cols) = (7, 147);
        let w = testing::trained_like(rows, cols, 11);
        for recipe in all_recipes() {
            let name = format!("layer.{}.weight", recipe.label());
            let q = quantize_weight(&name, &w, rows, cols, &recipe).unwrap();
            let stored = q.to_tensors(&name);
            // Memory reports and checkpoint sizes rely on weight_bytes() counting exactly what is stored.
            let stored_bytes: usize = stored.iter().map(|t| t.3.len()).sum();
            assert_eq!(stored_bytes, q.weight_bytes(), "{}", recipe.label());
            let views: Vec<(String, safetensors::tensor::TensorView)> = stored
                .iter()
                .map(|(n, d, s, b)| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            let metadata = checkpoint_metadata(&recipe, &recipe.label(), [(name.as_str(), &q)]).unwrap();
            let bytes = safetensors::serialize(views, Some(metadata)).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let (header, map) =
                read_checkpoint_metadata("test.safetensors", meta.metadata().as_ref().unwrap()).unwrap();
            assert_eq!(header.recipe, recipe);
            assert_eq!(header.label, recipe.label());
            let back = QuantTensor::from_tensors(&name, &map[&name], |n| {
                file.tensor(n).ok().map(|t| (t.dtype(), t.shape().to_vec(), t.data()))
            })
            .unwrap();
            assert_eq!(back, q, "{}", recipe.label());
            let deq = back.dequantize();
            assert!(deq.iter().zip(q.dequantize()).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn loading_names_the_tensor_and_the_mismatch() {
        let w = testing::trained_like(4, 64, 3);
        let q = quantize_weight("w", &w, 4, 64, &Recipe::level_default(Level::Int4)).unwrap();
        let stored = q.to_tensors("w");
        let lookup = |n: &str| {
            stored
                .iter()
                .find(|t| t.0 == n)
                .map(|t| (t.1, t.2.clone(), t.3.as_slice()))
        };
        let mut meta = q.meta();
        meta.rows = 5;
        let err = QuantTensor::from_tensors("w", &meta, lookup).unwrap_err().to_string();
        assert_eq!(err, "w.qdata: expected U8 [5, 32], found U8 [4, 32]");
        let mut meta = q.meta();
        meta.param_dtype = if q.param_dtype == ParamDtype::F16 {
            ParamDtype::F32
        } else {
            ParamDtype::F16
        };
        let err = QuantTensor::from_tensors("w", &meta, lookup).unwrap_err().to_string();
        assert!(err.starts_with("w.scale: expected"), "{err}");
        let err = QuantTensor::from_tensors("v", &q.meta(), lookup)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "v.qdata: missing from the checkpoint");
        let mut bad = HashMap::new();
        bad.insert(
            RECIPE_METADATA_KEY.to_string(),
            r#"{"version":9,"label":"x","recipe":{}}"#.to_string(),
        );
        let err = read_checkpoint_metadata("m.safetensors", &bad).unwrap_err().to_string();
        assert!(
            err.starts_with("m.safetensors: metadata 'quantization_recipe' is invalid"),
            "{err}"
        );
        let recipe = Recipe::level_default(Level::Int4);
        let mut meta = checkpoint_metadata(&recipe, &recipe.label(), [("w", &q)]).unwrap();
        meta.insert(
            RECIPE_METADATA_KEY.into(),
            meta[RECIPE_METADATA_KEY].replace("\"version\":1", "\"version\":2"),
        );
        let err = read_checkpoint_metadata("m.safetensors", &meta)
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage version 2 is not supported"), "{err}");
    }

    #[test]
    fn dequantize_rows_matches_whole_tensor_and_checks_bounds() {
        let (rows, cols) = (9, 70);
        let w = testing::trained_like(rows, cols, 5);
        for recipe in all_recipes() {
            let q = quantize_weight("w", &w, rows, cols, &recipe).unwrap();
            let full = q.dequantize();
            let mut tile = vec![0f32; 3 * cols];
            q.dequantize_rows_into(4, &mut tile).unwrap();
            assert_eq!(tile, full[4 * cols..7 * cols], "{}", recipe.label());
            assert!(q.dequantize_rows_into(7, &mut tile).is_err());
            assert!(q.dequantize_rows_into(0, &mut tile[..cols + 1]).is_err());
        }
    }

    #[test]
    fn chunked_dequantization_equals_the_scalar_reference_bit_for_bit() {
        fn check<const BITS: u32>(cols: usize, group_size: usize, seed: u64) {
            let mut rng = testing::SplitMix(seed);
            let packed: Vec<u8> = (0..int::row_bytes(cols, BITS)).map(|_| rng.next_u64() as u8).collect();
            let groups = cols.div_ceil(group_size);
            let scales: Vec<f32> = (0..groups).map(|_| (rng.uniform() * 0.1) as f32).collect();
            let zeros: Vec<f32> = (0..groups).map(|_| (rng.uniform() * 15.0 - 3.0) as f32).collect();
            for mode in [None, Some(ZeroPoint::Codes), Some(ZeroPoint::Shift)] {
                let z = mode.map(|m| (zeros.as_slice(), m));
                let mut fast = vec![f32::NAN; cols];
                let mut slow = vec![f32::NAN; cols];
                dequantize_int_row::<BITS>(&packed, &scales, z, group_size, &mut fast);
                dequantize_int_row_scalar::<BITS>(&packed, &scales, z, group_size, &mut slow);
                let same = fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{BITS} bits, {cols} columns, groups of {group_size}, {mode:?}");
            }
        }
        // Odd and short rows, trailing partial groups and chunks, groups starting inside a byte or across chunks.
        for cols in [1, 2, 3, 5, 7, 9, 31, 63, 64, 65, 127, 255, 256, 257, 300, 515, 1024] {
            for g in [cols, 1, 3, 5, 16, 32, 64, 128, 300] {
                let g = g.min(cols);
                check::<8>(cols, g, cols as u64 * 31 + g as u64);
                check::<4>(cols, g, cols as u64 * 37 + g as u64);
                check::<2>(cols, g, cols as u64 * 41 + g as u64);
            }
        }
    }

    #[test]
    fn bits_per_weight_count_codes_scales_and_zeros() {
        let (rows, cols) = (8, 256);
        let w = testing::trained_like(rows, cols, 9);
        let bpw = |level, method| {
            let r = Recipe::new(level, method, None, None, vec![]).unwrap();
            let q = quantize_weight("w", &w, rows, cols, &r).unwrap();
            if q.format.has_scales() {
                assert_eq!(q.param_dtype, ParamDtype::F16, "{}", r.label());
            }
            q.bits_per_weight()
        };
        assert_eq!(bpw(Level::F32, Method::Rtn), 32.0);
        assert_eq!(bpw(Level::Bf16, Method::Rtn), 16.0);
        // One f16 scale per row of 256.
        assert_eq!(bpw(Level::F8E4m3, Method::Rtn), 8.0 + 16.0 / 256.0);
        assert_eq!(bpw(Level::Int8, Method::Rtn), 8.0 + 16.0 / 256.0);
        assert_eq!(bpw(Level::Int8, Method::Hqq), 8.0 + 32.0 / 256.0);
        // f16 scale + f16 zero per group: 32 bits per 64 or per 32 weights.
        assert_eq!(bpw(Level::Int4, Method::Rtn), 4.5);
        assert_eq!(bpw(Level::Int2, Method::Hqq), 3.0);
        // Odd rows pad to a byte.
        let q = quantize_weight("w", &w[..9 * 3], 3, 9, &Recipe::level_default(Level::Int4)).unwrap();
        assert_eq!(q.data.len(), 3 * 5);
        assert_eq!(q.group_size, 9);
        assert_eq!(q.format_name(), "int4-affine");
    }

    /// An int4 tensor with hand-made column scales (f16-exact powers of two and thirds rounded to f16).
    fn with_col_scales(rows: usize, cols: usize) -> (Vec<f32>, QuantTensor) {
        let w = testing::trained_like(rows, cols, 17);
        let r = Recipe::new(Level::Int4, Method::Rtn, Some(32), None, vec![]).unwrap();
        let mut q = quantize_weight("w", &w, rows, cols, &r).unwrap();
        assert_eq!(q.param_dtype, ParamDtype::F16);
        q.col_scales = (0..cols)
            .map(|j| ParamDtype::F16.round([0.5, 1.0 / 3.0, 4.0, 1.25][j % 4]))
            .collect();
        (w, q)
    }

    #[test]
    fn column_scales_multiply_the_dequantized_columns() {
        let (rows, cols) = (5, 96);
        let (_, q) = with_col_scales(rows, cols);
        let plain = QuantTensor {
            col_scales: Vec::new(),
            ..q.clone()
        }
        .dequantize();
        let manual: Vec<f32> = plain
            .iter()
            .enumerate()
            .map(|(i, v)| v * q.col_scales[i % cols])
            .collect();
        assert_eq!(q.dequantize(), manual);
        let mut tile = vec![0f32; 2 * cols];
        q.dequantize_rows_into(3, &mut tile).unwrap();
        assert_eq!(tile, manual[3 * cols..]);
        assert_eq!(q.format_name(), "int4-g32-affine-awq");
        // One f16 per column on top of codes, scales and zeros.
        assert_eq!(q.weight_bytes(), rows * 48 + 2 * (2 * rows * 3 + cols));
        assert_eq!(
            q.bits_per_weight(),
            q.weight_bytes() as f64 * 8.0 / (rows * cols) as f64
        );
        let mut wrong = q.clone();
        wrong.col_scales.pop();
        assert!(wrong.dequantize_rows_into(0, &mut tile).is_err());
    }

    #[test]
    fn column_scales_round_trip_and_bad_ones_are_refused() {
        let (rows, cols) = (4, 64);
        let (_, q) = with_col_scales(rows, cols);
        let meta = q.meta();
        assert!(meta.col_scales);
        let stored = q.to_tensors("m.w");
        let col = stored.iter().find(|t| t.0 == "m.w.col_scale").unwrap();
        assert_eq!((col.1, col.2.clone()), (Dtype::F16, vec![cols]));
        fn lookup_in<'a>(stored: &'a [StoredTensor]) -> impl Fn(&str) -> Option<(Dtype, Vec<usize>, &'a [u8])> + 'a {
            move |n| {
                stored
                    .iter()
                    .find(|t| t.0 == n)
                    .map(|t| (t.1, t.2.clone(), t.3.as_slice()))
            }
        }
        let back = QuantTensor::from_tensors("m.w", &meta, lookup_in(&stored)).unwrap();
        assert_eq!(back, q);
        assert!(
            back.dequantize()
                .iter()
                .zip(q.dequantize())
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // The metadata says col_scales only when there are some (older checkpoints read as before).
        let json = serde_json::to_string(&meta).unwrap();
        assert!(json.contains("\"col_scales\":true"), "{json}");
        let plain_meta = QuantTensor {
            col_scales: Vec::new(),
            ..q.clone()
        }
        .meta();
        assert!(!serde_json::to_string(&plain_meta).unwrap().contains("col_scales"));

        let without: Vec<StoredTensor> = stored.iter().filter(|t| t.0 != "m.w.col_scale").cloned().collect();
        let err = QuantTensor::from_tensors("m.w", &meta, lookup_in(&without))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "m.w.col_scale: missing from the checkpoint");
        let replaced = |f: &dyn Fn(&mut StoredTensor)| -> Vec<StoredTensor> {
            let mut out = stored.clone();
            f(out.iter_mut().find(|t| t.0 == "m.w.col_scale").unwrap());
            out
        };
        let short = replaced(&|t| {
            t.2 = vec![cols - 1];
            t.3.truncate(2 * (cols - 1));
        });
        let err = QuantTensor::from_tensors("m.w", &meta, lookup_in(&short))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "m.w.col_scale: expected F16 [64], found F16 [63]");
        for (bad, shown) in [
            (half::f16::INFINITY, "inf"),
            (half::f16::ZERO, "0"),
            (half::f16::NAN, "NaN"),
        ] {
            let poisoned = replaced(&|t| t.3[6..8].copy_from_slice(&bad.to_le_bytes()));
            let err = QuantTensor::from_tensors("m.w", &meta, lookup_in(&poisoned))
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!("m.w.col_scale: column scale 3 is {shown} (column scales must be finite and non-zero)")
            );
        }
    }

    #[test]
    fn bad_input_is_an_error_naming_the_weight() {
        let recipe = Recipe::level_default(Level::Int8);
        let err = quantize_weight("enc.w", &[1.0, f32::NAN, 0.0, 1.0], 2, 2, &recipe).unwrap_err();
        assert_eq!(
            err.to_string(),
            "enc.w: weight at row 0, column 1 is NaN (cannot quantize non-finite values)"
        );
        let err = quantize_weight("enc.w", &[1.0; 3], 2, 2, &recipe).unwrap_err();
        assert_eq!(err.to_string(), "enc.w: 3 values for shape [2, 2]");
        let mut bad = recipe.clone();
        bad.group_size = Some(0);
        let err = quantize_weight("enc.w", &[1.0; 4], 2, 2, &bad).unwrap_err().to_string();
        assert!(err.starts_with("enc.w: level int8, method rtn: group size 0"), "{err}");
    }
}
