//! Kernel benchmarks at SegFormer-B0 shapes for a 512x512 input: depthwise 3x3 conv on tokens (scalar reference,
//! AVX2 with and without the fused GELU Mix-FFN uses) and the W8A8 dynamic GEMM against candle's f32 matmul and
//! naive loops; the attention softmax and the decode head's upsample-sum; fused attention (f32 and int8-dyn) and one
//! encoder block's Linear layers (f32 and W8A8) per stage, the two parts int8-dyn changes. The machine is shared and noisy: read the results as ratios within one run.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use segq::kernels::{
    self, AttentionShape, I8Panels, attention, attention_i8, dwconv, gemm_i8, gemm_i8_dynamic, linear_f32,
};

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_dwconv(c: &mut Criterion) {
    eprintln!(
        "kernels: {} on {} threads",
        kernels::cpu_features(),
        rayon::current_num_threads()
    );
    let mut g = c.benchmark_group("dwconv3x3_gelu");
    for &(ch, h, w) in &[
        (128usize, 128usize, 128usize),
        (256, 64, 64),
        (640, 32, 32),
        (1024, 16, 16),
    ] {
        let input = values(ch * h * w, 1);
        let weight = values(ch * 9, 2);
        let bias = values(ch, 3);
        let mut out = vec![0f32; ch * h * w];
        let id = format!("C{ch}_{h}x{w}");
        g.bench_function(BenchmarkId::new("nhwc_scalar", &id), |b| {
            b.iter(|| dwconv::dwconv3x3_nhwc_scalar(black_box(&input), ch, h, w, &weight, &bias, true, &mut out))
        });
        g.bench_function(BenchmarkId::new("nhwc_simd_nogelu", &id), |b| {
            b.iter(|| kernels::dwconv3x3_nhwc(black_box(&input), ch, h, w, &weight, &bias, false, &mut out))
        });
        g.bench_function(BenchmarkId::new("nhwc_simd", &id), |b| {
            b.iter(|| kernels::dwconv3x3_nhwc(black_box(&input), ch, h, w, &weight, &bias, true, &mut out))
        });
    }
    g.finish();
}

fn naive_f32(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    for r in 0..m {
        for c in 0..n {
            out[r * n + c] = x[r * k..(r + 1) * k]
                .iter()
                .zip(&w[c * k..(c + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    for &(m, k, n) in &[(16384usize, 1024usize, 256usize), (4096, 256, 1024)] {
        let x = values(m * k, 4);
        let wf = values(n * k, 5);
        let bias = values(n, 6);
        let codes: Vec<i8> = wf.iter().map(|v| (v * 127.0).round() as i8).collect();
        let packed = I8Panels::pack(&codes, &vec![1.0 / 127.0; n], n, k).expect("pack");
        let mut out = vec![0f32; m * n];
        let id = format!("{m}x{k}x{n}");
        g.bench_function(BenchmarkId::new("i8_dynamic_simd", &id), |b| {
            b.iter(|| kernels::gemm_i8_dynamic(black_box(&x), m, k, &packed, Some(&bias), &mut out))
        });
        let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).expect("tensor");
        let wt = Tensor::from_slice(&wf, (n, k), &Device::Cpu)
            .expect("tensor")
            .t()
            .expect("t")
            .contiguous()
            .expect("c");
        g.bench_function(BenchmarkId::new("candle_f32_matmul", &id), |b| {
            b.iter(|| xt.matmul(black_box(&wt)))
        });
        // The scalar paths run on 1/32 of the rows; multiply their times by 32 to compare.
        let ms = m / 32;
        g.bench_function(BenchmarkId::new("i8_dynamic_scalar_rows_div32", &id), |b| {
            b.iter(|| {
                gemm_i8::gemm_i8_dynamic_scalar(
                    black_box(&x[..ms * k]),
                    ms,
                    k,
                    &packed,
                    Some(&bias),
                    &mut out[..ms * n],
                )
            })
        });
        g.bench_function(BenchmarkId::new("naive_f32_rows_div32", &id), |b| {
            b.iter(|| naive_f32(black_box(&x[..ms * k]), &wf, ms, k, n, &mut out[..ms * n]))
        });
    }
    g.finish();
}

/// Attention softmax at stage 1's shape (16384 queries x 256 keys): the fused scaled kernel against candle's
/// divide + softmax_last_dim.
fn bench_softmax(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_softmax");
    let (rows, cols) = (16384, 256);
    let x = values(rows * cols, 11);
    let mut out = vec![0f32; rows * cols];
    g.bench_function("segq_scaled_simd", |b| {
        b.iter(|| kernels::softmax_rows(black_box(&x), rows, cols, 0.176, &mut out).unwrap())
    });
    g.bench_function("scalar", |b| {
        b.iter(|| kernels::softmax::softmax_rows_scalar(black_box(&x), rows, cols, 0.176, &mut out).unwrap())
    });
    let t = Tensor::from_vec(x.clone(), (rows, cols), &Device::Cpu).unwrap();
    g.bench_function("candle_div_softmax", |b| {
        b.iter(|| candle_nn::ops::softmax_last_dim(&(black_box(&t) / 5.66).unwrap()).unwrap())
    });
    g.finish();
}

/// The decode head's upsample + sum + bias + ReLU of B0's four 256-channel maps at 512x512 (to 128x128).
fn bench_upsample_sum(c: &mut Criterion) {
    let d = 256;
    let sizes = [128usize, 64, 32, 16];
    let data: Vec<Vec<f32>> = sizes.iter().map(|&s| values(s * s * d, s as u64)).collect();
    let maps: Vec<kernels::MapNhwc<'_>> = sizes
        .iter()
        .zip(&data)
        .map(|(&s, v)| kernels::MapNhwc {
            data: v,
            height: s,
            width: s,
        })
        .collect();
    let bias = values(d, 5);
    let mut out = vec![0f32; 128 * 128 * d];
    c.bench_function("decode_head_upsample_sum_relu", |b| {
        b.iter(|| kernels::upsample_sum_nhwc(black_box(&maps), d, 128, 128, &bias, true, &mut out).unwrap())
    });
}

/// Attention at SegFormer-B0's four stage shapes at 512x512 (queries, keys after spatial reduction, heads, width):
/// the fused f32 kernel and the int8-dyn one. Run with `SEGQ_SIMD=avx2` to time the AVX2-only int8 path.
fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    for (queries, keys, heads, width) in [
        (16384, 256, 1, 32),
        (4096, 256, 2, 64),
        (1024, 256, 5, 160),
        (256, 256, 8, 256),
    ] {
        let shape = AttentionShape {
            batch: 1,
            queries,
            keys,
            heads,
            head_dim: width / heads,
        };
        let (q, k, v) = (
            values(queries * width, 1),
            values(keys * width, 2),
            values(keys * width, 3),
        );
        let mut out = vec![0f32; queries * width];
        let id = format!("{queries}x{keys}x{width}");
        g.bench_function(BenchmarkId::new("f32_fused", &id), |b| {
            b.iter(|| attention(&q, &k, &v, shape, &mut out).expect("attention"))
        });
        g.bench_function(BenchmarkId::new("int8_dynamic", &id), |b| {
            b.iter(|| attention_i8(&q, &k, &v, shape, &mut out).expect("attention_i8"))
        });
    }
    g.finish();
}

/// Every Linear of one B0 encoder block per stage (q, k, v, output, dense1, dense2) in f32 and W8A8.
fn bench_block_linears(c: &mut Criterion) {
    let mut g = c.benchmark_group("block_linears");
    for (tokens, keys, width) in [(16384, 256, 32), (4096, 256, 64), (1024, 256, 160), (256, 256, 256)] {
        let shapes = [
            (tokens, width, width),
            (keys, width, width),
            (keys, width, width),
            (tokens, width, width),
            (tokens, width, 4 * width),
            (tokens, 4 * width, width),
        ];
        let inputs: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(rows, k, n))| {
                let codes: Vec<i8> = (0..n * k).map(|j| (((j * 31 + i) % 255) as i32 - 127) as i8).collect();
                let packed = I8Panels::pack(&codes, &vec![0.01; n], n, k).expect("pack");
                (
                    rows,
                    k,
                    n,
                    values(rows * k, i as u64),
                    values(n * k, 9 + i as u64),
                    packed,
                )
            })
            .collect();
        let id = format!("{tokens}x{width}");
        g.bench_function(BenchmarkId::new("f32", &id), |b| {
            b.iter(|| {
                for (rows, k, n, x, w, _) in &inputs {
                    linear_f32(x, *rows, *k, w, *n, None, None).expect("linear");
                }
            })
        });
        g.bench_function(BenchmarkId::new("int8_dynamic", &id), |b| {
            b.iter(|| {
                for (rows, k, n, x, _, p) in &inputs {
                    let mut out = vec![0f32; rows * n];
                    gemm_i8_dynamic(x, *rows, *k, p, None, &mut out).expect("gemm_i8");
                }
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = bench_dwconv, bench_gemm, bench_softmax, bench_upsample_sum, bench_attention, bench_block_linears }
criterion_main!(benches);
