//! Confidence intervals by a paired bootstrap over images: each resample draws as many images as were scored, with
//! replacement, the same draw for every level and for the reference row, and recomputes the dataset-level mIoU of
//! each from the per-image counts ([`crate::eval::per_image`]), so the resampled figure is the very metric of the
//! table. The 95% interval is the 2.5th and 97.5th percentile of the resampled values (numpy's linear
//! interpolation). Draws come from a fixed-seed SplitMix64 stream per resample over the images in index order, so
//! an interval depends on the seed, the number of resamples and the set of images only: not on threads, batch
//! order or sharding.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::shard::splitmix64;
use crate::eval::metrics::ClassAreas;
use crate::eval::per_image::ImageCounts;
use crate::eval::results::quantile;

/// The interval's coverage.
pub const CONFIDENCE: f64 = 0.95;

/// Most resamples a run may ask for (time grows linearly; 1,000 is the usual choice).
pub const MAX_RESAMPLES: usize = 100_000;

/// How a run's intervals are drawn: recorded in results.json, so that a merge draws them the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapSettings {
    /// Resamples of the images (0: no intervals, and no per-image counts are kept).
    pub resamples: usize,
    pub seed: u64,
}

/// One level's intervals, `[low, high]` as fractions (mIoU differences and agreement mIoU, like the point values).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LevelIntervals {
    /// mIoU of the level minus the reference row's, on the same resampled images.
    pub delta_miou: Option<[f64; 2]>,
    /// mIoU of the level's predictions against the reference row's predictions.
    pub agreement_miou: Option<[f64; 2]>,
}

/// The percentile interval of `values` at [`CONFIDENCE`]; `None` when there are none or one is not finite.
pub fn percentile_interval(values: &[f64]) -> Option<[f64; 2]> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let tail = (1.0 - CONFIDENCE) / 2.0;
    Some([quantile(values, tail), quantile(values, 1.0 - tail)])
}

/// One level's per-image counts laid out flat, image after image, for summing with multiplicities.
struct Flat {
    /// Image `i`'s groups are `classes[starts[i]..starts[i + 1]]` and the same range of `counts`.
    starts: Vec<usize>,
    classes: Vec<u32>,
    /// `[intersect, pred, label]`.
    counts: Vec<[u64; 3]>,
}

impl Flat {
    /// `None` when an image lacks the counts asked for (agreement of a row with none).
    fn new(images: &[ImageCounts], agreement: bool) -> Option<Flat> {
        let mut flat = Flat {
            starts: vec![0],
            classes: Vec::new(),
            counts: Vec::new(),
        };
        for image in images {
            let counts = if agreement {
                image.agreement.as_ref()?
            } else {
                &image.labels
            };
            for c in counts.classes() {
                flat.classes.push(c.class);
                flat.counts.push([c.intersect, c.pred, c.label]);
            }
            flat.starts.push(flat.classes.len());
        }
        Some(flat)
    }

    /// mIoU of the images drawn `times[i]` times each; `sums` is scratch space of one entry per class.
    fn mean_iou(&self, times: &[u32], sums: &mut [[u64; 3]]) -> f64 {
        sums.fill([0; 3]);
        for (image, &t) in times.iter().enumerate() {
            if t == 0 {
                continue;
            }
            let t = u64::from(t);
            let range = self.starts[image]..self.starts[image + 1];
            for (&class, counts) in self.classes[range.clone()].iter().zip(&self.counts[range]) {
                let sum = &mut sums[class as usize];
                sum[0] += counts[0] * t;
                sum[1] += counts[1] * t;
                sum[2] += counts[2] * t;
            }
        }
        let areas = ClassAreas {
            intersect: sums.iter().map(|s| s[0]).collect(),
            pred: sums.iter().map(|s| s[1]).collect(),
            label: sums.iter().map(|s| s[2]).collect(),
        };
        areas.mean_iou()
    }

    /// The mIoU of every resample, in resample order. Resamples run in parallel, each drawing its images from
    /// the seed alone, so the values do not depend on the thread count.
    fn resampled(&self, images: usize, num_labels: usize, settings: BootstrapSettings) -> Vec<f64> {
        (0..settings.resamples.min(MAX_RESAMPLES))
            .into_par_iter()
            .map_init(
                || vec![[0u64; 3]; num_labels],
                |sums, resample| self.mean_iou(&draw(settings.seed, resample, images), sums),
            )
            .collect()
    }
}

/// How many times resample `resample` draws each of `images` images: `images` draws, uniform, with replacement.
fn draw(seed: u64, resample: usize, images: usize) -> Vec<u32> {
    let mut state = seed;
    let mut state = splitmix64(&mut state) ^ (resample as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut times = vec![0u32; images];
    for _ in 0..images {
        // Lemire's multiply-shift maps 64 random bits onto 0..images (bias below 2^-40 for any real dataset).
        let pick = ((u128::from(splitmix64(&mut state)) * images as u128) >> 64) as usize;
        times[pick] += 1;
    }
    times
}

/// The intervals of every level in `levels` against `reference` (the reference row's per-image counts), paired:
/// the same draws for all. A level gets intervals when it scored exactly the reference's images (by index);
/// the reference row itself, passed as a level, gets a delta interval of `[0, 0]`. `None` entries (failed levels)
/// and an empty reference or `settings.resamples == 0` give no interval.
pub fn paired_intervals(
    reference: &[ImageCounts],
    levels: &[Option<&[ImageCounts]>],
    num_labels: usize,
    settings: BootstrapSettings,
) -> Vec<LevelIntervals> {
    let none = vec![LevelIntervals::default(); levels.len()];
    if reference.is_empty() || settings.resamples == 0 {
        return none;
    }
    let Some(reference_flat) = Flat::new(reference, false) else {
        return none;
    };
    let same_images = |images: &[ImageCounts]| {
        images.len() == reference.len() && images.iter().zip(reference).all(|(a, b)| a.index == b.index)
    };
    let flats: Vec<(Option<Flat>, Option<Flat>)> = levels
        .iter()
        .map(|images| match images {
            Some(images) if same_images(images) => (Flat::new(images, false), Flat::new(images, true)),
            _ => (None, None),
        })
        .collect();
    // Level by level, so that one level's counts stay in cache; every level redraws the same images per resample.
    let images = reference.len();
    let reference_values = reference_flat.resampled(images, num_labels, settings);
    flats
        .iter()
        .map(|(labels, agreement)| {
            let delta_miou = labels.as_ref().and_then(|flat| {
                let deltas: Vec<f64> = flat
                    .resampled(images, num_labels, settings)
                    .iter()
                    .zip(&reference_values)
                    .map(|(level, reference)| level - reference)
                    .collect();
                percentile_interval(&deltas)
            });
            let agreement_miou = agreement
                .as_ref()
                .and_then(|flat| percentile_interval(&flat.resampled(images, num_labels, settings)));
            LevelIntervals {
                delta_miou,
                agreement_miou,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::per_image::SparseCounts;

    #[test]
    fn percentile_interval_by_hand() {
        // Five values: positions 0.025 * 4 = 0.1 and 0.975 * 4 = 3.9 between the sorted values 1..5.
        let interval = percentile_interval(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert!(
            (interval[0] - 1.1).abs() < 1e-12 && (interval[1] - 4.9).abs() < 1e-12,
            "{interval:?}"
        );
        // 0..999: positions 24.975 and 974.025.
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let interval = percentile_interval(&values).unwrap();
        assert!(
            (interval[0] - 24.975).abs() < 1e-9 && (interval[1] - 974.025).abs() < 1e-9,
            "{interval:?}"
        );
        assert_eq!(percentile_interval(&[0.25]), Some([0.25, 0.25]));
        assert_eq!(percentile_interval(&[]), None);
        assert_eq!(percentile_interval(&[0.1, f64::NAN]), None);
    }

    #[test]
    fn draws_are_fixed_by_seed_and_resample_and_count_every_image() {
        let a = draw(0, 3, 50);
        assert_eq!(a, draw(0, 3, 50));
        assert_ne!(a, draw(1, 3, 50));
        assert_ne!(a, draw(0, 4, 50));
        assert_eq!(a.iter().map(|&t| t as usize).sum::<usize>(), 50);
        // Roughly 1 - 1/e of the images are drawn at least once.
        let drawn = draw(9, 0, 10_000).iter().filter(|&&t| t > 0).count();
        assert!((6000..6600).contains(&drawn), "{drawn}");
    }

    /// Images whose counts are `(class, intersect, pred, label)` groups.
    fn images(groups: &[&[(u32, u64, u64, u64)]]) -> Vec<ImageCounts> {
        groups
            .iter()
            .enumerate()
            .map(|(index, groups)| {
                let text = groups
                    .iter()
                    .map(|(c, i, p, l)| format!("{c}:{i}:{p}:{l}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let counts = SparseCounts::try_from(text).unwrap();
                ImageCounts {
                    index: index * 2,
                    labels: counts.clone(),
                    agreement: Some(counts),
                }
            })
            .collect()
    }

    #[test]
    fn one_image_resamples_to_its_own_score() {
        // Drawing the single image n times multiplies every count by n: IoU ratios, and the interval, stay exact.
        let reference = images(&[&[(0, 3, 4, 5), (1, 2, 2, 3)]]);
        let level = images(&[&[(0, 1, 4, 5), (1, 2, 6, 3)]]);
        let settings = BootstrapSettings { resamples: 50, seed: 7 };
        let intervals = paired_intervals(&reference, &[Some(&level)], 2, settings);
        let iou = |i: f64, p: f64, l: f64| i / (p + l - i);
        let delta = (iou(1.0, 4.0, 5.0) + iou(2.0, 6.0, 3.0)) / 2.0 - (iou(3.0, 4.0, 5.0) + iou(2.0, 2.0, 3.0)) / 2.0;
        let [low, high] = intervals[0].delta_miou.unwrap();
        assert!(
            (low - delta).abs() < 1e-15 && (high - delta).abs() < 1e-15,
            "{low} {high} {delta}"
        );
    }

    #[test]
    fn the_reference_against_itself_is_zero_and_other_images_get_none() {
        let reference = images(&[&[(0, 3, 4, 5)], &[(0, 0, 1, 0), (1, 1, 3, 2)], &[(1, 5, 5, 9)]]);
        let other = images(&[&[(0, 3, 4, 5)], &[(1, 1, 3, 2)]]);
        let settings = BootstrapSettings {
            resamples: 200,
            seed: 1,
        };
        let intervals = paired_intervals(&reference, &[Some(&reference), Some(&other), None], 3, settings);
        assert_eq!(intervals[0].delta_miou, Some([0.0, 0.0]));
        assert_eq!(
            intervals[1],
            LevelIntervals::default(),
            "different images: no paired interval"
        );
        assert_eq!(intervals[2], LevelIntervals::default());
        let off = BootstrapSettings { resamples: 0, seed: 1 };
        assert_eq!(
            paired_intervals(&reference, &[Some(&reference)], 3, off)[0],
            LevelIntervals::default()
        );
    }
}
