//! Per-image class counts: for every scored image and level, the intersection, predicted area and label area of
//! each class present, against the labels and against the reference prediction. They are the dataset's confusion
//! counts split by image (their sum is exactly what the dataset matrices give `metrics`), kept in results.json so
//! that the bootstrap can resample images and `segq merge` can join shards by image index.
//!
//! On disk one image's counts are a string of `class:intersect:pred:label` groups separated by spaces, classes
//! ascending, absent classes left out: a sparse record a few hundred bytes long, where a JSON array would take a
//! line per number in the pretty-printed file.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::eval::metrics::{ClassAreas, ConfusionMatrix, MAX_PIXELS};
use crate::{Error, Result};

/// One class's pixel counts in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCounts {
    pub class: u32,
    /// Pixels where label (or reference) and prediction both name this class.
    pub intersect: u64,
    /// Pixels predicted as this class (whatever their label, out-of-range labels included).
    pub pred: u64,
    /// Pixels labelled as this class (whatever their prediction, out-of-range predictions included).
    pub label: u64,
}

/// One image's [`ClassCounts`], classes ascending, classes with no pixel left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SparseCounts(Vec<ClassCounts>);

impl SparseCounts {
    /// The classes present in `matrix` (one image's counts).
    pub fn from_matrix(matrix: &ConfusionMatrix) -> SparseCounts {
        let areas = matrix.class_areas();
        SparseCounts(
            (0..areas.intersect.len())
                .filter(|&c| areas.pred[c] > 0 || areas.label[c] > 0)
                .map(|c| ClassCounts {
                    class: c as u32,
                    intersect: areas.intersect[c],
                    pred: areas.pred[c],
                    label: areas.label[c],
                })
                .collect(),
        )
    }

    pub fn classes(&self) -> &[ClassCounts] {
        &self.0
    }

    /// Adds these counts, each times `times`, to `areas`.
    pub fn add_to(&self, areas: &mut ClassAreas, times: u64) {
        for c in &self.0 {
            let class = c.class as usize;
            areas.intersect[class] += c.intersect * times;
            areas.pred[class] += c.pred * times;
            areas.label[class] += c.label * times;
        }
    }

    /// The larger of the summed predicted and label areas: a bound on every sum of these counts (at most
    /// [`MAX_PIXELS`] once checked).
    fn largest_area(&self) -> u64 {
        let pred: u64 = self.0.iter().map(|c| c.pred).sum();
        let label: u64 = self.0.iter().map(|c| c.label).sum();
        pred.max(label)
    }

    /// Classes below `num_labels`, ascending, each with a pixel, an intersection within both areas, and counts
    /// that cannot overflow when summed.
    fn check(&self, num_labels: usize) -> std::result::Result<(), String> {
        let mut previous: Option<u32> = None;
        for c in &self.0 {
            if c.class as usize >= num_labels {
                return Err(format!(
                    "class {} is not below the model's {num_labels} labels",
                    c.class
                ));
            }
            if previous.is_some_and(|p| p >= c.class) {
                return Err(format!("class {} is out of ascending order", c.class));
            }
            previous = Some(c.class);
            if c.intersect > c.pred.min(c.label) {
                return Err(format!(
                    "class {}: intersection {} exceeds an area ({} predicted, {} labelled)",
                    c.class, c.intersect, c.pred, c.label
                ));
            }
            if c.pred == 0 && c.label == 0 {
                return Err(format!("class {} has no pixel", c.class));
            }
        }
        let total = self.0.iter().try_fold(0u64, |sum, c| {
            sum.checked_add(c.pred)?
                .checked_add(c.label)
                .filter(|&t| t <= MAX_PIXELS)
        });
        if total.is_none() {
            return Err(format!("counts add up to more than {MAX_PIXELS} pixels"));
        }
        Ok(())
    }
}

impl From<SparseCounts> for String {
    fn from(counts: SparseCounts) -> String {
        let mut text = String::with_capacity(counts.0.len() * 24);
        for (i, c) in counts.0.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            let _ = write!(text, "{}:{}:{}:{}", c.class, c.intersect, c.pred, c.label);
        }
        text
    }
}

impl TryFrom<String> for SparseCounts {
    type Error = Error;

    fn try_from(text: String) -> Result<SparseCounts> {
        let bad = |group: &str| {
            Error::invalid(
                "per-image counts",
                format!("per-image counts group {group:?} is not class:intersect:pred:label"),
            )
        };
        text.split_ascii_whitespace()
            .map(|group| {
                let mut fields = group.split(':');
                let mut number = || -> Result<u64> {
                    fields
                        .next()
                        .and_then(|f| f.parse::<u64>().ok())
                        .ok_or_else(|| bad(group))
                };
                let class = u32::try_from(number()?).map_err(|_| bad(group))?;
                let counts = ClassCounts {
                    class,
                    intersect: number()?,
                    pred: number()?,
                    label: number()?,
                };
                if fields.next().is_some() {
                    return Err(bad(group));
                }
                Ok(counts)
            })
            .collect::<Result<Vec<_>>>()
            .map(SparseCounts)
    }
}

/// One image's counts for one level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageCounts {
    /// The image's row in the dataset (before offset, limit and sharding): shards merge by it, and the bootstrap
    /// resamples images in its order.
    pub index: usize,
    /// Against the dataset's labels.
    pub labels: SparseCounts,
    /// Against the reference row's prediction, on the pixels the labels score (none for the reference row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<SparseCounts>,
}

impl ImageCounts {
    /// Scores one image exactly as [`ConfusionMatrix::add`] and [`ConfusionMatrix::add_agreement`] score it:
    /// `pred` against the remapped `labels`, and against `reference` (the reference row's prediction) when given.
    pub fn score(
        index: usize,
        num_labels: usize,
        pred: &[u16],
        labels: &[u8],
        reference: Option<&[u16]>,
        ignore_index: u8,
    ) -> Result<ImageCounts> {
        let mut matrix = ConfusionMatrix::new(num_labels);
        matrix.add(pred, labels, ignore_index)?;
        let agreement = match reference {
            Some(reference) => {
                let mut matrix = ConfusionMatrix::new(num_labels);
                matrix.add_agreement(pred, reference, Some(labels), ignore_index)?;
                Some(SparseCounts::from_matrix(&matrix))
            }
            None => None,
        };
        Ok(ImageCounts {
            index,
            labels: SparseCounts::from_matrix(&matrix),
            agreement,
        })
    }
}

/// The sums of `images`' label counts (`agreement: false`) or agreement counts (`true`) over `num_labels` classes;
/// `None` when asked for agreement and an image has none.
pub fn sum_areas(images: &[ImageCounts], num_labels: usize, agreement: bool) -> Option<ClassAreas> {
    let mut areas = ClassAreas {
        intersect: vec![0; num_labels],
        pred: vec![0; num_labels],
        label: vec![0; num_labels],
    };
    for image in images {
        let counts = if agreement {
            image.agreement.as_ref()?
        } else {
            &image.labels
        };
        counts.add_to(&mut areas, 1);
    }
    Some(areas)
}

/// Checks one level's records against its model and its dataset matrices: classes in range, image indices strictly
/// ascending (each image once), and sums equal to `confusion`'s and `agreement`'s areas, so that resampling them
/// recomputes the very metric of the file. `what` names the level in errors.
pub fn validate(
    what: &str,
    images: &[ImageCounts],
    num_labels: usize,
    confusion: Option<&ConfusionMatrix>,
    agreement: Option<&ConfusionMatrix>,
) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let fail = |message: String| Err(Error::invalid(what, format!("{what}: per-image counts: {message}")));
    let mut pixels = 0u64;
    for (position, image) in images.iter().enumerate() {
        if position > 0 && images[position - 1].index >= image.index {
            return fail(format!(
                "image {} follows image {}: indices must ascend, each image once",
                image.index,
                images[position - 1].index
            ));
        }
        let mut largest = 0;
        for counts in std::iter::once(&image.labels).chain(&image.agreement) {
            if let Err(message) = counts.check(num_labels) {
                return fail(format!("image {}: {message}", image.index));
            }
            largest = counts.largest_area().max(largest);
        }
        pixels = pixels.saturating_add(largest);
    }
    // A resample draws an image at most once per image: every resampled sum stays below 2^64.
    if pixels.checked_mul(images.len() as u64).is_none() {
        return fail("too many pixels to resample without overflow".into());
    }
    // A level without scores (failed) has nothing for its counts to match; they are never resampled.
    let Some(confusion) = confusion else {
        return Ok(());
    };
    if sum_areas(images, num_labels, false).as_ref() != Some(&confusion.class_areas()) {
        return fail("their sum differs from the confusion matrix".into());
    }
    let with_agreement = images.iter().filter(|i| i.agreement.is_some()).count();
    match agreement {
        Some(matrix)
            if with_agreement == images.len()
                && sum_areas(images, num_labels, true).as_ref() != Some(&matrix.class_areas()) =>
        {
            return fail("their agreement sum differs from the agreement matrix".into());
        }
        // A reference row that failed mid-run leaves later images without agreement: no interval, but no error.
        Some(_) => {}
        None if with_agreement > 0 => return fail("agreement recorded for a level without an agreement matrix".into()),
        None => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_refuses_bad_groups() {
        let counts = SparseCounts(vec![
            ClassCounts {
                class: 0,
                intersect: 3,
                pred: 4,
                label: 5,
            },
            ClassCounts {
                class: 17,
                intersect: 0,
                pred: 0,
                label: 262_144,
            },
        ]);
        let text = String::from(counts.clone());
        assert_eq!(text, "0:3:4:5 17:0:0:262144");
        assert_eq!(SparseCounts::try_from(text).unwrap(), counts);
        assert_eq!(SparseCounts::try_from(String::new()).unwrap(), SparseCounts::default());
        for bad in ["1:2:3", "1:2:3:4:5", "a:1:1:1", "1:-1:2:2", "4294967296:0:0:1"] {
            let error = SparseCounts::try_from(bad.to_string()).unwrap_err().to_string();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }

    #[test]
    fn records_sum_to_the_dataset_matrices() {
        let mut state = 5u64;
        let mut below = |bound: u64| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        let num_labels = 7;
        let mut confusion = ConfusionMatrix::new(num_labels);
        let mut agreement = ConfusionMatrix::new(num_labels);
        let mut images = Vec::new();
        for index in 0..9 {
            let pixels = 50 + index * 13;
            let labels: Vec<u8> = (0..pixels)
                .map(|_| [0, 1, 2, 3, 4, 5, 6, 9, 255][below(9) as usize])
                .collect();
            let reference: Vec<u16> = (0..pixels).map(|_| below(9) as u16).collect();
            let pred: Vec<u16> = (0..pixels).map(|_| below(8) as u16).collect();
            confusion.add(&pred, &labels, 255).unwrap();
            agreement.add_agreement(&pred, &reference, Some(&labels), 255).unwrap();
            images.push(ImageCounts::score(index * 3, num_labels, &pred, &labels, Some(&reference), 255).unwrap());
        }
        let summed = sum_areas(&images, num_labels, false).unwrap();
        assert_eq!(summed, confusion.class_areas());
        assert_eq!(summed.mean_iou(), confusion.metrics().mean_iou);
        let summed = sum_areas(&images, num_labels, true).unwrap();
        assert_eq!(summed, agreement.class_areas());
        assert_eq!(summed.mean_iou(), agreement.agreement().miou);
        validate("level \"x\"", &images, num_labels, Some(&confusion), Some(&agreement)).unwrap();

        // Out-of-order indices, a wrong sum, a class out of range: each an error naming the level.
        let mut swapped = images.clone();
        swapped.swap(0, 1);
        let error = validate("level \"x\"", &swapped, num_labels, Some(&confusion), Some(&agreement))
            .unwrap_err()
            .to_string();
        assert!(error.contains("level \"x\"") && error.contains("ascend"), "{error}");
        let error = validate(
            "level \"x\"",
            &images[1..],
            num_labels,
            Some(&confusion),
            Some(&agreement),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("differs from the confusion matrix"), "{error}");
        let error = validate("level \"x\"", &images, 5, None, None).unwrap_err().to_string();
        assert!(error.contains("not below the model's 5 labels"), "{error}");
    }
}
