//! segq's activation type in the hot path: channels-last tokens in a plain `Vec<f32>`, which every layer and kernel
//! reads and writes as slices. Candle tensors appear only at the model's edges (NCHW pixels in, NCHW logits out),
//! where checkpoints are read, and in the reference forward of the decode head that tests compare against.

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Activations `[batch, height * width, channels]`, row-major: one row of `channels` values per pixel (a token).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    data: Vec<f32>,
    batch: usize,
    height: usize,
    width: usize,
    channels: usize,
}

impl Tokens {
    pub fn new(data: Vec<f32>, batch: usize, height: usize, width: usize, channels: usize) -> Result<Tokens> {
        if data.len() != batch * height * width * channels {
            return Err(Error::internal(format!(
                "{} values for tokens [{batch}, {height}x{width}, {channels}]",
                data.len()
            )));
        }
        Ok(Tokens {
            data,
            batch,
            height,
            width,
            channels,
        })
    }

    /// Tokens of the same batch and map size with other values per pixel (a layer's output).
    pub fn with_channels(&self, data: Vec<f32>, channels: usize) -> Result<Tokens> {
        Tokens::new(data, self.batch, self.height, self.width, channels)
    }

    /// From an NCHW tensor `[B, C, H, W]` (transformers' layout of pixels and stage maps).
    pub fn from_nchw(x: &Tensor) -> Result<Tokens> {
        let (batch, channels, height, width) = x.dims4()?;
        let plane = height * width;
        let mut data = vec![0f32; x.elem_count()];
        with_f32(x, |src| {
            for (image, dst) in src
                .chunks_exact(channels * plane)
                .zip(data.chunks_exact_mut(channels * plane))
            {
                for (c, channel) in image.chunks_exact(plane).enumerate() {
                    for (p, &v) in channel.iter().enumerate() {
                        dst[p * channels + c] = v;
                    }
                }
            }
            Ok(())
        })?;
        Tokens::new(data, batch, height, width, channels)
    }

    /// `[B, C, H, W]`, transformers' layout.
    pub fn to_nchw(&self) -> Result<Tensor> {
        let (plane, c) = (self.height * self.width, self.channels);
        let mut out = vec![0f32; self.data.len()];
        for (image, dst) in self.data.chunks_exact(plane * c).zip(out.chunks_exact_mut(plane * c)) {
            for (p, px) in image.chunks_exact(c).enumerate() {
                for (ch, &v) in px.iter().enumerate() {
                    dst[ch * plane + p] = v;
                }
            }
        }
        Ok(Tensor::from_vec(
            out,
            (self.batch, c, self.height, self.width),
            &Device::Cpu,
        )?)
    }

    /// `[B, H*W, C]` as a tensor (transformers' sequence layout).
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.batch, self.height * self.width, self.channels),
            &Device::Cpu,
        )?)
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Image `b` of the batch, `[H*W, C]`.
    pub fn image(&self, b: usize) -> &[f32] {
        let n = self.height * self.width * self.channels;
        &self.data[b * n..(b + 1) * n]
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Tokens in the batch: `batch * height * width` rows of `channels`.
    pub fn rows(&self) -> usize {
        self.batch * self.height * self.width
    }
}

/// Runs `f` on the tensor's f32 values in row-major order, borrowing them when the tensor is contiguous (a
/// non-contiguous tensor is copied once).
pub(crate) fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::unsupported(format!("tensor of shape {:?}", x.dims()), "not contiguous"))?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => f(&cpu.as_slice::<f32>()?[start..end]),
        _ => Err(Error::unsupported(
            format!("tensor of shape {:?}", x.dims()),
            "not on the CPU",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nchw_round_trip() {
        let v: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32).collect();
        let x = Tensor::from_vec(v, (2, 3, 4, 5), &Device::Cpu).unwrap();
        let t = Tokens::from_nchw(&x).unwrap();
        assert_eq!((t.batch(), t.height(), t.width(), t.channels()), (2, 4, 5, 3));
        // Pixel (b=1, y=2, x=3), channel 1 is NCHW element ((1 * 3 + 1) * 4 + 2) * 5 + 3.
        assert_eq!(t.image(1)[(2 * 5 + 3) * 3 + 1], (((3 + 1) * 4 + 2) * 5 + 3) as f32);
        let back = t.to_nchw().unwrap();
        assert_eq!(back.dims(), x.dims());
        let same = |a: &Tensor| a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(same(&back), same(&x));
        let seq = x.flatten_from(2).unwrap().transpose(1, 2).unwrap();
        assert_eq!(same(&t.to_tensor().unwrap()), same(&seq.contiguous().unwrap()));
        assert!(Tokens::new(vec![0.0; 5], 1, 2, 2, 1).is_err());
    }
}
