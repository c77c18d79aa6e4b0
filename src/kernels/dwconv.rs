//! Depthwise 3x3 convolution (placeholder scalar version).
#[allow(clippy::too_many_arguments)]
pub fn dwconv3x3(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    weight: &[f32],
    bias: &[f32],
    fuse_gelu: bool,
    out: &mut [f32],
) {
    for c in 0..channels {
        let k = &weight[c * 9..c * 9 + 9];
        for y in 0..height {
            for x in 0..width {
                let mut acc = bias[c];
                for dy in 0..3 {
                    let yy = y as isize + dy as isize - 1;
                    if yy < 0 || yy >= height as isize {
                        continue;
                    }
                    for dx in 0..3 {
                        let xx = x as isize + dx as isize - 1;
                        if xx < 0 || xx >= width as isize {
                            continue;
                        }
                        acc += input[c * height * width + yy as usize * width + xx as usize]
                            * k[dy * 3 + dx];
                    }
                }
                if fuse_gelu {
                    acc = 0.5 * acc * (1.0 + libm_erf(acc / std::f32::consts::SQRT_2));
                }
                out[c * height * width + y * width + x] = acc;
            }
        }
    }
}
fn libm_erf(x: f32) -> f32 {
    let x = x as f64;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let y = 1.0
        - t * (-x * x - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398
                                    + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    (if x >= 0.0 { y } else { -y }) as f32
}
