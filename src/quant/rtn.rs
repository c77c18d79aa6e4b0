//! Round-to-nearest quantization (the `rtn` method): float levels are cast (f16, bf16) or scaled per output channel
//! by absmax / max-finite and cast (float8, as optimum-quanto does); integer levels use absmax per group
//! (symmetric) or min/max per group (affine), with no search.

use rayon::prelude::*;

use super::int::{self, quantize_grouped};
use super::{Format, Level, ParamDtype, QuantTensor, Recipe, f8};
use crate::Result;

/// Quantizes a row-major `[rows, cols]` weight by round to nearest.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    recipe: &Recipe,
    _stats: Option<&super::LayerStats>,
) -> Result<QuantTensor> {
    let format = Format::of_level(recipe.level);
    let float = |data: Vec<u8>| QuantTensor {
        format,
        symmetric: true,
        zero_point: super::ZeroPoint::Codes,
        rows,
        cols,
        group_size: cols,
        param_dtype: ParamDtype::F32,
        data,
        scales: Vec::new(),
        zeros: Vec::new(),
        col_scales: Vec::new(),
    };
    let tensor = match recipe.level {
        Level::F32 => float(w.iter().flat_map(|v| v.to_le_bytes()).collect()),
        Level::F16 => float(w.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        Level::Bf16 => float(w.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        Level::F8E4m3 | Level::W8A8F8 => quantize_f8(w, rows, cols, format, f8::E4M3FN),
        Level::F8E5m2 => quantize_f8(w, rows, cols, format, f8::E5M2),
        Level::Int8 | Level::Int8Dyn | Level::Int8Static | Level::Int4 | Level::Int4Dyn | Level::W4A8 | Level::Int2 => {
            let bits = recipe.level.int_bits().unwrap_or(8);
            let symmetric = recipe.is_symmetric();
            let group_size = recipe.effective_group_size(cols);
            if symmetric {
                quantize_grouped(w, rows, cols, bits, true, group_size, |g| {
                    (int::absmax_scale(g, bits), 0.0)
                })
            } else {
                quantize_grouped(w, rows, cols, bits, false, group_size, |g| int::minmax_params(g, bits))
            }
        }
    };
    Ok(tensor)
}

/// Float8 with one scale per row: `scale = absmax / max_finite` (1 for an all-zero row), codes = cast(w / scale)
/// saturating at +-max, the scale rounded to its storage type first.
fn quantize_f8(w: &[f32], rows: usize, cols: usize, format: Format, spec: f8::F8Spec) -> QuantTensor {
    let max = spec.max_finite();
    let scales: Vec<f32> = if cols == 0 {
        vec![1.0; rows]
    } else {
        w.chunks(cols)
            .map(|row| {
                let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if absmax > 0.0 { absmax / max } else { 1.0 }
            })
            .collect()
    };
    let param_dtype = int::choose_param_dtype(&scales, &[]);
    let scales: Vec<f32> = scales.into_iter().map(|s| param_dtype.round(s)).collect();
    let mut data = vec![0u8; rows * cols];
    if cols > 0 {
        data.par_chunks_mut(cols)
            .zip(w.par_chunks(cols))
            .zip(&scales)
            .for_each(|((codes, row), &s)| {
                for (c, &x) in codes.iter_mut().zip(row) {
                    *c = spec.encode(x / s);
                }
            });
    }
    QuantTensor {
        format,
        symmetric: true,
        zero_point: super::ZeroPoint::Codes,
        rows,
        cols,
        group_size: cols,
        param_dtype,
        data,
        scales,
        zeros: Vec::new(),
        col_scales: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Method, quantize_weight, relative_error, testing};

    fn recipe(level: Level, g: Option<usize>, sym: Option<bool>) -> Recipe {
        Recipe::new(level, Method::Rtn, g, sym, vec![]).unwrap()
    }

    #[test]
    fn hand_made_int8_scales_are_exact() {
        // Row absmax 1.27 and 2.54: scales 0.01 and 0.02 (f32 rows since 0.01 fits f16 too: check both).
        let w = [1.27f32, -0.5, 0.0, 0.004, -2.54, 1.0, 0.01, 0.0];
        let q = quantize_weight("w", &w, 2, 4, &recipe(Level::Int8, None, None)).unwrap();
        assert_eq!(q.param_dtype, ParamDtype::F16);
        assert_eq!(
            q.scales,
            vec![half::f16::from_f32(0.01).to_f32(), half::f16::from_f32(0.02).to_f32()]
        );
        assert!(q.zeros.is_empty());
        let codes: Vec<i8> = q.data.iter().map(|&b| b as i8).collect();
        assert_eq!(codes, vec![127, -50, 0, 0, -127, 50, 0, 0]);
    }

    #[test]
    fn hand_made_affine_scales_and_zero_points_are_exact() {
        // Groups of 4: [-1, 2] -> scale 0.2, zero 5; [0, 0.75] -> scale 0.05, zero 0. Values chosen exact in f16.
        let w = [-1.0f32, 0.0, 2.0, 0.5, 0.0, 0.25, 0.75, 0.5];
        let q = quantize_weight("w", &w, 1, 8, &recipe(Level::Int4, Some(4), None)).unwrap();
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        assert_eq!(q.scales, vec![f16(0.2), f16(0.05)]);
        assert_eq!(q.zeros, vec![5.0, 0.0]);
        assert_eq!(int::unpack(&q.data, 1, 8, 4), vec![0, 5, 15, 8, 0, 5, 15, 10]);
        // Symmetric int4 in one group: absmax 2 -> scale 2/7.
        let q = quantize_weight("w", &w, 1, 8, &recipe(Level::Int4, None, Some(true))).unwrap();
        assert_eq!(q.group_size, 8);
        assert_eq!(q.scales, vec![f16(2.0 / 7.0)]);
    }

    #[test]
    fn per_element_error_is_at_most_half_a_step() {
        let (rows, cols) = (64, 300);
        let w = testing::trained_like(rows, cols, 21);
        for (level, g, sym) in [
            (Level::Int8, None, None),
            (Level::Int8, Some(32), Some(false)),
            (Level::Int4, None, None),
            (Level::Int4, Some(128), None),
            (Level::Int2, None, None),
            (Level::Int4, Some(64), Some(true)),
            (Level::Int2, Some(16), Some(true)),
        ] {
            let r = recipe(level, g, sym);
            let q = quantize_weight("w", &w, rows, cols, &r).unwrap();
            let deq = q.dequantize();
            let groups = q.groups_per_row();
            let layout = int::GroupLayout {
                cols,
                group_size: q.group_size,
            };
            for row in 0..rows {
                for g in 0..groups {
                    let s = q.scales[row * groups + g];
                    for c in layout.range(g) {
                        let e = (w[row * cols + c] - deq[row * cols + c]).abs();
                        // A hair of f32 slack for the products in dequantization.
                        assert!(
                            e <= s * 0.5 * (1.0 + 1e-5),
                            "{} row {row} col {c}: {e} > {s}/2",
                            r.label()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn float_levels_round_trip_as_expected() {
        let (rows, cols) = (16, 96);
        let w = testing::trained_like(rows, cols, 2);
        let q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(Level::F32)).unwrap();
        assert_eq!(q.dequantize(), w);
        let q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(Level::F16)).unwrap();
        assert!(
            q.dequantize()
                .iter()
                .zip(&w)
                .all(|(d, x)| *d == half::f16::from_f32(*x).to_f32())
        );
        let q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(Level::Bf16)).unwrap();
        assert!(
            q.dequantize()
                .iter()
                .zip(&w)
                .all(|(d, x)| *d == half::bf16::from_f32(*x).to_f32())
        );
        // (level, half an ulp relative to the value in the normal range, half the subnormal step)
        for (level, half_ulp, half_sub) in [
            (Level::F8E4m3, 2f32.powi(-4), 2f32.powi(-10)),
            (Level::F8E5m2, 2f32.powi(-3), 2f32.powi(-17)),
        ] {
            let q = quantize_weight("w", &w, rows, cols, &Recipe::level_default(level)).unwrap();
            let deq = q.dequantize();
            for r in 0..rows {
                let s = q.scales[r];
                let row = &w[r * cols..(r + 1) * cols];
                let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (c, &x) in row.iter().enumerate() {
                    let bound = s * (x.abs() / s * half_ulp).max(half_sub) * (1.0 + 1e-5);
                    let e = (deq[r * cols + c] - x).abs();
                    // The row's absmax saturates when the rounded scale came out a hair small.
                    let fmax = if level == Level::F8E4m3 { 448.0 } else { 57344.0 };
                    let saturation = (absmax - s * fmax).max(0.0);
                    assert!(e <= bound + saturation, "{level} row {r} col {c}: {e} > {bound}");
                }
            }
            assert!(relative_error(&w, &deq) < half_ulp as f64);
        }
    }
}
