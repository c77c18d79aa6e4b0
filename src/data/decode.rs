//! Turning the stored bytes of one example into pixels, the way Pillow (and so `datasets` and transformers) sees
//! them: images become 8-bit RGB (`.convert("RGB")`), masks stay single-channel 8-bit values.
//!
//! JPEG goes through libjpeg-turbo (the `turbojpeg` crate), which decodes bit-identically to Pillow; PNG images go
//! through the `image` crate; PNG masks through the `png` crate directly, so that palette masks give their raw
//! indices (as Pillow's mode P does) rather than colours.

use std::io::Cursor;

use image::{DynamicImage, GrayImage, RgbImage};

use super::Problem;

/// Decodes an image (JPEG or PNG) to RGB. Errors are one short line, without the location (the caller adds it).
pub fn decode_image(bytes: &[u8], jpeg: &mut Option<turbojpeg::Decompressor>) -> Result<RgbImage, Problem> {
    match sniff(bytes) {
        Format::Jpeg => decode_jpeg(bytes, jpeg),
        Format::Png => decode_png_image(bytes),
        Format::Other => Err(format!("image is neither JPEG nor PNG ({})", describe_start(bytes)).into()),
    }
}

/// Decodes a PNG annotation to its 8-bit values: greyscale values, or palette indices for palette PNGs.
pub fn decode_mask(bytes: &[u8]) -> Result<GrayImage, Problem> {
    if sniff(bytes) != Format::Png {
        return Err(format!("annotation is not a PNG ({})", describe_start(bytes)).into());
    }
    let mut decoder = png::Decoder::new(Cursor::new(bytes));
    // IDENTITY: no palette expansion, no tRNS alpha, no bit-depth scaling: we want the stored values.
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| format!("annotation PNG: {e}"))?;
    let (width, height, color, depth) = {
        let info = reader.info();
        (info.width, info.height, info.color_type, info.bit_depth)
    };
    let size = reader.output_buffer_size().ok_or("annotation PNG: image too large")?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("annotation PNG: {e}"))?;
    let bits = depth as u8;
    let supported = match color {
        png::ColorType::Grayscale => bits == 8,
        png::ColorType::Indexed => bits <= 8,
        _ => false,
    };
    if !supported {
        return Err(format!(
            "annotation PNG must be 8-bit greyscale or palette (one value per pixel), found {color:?} {bits}-bit"
        )
        .into());
    }
    let (w, h) = (width as usize, height as usize);
    let mut values = Vec::with_capacity(w * h);
    let per_byte = 8 / bits as usize;
    for row in buf[..frame.buffer_size()].chunks(frame.line_size).take(h) {
        if bits == 8 {
            values.extend_from_slice(&row[..w]);
        } else {
            // Palette indices packed most significant bits first.
            let mask = (1u8 << bits) - 1;
            values.extend((0..w).map(|x| {
                let shift = 8 - bits as usize * (x % per_byte + 1);
                (row[x / per_byte] >> shift) & mask
            }));
        }
    }
    GrayImage::from_raw(width, height, values).ok_or_else(|| "annotation PNG: truncated pixel data".into())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    Other,
}

fn sniff(bytes: &[u8]) -> Format {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Format::Jpeg
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Format::Png
    } else {
        Format::Other
    }
}

fn describe_start(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "0 bytes".into();
    }
    let head: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{} bytes starting {}", bytes.len(), head.join(" "))
}

fn decode_jpeg(bytes: &[u8], slot: &mut Option<turbojpeg::Decompressor>) -> Result<RgbImage, Problem> {
    match decode_jpeg_with(bytes, slot) {
        Ok((image, false)) => Ok(image),
        other => {
            // libjpeg leaves a decompressor that reported a problem in a state that fails the next image.
            *slot = None;
            other.map(|(image, _)| image)
        }
    }
}

/// Decodes with the given (or a new) decompressor; the flag says a libjpeg warning was ignored.
fn decode_jpeg_with(bytes: &[u8], slot: &mut Option<turbojpeg::Decompressor>) -> Result<(RgbImage, bool), Problem> {
    if slot.is_none() {
        *slot = Some(turbojpeg::Decompressor::new().map_err(|e| format!("cannot start the JPEG decoder: {e}"))?);
    }
    let decoder = slot.as_mut().ok_or("JPEG decoder unavailable")?;
    let header = decoder
        .read_header(bytes)
        .map_err(|e| format!("JPEG header: {}", jpeg_message(&e)))?;
    if matches!(
        header.colorspace,
        turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
    ) {
        return Err(format!(
            "JPEG in {:?} colour space is not supported (only RGB/YCbCr/greyscale)",
            header.colorspace
        )
        .into());
    }
    let (w, h) = (header.width, header.height);
    let mut pixels = vec![
        0u8;
        w.checked_mul(h)
            .and_then(|n| n.checked_mul(3))
            .ok_or("JPEG dimensions overflow")?
    ];
    let out = turbojpeg::Image {
        pixels: &mut pixels[..],
        width: w,
        pitch: w * 3,
        height: h,
        format: turbojpeg::PixelFormat::RGB,
    };
    let mut warned = false;
    if let Err(e) = decoder.decompress(bytes, out) {
        let message = jpeg_message(&e);
        // TurboJPEG reports libjpeg warnings as errors. Pillow ignores "Corrupt JPEG data: ..." warnings (the image
        // still loads) but refuses truncated files; do the same.
        if message.starts_with("Corrupt JPEG data") {
            tracing::debug!("JPEG warning ignored as Pillow does: {message}");
            warned = true;
        } else if message.contains("Premature end of JPEG file") {
            return Err(format!("JPEG is truncated ({message})").into());
        } else {
            return Err(format!("JPEG: {message}").into());
        }
    }
    let image = RgbImage::from_raw(w as u32, h as u32, pixels).ok_or("JPEG: bad dimensions")?;
    Ok((image, warned))
}

fn jpeg_message(e: &turbojpeg::Error) -> String {
    match e {
        turbojpeg::Error::TurboJpegError(m) => m.trim().to_string(),
        other => other.to_string(),
    }
}

fn decode_png_image(bytes: &[u8]) -> Result<RgbImage, Problem> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).map_err(|e| format!("PNG: {e}"))?;
    Ok(match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        // Pillow reads 16-bit RGB(A) PNGs as 8-bit by keeping the high byte of each sample.
        DynamicImage::ImageRgb16(rgb) => high_bytes(rgb.width(), rgb.height(), rgb.pixels().map(|p| p.0)),
        DynamicImage::ImageRgba16(rgba) => high_bytes(
            rgba.width(),
            rgba.height(),
            rgba.pixels().map(|p| [p.0[0], p.0[1], p.0[2]]),
        ),
        DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_) => {
            return Err("16-bit greyscale PNG images are not supported".into());
        }
        // L, LA, RGBA, palette (expanded by the decoder): replicate grey, drop alpha, as Pillow's convert("RGB").
        other => other.to_rgb8(),
    })
}

fn high_bytes(w: u32, h: u32, pixels: impl Iterator<Item = [u16; 3]>) -> RgbImage {
    let data: Vec<u8> = pixels.flat_map(|p| p.map(|v| (v >> 8) as u8)).collect();
    RgbImage::from_raw(w, h, data).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Reads and decodes an image file to RGB (for `segq predict` and other single-image uses); errors name the file.
pub fn read_rgb(path: &std::path::Path) -> crate::Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| crate::Error::io(path, e))?;
    decode_image(&bytes, &mut None).map_err(|e| crate::Error::invalid(path.display().to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn palette_png(width: u32, height: u32, bits: png::BitDepth, indices: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, width, height);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(bits);
            enc.set_palette((0..16u8).flat_map(|i| [i * 10, 255 - i, 7]).collect::<Vec<u8>>());
            let mut w = enc.write_header().unwrap();
            w.write_image_data(indices).unwrap();
        }
        out
    }

    #[test]
    fn grey_and_alpha_pngs_convert_like_pillow() {
        let grey = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 40 + y * 7) as u8]));
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageLuma8(grey.clone())), &mut None).unwrap();
        for (x, y, p) in rgb.enumerate_pixels() {
            let v = grey.get_pixel(x, y).0[0];
            assert_eq!(p.0, [v, v, v]);
        }
        let rgba = image::RgbaImage::from_fn(2, 2, |x, y| image::Rgba([x as u8 * 100, y as u8 * 50, 9, 17]));
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageRgba8(rgba.clone())), &mut None).unwrap();
        for (x, y, p) in rgb.enumerate_pixels() {
            let q = rgba.get_pixel(x, y).0;
            assert_eq!(p.0, [q[0], q[1], q[2]], "alpha is dropped, not blended");
        }
    }

    #[test]
    fn sixteen_bit_rgb_keeps_high_byte() {
        let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(2, 1, |x, _| {
            image::Rgb([0x1280 + x as u16, 0xFFFF, 0x00FF])
        });
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageRgb16(img)), &mut None).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [0x12, 0xFF, 0x00]);
    }

    #[test]
    fn palette_masks_give_indices_not_colours() {
        let indices = [0u8, 1, 2, 3, 15, 14, 7, 8];
        let bytes = palette_png(4, 2, png::BitDepth::Eight, &indices);
        assert_eq!(decode_mask(&bytes).unwrap().into_raw(), indices);
        // 4-bit palette, 3 pixels wide: packed two per byte, last nibble is padding.
        let packed = [0x12, 0x30, 0xFE, 0xD0];
        let bytes = palette_png(3, 2, png::BitDepth::Four, &packed);
        assert_eq!(decode_mask(&bytes).unwrap().into_raw(), vec![1, 2, 3, 15, 14, 13]);
    }

    #[test]
    fn grey_masks_keep_values_and_colour_masks_are_refused() {
        let grey = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(x + 10 * y) as u8]));
        let got = decode_mask(&png_bytes(&DynamicImage::ImageLuma8(grey.clone()))).unwrap();
        assert_eq!(got, grey);
        let rgb = DynamicImage::ImageRgb8(image::RgbImage::new(2, 2));
        let e = decode_mask(&png_bytes(&rgb)).unwrap_err().to_string();
        assert!(e.contains("8-bit greyscale or palette") && e.contains("Rgb"), "{e}");
        let e = decode_mask(b"GIF89a....").unwrap_err().to_string();
        assert!(e.contains("not a PNG") && e.contains("47 49 46 38"), "{e}");
    }

    #[test]
    fn jpeg_round_trip_and_corruption() {
        let img = image::RgbImage::from_fn(160, 96, |x, y| {
            image::Rgb([(x * 6 % 256) as u8, ((x + 2 * y) / 2) as u8, (y * 10 % 256) as u8])
        });
        let jpeg = turbojpeg::compress_image(&img, 90, turbojpeg::Subsamp::Sub2x2)
            .unwrap()
            .to_vec();
        let mut dec = None;
        let first = decode_image(&jpeg, &mut dec).unwrap();
        assert_eq!(first.dimensions(), (160, 96));
        let total: u64 = first
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum();
        let mean = total as f64 / img.as_raw().len() as f64;
        assert!(mean < 12.0, "decoded JPEG far from source: mean difference {mean}");
        let e = decode_image(&jpeg[..jpeg.len() * 3 / 4], &mut dec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("JPEG is truncated"), "{e}");
        assert!(dec.is_none(), "a decoder that saw an error is dropped");
        assert!(decode_image(&jpeg, &mut dec).unwrap() == first);
        let e = decode_image(&jpeg[..20], &mut dec).unwrap_err().to_string();
        assert!(e.starts_with("JPEG"), "{e}");
        let e = decode_image(b"\xFF\xD8\xFF junk", &mut dec).unwrap_err().to_string();
        assert!(e.starts_with("JPEG header"), "{e}");
        // The same decoder slot still decodes a good image identically afterwards.
        assert!(decode_image(&jpeg, &mut dec).unwrap() == first);
        let e = decode_image(b"", &mut dec).unwrap_err().to_string();
        assert!(e.contains("0 bytes"), "{e}");
    }
}
