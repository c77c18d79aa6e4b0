//! Class masks as pictures: a fixed palette of distinct colours, coloured masks, masks blended over the input
//! image, class-id PNGs (the form W&B and most tools read), and the worst images' side-by-side overlays.

use std::path::Path;

use image::{ImageBuffer, Luma, Rgb, RgbImage};

use crate::eval::worst::{WorstImage, WorstOfLevel, WorstPixels};
use crate::{Error, Result};

/// Number of distinct colours in the palette; class ids repeat colours beyond it.
pub const PALETTE_SIZE: usize = 7 * 7 * 6;

/// Colour of class `id`: a point of a 7 x 7 x 6 grid over the RGB cube (any two colours differ by at least 42
/// in one channel), visited in a scrambled order (`id * 101 + 37` modulo the grid size, 101 being coprime to
/// it) so that neighbouring ids, which are often related classes, get very different colours.
/// Fixed forever: the same class has the same colour in every run and every legend.
pub fn class_color(id: usize) -> [u8; 3] {
    const SEVEN_LEVELS: [u8; 7] = [0, 42, 85, 128, 170, 213, 255];
    const SIX_LEVELS: [u8; 6] = [0, 51, 102, 153, 204, 255];
    let cell = (id % PALETTE_SIZE * 101 + 37) % PALETTE_SIZE;
    [
        SEVEN_LEVELS[cell % 7],
        SEVEN_LEVELS[cell / 7 % 7],
        SIX_LEVELS[cell / 49],
    ]
}

/// The first `num_labels` colours of [`class_color`], for legends.
pub fn palette(num_labels: usize) -> Vec<[u8; 3]> {
    (0..num_labels).map(class_color).collect()
}

fn check_size(mask: &[u16], width: u32, height: u32) -> Result<()> {
    let expected = width as usize * height as usize;
    if mask.len() != expected {
        // The mask is flat: its shape is its pixel count.
        return Err(Error::shape_mismatch(
            "mask",
            &[height as usize, width as usize],
            &[mask.len()],
        ));
    }
    Ok(())
}

/// The mask (row-major class ids) drawn in palette colours.
pub fn colorize(mask: &[u16], width: u32, height: u32) -> Result<RgbImage> {
    check_size(mask, width, height)?;
    let mut image = RgbImage::new(width, height);
    for (pixel, &class) in image.pixels_mut().zip(mask) {
        *pixel = Rgb(class_color(usize::from(class)));
    }
    Ok(image)
}

/// `image` with the coloured mask blended over it: `alpha` 0 shows only the image, 1 only the mask.
pub fn overlay(image: &RgbImage, mask: &[u16], alpha: f32) -> Result<RgbImage> {
    let (width, height) = image.dimensions();
    check_size(mask, width, height)?;
    let alpha = alpha.clamp(0.0, 1.0);
    // The blend depends only on (channel value, tint value), and the palette has 11 distinct tint values: a
    // 256-entry table per tint, filled with the same arithmetic, replaces three roundings per pixel.
    let mut colors: Vec<Option<[u8; 3]>> = Vec::new();
    let mut tables: Vec<Option<Box<[u8; 256]>>> = vec![None; 256];
    let mut blended = image.clone();
    for (pixel, &class) in blended.pixels_mut().zip(mask) {
        let class = usize::from(class);
        if class >= colors.len() {
            colors.resize(class + 1, None);
        }
        let color = *colors[class].get_or_insert_with(|| class_color(class));
        for (channel, tint) in pixel.0.iter_mut().zip(color) {
            let table = tables[usize::from(tint)].get_or_insert_with(|| Box::new(blend_table(tint, alpha)));
            *channel = table[usize::from(*channel)];
        }
    }
    Ok(blended)
}

/// `v * (1 - alpha) + tint * alpha`, rounded, for every 8-bit `v`.
fn blend_table(tint: u8, alpha: f32) -> [u8; 256] {
    std::array::from_fn(|v| blend(v as u8, tint, alpha))
}

/// One channel of [`overlay`]'s blend: the plain reference its tables are filled from.
fn blend(value: u8, tint: u8, alpha: f32) -> u8 {
    (f32::from(value) * (1.0 - alpha) + f32::from(tint) * alpha).round() as u8
}

/// Saves the class ids as a greyscale PNG: 8-bit when `num_labels <= 256` (what W&B masks require), 16-bit
/// otherwise, so the format depends on the model, never on which classes one image happens to contain.
pub fn save_mask_png(mask: &[u16], width: u32, height: u32, num_labels: usize, path: &Path) -> Result<()> {
    check_size(mask, width, height)?;
    let saved = if num_labels <= 256 {
        let bytes = mask
            .iter()
            .map(|&class| {
                u8::try_from(class).map_err(|_| {
                    Error::invalid(
                        path.display().to_string(),
                        format!("class id {class} does not fit an 8-bit mask"),
                    )
                })
            })
            .collect::<Result<Vec<u8>>>()?;
        ImageBuffer::<Luma<u8>, _>::from_raw(width, height, bytes).map(|m| m.save(path))
    } else {
        ImageBuffer::<Luma<u16>, _>::from_raw(width, height, mask.to_vec()).map(|m| m.save(path))
    };
    match saved {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(Error::write(path, format!("cannot write mask PNG: {e}"))),
        None => Err(Error::internal(format!(
            "{}: mask buffer does not match {width}x{height}",
            path.display()
        ))),
    }
}

/// Writes what `segq predict` writes for one image besides its logits: the class-id mask PNG at `mask_path` and the
/// mask blended over the image (alpha 0.5) at `overlay_path`, each through a temporary file renamed into place.
pub fn write_prediction_pngs(
    image: &RgbImage,
    mask: &[u16],
    num_labels: usize,
    mask_path: &Path,
    overlay_path: &Path,
) -> Result<()> {
    let (width, height) = image.dimensions();
    // The two files are independent: encoded on both threads at once.
    let (mask_written, overlay_written) = rayon::join(
        || crate::outputs::write_atomically(mask_path, |tmp| save_mask_png(mask, width, height, num_labels, tmp)),
        || {
            let blended = overlay(image, mask, 0.5)?;
            crate::outputs::write_atomically(overlay_path, |tmp| {
                blended
                    .save(tmp)
                    .map_err(|e| Error::write(overlay_path, format!("cannot write: {e}")))
            })
        },
    );
    mask_written.and(overlay_written)
}

/// Saves each sample's overlay per level under `dir/<level>/<id>.png`, plus the image with its ground truth once
/// under `dir/ground_truth/`.
pub fn save_sample_overlays(samples: &[crate::eval::Sample], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    let save = |image: RgbImage, folder: &Path, id: &str| -> Result<std::path::PathBuf> {
        std::fs::create_dir_all(folder).map_err(|e| Error::io(folder, e))?;
        let path = folder.join(format!("{id}.png"));
        image.save(&path).map_err(|e| Error::write(&path, e.to_string()))?;
        Ok(path)
    };
    for sample in samples {
        let truth: Vec<u16> = sample.label.as_raw().iter().map(|&v| v as u16).collect();
        written.push(save(
            overlay(&sample.image, &truth, 0.5)?,
            &dir.join("ground_truth"),
            &sample.id,
        )?);
        for (label, pred) in &sample.predictions {
            written.push(save(overlay(&sample.image, pred, 0.5)?, &dir.join(label), &sample.id)?);
        }
    }
    Ok(written)
}

/// Longest side of one panel of a worst-image overlay: small images are enlarged (nearest neighbour, so
/// pixels stay sharp) and large ones reduced, so every overlay reads the same.
const WORST_PANEL: u32 = 320;
/// Heights of the header (two lines of text) and of each panel's title.
const WORST_HEADER: u32 = 58;
const WORST_TITLE: u32 = 26;
const WORST_GAP: u32 = 8;
/// Colour of the pixels whose prediction differs from the reference's.
const DISAGREE: [u8; 3] = [230, 0, 40];

/// One worst image as a picture: a header naming the level, the image and its loss (not its rank, which the file
/// name carries: a merge copies a shard's picture to another rank), then four panels side by side: the
/// image, the reference prediction over it, the level's prediction over it, and where the two disagree (red on
/// the dimmed image; pixels that are not scored are darkened with a checker pattern).
pub fn worst_overlay(
    pixels: &WorstPixels,
    image: &WorstImage,
    level_label: &str,
    reference_label: &str,
) -> Result<RgbImage> {
    let (width, height) = pixels.image.dimensions();
    check_size(&pixels.reference, width, height)?;
    check_size(&pixels.prediction, width, height)?;
    if pixels.scored.dimensions() != (width, height) {
        return Err(Error::shape_mismatch(
            "scored-pixel mask",
            &[height as usize, width as usize],
            &[pixels.scored.height() as usize, pixels.scored.width() as usize],
        ));
    }
    let panels = [
        ("image".to_string(), pixels.image.clone()),
        (
            format!("{reference_label} (reference)"),
            overlay(&pixels.image, &pixels.reference, 0.55)?,
        ),
        (
            level_label.to_string(),
            overlay(&pixels.image, &pixels.prediction, 0.55)?,
        ),
    ];
    let scale = f64::from(WORST_PANEL) / f64::from(width.max(height));
    let panel_w = ((f64::from(width) * scale).round() as u32).max(1);
    let panel_h = ((f64::from(height) * scale).round() as u32).max(1);
    let filter = if scale >= 1.0 {
        image::imageops::FilterType::Nearest
    } else {
        image::imageops::FilterType::Triangle
    };
    let mut panels: Vec<(String, RgbImage)> = panels
        .into_iter()
        .map(|(title, panel)| (title, image::imageops::resize(&panel, panel_w, panel_h, filter)))
        .collect();
    panels.push((
        "red: differs, checkered: not scored".to_string(),
        difference_panel(pixels, panel_w, panel_h),
    ));
    let total_w = WORST_GAP + panels.len() as u32 * (panel_w + WORST_GAP);
    let total_h = WORST_HEADER + WORST_TITLE + panel_h + WORST_GAP;
    let mut canvas = RgbImage::from_pixel(total_w, total_h, Rgb([255, 255, 255]));
    for (i, (_, panel)) in panels.iter().enumerate() {
        let x = WORST_GAP + i as u32 * (panel_w + WORST_GAP);
        image::imageops::replace(&mut canvas, panel, i64::from(x), i64::from(WORST_HEADER + WORST_TITLE));
    }
    let header = [
        format!("{level_label}: {} (row {})", image.id, image.index),
        format!(
            "{:.2}% of scored pixels differ from {reference_label} ({} of {})",
            image.loss * 100.0,
            image.disagreeing_pixels,
            image.pixels
        ),
    ];
    let titles: Vec<(u32, &str)> = panels
        .iter()
        .enumerate()
        .map(|(i, (title, _))| (WORST_GAP + i as u32 * (panel_w + WORST_GAP), title.as_str()))
        .collect();
    draw_text(&mut canvas, &header, &titles, panel_w)
        .map_err(|e| Error::internal(format!("cannot draw the worst-image caption: {e}")))?;
    Ok(canvas)
}

/// Where the predictions differ, drawn at the panel's size: an output pixel is red when any scored source pixel
/// it covers differs (so a single differing pixel of a large image stays visible when reduced), else the dimmed
/// grey image, with a checker pattern over pixels that are not scored.
fn difference_panel(pixels: &WorstPixels, panel_w: u32, panel_h: u32) -> RgbImage {
    let (width, height) = pixels.image.dimensions();
    let span = |out: u32, out_size: u32, size: u32| {
        let start = (u64::from(out) * u64::from(size) / u64::from(out_size)) as u32;
        let end = ((u64::from(out + 1) * u64::from(size) / u64::from(out_size)) as u32).max(start + 1);
        start..end.min(size)
    };
    RgbImage::from_fn(panel_w, panel_h, |ox, oy| {
        let (xs, ys) = (span(ox, panel_w, width), span(oy, panel_h, height));
        let differs = ys.clone().any(|y| {
            xs.clone().any(|x| {
                let at = (y * width + x) as usize;
                pixels.scored.get_pixel(x, y).0[0] != 0 && pixels.reference[at] != pixels.prediction[at]
            })
        });
        if differs {
            return Rgb(DISAGREE);
        }
        let (x, y) = (xs.start, ys.start);
        let [r, g, b] = pixels.image.get_pixel(x, y).0;
        let grey = (f32::from(r) * 0.3 + f32::from(g) * 0.59 + f32::from(b) * 0.11) as u8;
        if pixels.scored.get_pixel(x, y).0[0] != 0 {
            Rgb([grey / 2 + 64; 3])
        } else if (ox / 5 + oy / 5) % 2 == 0 {
            Rgb([90, 90, 90])
        } else {
            Rgb([grey / 5; 3])
        }
    })
}

/// Writes the header lines and the panel titles onto `canvas` with the embedded font.
fn draw_text(
    canvas: &mut RgbImage,
    header: &[String],
    titles: &[(u32, &str)],
    panel_w: u32,
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    crate::report::plots::register_font();
    let (width, height) = canvas.dimensions();
    let family = crate::report::plots::FAMILY;
    let root = BitMapBackend::with_buffer(canvas.as_mut(), (width, height)).into_drawing_area();
    for (line, text) in header.iter().enumerate() {
        let size = if line == 0 { 20 } else { 17 };
        let style = (family, size).into_font().color(&BLACK);
        root.draw(&Text::new(
            text.clone(),
            (WORST_GAP as i32, 6 + 26 * line as i32),
            style,
        ))
        .map_err(|e| e.to_string())?;
    }
    for (x, title) in titles {
        // Titles longer than their panel are cut, so neighbours never overlap.
        let style = (family, 15).into_font().color(&BLACK);
        let mut text = title.to_string();
        while text.chars().count() > 3 && root.estimate_text_size(&text, &style).map_or(0, |(w, _)| w) > panel_w {
            text.pop();
            text.pop();
            text.push('…');
        }
        root.draw(&Text::new(text, (*x as i32, WORST_HEADER as i32 + 4), style))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

/// Saves every worst image's overlay at its listed path under `dir` (the results folder). Entries without pixels
/// (carried over from an interrupted run) are skipped.
pub fn save_worst_overlays(worst: &[WorstOfLevel], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut written = Vec::new();
    for level in worst {
        for entry in &level.entries {
            let (Some(pixels), Some(relative)) = (&entry.pixels, &entry.image.overlay) else {
                continue;
            };
            let picture = worst_overlay(pixels, &entry.image, &level.label, &level.reference_label)?;
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            picture.save(&path).map_err(|e| Error::write(&path, e.to_string()))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Removes the `.png` files directly in `folder` (segq's own overlays from an earlier run), if it exists.
pub(crate) fn clear_pngs(folder: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(folder, e))?.path();
        if path.extension().is_some_and(|e| e == "png") && path.is_file() {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table-driven overlay equals the blend formula per pixel, for every channel value, many classes (past the
    /// palette's size) and several alphas.
    #[test]
    fn overlay_equals_the_per_pixel_blend() {
        let (width, height) = (256u32, 3u32);
        let image = RgbImage::from_fn(width, height, |x, y| {
            Rgb([x as u8, (x as u8).wrapping_mul(7), y as u8 * 90])
        });
        let mask: Vec<u16> = (0..width * height).map(|i| (i * 37 % 700) as u16).collect();
        for alpha in [0.0, 0.3, 0.5, 0.55, 1.0] {
            let got = overlay(&image, &mask, alpha).unwrap();
            for (i, (pixel, want)) in got.pixels().zip(image.pixels()).enumerate() {
                let tint = class_color(usize::from(mask[i]));
                let want: Vec<u8> = (0..3).map(|c| blend(want.0[c], tint[c], alpha)).collect();
                assert_eq!(pixel.0.to_vec(), want, "pixel {i}, alpha {alpha}");
            }
        }
    }

    #[test]
    fn palette_colours_are_distinct_and_far_apart() {
        let colours = palette(PALETTE_SIZE);
        let distance = |a: &[u8; 3], b: &[u8; 3]| -> i32 {
            a.iter()
                .zip(b)
                .map(|(&x, &y)| (i32::from(x) - i32::from(y)).abs())
                .sum()
        };
        for (i, a) in colours.iter().enumerate() {
            for (j, b) in colours.iter().enumerate().skip(i + 1) {
                assert!(distance(a, b) >= 42, "classes {i} and {j} look alike: {a:?} vs {b:?}");
            }
        }
        for pair in colours.windows(2) {
            assert!(
                distance(&pair[0], &pair[1]) >= 200,
                "neighbouring ids too alike: {pair:?}"
            );
        }
        assert_eq!(class_color(7), palette(8)[7]);
        assert_eq!(class_color(PALETTE_SIZE + 3), class_color(3));
    }

    #[test]
    fn colorize_and_overlay_blend_as_specified() {
        let mask = [0u16, 1, 2, 3, 4, 5];
        let coloured = colorize(&mask, 3, 2).unwrap();
        assert_eq!(coloured.get_pixel(2, 1).0, class_color(5));
        let image = RgbImage::from_pixel(3, 2, Rgb([100, 0, 200]));
        assert_eq!(overlay(&image, &mask, 0.0).unwrap(), image);
        assert_eq!(overlay(&image, &mask, 1.0).unwrap(), coloured);
        let half = overlay(&image, &mask, 0.5).unwrap();
        let c = class_color(1);
        let expected = [
            (100.0 + f32::from(c[0])) / 2.0,
            f32::from(c[1]) / 2.0,
            (200.0 + f32::from(c[2])) / 2.0,
        ];
        assert_eq!(half.get_pixel(1, 0).0, expected.map(|v| v.round() as u8));
        assert!(colorize(&mask, 4, 2).is_err());
        assert!(overlay(&image, &mask[..5], 0.5).is_err());
    }

    #[test]
    fn worst_overlay_shows_four_panels_and_marks_the_differences() {
        let (w, h) = (40u32, 30u32);
        let image = RgbImage::from_fn(w, h, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, 120]));
        let reference: Vec<u16> = (0..w * h).map(|i| (i % w / 10) as u16).collect();
        let mut prediction = reference.clone();
        // The left half of the top row differs; one pixel of it is not scored.
        prediction[..20].iter_mut().for_each(|c| *c = 7);
        let scored = image::GrayImage::from_fn(w, h, |x, y| image::Luma([if (x, y) == (3, 0) { 0 } else { 255 }]));
        let pixels = WorstPixels {
            image,
            scored,
            reference,
            prediction,
        };
        let entry = WorstImage {
            index: 12,
            id: "SYN_val_00000013".into(),
            pixels: u64::from(w * h) - 1,
            disagreeing_pixels: 19,
            loss: 19.0 / 1199.0,
            pixel_agreement: 1.0 - 19.0 / 1199.0,
            overlay: None,
        };
        let picture = worst_overlay(&pixels, &entry, "int2-rtn-g32", "f32").unwrap();
        // Panels of 320 x 240 (the longest side enlarged to WORST_PANEL), four side by side under the captions.
        assert_eq!(picture.width(), WORST_GAP + 4 * (320 + WORST_GAP));
        assert_eq!(picture.height(), WORST_HEADER + WORST_TITLE + 240 + WORST_GAP);
        let panel_x = |i: u32| WORST_GAP + i * (320 + WORST_GAP);
        let top = WORST_HEADER + WORST_TITLE;
        // In the difference panel, source pixel (x, 0) is an 8 x 8 block: red where the classes differ.
        assert_eq!(picture.get_pixel(panel_x(3) + 8 * 10 + 4, top + 4).0, DISAGREE);
        assert_ne!(picture.get_pixel(panel_x(3) + 8 * 30 + 4, top + 4).0, DISAGREE);
        assert_ne!(
            picture.get_pixel(panel_x(3) + 8 * 3 + 4, top + 4).0,
            DISAGREE,
            "not scored: not red"
        );
        // The caption was drawn: dark pixels in the header.
        let dark = (0..picture.width())
            .flat_map(|x| (0..WORST_HEADER).map(move |y| (x, y)))
            .filter(|&(x, y)| picture.get_pixel(x, y).0.iter().all(|&c| c < 80))
            .count();
        assert!(dark > 200, "{dark} dark pixels in the header");
        // Reduced 1000 x 20 -> 320 x 6: the one differing pixel still shows.
        let wide = WorstPixels {
            image: RgbImage::new(1000, 20),
            scored: image::GrayImage::from_pixel(1000, 20, image::Luma([255])),
            reference: vec![1; 20_000],
            prediction: (0..20_000).map(|i| if i == 10 * 1000 + 777 { 2 } else { 1 }).collect(),
        };
        let panel = difference_panel(&wide, 320, 6);
        let red: Vec<(u32, u32)> = panel
            .enumerate_pixels()
            .filter(|p| p.2.0 == DISAGREE)
            .map(|p| (p.0, p.1))
            .collect();
        assert_eq!(red, [(248, 3)], "777 * 320 / 1000 = 248, 10 * 6 / 20 = 3");
        let mut bad = pixels.clone();
        bad.prediction.pop();
        assert!(worst_overlay(&bad, &entry, "int2", "f32").is_err());
    }

    #[test]
    fn mask_png_round_trips_in_8_and_16_bits() {
        let dir = std::env::temp_dir().join(format!("segq-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mask: Vec<u16> = (0..12).map(|i| i * 20).collect();
        let small = dir.join("small.png");
        save_mask_png(&mask, 4, 3, 150, &small).unwrap();
        let read = image::open(&small).unwrap();
        assert_eq!(read.color(), image::ColorType::L8);
        assert_eq!(
            read.to_luma8().into_raw(),
            mask.iter().map(|&v| v as u8).collect::<Vec<_>>()
        );

        let wide: Vec<u16> = (0..12).map(|i| i * 300).collect();
        let large = dir.join("large.png");
        save_mask_png(&wide, 4, 3, 4000, &large).unwrap();
        let read = image::open(&large).unwrap();
        assert_eq!(read.color(), image::ColorType::L16);
        assert_eq!(read.to_luma16().into_raw(), wide);

        let error = save_mask_png(&wide, 4, 3, 150, &dir.join("bad.png"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("class id 300"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
