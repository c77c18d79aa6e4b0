//! Integer weight layout: packing 8/4/2-bit codes into bytes row by row, the group layout along a row, the
//! round-to-nearest code and scale/zero-point formulas shared by every method, and the assembly of an integer
//! [`QuantTensor`] from per-group parameters.
//!
//! Conventions (one place, used by every reader and writer):
//! - Codes are packed little-end first: element `i` of a row sits in byte `i / (8 / bits)` at bit offset
//!   `(i % (8 / bits)) * bits`. Each row starts on a byte boundary (`row_bytes = ceil(cols * bits / 8)`), so a row
//!   range can be dequantized on its own.
//! - Affine codes are unsigned in `[0, 2^bits - 1]` and dequantize to `(q - zero) * scale`, the zero point being
//!   a float in code units (as in HQQ). Symmetric codes are two's complement in `bits` bits, restricted to
//!   `[-(2^(bits-1) - 1), 2^(bits-1) - 1]`, and dequantize to `q * scale`.
//! - Groups run along a row (the input dimension): `group_size` elements each, the last one shorter when the size
//!   does not divide the row.

use rayon::prelude::*;

use super::{Format, ParamDtype, QuantTensor};

/// Bytes one packed row of `cols` codes of `bits` bits takes.
pub fn row_bytes(cols: usize, bits: u32) -> usize {
    (cols * bits as usize).div_ceil(8)
}

/// Packs the low `bits` bits of each code of one row into `out` (`row_bytes(codes.len(), bits)` bytes).
pub fn pack_row(codes: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert_eq!(out.len(), row_bytes(codes.len(), bits));
    if bits == 8 {
        out.copy_from_slice(codes);
        return;
    }
    let per_byte = (8 / bits) as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    for (byte, chunk) in out.iter_mut().zip(codes.chunks(per_byte)) {
        *byte = chunk
            .iter()
            .enumerate()
            .fold(0u8, |acc, (k, &c)| acc | ((c & mask) << (k as u32 * bits)));
    }
}

/// Unpacks `out.len()` codes of `bits` bits from one packed row. Inlined, so that a caller with a constant width
/// (weight-only levels dequantize every weight on every forward pass) gets constant shifts in a loop the compiler
/// vectorises.
#[inline(always)]
pub fn unpack_row(packed: &[u8], bits: u32, out: &mut [u8]) {
    debug_assert_eq!(packed.len(), row_bytes(out.len(), bits));
    if bits == 8 {
        out.copy_from_slice(packed);
        return;
    }
    let per_byte = (8 / bits) as usize;
    let mask = ((1u16 << bits) - 1) as u8;
    let unpack_byte = |codes: &mut [u8], byte: u8| {
        for (k, code) in codes.iter_mut().enumerate() {
            *code = (byte >> (k as u32 * bits)) & mask;
        }
    };
    // Whole bytes in exact chunks (a known trip count), then the codes of a last byte the row ends inside.
    let last_byte = out.len() / per_byte;
    let mut whole = out.chunks_exact_mut(per_byte);
    for (codes, &byte) in (&mut whole).zip(packed) {
        unpack_byte(codes, byte);
    }
    if let Some(&byte) = packed.get(last_byte) {
        unpack_byte(whole.into_remainder(), byte);
    }
}

/// Packs a row-major `[rows, cols]` matrix of codes, each row starting on a byte boundary.
pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let rb = row_bytes(cols, bits);
    let mut out = vec![0u8; rows * rb];
    if cols == 0 {
        return out;
    }
    for (dst, src) in out.chunks_mut(rb).zip(codes.chunks(cols)) {
        pack_row(src, bits, dst);
    }
    out
}

/// Unpacks what [`pack`] wrote.
pub fn unpack(packed: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<u8> {
    let rb = row_bytes(cols, bits);
    let mut out = vec![0u8; rows * cols];
    if cols == 0 {
        return out;
    }
    for (dst, src) in out.chunks_mut(cols).zip(packed.chunks(rb)) {
        unpack_row(src, bits, dst);
    }
    out
}

/// Reads a `bits`-bit two's complement code as a signed integer.
pub fn sign_extend(code: u8, bits: u32) -> i8 {
    let shift = 8 - bits;
    ((code << shift) as i8) >> shift
}

/// How a row of `cols` elements splits into groups of `group_size` (the last possibly shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    pub cols: usize,
    pub group_size: usize,
}

impl GroupLayout {
    /// Groups per row (0 for an empty row).
    pub fn groups_per_row(&self) -> usize {
        if self.group_size == 0 {
            0
        } else {
            self.cols.div_ceil(self.group_size)
        }
    }

    /// The column range of group `g`.
    pub fn range(&self, g: usize) -> std::ops::Range<usize> {
        let start = g * self.group_size;
        start..(start + self.group_size).min(self.cols)
    }
}

/// Largest symmetric code magnitude: 127, 7, 1.
pub fn symmetric_qmax(bits: u32) -> i32 {
    (1 << (bits - 1)) - 1
}

/// Largest affine code: 255, 15, 3.
pub fn affine_qmax(bits: u32) -> i32 {
    (1 << bits) - 1
}

/// Symmetric absmax scale of a group: absmax / qmax (1 for an all-zero group, whose codes are then all 0).
pub fn absmax_scale(group: &[f32], bits: u32) -> f32 {
    let absmax = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    if absmax > 0.0 {
        absmax / symmetric_qmax(bits) as f32
    } else {
        1.0
    }
}

/// Affine min/max parameters of a group: `scale = (max - min) / (2^bits - 1)`, `zero = -min / scale`, so that min
/// and max map to codes 0 and 2^bits - 1 exactly. A constant group gets `scale = |v|` (1 for zeros) and a zero point
/// that reproduces the constant exactly.
pub fn minmax_params(group: &[f32], bits: u32) -> (f32, f32) {
    let (min, max) = group.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    if group.is_empty() {
        return (1.0, 0.0);
    }
    if max > min {
        let scale = (max - min) / affine_qmax(bits) as f32;
        if scale > 0.0 && scale.is_finite() {
            return (scale, -min / scale);
        }
    }
    let scale = if max != 0.0 { max.abs() } else { 1.0 };
    (scale, -max / scale)
}

/// The affine code of `w`: `clamp(round(w / scale + zero), 0, 2^bits - 1)`.
#[inline]
pub fn affine_code(w: f32, scale: f32, zero: f32, qmax: f32) -> f32 {
    round_ties_even(w / scale + zero).clamp(0.0, qmax)
}

/// `v.round_ties_even()`, bit for bit, without the libm call that x86-64's baseline (no SSE4.1 `roundss`) compiles
/// it to: adding and subtracting 2^23 rounds to the nearest integer, ties to even, in the default rounding mode.
/// The searches of `hqq` round each weight of a group dozens of times, and the call dominated them.
#[inline(always)]
pub fn round_ties_even(v: f32) -> f32 {
    const TWO_POW_23: f32 = 8_388_608.0;
    // NaN and infinities fail the test and come back unchanged; from 2^23 up every f32 is an integer already.
    if v.abs() < TWO_POW_23 {
        ((v.abs() + TWO_POW_23) - TWO_POW_23).copysign(v)
    } else {
        v
    }
}

/// The symmetric code of `w`: `clamp(round(w / scale), -qmax, qmax)`.
#[inline]
pub fn symmetric_code(w: f32, scale: f32, qmax: f32) -> f32 {
    round_ties_even(w / scale).clamp(-qmax, qmax)
}

/// Sum of squared reconstruction errors of a group under affine parameters (f64 accumulation).
pub fn affine_sq_error(group: &[f32], scale: f32, zero: f32, bits: u32) -> f64 {
    let qmax = affine_qmax(bits) as f32;
    group
        .iter()
        .map(|&w| {
            let e = w - (affine_code(w, scale, zero, qmax) - zero) * scale;
            (e as f64) * (e as f64)
        })
        .sum()
}

/// Zero points beyond this magnitude (in code units) would lose more than 1/8 of a code to f16 rounding.
const F16_ZERO_LIMIT: f32 = 256.0;

/// The storage type of scales and zero points: f16 when every value fits it without losing range (normal f16
/// scales, zero points within +-256 codes), f32 otherwise.
pub fn choose_param_dtype(scales: &[f32], zeros: &[f32]) -> ParamDtype {
    let min_normal = half::f16::MIN_POSITIVE.to_f32();
    let max = half::f16::MAX.to_f32();
    let scales_fit = scales.iter().all(|&s| (min_normal..=max).contains(&s));
    let zeros_fit = zeros.iter().all(|z| z.abs() <= F16_ZERO_LIMIT);
    if scales_fit && zeros_fit {
        ParamDtype::F16
    } else {
        ParamDtype::F32
    }
}

/// Builds an integer [`QuantTensor`] from a weight matrix and a function that picks `(scale, zero)` for one group
/// (the zero is ignored when `symmetric`). Parameters are rounded to their storage type before the codes are
/// computed, so the codes are the nearest ones for the parameters actually stored.
pub fn quantize_grouped<F>(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    symmetric: bool,
    group_size: usize,
    params: F,
) -> QuantTensor
where
    F: Fn(&[f32]) -> (f32, f32) + Sync,
{
    quantize_grouped_at(w, rows, cols, bits, symmetric, group_size, |_, _, g| params(g))
}

/// [`quantize_grouped`] with `params(row, group index, group values)`, for searches that score a group against
/// data of its columns (AWQ's clipping search).
pub fn quantize_grouped_at<F>(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    symmetric: bool,
    group_size: usize,
    params: F,
) -> QuantTensor
where
    F: Fn(usize, usize, &[f32]) -> (f32, f32) + Sync,
{
    let layout = GroupLayout { cols, group_size };
    let groups = layout.groups_per_row();
    let mut pairs = vec![(0f32, 0f32); rows * groups];
    if groups > 0 {
        pairs.par_chunks_mut(groups).enumerate().for_each(|(r, row_params)| {
            for (g, p) in row_params.iter_mut().enumerate() {
                *p = params(r, g, &w[r * cols..][layout.range(g)]);
            }
        });
    }
    let mut scales: Vec<f32> = pairs.iter().map(|p| p.0).collect();
    let mut zeros: Vec<f32> = if symmetric {
        Vec::new()
    } else {
        pairs.iter().map(|p| p.1).collect()
    };
    let param_dtype = choose_param_dtype(&scales, &zeros);
    for v in scales.iter_mut().chain(zeros.iter_mut()) {
        *v = param_dtype.round(*v);
    }
    let rb = row_bytes(cols, bits);
    let mut data = vec![0u8; rows * rb];
    if groups > 0 {
        data.par_chunks_mut(rb).enumerate().for_each(|(r, packed)| {
            let row = &w[r * cols..(r + 1) * cols];
            let mut codes = vec![0u8; cols];
            for g in 0..groups {
                let range = layout.range(g);
                let s = scales[r * groups + g];
                if symmetric {
                    let qmax = symmetric_qmax(bits) as f32;
                    for (c, &x) in codes[range.clone()].iter_mut().zip(&row[range.clone()]) {
                        *c = symmetric_code(x, s, qmax) as i8 as u8;
                    }
                } else {
                    let z = zeros[r * groups + g];
                    let qmax = affine_qmax(bits) as f32;
                    for (c, &x) in codes[range.clone()].iter_mut().zip(&row[range.clone()]) {
                        *c = affine_code(x, s, z, qmax) as u8;
                    }
                }
            }
            pack_row(&codes, bits, packed);
        });
    }
    let format = match bits {
        8 => Format::Int8,
        4 => Format::Int4,
        _ => Format::Int2,
    };
    QuantTensor {
        format,
        symmetric,
        zero_point: super::ZeroPoint::Codes,
        rows,
        cols,
        group_size,
        param_dtype,
        data,
        scales,
        zeros,
        col_scales: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ties_even_matches_std_bit_for_bit() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            0.49999997,
            -0.49999997,
            8_388_607.5,
            -8_388_607.5,
            8_388_608.0,
            8_388_609.0,
            16_777_217.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            1e-45,
            255.5,
            254.5,
            15.5,
            3.4999998,
        ];
        // Every value from -300 to 300 in steps of 1/64 (the codes' range, ties included), and random bit patterns.
        specials.extend((-19200..=19200).map(|i| i as f32 / 64.0));
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        specials.extend((0..200_000).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            f32::from_bits((state >> 32) as u32)
        }));
        for v in specials {
            let (ours, std) = (round_ties_even(v), v.round_ties_even());
            assert!(
                ours.to_bits() == std.to_bits() || (ours.is_nan() && std.is_nan()),
                "{v:e}: {ours} vs {std}"
            );
        }
    }

    #[test]
    fn pack_unpack_round_trips_on_awkward_lengths() {
        for bits in [8u32, 4, 2] {
            for cols in [0usize, 1, 2, 3, 5, 7, 9, 17, 63, 64, 65, 147] {
                let rows = 3;
                let max = (1u32 << bits) as usize;
                let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + i / 3) % max) as u8).collect();
                let packed = pack(&codes, rows, cols, bits);
                assert_eq!(packed.len(), rows * row_bytes(cols, bits));
                assert_eq!(unpack(&packed, rows, cols, bits), codes, "bits {bits} cols {cols}");
            }
        }
    }

    #[test]
    fn packing_order_is_little_end_first() {
        assert_eq!(pack(&[0x1, 0x2, 0x3], 1, 3, 4), vec![0x21, 0x03]);
        assert_eq!(pack(&[1, 2, 3, 0, 3], 1, 5, 2), vec![0b00_11_10_01, 0b11]);
        assert_eq!(row_bytes(9, 4), 5);
        assert_eq!(row_bytes(9, 2), 3);
        assert_eq!(sign_extend(0xF, 4), -1);
        assert_eq!(sign_extend(0x7, 4), 7);
        assert_eq!(sign_extend(0x9, 4), -7);
        assert_eq!(sign_extend(0b11, 2), -1);
        assert_eq!(sign_extend(0x81, 8), -127);
    }

    #[test]
    fn group_layout_handles_partial_groups() {
        let layout = GroupLayout {
            cols: 147,
            group_size: 64,
        };
        assert_eq!(layout.groups_per_row(), 3);
        assert_eq!(layout.range(2), 128..147);
        assert_eq!(
            GroupLayout {
                cols: 128,
                group_size: 64
            }
            .groups_per_row(),
            2
        );
    }

    #[test]
    fn minmax_and_absmax_parameters_are_exact() {
        let (s, z) = minmax_params(&[-1.0, 0.5, 2.0], 4);
        assert_eq!(s, 0.2);
        assert_eq!(z, 5.0);
        let (s, z) = minmax_params(&[0.0, 3.0], 2);
        assert_eq!((s, z), (1.0, 0.0));
        assert_eq!(absmax_scale(&[-1.27, 0.5], 8), 0.01);
        assert_eq!(absmax_scale(&[0.0, 0.0], 8), 1.0);
        // A constant group reproduces its value exactly.
        for v in [0.0f32, 0.25, -3.0] {
            let (s, z) = minmax_params(&[v; 4], 4);
            assert_eq!((affine_code(v, s, z, 15.0) - z) * s, v);
        }
        assert_eq!(choose_param_dtype(&[0.01, 1.0], &[3.0]), ParamDtype::F16);
        assert_eq!(choose_param_dtype(&[1e-6], &[]), ParamDtype::F32);
        assert_eq!(choose_param_dtype(&[0.1], &[-1000.0]), ParamDtype::F32);
    }
}
