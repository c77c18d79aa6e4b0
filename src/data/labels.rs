//! Label conventions: turning the values stored in annotation masks into the class ids that are scored.
//!
//! Mirrors `evaluate`'s `mean_iou` preprocessing of the label (prediction untouched): first the optional
//! `label_map` {from: to}, then `reduce_labels` (0 -> 255, k -> k-1, and 254 -> 255 after the shift, as
//! `evaluate` does). Pixels equal to `ignore_index` are not scored by the metrics. One difference on purpose:
//! the label map is applied simultaneously (a lookup table), whereas `evaluate` applies its dict entry by entry,
//! so a chain such as {1: 2, 2: 3} there depends on the dict's order; here 1 -> 2 and 2 -> 3, as written.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{Error, Result};

/// How annotation values become scored class ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LabelOptions {
    /// ADE20K / Scene Parse 150 convention: value 0 is "other" (not scored), values 1..=150 are classes 0..=149.
    pub reduce_labels: bool,
    /// Label value that the metrics skip (255 by default, as in `evaluate` and mmsegmentation).
    pub ignore_index: u8,
    /// Applied before `reduce_labels`, e.g. Cityscapes label ids to train ids.
    pub label_map: Option<BTreeMap<u8, u8>>,
}

impl Default for LabelOptions {
    fn default() -> Self {
        LabelOptions {
            reduce_labels: false,
            ignore_index: 255,
            label_map: None,
        }
    }
}

impl LabelOptions {
    /// The 256-entry table that `apply` uses: entry v is what annotation value v becomes.
    pub fn lookup_table(&self) -> [u8; 256] {
        let mut table = [0u8; 256];
        for (value, slot) in table.iter_mut().enumerate() {
            let mut v = value as u8;
            if let Some(map) = &self.label_map
                && let Some(&to) = map.get(&v)
            {
                v = to;
            }
            if self.reduce_labels {
                // evaluate: label[label == 0] = 255; label = label - 1; label[label == 254] = 255 (uint8 wraps).
                v = if v == 0 { 255 } else { v - 1 };
                if v == 254 {
                    v = 255;
                }
            }
            *slot = v;
        }
        table
    }

    /// Rewrites annotation values in place into scored class ids.
    pub fn apply(&self, labels: &mut [u8]) {
        if !self.reduce_labels && self.label_map.is_none() {
            return;
        }
        let table = self.lookup_table();
        for v in labels.iter_mut() {
            *v = table[*v as usize];
        }
    }

    /// Parses a label map written as `from:to` pairs separated by commas, e.g. `0:255,7:0,8:1`.
    pub fn parse_label_map(text: &str) -> Result<BTreeMap<u8, u8>> {
        let mut map = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let entry = format!("label map entry '{pair}'");
            let (from, to) = pair
                .split_once(':')
                .ok_or_else(|| Error::config(&entry, format!("{entry} is not of the form from:to")))?;
            let parse = |s: &str| {
                s.trim()
                    .parse::<u8>()
                    .map_err(|_| Error::config(&entry, format!("'{}' is not a label value 0..=255", s.trim())))
            };
            let (from, to) = (parse(from)?, parse(to)?);
            if map.insert(from, to).is_some() {
                return Err(Error::config("label map", format!("label map maps {from} twice")));
            }
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `evaluate`'s sequence written out literally on one value, for comparison.
    fn evaluate_reduce(v: u8) -> u8 {
        let v = if v == 0 { 255 } else { v };
        let v = v.wrapping_sub(1);
        if v == 254 { 255 } else { v }
    }

    #[test]
    fn reduce_labels_matches_evaluate_on_every_value() {
        let opts = LabelOptions {
            reduce_labels: true,
            ..Default::default()
        };
        let mut all: Vec<u8> = (0..=255).collect();
        opts.apply(&mut all);
        for (v, got) in all.iter().enumerate() {
            assert_eq!(*got, evaluate_reduce(v as u8), "value {v}");
        }
        assert_eq!(all[0], 255);
        assert_eq!(all[1], 0);
        assert_eq!(all[150], 149);
        assert_eq!(all[255], 255);
    }

    #[test]
    fn no_options_leave_labels_untouched() {
        let mut v: Vec<u8> = (0..=255).collect();
        LabelOptions::default().apply(&mut v);
        assert!(v.iter().enumerate().all(|(i, &x)| i as u8 == x));
    }

    #[test]
    fn label_map_is_applied_before_reduce_and_simultaneously() {
        let map = LabelOptions::parse_label_map("1:2, 2:3,0:9").unwrap();
        let opts = LabelOptions {
            reduce_labels: false,
            ignore_index: 255,
            label_map: Some(map.clone()),
        };
        let mut v = vec![0, 1, 2, 3];
        opts.apply(&mut v);
        assert_eq!(v, vec![9, 2, 3, 3]);
        let opts = LabelOptions {
            reduce_labels: true,
            ignore_index: 255,
            label_map: Some(map),
        };
        let mut v = vec![0, 1, 2, 3];
        opts.apply(&mut v);
        assert_eq!(v, vec![8, 1, 2, 2]);
    }

    #[test]
    fn label_map_parse_errors_name_the_entry() {
        let e = LabelOptions::parse_label_map("1:2,3").unwrap_err().to_string();
        assert!(e.contains("'3'"), "{e}");
        let e = LabelOptions::parse_label_map("1:256").unwrap_err().to_string();
        assert!(e.contains("'256'"), "{e}");
        let e = LabelOptions::parse_label_map("1:2,1:3").unwrap_err().to_string();
        assert!(e.contains("maps 1 twice"), "{e}");
        assert!(LabelOptions::parse_label_map("").unwrap().is_empty());
    }
}
