//! CPU compute kernels on plain slices, for the layers where candle is slow or has no quantized path.
//!
//! - [`attention`]: fused multi-head attention (scores kept per block of query rows in cache, never stored).
//! - [`dwconv`]: depthwise 3x3 convolution (stride 1, padding 1) with bias and optional fused exact GELU, for
//!   SegFormer's Mix-FFN, on channels-last tokens (`[H*W, C]`).
//! - [`gemm_f32`]: float GEMMs with the bias/residual written first: Linear, and dense convolutions on
//!   channels-last tokens via im2col per block of output pixels.
//! - [`gemm_i8`]: W8A8 int8 GEMM for quantized Linear / 1x1 conv layers: activations quantized per row at run time
//!   (`int8-dyn`, `int4-dyn`) or with one calibrated per-tensor scale (`int8-static`), weights packed once at load
//!   time (int4 codes widened to int8 then), f32 output with per-row and per-column scales and bias.
//! - [`gelu`]: f32 `erf`, `erfc` and exact GELU (PyTorch's `approximate="none"`).
//! - [`layer_norm`]: layer normalisation over the last dimension of a `[rows, C]` matrix.
//! - [`softmax`]: row-wise softmax of scaled attention scores in one pass.
//! - [`resize`]: bilinear upsampling of channels-last maps summed into one (SegFormer's decode head), bias + ReLU.
//!
//! Every SIMD kernel has a plain scalar reference beside it (`*_scalar`) that the tests compare it with. SIMD code
//! uses AVX2+FMA through `std::arch::x86_64`, chosen at run time by [`has_avx2_fma`]; elsewhere (other CPUs, other
//! architectures) the scalar path runs. Work is spread over the rayon thread pool.

use crate::Result;

pub mod attention;
pub mod dwconv;
pub mod gelu;
pub mod gemm_f32;
pub mod gemm_i8;
pub mod layer_norm;
pub mod resize;
pub mod softmax;

pub use attention::{AttentionShape, attention, attention_i8, attention_i8_scalar, attention_scalar};
pub use dwconv::{dwconv3x3_gelu_nhwc_i8, dwconv3x3_gelu_nhwc_i8_scalar, dwconv3x3_nhwc};
pub use gelu::{erf_f32, erfc_f32, gelu_f32, gelu_inplace};
pub use gemm_f32::{
    ConvShape, conv2d_nhwc, conv2d_nhwc_i8, conv2d_nhwc_i8_scalar, conv2d_nhwc_i8_static, conv2d_nhwc_i8_static_scalar,
    conv2d_nhwc_scalar, linear_f32, linear_f32_scalar, matmul, matmul_accumulate, matmul_accumulate_scalar,
    matmul_scalar,
};
pub use gemm_i8::{
    I8Panels, QuantizedRows, gemm_i8_dynamic, gemm_i8_dynamic_scalar, gemm_i8_dynamic_vec, gemm_i8_quantized,
    gemm_i8_static, gemm_i8_static_scalar, gemm_i8_static_vec, quantize_rows_i8, quantize_static_i8,
};
pub use layer_norm::{layer_norm, layer_norm_vec};
pub use resize::{MapNhwc, UpsampleSum, upsample_sum_nhwc};
pub use softmax::softmax_rows;

/// A new vector of `len` floats that `fill` writes, without a zeroing pass first (zeroed fresh buffers cost about
/// a tenth of an int8 SegFormer pass, in memset and in the kernel's page clearing).
///
/// # Safety
/// `fill` must write every one of the `len` values when it returns `Ok`.
pub(crate) unsafe fn filled_vec(
    len: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]) -> Result<()>,
) -> Result<Vec<f32>> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len])?;
    // SAFETY: `fill` wrote all `len` values (caller's contract) within the capacity.
    unsafe { v.set_len(len) };
    Ok(v)
}

/// An initialized float buffer as the kernels that fill fresh buffers take it.
///
/// # Safety
/// The user must write initialized floats only (never `MaybeUninit::uninit()`).
pub(crate) unsafe fn as_uninit(out: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; initialized values stay initialized (caller's contract).
    unsafe { &mut *(out as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// An output buffer's base pointer shared by parallel tasks that each write their own disjoint tile of it (rows of
/// a block, or one head's columns): slices cannot express tiles that interleave.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: users write disjoint tiles only, and hold the `&mut` output borrow until their parallel loop ends.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the whole `Sync` wrapper rather than the raw pointer field.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// The instruction sets the kernels may use, from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX2 + FMA and a 256-bit `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI with VL): the int8 GEMM multiplies four
    /// byte pairs and accumulates into i32 in one instruction instead of four.
    Vnni,
}

/// What this CPU supports, capped by the environment variable `SEGQ_SIMD` (`scalar`, `avx2` or `vnni`), which lets
/// a benchmark measure the narrower paths on the same machine. Detected once.
pub fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let detected = detect_simd();
        match std::env::var("SEGQ_SIMD").ok().as_deref().map(str::trim) {
            Some("scalar") => Simd::Scalar,
            Some("avx2") => detected.min(Simd::Avx2),
            _ => detected,
        }
    })
}

fn detect_simd() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) {
            return Simd::Scalar;
        }
        if has!("avxvnni") || (has!("avx512vnni") && has!("avx512vl")) {
            return Simd::Vnni;
        }
        Simd::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Simd::Scalar
    }
}

/// True when the AVX2+FMA kernels run (the CPU has them and `SEGQ_SIMD` allows them).
#[inline]
pub fn has_avx2_fma() -> bool {
    simd() >= Simd::Avx2
}

/// The SIMD features the kernels use on this CPU, for logs: `"avx2+fma+vnni"`, `"avx2+fma"` or `"scalar"`.
pub fn cpu_features() -> String {
    match simd() {
        Simd::Vnni => "avx2+fma+vnni",
        Simd::Avx2 => "avx2+fma",
        Simd::Scalar => "scalar",
    }
    .to_string()
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

    /// `["avx2+fma"]` when the kernels that choose by [`super::has_avx2_fma`] take their AVX2 path (the CPU has it
    /// and `SEGQ_SIMD` allows it), else nothing: the SIMD path a "SIMD matches scalar" test of such a kernel
    /// compares with the scalar reference.
    pub(crate) fn avx2_path() -> Vec<&'static str> {
        if super::has_avx2_fma() {
            vec!["avx2+fma"]
        } else {
            Vec::new()
        }
    }

    /// The path the `gemm` crate takes for f32 products (linear, dense conv, attention's two products). It chooses
    /// by itself, from the CPU alone (`SEGQ_SIMD` does not reach it); gemm-f32 0.19 tries AVX-512F, then FMA, then
    /// its scalar kernels, and this mirrors that order. On a CPU with AVX2+FMA it is never scalar, so tests of
    /// products that run on it only say which path ran ([`gemm_crate_compared`]): an assertion could not fail.
    pub(crate) fn gemm_crate_path() -> Vec<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                return vec!["gemm crate avx512f"];
            }
            if has!("fma") {
                return vec!["gemm crate fma"];
            }
        }
        Vec::new()
    }

    /// Says which SIMD paths a "SIMD matches scalar" test `test` compared with the scalar reference (printed; seen
    /// with `--nocapture`), and fails when the CPU has AVX2+FMA (detected, whatever `SEGQ_SIMD` says) but `paths`
    /// is empty: the test then compared the scalar reference with itself and proved nothing about the SIMD code.
    #[track_caller]
    pub(crate) fn compared_against_scalar(test: &str, paths: &[&str]) {
        compared_against(test, paths, "scalar");
    }

    /// [`compared_against_scalar`] for a test whose reference is something else (`reference`: exact sums, f64).
    #[track_caller]
    pub(crate) fn compared_against(test: &str, paths: &[&str], reference: &str) {
        let ran = if paths.is_empty() {
            "nothing (scalar only)".to_string()
        } else {
            paths.join(", ")
        };
        eprintln!("{test}: compared {ran} against {reference}");
        assert!(
            !scalar_only_on_a_simd_cpu(paths),
            "{test}: this CPU has AVX2+FMA ({}) but the test ran the scalar path only (SEGQ_SIMD={}); unset \
             SEGQ_SIMD so the SIMD kernels are tested",
            cpu_detected(),
            simd_cap()
        );
    }

    /// `SEGQ_SIMD`'s value for messages: `"avx2"`, or `unset`.
    pub(crate) fn simd_cap() -> String {
        std::env::var("SEGQ_SIMD").map_or("unset".to_string(), |v| format!("{v:?}"))
    }

    /// Says which path of the `gemm` crate a test compared with the scalar reference.
    pub(crate) fn gemm_crate_compared(test: &str) {
        let path = gemm_crate_path().first().copied().unwrap_or("gemm crate scalar");
        eprintln!(
            "{test}: compared {path} against scalar (the gemm crate's own dispatch; SEGQ_SIMD does not reach it)"
        );
    }

    /// True when a test compared no SIMD path although the CPU has AVX2+FMA.
    pub(crate) fn scalar_only_on_a_simd_cpu(paths: &[&str]) -> bool {
        paths.is_empty() && super::detect_simd() >= super::Simd::Avx2
    }

    /// The instruction sets the kernels or the `gemm` crate can use that this CPU has, e.g.
    /// `"avx2 fma avx512f avx512vl"` (`"none"` when it has none of them).
    pub(crate) fn cpu_detected() -> String {
        #[allow(unused_mut)]
        let mut found: Vec<&str> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let all = [
                ("avx2", has!("avx2")),
                ("fma", has!("fma")),
                ("avx512f", has!("avx512f")),
                ("avx512vl", has!("avx512vl")),
                ("avx512vnni", has!("avx512vnni")),
                ("avxvnni", has!("avxvnni")),
            ];
            found.extend(all.iter().filter(|(_, on)| *on).map(|(name, _)| *name));
        }
        if found.is_empty() {
            "none".to_string()
        } else {
            found.join(" ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{cpu_detected, scalar_only_on_a_simd_cpu, simd_cap};

    #[test]
    fn cpu_features_names_the_path_taken() {
        eprintln!(
            "kernels: CPU has {}; kernels use {} (SEGQ_SIMD={})",
            cpu_detected(),
            super::cpu_features(),
            simd_cap()
        );
        let f = super::cpu_features();
        assert_eq!(f.starts_with("avx2+fma"), super::has_avx2_fma(), "{f}");
        assert_eq!(f.ends_with("vnni"), super::simd() == super::Simd::Vnni, "{f}");
    }

    #[test]
    fn a_simd_test_that_ran_scalar_only_fails_on_an_avx2_cpu() {
        let avx2_cpu = super::detect_simd() >= super::Simd::Avx2;
        assert_eq!(scalar_only_on_a_simd_cpu(&[]), avx2_cpu, "CPU has {}", cpu_detected());
        assert!(!scalar_only_on_a_simd_cpu(&["avx2+fma"]));
    }
}
