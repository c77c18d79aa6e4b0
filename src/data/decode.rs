//! Image decoding as Pillow does it (temporary).
use crate::{Error, Result};
use std::path::Path;
pub fn read_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let is_jpeg = bytes.starts_with(&[0xFF, 0xD8]);
    if is_jpeg {
        return turbojpeg::decompress_image::<image::Rgb<u8>>(&bytes)
            .map_err(|e| Error::Data(format!("{}: cannot decode JPEG: {e}", path.display())));
    }
    let img = image::load_from_memory(&bytes)
        .map_err(|e| Error::Data(format!("{}: cannot decode image: {e}", path.display())))?;
    Ok(img.to_rgb8())
}
