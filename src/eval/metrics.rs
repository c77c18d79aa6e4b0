//! The confusion-matrix accumulator behind every segmentation score: exact pixel counts that add up image by
//! image, merge across shards, and yield the numbers of Hugging Face `evaluate`'s `mean_iou` metric.
//!
//! Layout: an `(n+1) x (n+1)` matrix of `u64`, row = ground-truth class, column = predicted class, where `n` is
//! the number of labels and index `n` collects every value outside `0..n`. `evaluate` drops such values from their
//! own histogram only, so an out-of-range prediction still counts in its pixel's label area (and vice versa);
//! the extra row and column keep exactly that information.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most pixels a matrix counts (2^52, exact in f64: some 17 billion 512x512 images); a file claiming more is
/// refused, so that no sum of counts can overflow.
pub const MAX_PIXELS: u64 = 1 << 52;

/// Exact per-(label, prediction) pixel counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConfusionMatrixRepr", into = "ConfusionMatrixRepr")]
pub struct ConfusionMatrix {
    num_labels: usize,
    /// Row-major `(num_labels + 1)^2` counts; row = label, column = prediction, last row/column = out of range.
    counts: Vec<u64>,
}

/// On-disk form: dense rows, so a reader in any language can index `counts[label][pred]`.
#[derive(Serialize, Deserialize)]
struct ConfusionMatrixRepr {
    num_labels: usize,
    /// `num_labels + 1` rows of `num_labels + 1` counts; the last row and column hold out-of-range values.
    counts: Vec<Vec<u64>>,
}

impl From<ConfusionMatrix> for ConfusionMatrixRepr {
    fn from(matrix: ConfusionMatrix) -> Self {
        let side = matrix.side();
        let counts = matrix.counts.chunks(side).map(<[u64]>::to_vec).collect();
        ConfusionMatrixRepr {
            num_labels: matrix.num_labels,
            counts,
        }
    }
}

impl TryFrom<ConfusionMatrixRepr> for ConfusionMatrix {
    type Error = Error;

    fn try_from(repr: ConfusionMatrixRepr) -> Result<Self> {
        let side = repr.num_labels.saturating_add(1);
        if repr.counts.len() != side {
            return Err(Error::invalid(
                "confusion matrix",
                format!(
                    "confusion matrix for {} labels needs {side} rows, found {}",
                    repr.num_labels,
                    repr.counts.len()
                ),
            ));
        }
        // Rows are checked before the matrix is allocated: its size comes from the file.
        if let Some((row_index, row)) = repr.counts.iter().enumerate().find(|(_, row)| row.len() != side) {
            return Err(Error::invalid(
                format!("confusion matrix row {row_index}"),
                format!(
                    "confusion matrix row {row_index} needs {side} counts, found {}",
                    row.len()
                ),
            ));
        }
        // Sums over rows, columns and the whole matrix (areas, unions) must not overflow.
        let total = repr
            .counts
            .iter()
            .flatten()
            .try_fold(0u64, |sum, &c| sum.checked_add(c).filter(|&t| t <= MAX_PIXELS));
        if total.is_none() {
            return Err(Error::invalid(
                "confusion matrix",
                format!("confusion matrix counts add up to more than {MAX_PIXELS} pixels"),
            ));
        }
        let mut counts = Vec::with_capacity(side * side);
        for (row_index, row) in repr.counts.iter().enumerate() {
            if row.len() != side {
                return Err(Error::invalid(
                    format!("confusion matrix row {row_index}"),
                    format!(
                        "confusion matrix row {row_index} needs {side} counts, found {}",
                        row.len()
                    ),
                ));
            }
            counts.extend_from_slice(row);
        }
        Ok(ConfusionMatrix {
            num_labels: repr.num_labels,
            counts,
        })
    }
}

/// The scores of `evaluate`'s `mean_iou`, computed from a [`ConfusionMatrix`].
///
/// Means are `NaN` when no class has a defined value (serialised as `null`); per-class entries are `None`
/// where `evaluate` gives `NaN`: IoU when the class is absent from labels and predictions, accuracy when it is
/// absent from labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeanIou {
    #[serde(with = "nan_as_null")]
    pub mean_iou: f64,
    #[serde(with = "nan_as_null")]
    pub mean_accuracy: f64,
    #[serde(with = "nan_as_null")]
    pub overall_accuracy: f64,
    pub per_category_iou: Vec<Option<f64>>,
    pub per_category_accuracy: Vec<Option<f64>>,
    pub total_area_intersect: Vec<u64>,
    pub total_area_union: Vec<u64>,
    pub total_area_pred_label: Vec<u64>,
    pub total_area_label: Vec<u64>,
}

/// How closely one prediction matches a reference prediction (a quantized model against the float model).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Share of counted pixels where both predictions name the same class.
    #[serde(with = "nan_as_null")]
    pub pixel_agreement: f64,
    /// `mean_iou` with the reference prediction taken as ground truth.
    #[serde(with = "nan_as_null")]
    pub miou: f64,
}

impl ConfusionMatrix {
    /// An empty accumulator for classes `0..num_labels`.
    pub fn new(num_labels: usize) -> Self {
        let side = num_labels + 1;
        ConfusionMatrix {
            num_labels,
            counts: vec![0; side * side],
        }
    }

    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn side(&self) -> usize {
        self.num_labels + 1
    }

    /// Count of pixels with ground truth `label` predicted as `pred`; index `num_labels` means "out of range".
    pub fn count(&self, label: usize, pred: usize) -> u64 {
        let side = self.side();
        if label < side && pred < side {
            self.counts[label * side + pred]
        } else {
            0
        }
    }

    /// Every pixel counted so far, out-of-range ones included (ignored pixels are never counted).
    pub fn total_pixels(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds one image: `pred` and `label` are the same pixels in the same order, `label` already remapped
    /// (label_map, reduce_labels). Pixels whose label equals `ignore_index` are dropped from both.
    pub fn add(&mut self, pred: &[u16], label: &[u8], ignore_index: u8) -> Result<()> {
        if pred.len() != label.len() {
            return Err(Error::shape_mismatch(
                "prediction (pixels of the label)",
                &[label.len()],
                &[pred.len()],
            ));
        }
        let side = self.side();
        let out_of_range = self.num_labels;
        // Row offset of every possible label byte, with a sentinel for the ignored one: one table lookup replaces
        // the range test per pixel.
        const IGNORED: usize = usize::MAX;
        let mut row_offset = [0usize; 256];
        for (value, offset) in row_offset.iter_mut().enumerate() {
            *offset = value.min(out_of_range) * side;
        }
        row_offset[usize::from(ignore_index)] = IGNORED;
        let counts = &mut self.counts[..side * side];
        for (&p, &l) in pred.iter().zip(label) {
            let row = row_offset[usize::from(l)];
            if row == IGNORED {
                continue;
            }
            counts[row + usize::from(p).min(out_of_range)] += 1;
        }
        Ok(())
    }

    /// Adds one image of agreement between `pred` and a `reference` prediction taken as ground truth.
    /// When the image has ground-truth `labels`, pixels whose label equals `ignore_index` are excluded, so
    /// agreement is measured on exactly the pixels that the accuracy metrics score.
    pub fn add_agreement(
        &mut self,
        pred: &[u16],
        reference: &[u16],
        labels: Option<&[u8]>,
        ignore_index: u8,
    ) -> Result<()> {
        if pred.len() != reference.len() {
            return Err(Error::shape_mismatch(
                "prediction (pixels of the reference prediction)",
                &[reference.len()],
                &[pred.len()],
            ));
        }
        let side = self.side();
        let out_of_range = self.num_labels;
        let counts = &mut self.counts[..side * side];
        match labels {
            Some(labels) => {
                if labels.len() != pred.len() {
                    return Err(Error::shape_mismatch(
                        "prediction (pixels of the label)",
                        &[labels.len()],
                        &[pred.len()],
                    ));
                }
                for ((&p, &r), &l) in pred.iter().zip(reference).zip(labels) {
                    if l == ignore_index {
                        continue;
                    }
                    counts[usize::from(r).min(out_of_range) * side + usize::from(p).min(out_of_range)] += 1;
                }
            }
            None => {
                for (&p, &r) in pred.iter().zip(reference) {
                    counts[usize::from(r).min(out_of_range) * side + usize::from(p).min(out_of_range)] += 1;
                }
            }
        }
        Ok(())
    }

    /// Adds another accumulator's counts (another shard, another thread); both must have the same labels.
    pub fn merge(&mut self, other: &ConfusionMatrix) -> Result<()> {
        if other.num_labels != self.num_labels {
            return Err(Error::invalid(
                "confusion matrix",
                format!(
                    "cannot merge a confusion matrix of {} labels into one of {}",
                    other.num_labels, self.num_labels
                ),
            ));
        }
        if self
            .total_pixels()
            .checked_add(other.total_pixels())
            .is_none_or(|t| t > MAX_PIXELS)
        {
            return Err(Error::invalid(
                "confusion matrix",
                format!("merged counts would exceed {MAX_PIXELS} pixels"),
            ));
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        Ok(())
    }

    /// Per-class intersection, predicted area and label area: the sums `evaluate` builds its scores from.
    pub fn class_areas(&self) -> ClassAreas {
        let n = self.num_labels;
        let side = self.side();
        let mut areas = ClassAreas {
            intersect: vec![0u64; n],
            pred: vec![0u64; n],
            label: vec![0u64; n],
        };
        for class in 0..n {
            areas.intersect[class] = self.counts[class * side + class];
            areas.label[class] = self.counts[class * side..(class + 1) * side].iter().sum();
        }
        for row in self.counts.chunks_exact(side) {
            for (area, &count) in areas.pred.iter_mut().zip(&row[..n]) {
                *area += count;
            }
        }
        areas
    }

    /// The `mean_iou` scores, with `evaluate`'s NaN rules (see [`MeanIou`]).
    pub fn metrics(&self) -> MeanIou {
        let n = self.num_labels;
        let ClassAreas {
            intersect,
            pred: area_pred,
            label: area_label,
        } = self.class_areas();
        let union: Vec<u64> = (0..n).map(|c| area_pred[c] + area_label[c] - intersect[c]).collect();
        let per_category_iou = iou_per_class(&intersect, &area_pred, &area_label);
        let per_category_accuracy: Vec<Option<f64>> = (0..n).map(|c| ratio(intersect[c], area_label[c])).collect();
        let total_intersect: u64 = intersect.iter().sum();
        let total_label: u64 = area_label.iter().sum();
        MeanIou {
            mean_iou: nanmean(&per_category_iou),
            mean_accuracy: nanmean(&per_category_accuracy),
            overall_accuracy: ratio(total_intersect, total_label).unwrap_or(f64::NAN),
            per_category_iou,
            per_category_accuracy,
            total_area_intersect: intersect,
            total_area_union: union,
            total_area_pred_label: area_pred,
            total_area_label: area_label,
        }
    }

    /// Agreement scores of a matrix filled with [`ConfusionMatrix::add_agreement`]. Pixel agreement counts
    /// every pixel, also those whose reference or prediction is out of range (as disagreements).
    pub fn agreement(&self) -> Agreement {
        let total = self.total_pixels();
        let side = self.side();
        let matching: u64 = (0..self.num_labels).map(|c| self.counts[c * side + c]).sum();
        let pixel_agreement = if total == 0 {
            f64::NAN
        } else {
            matching as f64 / total as f64
        };
        Agreement {
            pixel_agreement,
            miou: self.metrics().mean_iou,
        }
    }
}

/// Per-class pixel sums of one or many images: intersection (label and prediction agree), predicted area and label
/// area. They add up image by image, and [`ClassAreas::mean_iou`] turns any sum of them into `evaluate`'s `mean_iou`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassAreas {
    pub intersect: Vec<u64>,
    pub pred: Vec<u64>,
    pub label: Vec<u64>,
}

impl ClassAreas {
    /// `evaluate`'s `mean_iou` of these sums, computed exactly as [`ConfusionMatrix::metrics`] computes it.
    pub fn mean_iou(&self) -> f64 {
        mean_iou_of_areas(&self.intersect, &self.pred, &self.label)
    }
}

/// `evaluate`'s `mean_iou` from per-class intersection, predicted and label areas (equal lengths): the one
/// formula behind [`ConfusionMatrix::metrics`] and the bootstrap's resampled scores.
pub fn mean_iou_of_areas(intersect: &[u64], pred: &[u64], label: &[u64]) -> f64 {
    nanmean(&iou_per_class(intersect, pred, label))
}

/// IoU per class, `None` where the class is absent from labels and predictions (union 0).
fn iou_per_class(intersect: &[u64], pred: &[u64], label: &[u64]) -> Vec<Option<f64>> {
    intersect
        .iter()
        .zip(pred)
        .zip(label)
        .map(|((&i, &p), &l)| ratio(i, p + l - i))
        .collect()
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    if den == 0 { None } else { Some(num as f64 / den as f64) }
}

/// numpy's `nanmean`: `nansum` (NaN taken as 0) divided by the number of defined values; NaN when there are none.
/// The sum follows numpy's pairwise summation so that results match `evaluate` to the last bit.
fn nanmean(values: &[Option<f64>]) -> f64 {
    let zeroed: Vec<f64> = values.iter().map(|v| v.unwrap_or(0.0)).collect();
    let count = values.iter().flatten().count();
    if count == 0 {
        f64::NAN
    } else {
        numpy_pairwise_sum(&zeroed) / count as f64
    }
}

/// numpy's float summation order (`pairwise_sum` in its umath loops): a plain loop under 8 values, eight
/// interleaved accumulators up to 128, halves (at a multiple of 8) above that.
fn numpy_pairwise_sum(values: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = values.len();
    if n < 8 {
        values.iter().fold(0.0, |sum, v| sum + v)
    } else if n <= BLOCK {
        let mut acc = [0.0f64; 8];
        acc.copy_from_slice(&values[..8]);
        let whole = n - n % 8;
        for chunk in values[8..whole].chunks_exact(8) {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a += v;
            }
        }
        let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for v in &values[whole..] {
            sum += v;
        }
        sum
    } else {
        let half = n / 2;
        let half = half - half % 8;
        numpy_pairwise_sum(&values[..half]) + numpy_pairwise_sum(&values[half..])
    }
}

/// Serde helpers that write a non-finite `f64` as `null` and read `null` back as NaN.
pub mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            serializer.serialize_f64(*value)
        } else {
            serializer.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() <= 1e-12, "{actual} != {expected}");
    }

    /// Straightforward per-pixel reference of `add`, written from the definition, to check the table-driven loop.
    fn add_reference(matrix: &mut ConfusionMatrix, pred: &[u16], label: &[u8], ignore_index: u8) {
        let n = matrix.num_labels;
        for (&p, &l) in pred.iter().zip(label) {
            if l == ignore_index {
                continue;
            }
            let row = if usize::from(l) < n { usize::from(l) } else { n };
            let col = if usize::from(p) < n { usize::from(p) } else { n };
            matrix.counts[row * (n + 1) + col] += 1;
        }
    }

    /// Deterministic pseudo-random numbers (64-bit LCG), so tests need no dependency and never flake.
    pub(crate) struct Lcg(pub u64);
    impl Lcg {
        pub fn below(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % bound
        }
    }

    #[test]
    fn hand_computed_scores() {
        let mut matrix = ConfusionMatrix::new(3);
        matrix.add(&[0, 0, 1, 2, 2, 5], &[0, 1, 1, 2, 255, 0], 255).unwrap();
        let m = matrix.metrics();
        assert_eq!(m.total_area_intersect, [1, 1, 1]);
        assert_eq!(m.total_area_label, [2, 2, 1]);
        assert_eq!(m.total_area_pred_label, [2, 1, 1]);
        assert_eq!(m.total_area_union, [3, 2, 1]);
        assert_eq!(m.per_category_iou, [Some(1.0 / 3.0), Some(0.5), Some(1.0)]);
        assert_eq!(m.per_category_accuracy, [Some(0.5), Some(0.5), Some(1.0)]);
        close(m.mean_iou, (1.0 / 3.0 + 0.5 + 1.0) / 3.0);
        close(m.mean_accuracy, 2.0 / 3.0);
        close(m.overall_accuracy, 3.0 / 5.0);
        // The prediction 5 is out of range: it stays in class 0's label area, and in the out-of-range column.
        assert_eq!(matrix.count(0, 3), 1);
        assert_eq!(matrix.total_pixels(), 5);
    }

    #[test]
    fn nan_rules_follow_evaluate() {
        let mut matrix = ConfusionMatrix::new(4);
        // Class 2 is predicted but never a label; class 3 appears nowhere; label 200 is out of range.
        matrix.add(&[0, 2, 1, 1, 1], &[0, 0, 1, 200, 1], 255).unwrap();
        let m = matrix.metrics();
        assert_eq!(m.per_category_iou, [Some(0.5), Some(2.0 / 3.0), Some(0.0), None]);
        assert_eq!(m.per_category_accuracy, [Some(0.5), Some(1.0), None, None]);
        // The out-of-range label pixel's prediction (1) still counts in class 1's prediction area.
        assert_eq!(m.total_area_pred_label, [1, 3, 1, 0]);
        assert_eq!(m.total_area_label, [2, 2, 0, 0]);
        close(m.mean_iou, (0.5 + 2.0 / 3.0 + 0.0) / 3.0);
        close(m.mean_accuracy, 0.75);
        close(m.overall_accuracy, 3.0 / 4.0);

        let empty = ConfusionMatrix::new(3).metrics();
        assert!(empty.mean_iou.is_nan() && empty.mean_accuracy.is_nan() && empty.overall_accuracy.is_nan());
        assert_eq!(empty.per_category_iou, [None, None, None]);
    }

    #[test]
    fn ignore_index_zero_drops_class_zero_pixels() {
        let mut matrix = ConfusionMatrix::new(3);
        matrix.add(&[1, 0, 2], &[0, 1, 2], 0).unwrap();
        assert_eq!(matrix.total_pixels(), 2);
        assert_eq!(matrix.metrics().total_area_pred_label, [1, 0, 1]);
    }

    #[test]
    fn table_driven_add_matches_reference_on_awkward_inputs() {
        let mut rng = Lcg(7);
        for (num_labels, pixels, ignore) in [(1, 0, 255), (1, 17, 0), (5, 1001, 255), (150, 4099, 255), (300, 777, 3)] {
            let pred: Vec<u16> = (0..pixels).map(|_| rng.below(num_labels as u64 + 40) as u16).collect();
            let label: Vec<u8> = (0..pixels).map(|_| rng.below(256) as u8).collect();
            let mut fast = ConfusionMatrix::new(num_labels);
            let mut reference = ConfusionMatrix::new(num_labels);
            fast.add(&pred, &label, ignore).unwrap();
            add_reference(&mut reference, &pred, &label, ignore);
            assert_eq!(fast, reference, "{num_labels} labels, {pixels} pixels");
        }
        // u16 predictions far above any class, and the largest u16.
        let mut matrix = ConfusionMatrix::new(2);
        matrix.add(&[u16::MAX, 1000], &[1, 1], 255).unwrap();
        assert_eq!(matrix.count(1, 2), 2);
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let mut matrix = ConfusionMatrix::new(2);
        assert!(matrix.add(&[0, 1], &[0], 255).is_err());
        assert!(matrix.add_agreement(&[0, 1], &[0], None, 255).is_err());
        assert!(matrix.add_agreement(&[0, 1], &[0, 1], Some(&[0]), 255).is_err());
        assert_eq!(matrix.total_pixels(), 0);
    }

    #[test]
    fn merging_equals_accumulating_in_one() {
        let mut rng = Lcg(11);
        let images: Vec<(Vec<u16>, Vec<u8>)> = (0..6)
            .map(|_| {
                let pred = (0..300).map(|_| rng.below(12) as u16).collect();
                let label = (0..300)
                    .map(|_| [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255][rng.below(11) as usize])
                    .collect();
                (pred, label)
            })
            .collect();
        let mut whole = ConfusionMatrix::new(10);
        let (mut left, mut right) = (ConfusionMatrix::new(10), ConfusionMatrix::new(10));
        for (index, (pred, label)) in images.iter().enumerate() {
            whole.add(pred, label, 255).unwrap();
            if index < 2 { &mut left } else { &mut right }
                .add(pred, label, 255)
                .unwrap();
        }
        left.merge(&right).unwrap();
        assert_eq!(left, whole);
        assert_eq!(left.metrics(), whole.metrics());
        let error = whole.merge(&ConfusionMatrix::new(9)).unwrap_err().to_string();
        assert!(error.contains("9 labels"), "{error}");
    }

    #[test]
    fn agreement_excludes_ignored_label_pixels() {
        let reference = [0u16, 1, 1, 2, 2, 2];
        let pred = [0u16, 1, 2, 2, 2, 0];
        let labels = [0u8, 1, 1, 255, 2, 2];
        let mut with_labels = ConfusionMatrix::new(3);
        with_labels
            .add_agreement(&pred, &reference, Some(&labels), 255)
            .unwrap();
        let a = with_labels.agreement();
        close(a.pixel_agreement, 3.0 / 5.0);
        // IoU against the reference: class 0: 1/(2+1-1)=1/2, class 1: 1/2, class 2: 1/3.
        close(a.miou, (0.5 + 0.5 + 1.0 / 3.0) / 3.0);

        let mut without = ConfusionMatrix::new(3);
        without.add_agreement(&pred, &reference, None, 255).unwrap();
        close(without.agreement().pixel_agreement, 4.0 / 6.0);
        assert!(ConfusionMatrix::new(3).agreement().pixel_agreement.is_nan());
    }

    #[test]
    fn json_round_trip_and_shape_check() {
        let mut matrix = ConfusionMatrix::new(2);
        matrix.add(&[0, 1, 7], &[1, 1, 0], 255).unwrap();
        let text = serde_json::to_string(&matrix).unwrap();
        assert_eq!(text, r#"{"num_labels":2,"counts":[[0,0,1],[1,1,0],[0,0,0]]}"#);
        assert_eq!(serde_json::from_str::<ConfusionMatrix>(&text).unwrap(), matrix);
        let short_row = r#"{"num_labels":2,"counts":[[0,0],[1,1,0],[0,0,0]]}"#;
        assert!(
            serde_json::from_str::<ConfusionMatrix>(short_row)
                .unwrap_err()
                .to_string()
                .contains("row 0")
        );
        let rows = r#"{"num_labels":2,"counts":[[0,0,1]]}"#;
        assert!(serde_json::from_str::<ConfusionMatrix>(rows).is_err());

        let metrics = ConfusionMatrix::new(2).metrics();
        let json = serde_json::to_value(&metrics).unwrap();
        assert!(json["mean_iou"].is_null() && json["per_category_iou"][0].is_null());
        let back: MeanIou = serde_json::from_value(json).unwrap();
        assert!(back.mean_iou.is_nan());
    }

    /// The test's own label preparation (the data module owns the real one): `label_map` looked up on the
    /// original values, then `reduce_labels` (0 -> 255, k -> k - 1, 254 -> 255).
    fn prepare_labels(labels: &[u8], label_map: &[(u8, u8)], reduce_labels: bool) -> Vec<u8> {
        labels
            .iter()
            .map(|&original| {
                let mapped = label_map
                    .iter()
                    .find(|(from, _)| *from == original)
                    .map_or(original, |(_, to)| *to);
                if !reduce_labels {
                    mapped
                } else if mapped == 0 {
                    255
                } else {
                    match mapped - 1 {
                        254 => 255,
                        reduced => reduced,
                    }
                }
            })
            .collect()
    }

    fn flatten<T: TryFrom<u64>>(image: &serde_json::Value) -> Vec<T> {
        let rows = image.as_array().expect("image is a list of rows");
        rows.iter()
            .flat_map(|row| row.as_array().expect("row is a list").iter())
            .map(|v| {
                T::try_from(v.as_u64().expect("pixel is an integer"))
                    .ok()
                    .expect("pixel fits")
            })
            .collect()
    }

    fn optional_floats(value: &serde_json::Value) -> Vec<Option<f64>> {
        value
            .as_array()
            .expect("list")
            .iter()
            .map(serde_json::Value::as_f64)
            .collect()
    }

    fn check_optional(name: &str, actual: &[Option<f64>], expected: &[Option<f64>]) {
        assert_eq!(actual.len(), expected.len(), "{name}: length");
        for (class, (a, e)) in actual.iter().zip(expected).enumerate() {
            match (a, e) {
                (Some(a), Some(e)) => {
                    assert!((a - e).abs() <= 1e-12, "{name}[{class}]: {a} != {e}")
                }
                (None, None) => {}
                _ => panic!("{name}[{class}]: {a:?} != {e:?}"),
            }
        }
    }

    #[test]
    fn python_reference_cases() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/metrics/cases.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 9, "fixture has {} cases", cases.len());
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let num_labels = case["num_labels"].as_u64().unwrap() as usize;
            let ignore_index = case["ignore_index"].as_u64().unwrap() as u8;
            let reduce_labels = case["reduce_labels"].as_bool().unwrap();
            let label_map: Vec<(u8, u8)> = case["label_map"]
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap() as u8))
                        .collect()
                })
                .unwrap_or_default();
            let mut matrix = ConfusionMatrix::new(num_labels);
            let images = case["preds"]
                .as_array()
                .unwrap()
                .iter()
                .zip(case["labels"].as_array().unwrap());
            for (pred, label) in images {
                let pred: Vec<u16> = flatten(pred);
                let label = prepare_labels(&flatten::<u8>(label), &label_map, reduce_labels);
                matrix.add(&pred, &label, ignore_index).unwrap();
            }
            let m = matrix.metrics();
            let expected = &case["expected"];
            let counts = |key: &str| -> Vec<u64> {
                expected[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as u64)
                    .collect()
            };
            assert_eq!(m.total_area_intersect, counts("total_area_intersect"), "{name}");
            assert_eq!(m.total_area_union, counts("total_area_union"), "{name}");
            assert_eq!(m.total_area_pred_label, counts("total_area_pred_label"), "{name}");
            assert_eq!(m.total_area_label, counts("total_area_label"), "{name}");
            check_optional(
                name,
                &m.per_category_iou,
                &optional_floats(&expected["per_category_iou"]),
            );
            check_optional(
                name,
                &m.per_category_accuracy,
                &optional_floats(&expected["per_category_accuracy"]),
            );
            for (key, actual) in [
                ("mean_iou", m.mean_iou),
                ("mean_accuracy", m.mean_accuracy),
                ("overall_accuracy", m.overall_accuracy),
            ] {
                check_optional(
                    &format!("{name}.{key}"),
                    &[Some(actual).filter(|v| !v.is_nan())],
                    &[expected[key].as_f64()],
                );
            }
        }
    }

    #[test]
    fn nanmean_sums_in_numpys_order() {
        // Expected values computed with numpy 2 (np.nanmean / np.sum); a plain left-to-right sum of the
        // 1000 values gives 1015.0670103092783, one ulp off.
        let value = |i: usize| ((i * 37) % 101) as f64 / 97.0 + 1e-3 * i as f64;
        let many: Vec<f64> = (0..1000).map(value).collect();
        assert_eq!(numpy_pairwise_sum(&many), 1015.0670103092784);
        let with_nans: Vec<Option<f64>> = (0..150)
            .map(|i| {
                if [3, 50, 149].contains(&i) {
                    None
                } else {
                    Some(value(i))
                }
            })
            .collect();
        assert_eq!(nanmean(&with_nans), 0.590390700610141);
        assert!(nanmean(&[None, None]).is_nan());
    }
}
