//! CPU compute kernels on plain slices, for the layers where candle is slow or has no quantized path.
//!
//! - [`attention`]: fused multi-head attention (scores kept per block of query rows in cache, never stored).
//! - [`dwconv`]: depthwise 3x3 convolution (stride 1, padding 1) with bias and optional fused exact GELU, for
//!   SegFormer's Mix-FFN; channels-first (`[C, H, W]`) and channels-last (`[H*W, C]`) layouts.
//! - [`gemm_f32`]: float GEMMs with the bias/residual written first: Linear, and dense convolutions on
//!   channels-last tokens via im2col per block of output pixels.
//! - [`gemm_i8`]: W8A8 dynamic int8 GEMM for quantized Linear / 1x1 conv layers: activations quantized per row at
//!   run time, weights packed once at load time, f32 output with per-row and per-column scales and bias.
//! - [`gemm_i4`]: W4A8 dynamic GEMM: int4 weights (nibble-packed) with per-group scales and zero points, activations
//!   quantized per row to int8 at run time.
//! - [`gelu`]: f32 `erf`, `erfc` and exact GELU (PyTorch's `approximate="none"`).
//! - [`layer_norm`]: layer normalisation over the last dimension of a `[rows, C]` matrix.
//! - [`softmax`]: row-wise softmax of scaled attention scores in one pass.
//! - [`resize`]: bilinear upsampling of channels-last maps summed into one (SegFormer's decode head), bias + ReLU.
//!
//! Every SIMD kernel has a plain scalar reference beside it (`*_scalar`) that the tests compare it with. SIMD code
//! uses AVX2+FMA through `std::arch::x86_64`, chosen at run time by [`has_avx2_fma`]; elsewhere (other CPUs, other
//! architectures) the scalar path runs. Work is spread over the rayon thread pool.

pub mod attention;
pub mod dwconv;
pub mod gelu;
pub mod gemm_f32;
pub mod gemm_i4;
pub mod gemm_i8;
pub mod layer_norm;
pub mod resize;
pub mod softmax;

pub use attention::{AttentionShape, attention, attention_scalar};
pub use dwconv::{dwconv3x3, dwconv3x3_nhwc};
pub use gelu::{erf_f32, erfc_f32, gelu_f32, gelu_inplace};
pub use gemm_f32::{ConvShape, conv2d_nhwc, conv2d_nhwc_scalar, linear_f32, linear_f32_scalar};
pub use gemm_i4::{PackedI4, gemm_i4_dynamic};
pub use gemm_i8::{PackedI8, gemm_i8_dynamic, quantize_rows_i8};
pub use layer_norm::layer_norm;
pub use resize::{MapNhwc, upsample_sum_nhwc};
pub use softmax::softmax_rows;

/// True when the CPU can run the AVX2+FMA kernels (detected once, then cached by std).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The SIMD features the kernels use on this CPU, for logs: e.g. `"avx2+fma"`, or `"scalar"`.
pub fn cpu_features() -> String {
    if has_avx2_fma() {
        "avx2+fma".to_string()
    } else {
        "scalar".to_string()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values uniform in `[-scale, scale)` (xorshift), so tests need no extra dependency.
    pub(crate) fn random_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_features_names_the_path_taken() {
        let f = super::cpu_features();
        assert_eq!(f == "avx2+fma", super::has_avx2_fma(), "{f}");
    }
}
