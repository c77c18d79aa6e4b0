//! Colour overlays and mask PNGs (temporary).
use crate::{Error, Result};
use image::{GrayImage, RgbImage};
use std::path::Path;
pub fn colorize(mask: &[u16], w: usize, h: usize) -> RgbImage {
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let c = mask[y as usize * w + x as usize] as u32;
        image::Rgb([
            (c * 67 % 256) as u8,
            (c * 131 % 256) as u8,
            (c * 199 % 256) as u8,
        ])
    })
}
pub fn overlay(image: &RgbImage, mask: &[u16], alpha: f32) -> RgbImage {
    let colors = colorize(mask, image.width() as usize, image.height() as usize);
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let a = image.get_pixel(x, y).0;
        let b = colors.get_pixel(x, y).0;
        image::Rgb(
            [0, 1, 2].map(|i| (a[i] as f32 * (1.0 - alpha) + b[i] as f32 * alpha).round() as u8),
        )
    })
}
pub fn save_mask_png(mask: &[u16], w: usize, h: usize, path: &Path) -> Result<()> {
    let img = GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([mask[y as usize * w + x as usize] as u8])
    });
    img.save(path)
        .map_err(|e| Error::Report(format!("{}: {e}", path.display())))
}
