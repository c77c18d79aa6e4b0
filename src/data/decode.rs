//! Turning the stored bytes of one example into pixels, the way Pillow (and so `datasets` and transformers) sees
//! them: images become 8-bit RGB (`ImageOps.exif_transpose(im).convert("RGB")`), masks stay single-channel 8-bit
//! values. Sizes are checked from the file's header before any pixel buffer is allocated.
//!
//! JPEG goes through libjpeg with its default settings (accurate integer IDCT, fancy upsampling), as Pillow, which
//! bundles libjpeg-turbo, decodes it: the libjpeg-turbo-derived code that `mozjpeg-sys` compiles with the C compiler
//! alone (no cmake), called through its TurboJPEG API. nasm, when installed, adds the SIMD code Pillow's build has:
//! the same pixels, except in the damaged blocks of a corrupt file that Pillow still loads (with a warning), which
//! only the SIMD code decodes exactly as Pillow. PNG goes through the `png` crate with no transformations, so that
//! every conversion to RGB is written here, as Pillow's `convert("RGB")` does it (16-bit samples, low bit depths,
//! palettes, alpha dropped). Masks keep their stored values: palette masks give their raw indices (as Pillow's mode P
//! does) rather than colours.

use std::io::Cursor;
use std::path::Path;

use image::{GrayImage, ImageBuffer, Pixel, RgbImage};
use serde::Serialize;

use super::Problem;
use crate::limits::DEFAULT_MAX_IMAGE_PIXELS;

/// How images and masks are decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DecodeOptions {
    /// Images (and masks) with more pixels than this are refused from their header, before decoding.
    pub max_image_pixels: u64,
    /// Turn images and masks upright as their EXIF Orientation tag says (Pillow's `exif_transpose`, which
    /// `datasets`' Image feature and transformers' `load_image` apply).
    pub exif_orientation: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            exif_orientation: true,
        }
    }
}

impl DecodeOptions {
    /// Refuses a `width x height` image above the pixel limit (checked before anything is allocated for it).
    fn check_size(&self, width: u64, height: u64) -> Result<(), Problem> {
        let pixels = width.saturating_mul(height);
        if pixels > self.max_image_pixels {
            return Err(format!(
                "{width}x{height} = {pixels} pixels is over the limit of {} pixels (a decompression bomb, or a \
                 genuinely huge image: raise the limit with --max-image-pixels or dataset.max_image_pixels)",
                self.max_image_pixels
            )
            .into());
        }
        Ok(())
    }

    /// The largest file segq reads for one image or mask: the size of its pixels stored uncompressed at 16-bit RGBA,
    /// plus room for metadata. Anything bigger cannot be an image under the limit, so it is not read into memory.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_image_pixels.saturating_mul(8).saturating_add(64 << 20)
    }
}

/// Decodes an image (JPEG or PNG) to RGB. Errors are one short line, without the location (the caller adds it).
pub fn decode_image(
    bytes: &[u8],
    jpeg: &mut Option<JpegDecoder>,
    options: &DecodeOptions,
) -> Result<RgbImage, Problem> {
    let (image, orientation) = match sniff(bytes) {
        Format::Jpeg => (decode_jpeg(bytes, jpeg, options)?, jpeg_orientation(bytes)),
        Format::Png => decode_png_image(bytes, options)?,
        Format::Other => return Err(format!("image is neither JPEG nor PNG ({})", describe_start(bytes)).into()),
    };
    Ok(if options.exif_orientation {
        orient(image, orientation)
    } else {
        image
    })
}

/// Decodes a PNG annotation to its 8-bit values: greyscale values, or palette indices for palette PNGs.
pub fn decode_mask(bytes: &[u8], options: &DecodeOptions) -> Result<GrayImage, Problem> {
    if sniff(bytes) != Format::Png {
        return Err(format!("annotation is not a PNG ({})", describe_start(bytes)).into());
    }
    let png = read_png(bytes, options).map_err(|e| format!("annotation {e}"))?;
    let bits = png.depth as u8;
    let supported = match png.color {
        png::ColorType::Grayscale => bits == 8,
        png::ColorType::Indexed => bits <= 8,
        _ => false,
    };
    if !supported {
        return Err(format!(
            "annotation PNG must be 8-bit greyscale or palette (one value per pixel), found {:?} {bits}-bit",
            png.color
        )
        .into());
    }
    let (w, h) = (png.width as usize, png.height as usize);
    let mut values = Vec::with_capacity(w * h);
    for row in png.rows() {
        values.extend((0..w).map(|x| sample(row, x, bits)));
    }
    let mask = GrayImage::from_raw(png.width, png.height, values).ok_or("annotation PNG: truncated pixel data")?;
    // `datasets` decodes annotation columns with the same Image feature as images, so they are transposed too.
    Ok(if options.exif_orientation {
        orient(mask, png.orientation)
    } else {
        mask
    })
}

/// Reads and decodes an image file to RGB with the default options (tests, examples); see [`read_rgb_with`].
pub fn read_rgb(path: &Path) -> crate::Result<RgbImage> {
    read_rgb_with(path, &DecodeOptions::default())
}

/// Reads and decodes an image file to RGB (for `segq predict` and other single-image uses); errors name the file.
pub fn read_rgb_with(path: &Path, options: &DecodeOptions) -> crate::Result<RgbImage> {
    let bytes =
        read_file(path, options).map_err(|e| crate::Error::invalid(path.display().to_string(), e.to_string()))?;
    decode_image(&bytes, &mut None, options)
        .map_err(|e| crate::Error::invalid(path.display().to_string(), e.to_string()))
}

/// Reads an image or mask file whole, refusing what is not a regular file before opening it (a FIFO would block
/// forever, a device would never end) and files larger than any image under the pixel limit.
pub fn read_file(path: &Path, options: &DecodeOptions) -> Result<Vec<u8>, FileProblem> {
    // metadata follows symlinks: a link to a regular file is fine, a dangling one is NotFound.
    let meta = std::fs::metadata(path).map_err(FileProblem::Io)?;
    if !meta.is_file() {
        return Err(FileProblem::NotRegular(file_kind(&meta)));
    }
    if meta.len() > options.max_file_bytes() {
        return Err(FileProblem::TooLarge(meta.len()));
    }
    std::fs::read(path).map_err(FileProblem::Io)
}

/// Why a file could not be read.
#[derive(Debug)]
pub enum FileProblem {
    Io(std::io::Error),
    /// A FIFO, socket, device or folder, named like an image.
    NotRegular(&'static str),
    TooLarge(u64),
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Io(e) => write!(f, "{}", crate::error::IoCause(e)),
            FileProblem::NotRegular(kind) => write!(f, "not a regular file (a {kind}); not opened"),
            FileProblem::TooLarge(bytes) => write!(
                f,
                "the file is {}, larger than any image under the pixel limit (--max-image-pixels)",
                crate::limits::human_bytes(*bytes)
            ),
        }
    }
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "folder"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
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

// ---------------------------------------------------------------------------------------------------------- JPEG

fn decode_jpeg(bytes: &[u8], slot: &mut Option<JpegDecoder>, options: &DecodeOptions) -> Result<RgbImage, Problem> {
    match decode_jpeg_with(bytes, slot, options) {
        Ok((image, false)) => Ok(image),
        other => {
            // libjpeg leaves a decompressor that reported a problem in a state that fails the next image.
            *slot = None;
            other.map(|(image, _)| image)
        }
    }
}

/// Decodes with the given (or a new) decompressor; the flag says a libjpeg warning was ignored.
fn decode_jpeg_with(
    bytes: &[u8],
    slot: &mut Option<JpegDecoder>,
    options: &DecodeOptions,
) -> Result<(RgbImage, bool), Problem> {
    if slot.is_none() {
        *slot = Some(JpegDecoder::new()?);
    }
    let decoder = slot.as_mut().ok_or("JPEG decoder unavailable")?;
    let header = decoder
        .read_header(bytes)
        .map_err(|message| format!("JPEG header: {message}"))?;
    let (w, h) = (header.width, header.height);
    options
        .check_size(w as u64, h as u64)
        .map_err(|e| format!("JPEG {e}"))?;
    // Pillow opens 4-component JPEGs as CMYK (libjpeg turns YCCK into CMYK) and reads them Adobe-inverted.
    let (format, channels) = if header.cmyk {
        (turbojpeg_api::TJPF_CMYK, 4)
    } else {
        (turbojpeg_api::TJPF_RGB, 3)
    };
    let mut pixels = vec![0u8; w * h * channels];
    let mut warned = false;
    if let Err(message) = decoder.decompress(bytes, &mut pixels, (w, h), format, channels) {
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
    if header.cmyk {
        pixels = inverted_cmyk_to_rgb(&pixels);
    }
    let image = RgbImage::from_raw(w as u32, h as u32, pixels).ok_or("JPEG: bad dimensions")?;
    Ok((image, warned))
}

/// A JPEG decompressor, kept by each decoding thread across images (starting one allocates libjpeg's state).
pub struct JpegDecoder {
    handle: std::ptr::NonNull<std::ffi::c_void>,
}

// A TurboJPEG handle holds no thread-local state: it may move between threads, used by one at a time (`&mut self`).
unsafe impl Send for JpegDecoder {}

/// What the frame header says: the size, and whether the pixels are 4-component CMYK or YCCK.
struct JpegHeader {
    width: usize,
    height: usize,
    cmyk: bool,
}

impl JpegDecoder {
    fn new() -> Result<Self, Problem> {
        // SAFETY: no arguments; a null handle is the failure, with its message in the library's thread-local string.
        let handle = unsafe { turbojpeg_api::tjInitDecompress() };
        match std::ptr::NonNull::new(handle) {
            Some(handle) => Ok(JpegDecoder { handle }),
            None => Err(format!("cannot start the JPEG decoder: {}", error_text(handle)).into()),
        }
    }

    fn read_header(&mut self, bytes: &[u8]) -> Result<JpegHeader, String> {
        let size = std::ffi::c_ulong::try_from(bytes.len()).map_err(|_| "file too large".to_string())?;
        let (mut width, mut height, mut subsampling, mut colorspace) = (0, 0, -1, -1);
        // SAFETY: the handle is live; the buffer and its length come from one slice; the outputs are plain ints.
        let status = unsafe {
            turbojpeg_api::tjDecompressHeader3(
                self.handle.as_ptr(),
                bytes.as_ptr(),
                size,
                &mut width,
                &mut height,
                &mut subsampling,
                &mut colorspace,
            )
        };
        if status != 0 {
            let message = error_text(self.handle.as_ptr());
            // TurboJPEG 2 refuses sampling factors outside its named layouts (4:1:0, 3x1, mixed chroma) after it
            // has read the whole header and filled in the size; libjpeg (and so Pillow) decodes them, and so does
            // tjDecompress2, which does not look at the layout.
            let unnamed_layout = message.contains("Could not determine subsampling type") && width > 0 && height > 0;
            if !unnamed_layout {
                return Err(message);
            }
        }
        Ok(JpegHeader {
            width: width as usize,
            height: height as usize,
            cmyk: matches!(colorspace, turbojpeg_api::TJCS_CMYK | turbojpeg_api::TJCS_YCCK),
        })
    }

    /// Decodes the whole image at full size into `pixels` (`width * height * channels` bytes of `format`).
    fn decompress(
        &mut self,
        bytes: &[u8],
        pixels: &mut [u8],
        (width, height): (usize, usize),
        format: std::ffi::c_int,
        channels: usize,
    ) -> Result<(), String> {
        let too_large = || "image too large for the JPEG decoder".to_string();
        let size = std::ffi::c_ulong::try_from(bytes.len()).map_err(|_| too_large())?;
        let pitch = std::ffi::c_int::try_from(width * channels).map_err(|_| too_large())?;
        let (c_width, c_height) = (
            std::ffi::c_int::try_from(width).map_err(|_| too_large())?,
            std::ffi::c_int::try_from(height).map_err(|_| too_large())?,
        );
        if pixels.len() != width * height * channels {
            return Err("pixel buffer does not match the image size".into());
        }
        // SAFETY: the handle is live; `pixels` holds `height` rows of `pitch` bytes, and the decoder writes no more
        // (it scales to fit within width x height, and these are the image's own size); flags 0 keep libjpeg's
        // defaults (accurate integer IDCT, fancy upsampling), as Pillow uses them.
        let status = unsafe {
            turbojpeg_api::tjDecompress2(
                self.handle.as_ptr(),
                bytes.as_ptr(),
                size,
                pixels.as_mut_ptr(),
                c_width,
                pitch,
                c_height,
                format,
                0,
            )
        };
        if status != 0 {
            return Err(error_text(self.handle.as_ptr()));
        }
        Ok(())
    }
}

impl Drop for JpegDecoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitDecompress and is destroyed once, here.
        unsafe { turbojpeg_api::tjDestroy(self.handle.as_ptr()) };
    }
}

/// The library's message for the last failure of `handle` (or of starting one, for a null handle), trimmed.
fn error_text(handle: *mut std::ffi::c_void) -> String {
    // SAFETY: tjGetErrorStr2 accepts any handle or null and returns a NUL-terminated string it owns, copied at once.
    let text = unsafe { turbojpeg_api::tjGetErrorStr2(handle) };
    if text.is_null() {
        return "unknown JPEG decoder error".into();
    }
    unsafe { std::ffi::CStr::from_ptr(text) }
        .to_string_lossy()
        .trim()
        .to_string()
}

/// The few TurboJPEG 2 functions and constants segq uses, from the static library `mozjpeg-sys` builds (its
/// `turbojpeg_api` feature), declared as in its turbojpeg.h.
mod turbojpeg_api {
    use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void};

    // Names the crate so that its static library is linked.
    use mozjpeg_sys as _;

    pub const TJPF_RGB: c_int = 0;
    pub const TJPF_CMYK: c_int = 11;
    pub const TJCS_CMYK: c_int = 3;
    pub const TJCS_YCCK: c_int = 4;

    unsafe extern "C" {
        pub fn tjInitDecompress() -> *mut c_void;
        pub fn tjDecompressHeader3(
            handle: *mut c_void,
            jpeg: *const c_uchar,
            jpeg_size: c_ulong,
            width: *mut c_int,
            height: *mut c_int,
            subsampling: *mut c_int,
            colorspace: *mut c_int,
        ) -> c_int;
        pub fn tjDecompress2(
            handle: *mut c_void,
            jpeg: *const c_uchar,
            jpeg_size: c_ulong,
            pixels: *mut c_uchar,
            width: c_int,
            pitch: c_int,
            height: c_int,
            pixel_format: c_int,
            flags: c_int,
        ) -> c_int;
        pub fn tjGetErrorStr2(handle: *mut c_void) -> *mut c_char;
        pub fn tjDestroy(handle: *mut c_void) -> c_int;
    }
}

/// Pillow's CMYK JPEG path: unpack as "CMYK;I" (Adobe polarity: stored 0 is full ink), then `cmyk2rgb`:
/// each channel is `(255 - k) - round((c * (255 - k)) / 255)` with Pillow's integer rounding.
fn inverted_cmyk_to_rgb(stored: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(stored.len() / 4 * 3);
    for px in stored.chunks_exact(4) {
        let nk = px[3] as u32; // 255 - (255 - stored k)
        for &s in &px[..3] {
            let ink = 255 - s as u32;
            rgb.push(nk.saturating_sub(muldiv255(ink, nk)) as u8);
        }
    }
    rgb
}

/// The EXIF orientation of a JPEG as Pillow finds it: the Exif APP1 segments (concatenated, as Pillow does), else
/// `tiff:Orientation` in the XMP APP1 segment. 1 (as stored) when there is none or it cannot be read.
fn jpeg_orientation(bytes: &[u8]) -> u16 {
    let mut exif: Vec<u8> = Vec::new();
    let mut xmp: Option<&[u8]> = None;
    let mut at = 2; // after SOI
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            break;
        }
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        // Start of scan (or end of image): the metadata segments are all before it.
        if marker == 0xDA || marker == 0xD9 {
            break;
        }
        let length = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
        let Some(segment) = bytes.get(at + 4..at + 2 + length.max(2)) else {
            break;
        };
        if marker == 0xE1 {
            if let Some(rest) = segment.strip_prefix(b"Exif\0\0") {
                // The first segment keeps its header (Pillow strips it when parsing); later ones are appended bare.
                if exif.is_empty() {
                    exif.extend_from_slice(segment);
                } else {
                    exif.extend_from_slice(rest);
                }
            } else if let Some(rest) = segment.strip_prefix(b"http://ns.adobe.com/xap/1.0/\0") {
                xmp = Some(rest);
            }
        }
        at += 2 + length;
    }
    exif_orientation(&exif)
        .or_else(|| xmp.and_then(xmp_orientation))
        .unwrap_or(1)
}

// ----------------------------------------------------------------------------------------------------------- PNG

/// A decoded PNG, as stored: rows of packed samples, with what is needed to convert them.
struct RawPng {
    width: u32,
    height: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    palette: Vec<u8>,
    data: Vec<u8>,
    line_size: usize,
    orientation: u16,
}

impl RawPng {
    fn rows(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks(self.line_size.max(1)).take(self.height as usize)
    }
}

/// Metadata chunks (text, ICC) may use this much memory while the header is read; pixel data is sized separately.
const PNG_METADATA_BYTES: usize = 64 << 20;

/// Decodes a PNG with no transformation, after checking its size from the IHDR chunk.
fn read_png(bytes: &[u8], options: &DecodeOptions) -> Result<RawPng, Problem> {
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: PNG_METADATA_BYTES,
        },
    );
    // IDENTITY: no palette expansion, no tRNS alpha, no bit-depth scaling: conversions are done here, as Pillow does.
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(|e| format!("PNG: {e}"))?;
    let (width, height, color, depth) = {
        let info = reader.info();
        (info.width, info.height, info.color_type, info.bit_depth)
    };
    options
        .check_size(width as u64, height as u64)
        .map_err(|e| format!("PNG {e}"))?;
    let size = reader.output_buffer_size().ok_or("PNG: image too large")?;
    let mut data = vec![0u8; size];
    let frame = reader.next_frame(&mut data).map_err(|e| format!("PNG: {e}"))?;
    data.truncate(frame.buffer_size());
    // Chunks after the image data (an eXIf may be there) are read as Pillow's load() reads them; a damaged tail
    // only loses that metadata, as in Pillow.
    let _ = reader.finish();
    let info = reader.info();
    Ok(RawPng {
        width,
        height,
        color,
        depth,
        palette: info.palette.as_deref().unwrap_or(&[]).to_vec(),
        line_size: frame.line_size,
        orientation: if options.exif_orientation {
            png_orientation(info)
        } else {
            1
        },
        data,
    })
}

/// Sample `x` of a row of `bits`-bit samples (1, 2, 4 packed most significant bits first, or 8).
fn sample(row: &[u8], x: usize, bits: u8) -> u8 {
    if bits == 8 {
        return row[x];
    }
    let per_byte = 8 / bits as usize;
    let shift = 8 - bits as usize * (x % per_byte + 1);
    (row[x / per_byte] >> shift) & ((1u8 << bits) - 1)
}

/// A PNG as Pillow's `convert("RGB")` gives it (image crate conversions differ for 16-bit grey, so none are used).
fn decode_png_image(bytes: &[u8], options: &DecodeOptions) -> Result<(RgbImage, u16), Problem> {
    let png = read_png(bytes, options)?;
    let w = png.width as usize;
    let mut rgb = Vec::with_capacity(w * png.height as usize * 3);
    let bits = png.depth as u8;
    for row in png.rows() {
        match (png.color, bits) {
            // Pillow mode "1" / "L;2" / "L;4" / "L": low depths are scaled to 0..255 (1-bit 0/255, 2-bit x85, 4-bit x17).
            (png::ColorType::Grayscale, 1 | 2 | 4 | 8) => {
                let scale = 255 / ((1u16 << bits) - 1) as u8;
                rgb.extend((0..w).flat_map(|x| [sample(row, x, bits) * scale; 3]));
            }
            // Pillow mode "I;16": convert("RGB") clips values above 255 to 255 (it does not scale).
            (png::ColorType::Grayscale, 16) => rgb.extend(row.chunks_exact(2).take(w).flat_map(|s| {
                let v = if s[0] == 0 { s[1] } else { 255 };
                [v; 3]
            })),
            // Pillow reads 16-bit colour and grey+alpha PNGs as 8-bit by keeping each sample's high byte.
            (png::ColorType::GrayscaleAlpha, 8 | 16) => {
                let step = 2 * bits as usize / 8;
                rgb.extend(row.chunks_exact(step).take(w).flat_map(|p| [p[0]; 3]));
            }
            (png::ColorType::Rgb, 8 | 16) | (png::ColorType::Rgba, 8 | 16) => {
                let channels = if png.color == png::ColorType::Rgb { 3 } else { 4 };
                let bytes_per_sample = bits as usize / 8;
                rgb.extend(
                    row.chunks_exact(channels * bytes_per_sample)
                        .take(w)
                        .flat_map(|p| [p[0], p[bytes_per_sample], p[2 * bytes_per_sample]]),
                );
            }
            // Palette: indices past the palette's end are black, as in Pillow; tRNS alpha is dropped.
            (png::ColorType::Indexed, 1 | 2 | 4 | 8) => rgb.extend((0..w).flat_map(|x| {
                let i = sample(row, x, bits) as usize * 3;
                png.palette.get(i..i + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]])
            })),
            (color, bits) => return Err(format!("PNG: unsupported {color:?} {bits}-bit").into()),
        }
    }
    let image = RgbImage::from_raw(png.width, png.height, rgb).ok_or("PNG: truncated pixel data")?;
    Ok((image, png.orientation))
}

/// Bytes of zTXt/iTXt text decompressed to look for metadata: XMP packets are a few KiB.
const PNG_TEXT_BYTES: usize = 4 << 20;

/// The EXIF orientation of a PNG as Pillow finds it: the eXIf chunk, else an ImageMagick "Raw profile type exif"
/// text chunk, else `tiff:Orientation` in the "XML:com.adobe.xmp" iTXt chunk. 1 when there is none.
fn png_orientation(info: &png::Info) -> u16 {
    if let Some(exif) = &info.exif_metadata {
        return exif_orientation(exif).unwrap_or(1);
    }
    let mut raw_profile: Option<String> = None;
    let mut xmp: Option<String> = None;
    for t in &info.uncompressed_latin1_text {
        if t.keyword == "Raw profile type exif" && raw_profile.is_none() {
            raw_profile = Some(t.text.clone());
        }
    }
    for t in &info.compressed_latin1_text {
        if t.keyword == "Raw profile type exif" && raw_profile.is_none() {
            let mut t = t.clone();
            raw_profile = t
                .decompress_text_with_limit(PNG_TEXT_BYTES)
                .ok()
                .and_then(|_| t.get_text().ok());
        }
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        let text = t
            .decompress_text_with_limit(PNG_TEXT_BYTES)
            .ok()
            .and_then(|_| t.get_text().ok());
        match t.keyword.as_str() {
            "XML:com.adobe.xmp" => xmp = xmp.or(text),
            "Raw profile type exif" => raw_profile = raw_profile.or(text),
            _ => {}
        }
    }
    if let Some(profile) = raw_profile {
        // "\nexif\n  LENGTH\nHEX HEX ...": Pillow joins the lines after the third and reads them as hex.
        let hex: String = profile.split('\n').skip(3).collect::<String>();
        if let Some(exif) = from_hex(&hex) {
            return exif_orientation(&exif).unwrap_or(1);
        }
        return 1;
    }
    xmp.and_then(|x| xmp_orientation(x.as_bytes())).unwrap_or(1)
}

/// Python's `bytes.fromhex`: pairs of hex digits, ASCII whitespace allowed between pairs.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

// ----------------------------------------------------------------------------------------------------------- EXIF

/// The Orientation tag (0x0112) of IFD0 in an EXIF block (a TIFF structure, optionally behind "Exif\0\0"), parsed
/// by hand: only that one tag is needed, and every offset read is bounds-checked. `None` when there is no such tag
/// or the block is malformed (Pillow raises on some malformed blocks; segq then keeps the image as stored).
fn exif_orientation(exif: &[u8]) -> Option<u16> {
    let mut tiff = exif;
    // Pillow strips one or two "Exif\0\0" headers.
    for _ in 0..2 {
        if let Some(rest) = tiff.strip_prefix(b"Exif\0\0") {
            tiff = rest;
        }
    }
    let big_endian = match tiff.get(..4)? {
        b"II*\0" => false,
        b"MM\0*" => true,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = u32_at(4)? as usize;
    let entries = u16_at(ifd)? as usize;
    for i in 0..entries {
        let entry = ifd.checked_add(2 + 12 * i)?;
        if u16_at(entry)? != 0x0112 {
            continue;
        }
        let (kind, count) = (u16_at(entry + 2)?, u32_at(entry + 4)?);
        // A single value, stored in the entry itself: SHORT (the standard type), LONG or BYTE.
        return match (kind, count) {
            (3, 1) => u16_at(entry + 8),
            (4, 1) => u32_at(entry + 8).and_then(|v| u16::try_from(v).ok()),
            (1, 1) => tiff.get(entry + 8).map(|&b| b as u16),
            _ => None,
        };
    }
    None
}

/// `tiff:Orientation="N"` or `<tiff:Orientation>N</tiff:Orientation>` in an XMP packet, as Pillow's regular
/// expression `tiff:Orientation(="|>)([0-9])` finds it.
fn xmp_orientation(xmp: &[u8]) -> Option<u16> {
    let key = b"tiff:Orientation";
    let mut from = 0;
    while let Some(pos) = xmp[from..].windows(key.len()).position(|w| w == key) {
        let after = from + pos + key.len();
        let digit = match xmp.get(after..after + 2) {
            Some([b'=', b'"']) => xmp.get(after + 2),
            Some([b'>', d]) => Some(d),
            _ => None,
        };
        if let Some(d) = digit.filter(|d| d.is_ascii_digit()) {
            return Some((d - b'0') as u16);
        }
        from = after;
    }
    None
}

/// Applies an EXIF orientation as Pillow's `exif_transpose` does (values other than 2..=8 leave the image alone).
fn orient<P: Pixel<Subpixel = u8> + 'static>(
    image: ImageBuffer<P, Vec<u8>>,
    orientation: u16,
) -> ImageBuffer<P, Vec<u8>> {
    use image::imageops::{flip_horizontal, flip_vertical, rotate90, rotate180, rotate270};
    match orientation {
        2 => flip_horizontal(&image),             // FLIP_LEFT_RIGHT
        3 => rotate180(&image),                   // ROTATE_180
        4 => flip_vertical(&image),               // FLIP_TOP_BOTTOM
        5 => flip_horizontal(&rotate90(&image)),  // TRANSPOSE: out(x, y) = in(y, x)
        6 => rotate90(&image),                    // Pillow ROTATE_270 (counter-clockwise) is a clockwise quarter turn
        7 => flip_horizontal(&rotate270(&image)), // TRANSVERSE: out(x, y) = in(w-1-y, h-1-x)
        8 => rotate270(&image),                   // Pillow ROTATE_90 (counter-clockwise)
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::DynamicImage;

    fn opts() -> DecodeOptions {
        DecodeOptions::default()
    }

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
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageLuma8(grey.clone())), &mut None, &opts()).unwrap();
        for (x, y, p) in rgb.enumerate_pixels() {
            let v = grey.get_pixel(x, y).0[0];
            assert_eq!(p.0, [v, v, v]);
        }
        let rgba = image::RgbaImage::from_fn(2, 2, |x, y| image::Rgba([x as u8 * 100, y as u8 * 50, 9, 17]));
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageRgba8(rgba.clone())), &mut None, &opts()).unwrap();
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
        let rgb = decode_image(&png_bytes(&DynamicImage::ImageRgb16(img)), &mut None, &opts()).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [0x12, 0xFF, 0x00]);
    }

    #[test]
    fn palette_masks_give_indices_not_colours() {
        let indices = [0u8, 1, 2, 3, 15, 14, 7, 8];
        let bytes = palette_png(4, 2, png::BitDepth::Eight, &indices);
        assert_eq!(decode_mask(&bytes, &opts()).unwrap().into_raw(), indices);
        // 4-bit palette, 3 pixels wide: packed two per byte, last nibble is padding.
        let packed = [0x12, 0x30, 0xFE, 0xD0];
        let bytes = palette_png(3, 2, png::BitDepth::Four, &packed);
        assert_eq!(
            decode_mask(&bytes, &opts()).unwrap().into_raw(),
            vec![1, 2, 3, 15, 14, 13]
        );
    }

    #[test]
    fn grey_masks_keep_values_and_colour_masks_are_refused() {
        let grey = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(x + 10 * y) as u8]));
        let got = decode_mask(&png_bytes(&DynamicImage::ImageLuma8(grey.clone())), &opts()).unwrap();
        assert_eq!(got, grey);
        let rgb = DynamicImage::ImageRgb8(image::RgbImage::new(2, 2));
        let e = decode_mask(&png_bytes(&rgb), &opts()).unwrap_err().to_string();
        assert!(e.contains("8-bit greyscale or palette") && e.contains("Rgb"), "{e}");
        let e = decode_mask(b"GIF89a....", &opts()).unwrap_err().to_string();
        assert!(e.contains("not a PNG") && e.contains("47 49 46 38"), "{e}");
    }

    #[test]
    fn sizes_over_the_limit_are_refused_from_the_header() {
        let small = DecodeOptions {
            max_image_pixels: 100,
            ..opts()
        };
        let png = png_bytes(&DynamicImage::ImageLuma8(GrayImage::new(11, 10)));
        let e = decode_image(&png, &mut None, &small).unwrap_err().to_string();
        assert!(
            e.contains("11x10") && e.contains("limit of 100") && e.contains("--max-image-pixels"),
            "{e}"
        );
        let e = decode_mask(&png, &small).unwrap_err().to_string();
        assert!(e.contains("11x10"), "{e}");
        assert!(decode_mask(&png_bytes(&DynamicImage::ImageLuma8(GrayImage::new(10, 10))), &small).is_ok());
    }

    #[test]
    fn exif_blocks_are_read_safely() {
        let block = |order: &[u8], entry: &[u8]| [order, entry].concat();
        // Little-endian: IFD at 8, one entry, Orientation SHORT 1 = 6.
        let le = block(b"II*\0\x08\0\0\0", b"\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0");
        assert_eq!(exif_orientation(&le), Some(6));
        assert_eq!(exif_orientation(&[b"Exif\0\0".as_slice(), &le].concat()), Some(6));
        let be = block(b"MM\0*\0\0\0\x08", b"\0\x01\x01\x12\0\x03\0\0\0\x01\0\x03\0\0");
        assert_eq!(exif_orientation(&be), Some(3));
        // Truncated, offsets past the end, huge entry counts, wrong magic: no orientation, no panic.
        for n in 0..le.len() {
            assert!(exif_orientation(&le[..n]).is_none_or(|o| o == 6));
        }
        assert_eq!(exif_orientation(b"II*\0\xff\xff\xff\xff"), None);
        assert_eq!(exif_orientation(b"II*\0\x08\0\0\0\xff\xff"), None);
        assert_eq!(exif_orientation(b"XX*\0\x08\0\0\0"), None);
        assert_eq!(xmp_orientation(b"<a tiff:Orientation=\"8\"/>"), Some(8));
        assert_eq!(xmp_orientation(b"<tiff:Orientation>3</tiff:Orientation>"), Some(3));
        assert_eq!(xmp_orientation(b"tiff:Orientation"), None);
        // A JPEG whose segment lengths run past its end.
        assert_eq!(jpeg_orientation(b"\xff\xd8\xff\xe1\xff\xff Exif"), 1);
        assert_eq!(jpeg_orientation(b"\xff\xd8\xff\xe1\x00\x00\xff\xe1\x00\x01"), 1);
    }

    #[test]
    fn orientation_moves_pixels_as_pillow_transposes() {
        // 3x2 image, value = 10 * y + x; Pillow's results for each orientation, row by row.
        let img = GrayImage::from_fn(3, 2, |x, y| image::Luma([(10 * y + x) as u8]));
        let cases: [(u16, (u32, u32), &[u8]); 8] = [
            (1, (3, 2), &[0, 1, 2, 10, 11, 12]),
            (2, (3, 2), &[2, 1, 0, 12, 11, 10]),
            (3, (3, 2), &[12, 11, 10, 2, 1, 0]),
            (4, (3, 2), &[10, 11, 12, 0, 1, 2]),
            (5, (2, 3), &[0, 10, 1, 11, 2, 12]),
            (6, (2, 3), &[10, 0, 11, 1, 12, 2]),
            (7, (2, 3), &[12, 2, 11, 1, 10, 0]),
            (8, (2, 3), &[2, 12, 1, 11, 0, 10]),
        ];
        for (orientation, dims, values) in cases {
            let out = orient(img.clone(), orientation);
            assert_eq!(
                (out.dimensions(), out.as_raw().as_slice()),
                (dims, values),
                "orientation {orientation}"
            );
        }
    }

    /// A JPEG with the given luma sampling factors (chroma 1x1), from libjpeg's own compressor with libjpeg-turbo's
    /// defaults (no encoder segq has otherwise writes layouts such as 4:1:0 or 3x1).
    fn jpeg_with_luma_sampling(img: &RgbImage, factors: (i32, i32)) -> Vec<u8> {
        use mozjpeg_sys::*;
        let (w, h) = img.dimensions();
        // SAFETY: libjpeg's documented compression sequence on zeroed structs it initialises itself; the error
        // manager exits the process on failure (a test helper), rows are whole rows of `img`, and the output buffer
        // libjpeg allocates is copied and then freed.
        unsafe {
            let mut err: jpeg_error_mgr = std::mem::zeroed();
            let mut c: jpeg_compress_struct = std::mem::zeroed();
            c.common.err = jpeg_std_error(&mut err);
            jpeg_create_compress(&mut c);
            let (mut buffer, mut size): (*mut u8, std::ffi::c_ulong) = (std::ptr::null_mut(), 0);
            jpeg_mem_dest(&mut c, &mut buffer, &mut size);
            (c.image_width, c.image_height, c.input_components) = (w, h, 3);
            c.in_color_space = J_COLOR_SPACE::JCS_RGB;
            jpeg_c_set_int_param(
                &mut c,
                J_INT_PARAM::JINT_COMPRESS_PROFILE,
                JINT_COMPRESS_PROFILE_VALUE::JCP_FASTEST as i32,
            );
            jpeg_set_defaults(&mut c);
            (*c.comp_info).h_samp_factor = factors.0;
            (*c.comp_info).v_samp_factor = factors.1;
            jpeg_start_compress(&mut c, 1);
            while c.next_scanline < c.image_height {
                let rows = [img.as_raw().as_ptr().add(c.next_scanline as usize * w as usize * 3)];
                jpeg_write_scanlines(&mut c, rows.as_ptr() as JSAMPARRAY, 1);
            }
            jpeg_finish_compress(&mut c);
            let jpeg = std::slice::from_raw_parts(buffer, size as usize).to_vec();
            jpeg_destroy_compress(&mut c);
            libc::free(buffer.cast());
            jpeg
        }
    }

    #[test]
    fn jpegs_with_unnamed_sampling_layouts_decode() {
        let img = image::RgbImage::from_fn(61, 47, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
        });
        // 4:1:0 and 3x1 luma, which TurboJPEG 2's header reader cannot name; 2x2 (4:2:0) for comparison.
        for factors in [(4, 2), (3, 1), (2, 2)] {
            let jpeg = jpeg_with_luma_sampling(&img, factors);
            let decoded = decode_image(&jpeg, &mut None, &opts()).unwrap_or_else(|e| panic!("{factors:?}: {e}"));
            assert_eq!(decoded.dimensions(), (61, 47), "{factors:?}");
            let mean = mean_abs_difference(&decoded, &img);
            assert!(
                mean < 8.0,
                "{factors:?}: decoded JPEG far from source: mean difference {mean}"
            );
        }
    }

    /// Mean absolute difference per channel value between a decoded image and its source.
    fn mean_abs_difference(decoded: &image::RgbImage, source: &image::RgbImage) -> f64 {
        let total: u64 = decoded
            .as_raw()
            .iter()
            .zip(source.as_raw())
            .map(|(a, b)| a.abs_diff(*b) as u64)
            .sum();
        total as f64 / source.as_raw().len() as f64
    }

    #[test]
    fn jpeg_round_trip_and_corruption() {
        let img = image::RgbImage::from_fn(160, 96, |x, y| {
            image::Rgb([(x * 6 % 256) as u8, ((x + 2 * y) / 2) as u8, (y * 10 % 256) as u8])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .unwrap();
        let mut dec = None;
        let first = decode_image(&jpeg, &mut dec, &opts()).unwrap();
        assert_eq!(first.dimensions(), (160, 96));
        let mean = mean_abs_difference(&first, &img);
        assert!(mean < 12.0, "decoded JPEG far from source: mean difference {mean}");
        let e = decode_image(&jpeg[..jpeg.len() * 3 / 4], &mut dec, &opts())
            .unwrap_err()
            .to_string();
        assert!(e.contains("JPEG is truncated"), "{e}");
        assert!(dec.is_none(), "a decoder that saw an error is dropped");
        assert!(decode_image(&jpeg, &mut dec, &opts()).unwrap() == first);
        let e = decode_image(&jpeg[..20], &mut dec, &opts()).unwrap_err().to_string();
        assert!(e.starts_with("JPEG"), "{e}");
        let e = decode_image(b"\xFF\xD8\xFF junk", &mut dec, &opts())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("JPEG header"), "{e}");
        // The same decoder slot still decodes a good image identically afterwards.
        assert!(decode_image(&jpeg, &mut dec, &opts()).unwrap() == first);
        let e = decode_image(b"", &mut dec, &opts()).unwrap_err().to_string();
        assert!(e.contains("0 bytes"), "{e}");
    }
}
