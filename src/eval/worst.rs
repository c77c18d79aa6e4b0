//! The worst images of each quantized level: the examples whose prediction disagrees most with the reference
//! row's, as a bounded, deterministic top-K. It owns the per-image measure (the fraction of scored pixels whose
//! class differs from the reference prediction, ignore-index pixels left out as the agreement matrix leaves them
//! out), the ranking (largest loss first, ties by global image index), the K kept entries with the pixels their
//! overlays need, and the merge of several shards' lists into the global top-K.
//!
//! Why pixel disagreement rather than a per-image agreement mIoU: on one image a class of a few pixels that the
//! quantized model drops scores IoU 0 and halves the image's mIoU, so the ranking would be led by images with a
//! speck of a rare class; the fraction of changed pixels is what the overlay shows and is exact in integers.

use std::cmp::Ordering;

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The most images a level may keep (`eval.worst_images`): each holds its image, two masks and the scored-pixel
/// mask in memory until the run ends (about 2.8 MB for a 683x512 ADE image).
pub const MAX_WORST_IMAGES: usize = 32;

/// One listed image of a level's worst list, as written in results.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorstImage {
    /// Global row index in the dataset (before offset, limit and sharding), the tie-breaker.
    pub index: usize,
    /// The example's id as the loader names it (file stem, or `<parquet file>:<row>`).
    pub id: String,
    /// Pixels scored (the label is not the ignore index).
    pub pixels: u64,
    /// Scored pixels whose class differs from the reference prediction's.
    pub disagreeing_pixels: u64,
    /// `disagreeing_pixels / pixels`: the agreement loss the list is ranked by.
    pub loss: f64,
    /// `1 - loss`.
    pub pixel_agreement: f64,
    /// The overlay PNG, relative to the results folder; `None` when none was drawn (an entry carried over from
    /// an interrupted run, or a merged shard whose overlay file was missing).
    #[serde(default)]
    pub overlay: Option<String>,
}

impl WorstImage {
    fn new(index: usize, id: String, pixels: u64, disagreeing_pixels: u64) -> WorstImage {
        let loss = disagreeing_pixels as f64 / pixels as f64;
        WorstImage {
            index,
            id,
            pixels,
            disagreeing_pixels,
            loss,
            pixel_agreement: 1.0 - loss,
            overlay: None,
        }
    }

    /// Recomputes `loss` and `pixel_agreement` from the pixel counts.
    pub fn refresh(&mut self) {
        let exact = WorstImage::new(self.index, String::new(), self.pixels, self.disagreeing_pixels);
        (self.loss, self.pixel_agreement) = (exact.loss, exact.pixel_agreement);
    }

    /// Worse first: the larger disagreeing fraction (compared exactly, in integers), then the lower index.
    pub fn rank_order(&self, other: &WorstImage) -> Ordering {
        let mine = u128::from(self.disagreeing_pixels) * u128::from(other.pixels.max(1));
        let theirs = u128::from(other.disagreeing_pixels) * u128::from(self.pixels.max(1));
        theirs.cmp(&mine).then(self.index.cmp(&other.index))
    }
}

/// Where the overlay of the `rank`-th (0-based) worst image of `label` goes, relative to the results folder.
pub fn overlay_path(label: &str, rank: usize, id: &str) -> String {
    let safe_id: String = id
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("samples/worst/{label}/{:02}_{safe_id}.png", rank + 1)
}

/// What one overlay shows: the image, which pixels were scored, and both predictions (row-major class ids).
#[derive(Debug, Clone)]
pub struct WorstPixels {
    pub image: RgbImage,
    /// 255 where the pixel is scored, 0 where its label is the ignore index.
    pub scored: GrayImage,
    pub reference: Vec<u16>,
    pub prediction: Vec<u16>,
}

/// A listed image with its pixels, when this process holds them.
#[derive(Debug, Clone)]
pub struct WorstEntry {
    pub image: WorstImage,
    pub pixels: Option<WorstPixels>,
}

/// A level's worst images, for the report writer: the level and reference labels, and the ranked entries.
#[derive(Debug, Clone)]
pub struct WorstOfLevel {
    pub label: String,
    pub reference_label: String,
    pub entries: Vec<WorstEntry>,
}

/// Pixels scored and pixels whose class differs, over the pixels whose label is not `ignore_index` (as
/// [`crate::eval::metrics::ConfusionMatrix::add_agreement`] counts them).
pub fn disagreement(prediction: &[u16], reference: &[u16], labels: &[u8], ignore_index: u8) -> Result<(u64, u64)> {
    if prediction.len() != reference.len() || labels.len() != prediction.len() {
        return Err(Error::shape_mismatch(
            "prediction (pixels of the reference prediction and the label)",
            &[reference.len(), labels.len()],
            &[prediction.len(), prediction.len()],
        ));
    }
    let mut pixels = 0u64;
    let mut disagreeing = 0u64;
    for ((&p, &r), &l) in prediction.iter().zip(reference).zip(labels) {
        if l != ignore_index {
            pixels += 1;
            disagreeing += u64::from(p != r);
        }
    }
    Ok((pixels, disagreeing))
}

/// The `capacity` worst images seen so far, with the pixels of those offered in this process. Images that agree
/// everywhere (loss 0) or have no scored pixel are never listed, so a level identical to the reference has an
/// empty list. The result depends only on the set of images offered, not on their order or batching.
#[derive(Debug, Clone)]
pub struct WorstTracker {
    capacity: usize,
    entries: Vec<WorstEntry>,
}

impl WorstTracker {
    /// True when it keeps any image (worth measuring the disagreement for).
    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    pub fn new(capacity: usize) -> WorstTracker {
        WorstTracker {
            capacity,
            entries: Vec::with_capacity(capacity.min(MAX_WORST_IMAGES)),
        }
    }

    /// A tracker that continues `earlier` (an interrupted run's list): those entries compete without pixels.
    pub fn continuing(capacity: usize, earlier: &[WorstImage]) -> WorstTracker {
        let mut tracker = WorstTracker::new(capacity);
        for image in earlier {
            tracker.insert(
                WorstImage {
                    overlay: None,
                    ..image.clone()
                },
                || None,
            );
        }
        tracker
    }

    /// Offers one image: `pixels` is called only when it enters the list, so images that do not are never copied.
    pub fn offer(
        &mut self,
        index: usize,
        id: &str,
        (scored, disagreeing): (u64, u64),
        pixels: impl FnOnce() -> WorstPixels,
    ) {
        if scored == 0 || disagreeing == 0 || self.capacity == 0 {
            return;
        }
        let candidate = WorstImage::new(index, String::new(), scored, disagreeing);
        if self.entries.len() == self.capacity
            && self
                .entries
                .last()
                .is_some_and(|last| candidate.rank_order(&last.image) != Ordering::Less)
        {
            return;
        }
        self.insert(
            WorstImage {
                id: id.to_string(),
                ..candidate
            },
            || Some(pixels()),
        );
    }

    fn insert(&mut self, image: WorstImage, pixels: impl FnOnce() -> Option<WorstPixels>) {
        if self.capacity == 0 || image.pixels == 0 || image.disagreeing_pixels == 0 {
            return;
        }
        // The same image offered twice (never in one run) keeps one entry.
        if self.entries.iter().any(|e| e.image.index == image.index) {
            return;
        }
        let at = self
            .entries
            .partition_point(|e| e.image.rank_order(&image) == Ordering::Less);
        if at >= self.capacity {
            return;
        }
        self.entries.insert(
            at,
            WorstEntry {
                image,
                pixels: pixels(),
            },
        );
        self.entries.truncate(self.capacity);
    }

    /// The ranked list as results.json holds it: overlays named for the entries whose pixels are here.
    pub fn list(&self, label: &str) -> Vec<WorstImage> {
        self.entries
            .iter()
            .enumerate()
            .map(|(rank, entry)| WorstImage {
                overlay: entry
                    .pixels
                    .as_ref()
                    .map(|_| overlay_path(label, rank, &entry.image.id)),
                ..entry.image.clone()
            })
            .collect()
    }

    /// The ranked entries with their pixels (overlay paths filled as in [`WorstTracker::list`]).
    pub fn into_entries(self, label: &str) -> Vec<WorstEntry> {
        let listed = self.list(label);
        self.entries
            .into_iter()
            .zip(listed)
            .map(|(entry, image)| WorstEntry {
                image,
                pixels: entry.pixels,
            })
            .collect()
    }
}

/// The global top-`capacity` of several shards' lists (each already ranked), with each kept entry's overlay
/// path renamed to its merged rank. Returns the merged list and, per entry, the overlay path it had in its shard
/// (`None` where the shard drew none) and the shard's position in `lists`.
pub fn merge_lists(
    lists: &[&[WorstImage]],
    capacity: usize,
    label: &str,
) -> Vec<(WorstImage, Option<(usize, String)>)> {
    let mut all: Vec<(WorstImage, Option<(usize, String)>)> = lists
        .iter()
        .enumerate()
        .flat_map(|(shard, list)| {
            list.iter()
                .map(move |image| (image.clone(), image.overlay.clone().map(|path| (shard, path))))
        })
        .collect();
    all.sort_by(|a, b| a.0.rank_order(&b.0));
    all.dedup_by_key(|entry| entry.0.index);
    all.truncate(capacity);
    for (rank, (image, source)) in all.iter_mut().enumerate() {
        image.overlay = source.as_ref().map(|_| overlay_path(label, rank, &image.id));
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels() -> WorstPixels {
        WorstPixels {
            image: RgbImage::new(1, 1),
            scored: GrayImage::new(1, 1),
            reference: vec![0],
            prediction: vec![1],
        }
    }

    /// (index, scored pixels, disagreeing pixels) of a few images, with ties in loss.
    const IMAGES: [(usize, u64, u64); 8] = [
        (7, 100, 10),
        (3, 200, 20),
        (5, 50, 40),
        (1, 100, 0),
        (9, 10, 1),
        (2, 0, 0),
        (4, 100, 40),
        (8, 80, 64),
    ];

    fn ranked(order: &[usize], capacity: usize) -> Vec<(usize, u64)> {
        let mut tracker = WorstTracker::new(capacity);
        for &i in order {
            let (index, scored, disagreeing) = IMAGES[i];
            tracker.offer(index, &format!("img{index}"), (scored, disagreeing), pixels);
        }
        tracker
            .list("int2")
            .iter()
            .map(|w| (w.index, w.disagreeing_pixels))
            .collect()
    }

    #[test]
    fn top_k_is_ranked_by_loss_then_index_whatever_the_order() {
        let forward: Vec<usize> = (0..IMAGES.len()).collect();
        let backward: Vec<usize> = forward.iter().rev().copied().collect();
        let shuffled = [4, 0, 6, 2, 7, 1, 5, 3];
        let expected = vec![(5, 40), (8, 64), (4, 40), (3, 20)];
        for order in [&forward[..], &backward, &shuffled] {
            assert_eq!(ranked(order, 4), expected, "{order:?}");
        }
        // Losses 0.1 (images 3, 7, 9) tie: the lower index first.
        assert_eq!(ranked(&forward, 7)[3..], [(3, 20), (7, 10), (9, 1)]);
        // Images that agree everywhere or have no scored pixel are never listed.
        assert_eq!(ranked(&forward, 100).len(), 6);
        assert!(ranked(&forward, 0).is_empty());
    }

    #[test]
    fn pixels_are_taken_only_for_entries_and_overlays_named_by_rank() {
        let mut tracker = WorstTracker::new(1);
        let mut copied = 0;
        for (index, disagreeing) in [(0, 5), (1, 3), (2, 9)] {
            tracker.offer(index, "a/b", (10, disagreeing), || {
                copied += 1;
                pixels()
            });
        }
        assert_eq!(copied, 2, "image 1 ranks below the kept image 0 and is not copied");
        let list = tracker.list("int4-rtn-g64");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].index, 2);
        assert_eq!(list[0].loss, 0.9);
        assert_eq!(
            list[0].overlay.as_deref(),
            Some("samples/worst/int4-rtn-g64/01_a_b.png")
        );
        // Carried over from an interrupted run: listed, no overlay.
        let resumed = WorstTracker::continuing(2, &list);
        assert_eq!(resumed.list("x")[0].overlay, None);
    }

    #[test]
    fn disagreement_skips_ignored_pixels() {
        let (scored, disagreeing) = disagreement(&[1, 2, 3, 4], &[1, 0, 0, 4], &[0, 255, 7, 7], 255).unwrap();
        assert_eq!((scored, disagreeing), (3, 1));
        assert!(disagreement(&[1, 2], &[1], &[0, 0], 255).is_err());
    }

    #[test]
    fn merged_lists_equal_one_list_of_every_image() {
        let offer_all = |images: &[(usize, u64, u64)], capacity: usize| {
            let mut tracker = WorstTracker::new(capacity);
            for &(index, scored, disagreeing) in images {
                tracker.offer(index, &format!("img{index}"), (scored, disagreeing), pixels);
            }
            tracker.list("int2")
        };
        let whole = offer_all(&IMAGES, 4);
        let (a, b) = IMAGES.split_at(3);
        let merged: Vec<WorstImage> = merge_lists(&[&offer_all(b, 4), &offer_all(a, 4)], 4, "int2")
            .into_iter()
            .map(|(image, _)| image)
            .collect();
        assert_eq!(merged, whole);
    }
}
