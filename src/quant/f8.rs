//! OCP 8-bit floats (e4m3fn and e5m2): exact decode through 256-entry tables and round-to-nearest-even encode
//! that saturates to the largest finite value, as optimum-quanto does (clamp to +-max, then cast).

use std::sync::LazyLock;

/// The layout of one 8-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct F8Spec {
    pub exponent_bits: u32,
    pub mantissa_bits: u32,
    pub bias: i32,
    /// e4m3fn has no infinities and a single NaN pattern per sign (all ones); e5m2 follows IEEE.
    pub ieee_specials: bool,
}

/// OCP e4m3fn: bias 7, no infinities, NaN = S.1111.111, largest finite 448.
pub const E4M3FN: F8Spec = F8Spec {
    exponent_bits: 4,
    mantissa_bits: 3,
    bias: 7,
    ieee_specials: false,
};
/// OCP e5m2: bias 15, IEEE infinities and NaNs, largest finite 57344.
pub const E5M2: F8Spec = F8Spec {
    exponent_bits: 5,
    mantissa_bits: 2,
    bias: 15,
    ieee_specials: true,
};

impl F8Spec {
    /// The code of the largest finite positive value (0x7E for e4m3fn, 0x7B for e5m2).
    pub const fn max_code(&self) -> u8 {
        if self.ieee_specials {
            ((1u8 << self.exponent_bits) - 2) << self.mantissa_bits | ((1 << self.mantissa_bits) - 1)
        } else {
            0x7E
        }
    }

    /// The largest finite value (448 or 57344).
    pub fn max_finite(&self) -> f32 {
        self.decode_exact(self.max_code())
    }

    /// The canonical NaN code for a sign (0x7F/0xFF for both formats).
    pub const fn nan_code(&self, negative: bool) -> u8 {
        if negative { 0xFF } else { 0x7F }
    }

    /// Decodes one code by the format's definition (used to build the tables and in tests).
    pub fn decode_exact(&self, code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0f64 } else { 1.0 };
        let exponent_field = ((code & 0x7F) >> self.mantissa_bits) as i32;
        let mantissa = (code & ((1 << self.mantissa_bits) - 1)) as f64;
        let all_ones_exponent = exponent_field == (1 << self.exponent_bits) - 1;
        if self.ieee_specials && all_ones_exponent {
            return if mantissa == 0.0 {
                (sign * f64::INFINITY) as f32
            } else {
                f32::NAN
            };
        }
        if !self.ieee_specials && (code & 0x7F) == 0x7F {
            return f32::NAN;
        }
        let frac_scale = (1u32 << self.mantissa_bits) as f64;
        let value = if exponent_field == 0 {
            mantissa / frac_scale * 2f64.powi(1 - self.bias)
        } else {
            (1.0 + mantissa / frac_scale) * 2f64.powi(exponent_field - self.bias)
        };
        (sign * value) as f32
    }

    /// Encodes with round-to-nearest-even; finite values beyond the range and infinities saturate to +-max
    /// finite, NaN maps to NaN, and the sign of zero is kept.
    pub fn encode(&self, x: f32) -> u8 {
        let sign_bit = if x.is_sign_negative() { 0x80u8 } else { 0 };
        if x.is_nan() {
            return self.nan_code(sign_bit != 0);
        }
        let magnitude = x.abs() as f64;
        let max = self.max_finite() as f64;
        if magnitude >= max {
            return sign_bit | self.max_code();
        }
        if magnitude == 0.0 {
            return sign_bit;
        }
        let min_normal_exponent = 1 - self.bias;
        // f64 holds every f32 exactly and dividing by a power of two is exact, so the rounding below is the only one.
        let exponent = binary_exponent(magnitude).max(min_normal_exponent);
        let quantum = 2f64.powi(exponent - self.mantissa_bits as i32);
        let rounded = (magnitude / quantum).round_ties_even() * quantum;
        if rounded >= max {
            return sign_bit | self.max_code();
        }
        sign_bit | self.encode_representable(rounded)
    }

    /// Bits of a positive value that the format represents exactly.
    fn encode_representable(&self, value: f64) -> u8 {
        if value == 0.0 {
            return 0;
        }
        let min_normal_exponent = 1 - self.bias;
        let frac_scale = (1u32 << self.mantissa_bits) as f64;
        if value < 2f64.powi(min_normal_exponent) {
            let mantissa = (value / 2f64.powi(min_normal_exponent) * frac_scale) as u8;
            return mantissa;
        }
        let exponent = binary_exponent(value);
        let mantissa = ((value / 2f64.powi(exponent) - 1.0) * frac_scale) as u8;
        (((exponent + self.bias) as u8) << self.mantissa_bits) | mantissa
    }
}

/// floor(log2(x)) of a positive normal f64, read from its exponent bits (exact, unlike `log2().floor()`).
fn binary_exponent(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

static E4M3FN_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| std::array::from_fn(|c| E4M3FN.decode_exact(c as u8)));
static E5M2_TABLE: LazyLock<[f32; 256]> = LazyLock::new(|| std::array::from_fn(|c| E5M2.decode_exact(c as u8)));

/// The 256 decoded values of e4m3fn, indexed by code.
pub fn e4m3fn_table() -> &'static [f32; 256] {
    &E4M3FN_TABLE
}

/// The 256 decoded values of e5m2, indexed by code.
pub fn e5m2_table() -> &'static [f32; 256] {
    &E5M2_TABLE
}

/// Decodes e4m3fn.
pub fn decode_e4m3fn(code: u8) -> f32 {
    E4M3FN_TABLE[code as usize]
}

/// Decodes e5m2.
pub fn decode_e5m2(code: u8) -> f32 {
    E5M2_TABLE[code as usize]
}

/// Encodes e4m3fn (round to nearest even, saturating at +-448).
pub fn encode_e4m3fn(x: f32) -> u8 {
    E4M3FN.encode(x)
}

/// Encodes e5m2 (round to nearest even, saturating at +-57344).
pub fn encode_e5m2(x: f32) -> u8 {
    E5M2.encode(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (input, PyTorch's `x.clamp(-448,448).to(float8_e4m3fn)`, `x.clamp(-57344,57344).to(float8_e5m2)`), computed
    /// with torch 2.x: ties, subnormals, the smallest subnormal's half, saturation.
    /// The literals are those given to torch; both sides round them to f32 the same way.
    #[allow(clippy::excessive_precision)]
    const TORCH_CASES: [(f32, u8, u8); 30] = [
        (0.0, 0x00, 0x00),
        (-0.0, 0x80, 0x80),
        (1.0, 0x38, 0x3c),
        (448.0, 0x7e, 0x5f),
        (449.0, 0x7e, 0x5f),
        (464.0, 0x7e, 0x5f),
        (465.0, 0x7e, 0x5f),
        (479.0, 0x7e, 0x5f),
        (500.0, 0x7e, 0x60),
        (1000000.0, 0x7e, 0x7b),
        (-1000000.0, 0xfe, 0xfb),
        (0.001953125, 0x01, 0x18),
        (0.0009765625, 0x00, 0x14),
        (0.00097666015625, 0x01, 0x14),
        (0.0029296875, 0x02, 0x1a),
        (0.015625, 0x08, 0x24),
        (0.0166015625, 0x08, 0x24),
        (0.01660322265625, 0x09, 0x24),
        (1.0625, 0x38, 0x3c),
        (1.062501, 0x39, 0x3c),
        (1.1875, 0x3a, 0x3d),
        (0.3, 0x2a, 0x35),
        (-0.3, 0xaa, 0xb5),
        (17.0, 0x58, 0x4c),
        (18.0, 0x59, 0x4c),
        (19.0, 0x5a, 0x4d),
        (240.0, 0x77, 0x5c),
        (0.00146484375, 0x01, 0x16),
        (1e-09, 0x00, 0x00),
        (0.0068359375, 0x04, 0x1f),
    ];

    #[test]
    fn encode_matches_torch_on_edge_cases() {
        for (x, e4, e5) in TORCH_CASES {
            assert_eq!(encode_e4m3fn(x), e4, "e4m3fn({x})");
            assert_eq!(encode_e5m2(x), e5, "e5m2({x})");
        }
    }

    #[test]
    fn all_codes_decode_and_reencode() {
        for (spec, table, nans, infs, abs_sum) in [
            (E4M3FN, e4m3fn_table(), 2, 0, 10815.75f64),
            (E5M2, e5m2_table(), 6, 2, 720895.9995117188),
        ] {
            // Counts and the sum of finite magnitudes were computed with torch's float8 dtypes.
            assert_eq!(table.iter().filter(|v| v.is_nan()).count(), nans);
            assert_eq!(table.iter().filter(|v| v.is_infinite()).count(), infs);
            let sum: f64 = table.iter().filter(|v| v.is_finite()).map(|v| v.abs() as f64).sum();
            assert_eq!(sum, abs_sum);
            for code in 0..=255u8 {
                let value = table[code as usize];
                if value.is_finite() {
                    assert_eq!(spec.encode(value), code, "code {code:#04x} -> {value}");
                }
            }
            // Positive finite codes are strictly increasing in value.
            let positives: Vec<f32> = (0..=0x7Fu8)
                .map(|c| table[c as usize])
                .filter(|v| v.is_finite())
                .collect();
            assert!(positives.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(decode_e4m3fn(0x7E), 448.0);
        assert_eq!(decode_e4m3fn(0x01), 2f32.powi(-9));
        assert_eq!(decode_e4m3fn(0x08), 2f32.powi(-6));
        assert_eq!(decode_e4m3fn(0xB8), -1.0);
        assert_eq!(decode_e5m2(0x7B), 57344.0);
        assert_eq!(decode_e5m2(0x01), 2f32.powi(-16));
        assert_eq!(decode_e5m2(0x7C), f32::INFINITY);
        assert_eq!(decode_e5m2(0xFC), f32::NEG_INFINITY);
    }

    #[test]
    fn ties_round_to_even_and_specials_saturate() {
        // 1.0625 lies halfway between 1.0 (mantissa 0, even) and 1.125 (mantissa 1): even wins.
        assert_eq!(encode_e4m3fn(1.0625), 0x38);
        // 1.1875 lies halfway between 1.125 (odd) and 1.25 (even).
        assert_eq!(encode_e4m3fn(1.1875), 0x3A);
        // Subnormal ties: 1.5 * 2^-9 -> 2 * 2^-9 (even); 0.5 * 2^-9 -> 0.
        assert_eq!(encode_e4m3fn(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(encode_e4m3fn(0.5 * 2f32.powi(-9)), 0x00);
        assert_eq!(encode_e4m3fn(-0.5 * 2f32.powi(-9)), 0x80);
        assert_eq!(encode_e4m3fn(f32::INFINITY), 0x7E);
        assert_eq!(encode_e4m3fn(f32::NEG_INFINITY), 0xFE);
        assert_eq!(encode_e5m2(f32::INFINITY), 0x7B);
        assert!(decode_e4m3fn(encode_e4m3fn(f32::NAN)).is_nan());
        assert!(decode_e5m2(encode_e5m2(f32::NAN)).is_nan());
        assert_eq!(E4M3FN.max_finite(), 448.0);
        assert_eq!(E5M2.max_finite(), 57344.0);
    }

    #[test]
    fn encode_is_nearest_on_a_sweep() {
        // Every input maps to a code whose value is at least as close as both neighbours'.
        for spec in [E4M3FN, E5M2] {
            let max = spec.max_finite();
            let mut x = -max * 1.01;
            while x < max * 1.01 {
                let code = spec.encode(x);
                let got = spec.decode_exact(code);
                let clamped = x.clamp(-max, max);
                for neighbour in [code.wrapping_sub(1), code.wrapping_add(1), code ^ 0x80] {
                    let other = spec.decode_exact(neighbour);
                    if other.is_finite() {
                        assert!(
                            (got - clamped).abs() <= (other - clamped).abs(),
                            "{x}: {got} vs {other}"
                        );
                    }
                }
                x += max / 3001.7;
            }
        }
    }
}
