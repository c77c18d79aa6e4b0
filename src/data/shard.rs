//! Which rows of a dataset one run reads: `--offset`/`--limit` cut a window of rows, then `--shard I/N` takes
//! the I-th of N contiguous, disjoint parts of that window. Every row of the window lands in exactly one shard
//! for any N, including N larger than the number of rows (some shards are then empty).

use std::ops::Range;
use std::str::FromStr;

use serde::Serialize;

use crate::{Error, Result};

/// Row selection over a dataset's global row order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// (index, count), index 0-based and below count.
    pub shard: Option<(usize, usize)>,
    /// Rows skipped at the start of the dataset.
    pub offset: usize,
    /// At most this many rows after the offset (before sharding).
    pub limit: Option<usize>,
}

/// `--shard` / `eval.shard` as written: part `I/N` (0-based), or `auto` (resolved from the cluster's environment
/// when the evaluation is planned). Serialized back to the same text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ShardSpec {
    Part { index: usize, count: usize },
    Auto,
}

impl FromStr for ShardSpec {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        if text.trim() == "auto" {
            return Ok(ShardSpec::Auto);
        }
        let (index, count) = Selection::parse_shard(text)?;
        Ok(ShardSpec::Part { index, count })
    }
}

impl TryFrom<String> for ShardSpec {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<ShardSpec> for String {
    fn from(spec: ShardSpec) -> String {
        match spec {
            ShardSpec::Part { index, count } => format!("{index}/{count}"),
            ShardSpec::Auto => "auto".into(),
        }
    }
}

impl Selection {
    /// Parses `I/N` (0-based I < N) as given to `--shard`.
    pub fn parse_shard(text: &str) -> Result<(usize, usize)> {
        let bad = |why: &str| {
            Error::config(
                format!("--shard '{text}'"),
                format!("{why} (expected I/N with 0 <= I < N, e.g. 0/4)"),
            )
        };
        let (i, n) = text.trim().split_once('/').ok_or_else(|| bad("missing '/'"))?;
        let i: usize = i.trim().parse().map_err(|_| bad("I is not a non-negative integer"))?;
        let n: usize = n.trim().parse().map_err(|_| bad("N is not a non-negative integer"))?;
        if n == 0 {
            return Err(bad("N must be at least 1"));
        }
        if i >= n {
            return Err(bad("I must be below N"));
        }
        Ok((i, n))
    }

    /// The global rows this selection takes from a dataset of `total` rows.
    pub fn rows(&self, total: usize) -> Range<usize> {
        let start = self.offset.min(total);
        let end = match self.limit {
            Some(limit) => start.saturating_add(limit).min(total),
            None => total,
        };
        match self.shard {
            None => start..end,
            Some((index, count)) => {
                let len = end - start;
                // Part i covers [floor(i*len/N), floor((i+1)*len/N)): sizes differ by at most one.
                let bound = |i: usize| start + ((i as u128 * len as u128) / count as u128) as usize;
                bound(index)..bound(index + 1)
            }
        }
    }
}

/// SplitMix64 (Steele, Lea and Flood): a tiny generator whose stream is fixed by its seed on every platform.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `count` rows drawn without replacement, uniformly and fixed by `seed`, from `0..total` less the rows of
/// `exclude` (an evaluation's window, which a calibration sample must not touch), in ascending order. Fewer when
/// fewer remain.
pub fn sample_rows(total: usize, count: usize, seed: u64, exclude: Option<Range<usize>>) -> Vec<usize> {
    let mut candidates: Vec<usize> = (0..total)
        .filter(|r| !exclude.as_ref().is_some_and(|e| e.contains(r)))
        .collect();
    let take = count.min(candidates.len());
    let mut state = seed;
    // A partial Fisher-Yates shuffle: the first `take` places become the sample.
    for i in 0..take {
        let span = (candidates.len() - i) as u128;
        let j = i + ((u128::from(splitmix64(&mut state)) * span) >> 64) as usize;
        candidates.swap(i, j);
    }
    candidates.truncate(take);
    candidates.sort_unstable();
    candidates
}

impl FromStr for Selection {
    type Err = Error;

    /// Parses a shard alone (`I/N`) into a selection with no offset or limit.
    fn from_str(text: &str) -> Result<Self> {
        Ok(Selection {
            shard: Some(Selection::parse_shard(text)?),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_spread_seeded_and_avoid_the_excluded_window() {
        let a = sample_rows(1000, 50, 7, Some(100..900));
        assert_eq!(a.len(), 50);
        assert!(a.iter().all(|r| !(100..900).contains(r)));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, sample_rows(1000, 50, 7, Some(100..900)));
        assert_ne!(a, sample_rows(1000, 50, 8, Some(100..900)));
        assert_eq!(sample_rows(10, 50, 1, Some(2..10)), vec![0, 1]);
        assert_eq!(sample_rows(10, 3, 1, Some(0..10)), Vec::<usize>::new());
    }

    #[test]
    fn shards_cover_every_row_once_for_many_counts() {
        for total in [0usize, 1, 5, 12, 100, 101] {
            for (offset, limit) in [(0, None), (3, None), (2, Some(7)), (0, Some(1000)), (200, Some(3))] {
                let window = Selection {
                    shard: None,
                    offset,
                    limit,
                }
                .rows(total);
                for n in [1usize, 2, 3, 7, 50] {
                    let mut seen = vec![0u32; total];
                    let mut sizes = Vec::new();
                    for i in 0..n {
                        let r = Selection {
                            shard: Some((i, n)),
                            offset,
                            limit,
                        }
                        .rows(total);
                        sizes.push(r.len());
                        for row in r {
                            seen[row] += 1;
                        }
                    }
                    for (row, count) in seen.iter().enumerate() {
                        let expected = u32::from(window.contains(&row));
                        assert_eq!(
                            *count, expected,
                            "total {total} offset {offset} limit {limit:?} n {n} row {row}"
                        );
                    }
                    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                    assert!(max - min <= 1, "unbalanced shards {sizes:?}");
                }
            }
        }
    }

    #[test]
    fn offset_and_limit_cut_a_window() {
        let s = Selection {
            shard: None,
            offset: 3,
            limit: Some(4),
        };
        assert_eq!(s.rows(10), 3..7);
        assert_eq!(s.rows(5), 3..5);
        assert_eq!(s.rows(2), 2..2);
        assert_eq!(Selection::default().rows(9), 0..9);
    }

    #[test]
    fn shard_parsing_accepts_and_explains() {
        assert_eq!(Selection::parse_shard("0/1").unwrap(), (0, 1));
        assert_eq!(Selection::parse_shard(" 3 / 7 ").unwrap(), (3, 7));
        let s: Selection = "2/5".parse().unwrap();
        assert_eq!(s.shard, Some((2, 5)));
        for (text, why) in [
            ("3", "missing '/'"),
            ("a/2", "I is not"),
            ("1/x", "N is not"),
            ("0/0", "at least 1"),
            ("2/2", "below N"),
            ("-1/2", "I is not"),
        ] {
            let e = Selection::parse_shard(text).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(text), "{text}: {e}");
        }
    }
}
