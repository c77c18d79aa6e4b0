//! optimum-quanto's weight storage, both ways: its qtypes, the group size its `QModuleMixin` picks for a layer, its
//! `PackedTensor` layout (int4/int2 codes packed along the first axis), and the conversion of one weight's stored
//! parts (`weight._data[._data]`, `weight._scale`, `weight._shift`) to a [`QuantTensor`] and back.
//!
//! quanto's conventions (optimum-quanto 0.2.7, `tensor/packed.py`, `tensor/qbits.py`, `tensor/weights/qbytes.py`):
//! - qint8 and qfloat8: `_data` has the weight's shape (I8, F8_E4M3, F8_E5M2), `_scale` one value per output
//!   channel (shape `[out, 1, ...]`); dequantized as `scale * data`.
//! - qint4/qint2: unsigned codes; per channel the codes keep the weight's shape, with groups they are reshaped to
//!   `[out * in / group, group]` (groups of consecutive inputs within a row). That `[n, ...]` array is packed along
//!   its first axis: byte row `i` holds code rows `i, i + m, i + 2m, ...` (`m = ceil(n / (8 / bits))`) at bit
//!   offsets `0, bits, 2 bits, ...`. `_scale` and `_shift` have one value per group (`[n, 1]`). A float shift
//!   dequantizes as `scale * q - shift` ([`ZeroPoint::Shift`]); an integer shift (quanto's `zeropoint=True`) as
//!   `(q - shift) * scale` ([`ZeroPoint::Codes`]).
//!
//! Loading is exact: the codes, scales and shifts are kept as stored and dequantize with quanto's operations in its
//! order, so float32 checkpoints give quanto's dequantized weights bit for bit.

use safetensors::Dtype;

use super::{Format, ParamDtype, QuantTensor, StoredTensor, ZeroPoint, int};
use crate::{Error, Result};

/// The weight qtypes of optimum-quanto that segq reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QType {
    Int2,
    Int4,
    Int8,
    Float8E4m3fn,
    Float8E5m2,
}

impl QType {
    /// Parses a name of quanto's `qtypes` table (`qint4`, `qfloat8` = `qfloat8_e4m3fn`, ...).
    pub fn parse(name: &str) -> Option<QType> {
        Some(match name {
            "qint2" => QType::Int2,
            "qint4" => QType::Int4,
            "qint8" => QType::Int8,
            "qfloat8" | "qfloat8_e4m3fn" => QType::Float8E4m3fn,
            "qfloat8_e5m2" => QType::Float8E5m2,
            _ => return None,
        })
    }

    /// quanto's name, as `quantization_map` writes it.
    pub fn name(self) -> &'static str {
        match self {
            QType::Int2 => "qint2",
            QType::Int4 => "qint4",
            QType::Int8 => "qint8",
            QType::Float8E4m3fn => "qfloat8_e4m3fn",
            QType::Float8E5m2 => "qfloat8_e5m2",
        }
    }

    /// The segq format its codes are held in.
    pub fn format(self) -> Format {
        match self {
            QType::Int2 => Format::Int2,
            QType::Int4 => Format::Int4,
            QType::Int8 => Format::Int8,
            QType::Float8E4m3fn => Format::F8E4m3,
            QType::Float8E5m2 => Format::F8E5m2,
        }
    }

    /// The segq level of the same format.
    pub fn level(self) -> super::Level {
        match self {
            QType::Int2 => super::Level::Int2,
            QType::Int4 => super::Level::Int4,
            QType::Int8 => super::Level::Int8,
            QType::Float8E4m3fn => super::Level::F8E4m3,
            QType::Float8E5m2 => super::Level::F8E5m2,
        }
    }

    fn packed_bits(self) -> Option<u32> {
        match self {
            QType::Int2 => Some(2),
            QType::Int4 => Some(4),
            _ => None,
        }
    }
}

/// The list of quanto's weight qtypes, for error messages.
pub const QTYPE_NAMES: &str = "qint2, qint4, qint8, qfloat8 (qfloat8_e4m3fn), qfloat8_e5m2";

/// The group size quanto's `QModuleMixin` gives a qint4/qint2 layer whose rows hold `cols` inputs: 128, else 96,
/// 64 or 32, the first that divides a row longer than 128; `None` (per channel) otherwise. quanto does not store
/// it: `requantize` recomputes it from the layer's shape, so a checkpoint must use this one.
pub fn group_size(cols: usize) -> Option<usize> {
    if cols <= 128 {
        return None;
    }
    [128, 96, 64, 32].into_iter().find(|g| cols.is_multiple_of(*g))
}

/// Unpacks quanto's `PackedTensor` data: `packed` holds `ceil(n / (8 / bits))` byte rows of `inner` bytes; returns
/// the `n * inner` codes, row-major.
pub fn unpack_first_axis(packed: &[u8], n: usize, inner: usize, bits: u32) -> Vec<u8> {
    let per_byte = (8 / bits) as usize;
    let m = n.div_ceil(per_byte);
    let mask = ((1u16 << bits) - 1) as u8;
    let mut codes = vec![0u8; n * inner];
    for (row, dst) in codes.chunks_mut(inner.max(1)).enumerate().take(n) {
        let (byte_row, k) = (row % m, (row / m) as u32);
        for (c, &b) in dst.iter_mut().zip(&packed[byte_row * inner..(byte_row + 1) * inner]) {
            *c = (b >> (k * bits)) & mask;
        }
    }
    codes
}

/// Packs `n * inner` row-major codes as quanto's `pack_weights` does (the inverse of [`unpack_first_axis`]).
pub fn pack_first_axis(codes: &[u8], n: usize, inner: usize, bits: u32) -> Vec<u8> {
    let per_byte = (8 / bits) as usize;
    let m = n.div_ceil(per_byte);
    let mut packed = vec![0u8; m * inner];
    for (row, src) in codes.chunks(inner.max(1)).enumerate().take(n) {
        let (byte_row, k) = (row % m, (row / m) as u32);
        for (b, &c) in packed[byte_row * inner..(byte_row + 1) * inner].iter_mut().zip(src) {
            *b |= c << (k * bits);
        }
    }
    packed
}

/// One stored tensor as a lookup finds it: dtype, shape, little-endian bytes.
pub type Part<'a> = (Dtype, Vec<usize>, &'a [u8]);

fn param_values(name: &str, (dtype, _, bytes): &Part<'_>) -> Result<(ParamDtype, Vec<f32>)> {
    match dtype {
        Dtype::F32 => Ok((
            ParamDtype::F32,
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )),
        Dtype::F16 => Ok((
            ParamDtype::F16,
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        )),
        other => Err(Error::unsupported(
            name,
            format!("dtype {other:?} is not supported for quanto scales and shifts (expected F32 or F16)"),
        )),
    }
}

/// Reads the stored parts of the quanto weight `name` (`<module>.weight`) of PyTorch shape `shape` into a
/// [`QuantTensor`]. `lookup` returns a stored tensor by its full name. Every error names the tensor at fault.
pub fn from_quanto<'a>(
    name: &str,
    qtype: QType,
    shape: &[usize],
    lookup: impl Fn(&str) -> Option<Part<'a>>,
) -> Result<QuantTensor> {
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape.iter().skip(1).product::<usize>();
    let get = |suffix: &str| {
        let full = format!("{name}.{suffix}");
        lookup(&full).map(|p| (full.clone(), p)).ok_or_else(|| {
            Error::not_found(
                &full,
                format!("missing from the checkpoint (quanto {} weight)", qtype.name()),
            )
        })
    };
    let mismatch = |tensor: &str, expected: String, part: &Part<'_>| {
        Error::invalid(
            tensor,
            format!(
                "expected {expected} for a {} weight of shape {shape:?}, found {:?} {:?}",
                qtype.name(),
                part.0,
                part.1
            ),
        )
    };
    let check_bytes = |tensor: &str, part: &Part<'_>| -> Result<()> {
        let needed = part.1.iter().product::<usize>() * part.0.bitsize() / 8;
        if part.2.len() == needed {
            Ok(())
        } else {
            Err(Error::invalid(
                tensor,
                format!("expected {needed} bytes, found {}", part.2.len()),
            ))
        }
    };
    let (scale_name, scale) = get("_scale")?;
    check_bytes(&scale_name, &scale)?;
    let (param_dtype, scales) = param_values(&scale_name, &scale)?;
    let Some(bits) = qtype.packed_bits() else {
        // qint8 / qfloat8: codes in the weight's shape, one scale per output channel.
        let (data_name, data) = get("_data")?;
        let dtype = match qtype {
            QType::Int8 => Dtype::I8,
            QType::Float8E4m3fn => Dtype::F8_E4M3,
            _ => Dtype::F8_E5M2,
        };
        if data.0 != dtype || data.1 != shape {
            return Err(mismatch(&data_name, format!("{dtype:?} {shape:?}"), &data));
        }
        check_bytes(&data_name, &data)?;
        if scales.len() != rows {
            return Err(mismatch(
                &scale_name,
                format!("{rows} values (one per output channel)"),
                &scale,
            ));
        }
        return Ok(QuantTensor {
            format: qtype.format(),
            symmetric: true,
            zero_point: ZeroPoint::Codes,
            rows,
            cols,
            group_size: cols,
            param_dtype,
            data: data.2.to_vec(),
            scales,
            zeros: Vec::new(),
            col_scales: Vec::new(),
        });
    };
    // qint4 / qint2: one scale and shift per group; the group size follows from the number of scales.
    let groups_total = scales.len();
    let total = rows * cols;
    let group = total.checked_div(groups_total).unwrap_or(0);
    if group == 0 || group * groups_total != total || !cols.is_multiple_of(group) {
        return Err(mismatch(
            &scale_name,
            "one value per output channel or per group".into(),
            &scale,
        ));
    }
    let (n, inner, packed_shape) = if group == cols {
        let mut s = shape.to_vec();
        s[0] = rows.div_ceil((8 / bits) as usize);
        (rows, cols, s)
    } else {
        (
            groups_total,
            group,
            vec![groups_total.div_ceil((8 / bits) as usize), group],
        )
    };
    let (data_name, data) = get("_data._data")?;
    if data.0 != Dtype::U8 || data.1 != packed_shape {
        return Err(mismatch(&data_name, format!("U8 {packed_shape:?}"), &data));
    }
    check_bytes(&data_name, &data)?;
    let (shift_name, shift) = get("_shift")?;
    check_bytes(&shift_name, &shift)?;
    if shift.1.iter().product::<usize>() != groups_total {
        return Err(mismatch(
            &shift_name,
            format!("{groups_total} values like `_scale`"),
            &shift,
        ));
    }
    let (zero_point, zeros) = match shift.0 {
        Dtype::U8 => (ZeroPoint::Codes, shift.2.iter().map(|&z| z as f32).collect()),
        Dtype::I8 => (ZeroPoint::Codes, shift.2.iter().map(|&z| z as i8 as f32).collect()),
        _ => {
            let (dtype, values) = param_values(&shift_name, &shift)?;
            if dtype != param_dtype {
                return Err(mismatch(&shift_name, format!("{:?} like `_scale`", scale.0), &shift));
            }
            (ZeroPoint::Shift, values)
        }
    };
    let codes = unpack_first_axis(data.2, n, inner, bits);
    Ok(QuantTensor {
        format: qtype.format(),
        symmetric: false,
        zero_point,
        rows,
        cols,
        group_size: group,
        param_dtype,
        data: int::pack(&codes, rows, cols, bits),
        scales,
        zeros,
        col_scales: Vec::new(),
    })
}

/// The quanto qtype and stored parts (named `<name>._data[._data]`, `._scale`, `._shift`) of a weight `q` of PyTorch
/// shape `shape`, such that quanto's `requantize` rebuilds it. Scales and shifts are written as float32 (the
/// model's dtype). Errors name the weight and what quanto cannot hold: float levels without scales, int8 with zero
/// points or groups, groups that straddle quanto's.
///
/// Exactness: int8 and float8 weights dequantize in quanto to exactly segq's floats. int4/int2 codes are written as
/// they are, with quanto's float shift `zero * scale` (or `2^(bits-1) * scale` for symmetric codes made unsigned):
/// quanto's `q * scale - shift` then equals segq's `(q - zero) * scale` within float rounding.
pub fn to_quanto(name: &str, q: &QuantTensor, shape: &[usize]) -> Result<(QType, Vec<StoredTensor>)> {
    let (rows, cols) = (q.rows, q.cols);
    if shape.first() != Some(&rows) || shape.iter().skip(1).product::<usize>() != cols {
        return Err(Error::internal(format!(
            "{name}: quantized [{rows}, {cols}] does not match shape {shape:?}"
        )));
    }
    let refuse = |why: String| Error::unsupported(name, format!("cannot be written for optimum-quanto: {why}"));
    if !q.col_scales.is_empty() {
        return Err(refuse(format!(
            "it is {} with a scale per input column (AWQ), which quanto's weight types cannot hold; export it as \
             segq's format instead",
            q.format_name()
        )));
    }
    let f32_bytes = |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let per_channel_shape = {
        let mut s = vec![rows];
        s.extend(std::iter::repeat_n(1, shape.len().saturating_sub(1)));
        s
    };
    let qtype = match q.format {
        Format::F32 | Format::F16 | Format::Bf16 => {
            return Err(refuse(format!(
                "{} weights have no quanto qtype (quanto's weight types are {QTYPE_NAMES})",
                q.format.name()
            )));
        }
        Format::F8E4m3 => QType::Float8E4m3fn,
        Format::F8E5m2 => QType::Float8E5m2,
        Format::Int8 => QType::Int8,
        Format::Int4 => QType::Int4,
        Format::Int2 => QType::Int2,
    };
    let Some(bits) = qtype.packed_bits() else {
        if q.format == Format::Int8 && (!q.symmetric || q.group_size < cols) {
            return Err(refuse(format!(
                "quanto's qint8 is symmetric with one scale per output channel, this weight is {}",
                q.format_name()
            )));
        }
        let dtype = match qtype {
            QType::Int8 => Dtype::I8,
            QType::Float8E4m3fn => Dtype::F8_E4M3,
            _ => Dtype::F8_E5M2,
        };
        return Ok((
            qtype,
            vec![
                (format!("{name}._data"), dtype, shape.to_vec(), q.data.clone()),
                (
                    format!("{name}._scale"),
                    Dtype::F32,
                    per_channel_shape,
                    f32_bytes(&q.scales),
                ),
            ],
        ));
    };
    let quanto_group = group_size(cols).unwrap_or(cols);
    let segq_group = q.group_size.max(1);
    // Each of quanto's groups must lie within one of segq's, whose scale and zero point it then repeats.
    if (0..cols / quanto_group)
        .any(|k| (k * quanto_group) / segq_group != (k * quanto_group + quanto_group - 1) / segq_group)
    {
        let quanto_layout = if quanto_group == cols {
            "per output channel".to_string()
        } else {
            format!("in groups of {quanto_group}")
        };
        return Err(refuse(format!(
            "quanto quantizes rows of {cols} inputs {quanto_layout} (and recomputes that when it loads), this \
             weight has groups of {segq_group}; quantize with a group size that is a multiple of quanto's (per \
             channel: a --group-size at least as long as the longest row)"
        )));
    }
    let segq_groups = q.groups_per_row();
    let codes = int::unpack(&q.data, rows, cols, bits);
    let offset = 1u8 << (bits - 1);
    let codes: Vec<u8> = if q.symmetric {
        codes
            .iter()
            .map(|&c| (int::sign_extend(c, bits) + offset as i8) as u8)
            .collect()
    } else {
        codes
    };
    let n_groups = cols / quanto_group;
    let mut scales = Vec::with_capacity(rows * n_groups);
    let mut shifts = Vec::with_capacity(rows * n_groups);
    for r in 0..rows {
        for k in 0..n_groups {
            let g = r * segq_groups + (k * quanto_group) / segq_group;
            let s = q.scales[g];
            scales.push(s);
            shifts.push(match (q.symmetric, q.zero_point) {
                (true, _) => offset as f32 * s,
                (false, ZeroPoint::Codes) => q.zeros[g] * s,
                (false, ZeroPoint::Shift) => q.zeros[g],
            });
        }
    }
    let (n, inner, packed_shape, param_shape) = if quanto_group == cols {
        let mut s = shape.to_vec();
        s[0] = rows.div_ceil((8 / bits) as usize);
        (rows, cols, s, per_channel_shape)
    } else {
        let n = rows * n_groups;
        (
            n,
            quanto_group,
            vec![n.div_ceil((8 / bits) as usize), quanto_group],
            vec![n, 1],
        )
    };
    Ok((
        qtype,
        vec![
            (
                format!("{name}._data._data"),
                Dtype::U8,
                packed_shape,
                pack_first_axis(&codes, n, inner, bits),
            ),
            (
                format!("{name}._scale"),
                Dtype::F32,
                param_shape.clone(),
                f32_bytes(&scales),
            ),
            (format!("{name}._shift"), Dtype::F32, param_shape, f32_bytes(&shifts)),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Level, Method, Recipe, quantize_weight, testing};

    #[test]
    fn packing_follows_quanto_pack_weights() {
        // pack_weights([[0,1],[2,3],[4,5]], 4): m = 2 byte rows; row 2 goes to the high nibble of byte row 0.
        let codes = [0, 1, 2, 3, 4, 5];
        assert_eq!(pack_first_axis(&codes, 3, 2, 4), vec![0x40, 0x51, 0x02, 0x03]);
        assert_eq!(unpack_first_axis(&[0x40, 0x51, 0x02, 0x03], 3, 2, 4), codes);
        // 2 bits, 5 rows of 1: m = 2; rows 0, 2, 4 in byte 0 at offsets 0, 2, 4; rows 1, 3 in byte 1.
        let codes = [1, 2, 3, 0, 2];
        assert_eq!(pack_first_axis(&codes, 5, 1, 2), vec![1 | 3 << 2 | 2 << 4, 2]);
        for n in [1usize, 2, 3, 7, 8, 9] {
            let codes: Vec<u8> = (0..n * 3).map(|i| (i * 5 % 4) as u8).collect();
            assert_eq!(unpack_first_axis(&pack_first_axis(&codes, n, 3, 2), n, 3, 2), codes);
        }
    }

    #[test]
    fn group_sizes_follow_qmodule() {
        assert_eq!(group_size(32), None);
        assert_eq!(group_size(128), None);
        assert_eq!(group_size(256), Some(128));
        assert_eq!(group_size(288), Some(96));
        assert_eq!(group_size(160), Some(32));
        assert_eq!(group_size(147), None);
        assert_eq!(group_size(192), Some(96));
    }

    fn lookup<'a>(parts: &'a [StoredTensor]) -> impl Fn(&str) -> Option<Part<'a>> {
        move |n| {
            parts
                .iter()
                .find(|p| p.0 == n)
                .map(|p| (p.1, p.2.clone(), p.3.as_slice()))
        }
    }

    #[test]
    fn export_then_import_keeps_codes_and_dequantizes_alike() {
        for (shape, level, group) in [
            (vec![6usize, 4, 3, 3], Level::Int4, Some(4096)),
            (vec![5, 256], Level::Int4, Some(128)),
            (vec![4, 512], Level::Int2, Some(256)),
            (vec![7, 40], Level::Int8, None),
            (vec![3, 2, 2, 2], Level::F8E4m3, None),
            (vec![3, 20], Level::F8E5m2, None),
        ] {
            let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
            let w = testing::trained_like(rows, cols, 7);
            for symmetric in [None, Some(true)] {
                if symmetric.is_some() && level.int_bits().is_none_or(|b| b == 8) {
                    continue;
                }
                let recipe = Recipe::new(level, Method::Rtn, group, symmetric, vec![]).unwrap();
                let q = quantize_weight("w", &w, rows, cols, &recipe).unwrap();
                let (qtype, parts) = to_quanto("m.weight", &q, &shape).unwrap();
                assert_eq!(qtype.format(), q.format);
                let back = from_quanto("m.weight", qtype, &shape, lookup(&parts)).unwrap();
                let (a, b) = (q.dequantize(), back.dequantize());
                if q.format.is_int() && q.format != Format::Int8 {
                    let tol = q.scales.iter().fold(0f32, |m, s| m.max(*s)) * 1e-5;
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol),
                        "{}",
                        recipe.label()
                    );
                } else {
                    assert_eq!(a, b, "{}", recipe.label());
                    assert_eq!(back.data, q.data);
                }
            }
        }
    }

    #[test]
    fn refusals_name_the_weight_and_the_reason() {
        let w = testing::trained_like(4, 256, 1);
        let q = quantize_weight("w", &w, 4, 256, &Recipe::level_default(Level::Int4)).unwrap();
        let err = to_quanto("enc.weight", &q, &[4, 256]).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "enc.weight: cannot be written for optimum-quanto: quanto quantizes rows of 256 inputs in groups of 128"
            ),
            "{err}"
        );
        let q = quantize_weight("w", &w, 4, 256, &Recipe::level_default(Level::Bf16)).unwrap();
        let err = to_quanto("enc.weight", &q, &[4, 256]).unwrap_err().to_string();
        assert!(err.contains("bf16 weights have no quanto qtype"), "{err}");
        let r = Recipe::new(Level::Int8, Method::Rtn, Some(64), None, vec![]).unwrap();
        let q = quantize_weight("w", &w, 4, 256, &r).unwrap();
        let err = to_quanto("enc.weight", &q, &[4, 256]).unwrap_err().to_string();
        assert!(
            err.contains("qint8 is symmetric with one scale per output channel"),
            "{err}"
        );
        // AWQ's per-column multipliers have no place in quanto's weights.
        let r = Recipe::new(Level::Int4, Method::Rtn, Some(128), None, vec![]).unwrap();
        let mut q = quantize_weight("w", &w, 4, 256, &r).unwrap();
        q.col_scales = vec![0.5; 256];
        let err = to_quanto("enc.weight", &q, &[4, 256]).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "enc.weight: cannot be written for optimum-quanto: it is int4-g128-affine-awq with a scale per input \
                 column (AWQ)"
            ),
            "{err}"
        );
        // Import: a packed tensor of the wrong shape is named with both shapes.
        let q = quantize_weight(
            "w",
            &w,
            4,
            256,
            &Recipe::new(Level::Int4, Method::Rtn, Some(128), None, vec![]).unwrap(),
        )
        .unwrap();
        let (_, mut parts) = to_quanto("m.weight", &q, &[4, 256]).unwrap();
        parts[0].2 = vec![2, 256];
        let err = from_quanto("m.weight", QType::Int4, &[4, 256], lookup(&parts))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "m.weight._data._data: expected U8 [4, 128] for a qint4 weight of shape [4, 256], found U8 [2, 256]"
            ),
            "{err}"
        );
        let err = from_quanto("x.weight", QType::Int4, &[4, 256], lookup(&parts))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.weight._scale: missing"), "{err}");
        assert_eq!(QType::parse("qfloat8"), Some(QType::Float8E4m3fn));
        assert_eq!(QType::parse("qfloat8_e4m3fnuz"), None);
    }
}
