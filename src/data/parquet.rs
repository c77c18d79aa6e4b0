//! Parquet datasets, as written by Hugging Face `datasets` (and the Hub's Parquet conversion): finding the files
//! (locally or on the Hub through hf-hub's cache), indexing rows from the footers' row counts, and reading the
//! image and label bytes of a row range one row group at a time (never a whole file).

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection, RowSelector,
};

use super::{Problem, split_aliases};
use crate::{Error, Result};

/// Rows decoded from Parquet per Arrow batch: small, so memory follows the loader's bound, not the row group's.
const ARROW_BATCH_ROWS: usize = 8;

/// All `.parquet` files under `dir` (sorted by path). When some of their relative paths name a split (a folder
/// component, or a `<split>-NNNNN-of-NNNNN.parquet` file name), only those naming `split` are kept, and it is an
/// error if none do.
pub fn find_parquet_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect(dir, &mut files)?;
    files.sort();
    let split_of = |path: &PathBuf| -> Option<String> {
        let relative = path.strip_prefix(dir).unwrap_or(path);
        let mut names: Vec<String> = relative
            .iter()
            .map(|c| c.to_string_lossy().to_ascii_lowercase())
            .collect();
        let file = names.pop().unwrap_or_default();
        let known = ["train", "training", "validation", "val", "valid", "test", "testing"];
        names
            .into_iter()
            .rev()
            .find(|n| known.contains(&n.as_str()))
            .or_else(|| {
                file.split_once('-')
                    .map(|(s, _)| s.to_string())
                    .filter(|s| known.contains(&s.as_str()))
            })
    };
    if !files.iter().any(|f| split_of(f).is_some()) {
        return Ok(files);
    }
    let wanted = split_aliases(split);
    let (kept, other): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| split_of(f).is_some_and(|s| wanted.contains(&s)));
    if kept.is_empty() {
        let mut found: Vec<String> = other.iter().filter_map(split_of).collect();
        found.sort();
        found.dedup();
        return Err(Error::not_found(
            dir.display().to_string(),
            format!(
                "no Parquet files for split '{split}' (splits found: {})",
                found.join(", ")
            ),
        ));
    }
    Ok(kept)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
            out.push(path);
        }
    }
    Ok(())
}

/// The Parquet files of a Hub split that a run reads, on this machine, and the rows of the split's files that it
/// does not need (before and after them, in the split's order), so that global row numbers stay those of the
/// whole split.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HubParquetFiles {
    pub files: Vec<PathBuf>,
    pub rows_before: usize,
    pub rows_after: usize,
}

/// First guess of a Parquet footer's size: one Range request reads it whole for `datasets`' files (a few KiB).
const FOOTER_GUESS_BYTES: u64 = 64 << 10;
/// Largest footer read remotely (row-group statistics of a very wide file); a larger one downloads the file.
const MAX_FOOTER_BYTES: u64 = 64 << 20;

/// Lists `<config>/<split>/*.parquet` of a Hub dataset (its Parquet conversion, usually at revision
/// `refs/convert/parquet`) and fetches, through the shared Hub cache, only the files that hold the rows
/// `selection` takes. Row counts per file come from the files' footers: a cached file's own, else the footer's
/// bytes alone, by an HTTP Range request (no other Hub API is needed, and the counts are exact for the listed
/// commit). They are saved in segq's cache (`hub-parquet/<repo>/<commit>/<config>/<split>.json`) so that an
/// offline run (`HF_HUB_OFFLINE`) knows the whole split even when only some files were downloaded. When a count
/// cannot be had (a server without Range support, offline without saved counts), every file is fetched, as
/// huggingface_hub would.
pub fn hub_parquet_files(
    repo: &crate::hub::HubRepo,
    config: &str,
    split: &str,
    selection: &super::Selection,
) -> Result<HubParquetFiles> {
    let splits = split_aliases(split);
    let wanted = |name: &str| -> bool {
        let parts: Vec<&str> = name.split('/').collect();
        parts.len() == 3 && parts[0] == config && splits.iter().any(|s| s == parts[1]) && parts[2].ends_with(".parquet")
    };
    let listing = repo.listing()?;
    let counts_path = listing
        .commit
        .as_ref()
        .map(|commit| row_counts_path(repo, commit, config, split));
    let saved = counts_path.as_deref().and_then(read_row_counts);
    let mut names: Vec<String> = listing.files.iter().filter(|n| wanted(n)).cloned().collect();
    names.sort();
    if listing.from_cache
        && let Some(saved) = &saved
    {
        // The cache holds only what was downloaded; the saved counts name every file of the split.
        names = saved.iter().map(|(name, _)| name.clone()).collect();
    }
    if names.is_empty() {
        let mut available: Vec<&str> = listing
            .files
            .iter()
            .filter(|n| n.ends_with(".parquet"))
            .filter_map(|n| n.rsplit_once('/').map(|(dir, _)| dir))
            .collect();
        available.sort();
        available.dedup();
        let available = if available.is_empty() {
            "none".to_string()
        } else {
            available.join(", ")
        };
        return Err(Error::not_found(
            repo.describe(),
            format!("no Parquet files for {config}/{split} (available: {available})"),
        ));
    }
    let fetch_all = |names: &[String]| -> Result<HubParquetFiles> {
        Ok(HubParquetFiles {
            files: names.iter().map(|name| repo.get(name)).collect::<Result<_>>()?,
            ..Default::default()
        })
    };
    if *selection == super::Selection::default() {
        return fetch_all(&names);
    }
    let counts: Vec<usize> = match saved.filter(|saved| saved.iter().map(|(n, _)| n).eq(names.iter())) {
        Some(saved) => saved.into_iter().map(|(_, rows)| rows).collect(),
        None => match count_rows(repo, &names, listing.commit.as_deref()) {
            Ok(counts) => {
                if !listing.from_cache
                    && let Some(path) = &counts_path
                {
                    save_row_counts(path, &names, &counts);
                }
                counts
            }
            Err(why) => {
                tracing::info!(
                    dataset = %repo.describe(),
                    "fetching all {} Parquet files of {config}/{split}: {why}",
                    names.len()
                );
                return fetch_all(&names);
            }
        },
    };
    let total: usize = counts.iter().sum();
    let rows = selection.rows(total);
    let mut start = 0;
    let mut needed = Vec::new();
    for (index, &count) in counts.iter().enumerate() {
        if start < rows.end && rows.start < start + count {
            needed.push(index);
        }
        start += count;
    }
    let (first, last) = match (needed.first(), needed.last()) {
        (Some(&first), Some(&last)) => (first, last),
        _ => {
            return Ok(HubParquetFiles {
                files: Vec::new(),
                rows_before: total,
                rows_after: 0,
            });
        }
    };
    tracing::info!(
        dataset = %repo.describe(),
        "reading {} of the {} Parquet files of {config}/{split} (rows {}..{} of {total})",
        needed.len(),
        names.len(),
        rows.start,
        rows.end
    );
    Ok(HubParquetFiles {
        files: names[first..=last]
            .iter()
            .map(|name| repo.get(name))
            .collect::<Result<_>>()?,
        rows_before: counts[..first].iter().sum(),
        rows_after: counts[last + 1..].iter().sum(),
    })
}

/// Rows of each named file: from the cached file's footer, else from the footer alone over HTTP. Fails (with the
/// reason, one line) when a count cannot be had without downloading a file.
fn count_rows(
    repo: &crate::hub::HubRepo,
    names: &[String],
    commit: Option<&str>,
) -> std::result::Result<Vec<usize>, String> {
    names
        .iter()
        .map(|name| {
            if repo.is_cached(name) {
                let path = repo.get(name).map_err(|e| e.to_string())?;
                let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let metadata = parquet::file::metadata::ParquetMetaDataReader::new()
                    .parse_and_finish(&file)
                    .map_err(|e| format!("{}: not a readable Parquet file: {e}", path.display()))?;
                return Ok(metadata_rows(&metadata));
            }
            if repo.offline() {
                return Err(format!("`{name}` is not cached and HF_HUB_OFFLINE is set"));
            }
            let commit = commit.ok_or("the Hub gave no commit for the listing")?;
            remote_footer_rows(repo, name, commit)
        })
        .collect()
}

fn metadata_rows(metadata: &parquet::file::metadata::ParquetMetaData) -> usize {
    metadata.row_groups().iter().map(|g| g.num_rows().max(0) as usize).sum()
}

/// A remote Parquet file's row count from its footer: the last 64 KiB, and once more when the footer is longer.
fn remote_footer_rows(repo: &crate::hub::HubRepo, name: &str, commit: &str) -> std::result::Result<usize, String> {
    let mut want = FOOTER_GUESS_BYTES;
    loop {
        let (tail, size) = repo.read_tail(name, commit, want).map_err(|e| e.to_string())?;
        match footer_from_tail(&tail, size).map_err(|why| format!("`{name}`: {why}"))? {
            Footer::Rows(rows) => return Ok(rows),
            Footer::Needs(bytes) if bytes > want && bytes <= MAX_FOOTER_BYTES => want = bytes,
            Footer::Needs(bytes) => {
                return Err(format!(
                    "`{name}`: a footer of {bytes} bytes is too large to read alone"
                ));
            }
        }
    }
}

/// What the end of a Parquet file says.
#[derive(Debug, PartialEq, Eq)]
enum Footer {
    Rows(usize),
    /// The footer (with its 8-byte trailer) is this long: read that many bytes from the end.
    Needs(u64),
}

/// Decodes the row count from the last bytes of a Parquet file of `size` bytes (`tail` is its end).
fn footer_from_tail(tail: &[u8], size: u64) -> std::result::Result<Footer, String> {
    let n = tail.len();
    if n < 8 || &tail[n - 4..] != b"PAR1" {
        return Err("does not end like a Parquet file (PAR1)".into());
    }
    let length = u32::from_le_bytes([tail[n - 8], tail[n - 7], tail[n - 6], tail[n - 5]]) as u64;
    if length + 8 > size {
        return Err(format!("footer length {length} exceeds the file's {size} bytes"));
    }
    if length + 8 > n as u64 {
        return Ok(Footer::Needs(length + 8));
    }
    let start = n - 8 - length as usize;
    let metadata = parquet::file::metadata::ParquetMetaDataReader::decode_metadata(&tail[start..n - 8])
        .map_err(|e| format!("unreadable Parquet footer: {e}"))?;
    Ok(Footer::Rows(metadata_rows(&metadata)))
}

/// Where the row counts of a Hub split's Parquet files are kept: segq's cache, by repo and commit (a commit's
/// files never change, so the counts never go stale).
fn row_counts_path(repo: &crate::hub::HubRepo, commit: &str, config: &str, split: &str) -> PathBuf {
    let safe = |s: &str| s.replace(['/', '\\'], "_");
    crate::hub::segq_cache_dir()
        .join("hub-parquet")
        .join(repo.folder_name())
        .join(safe(commit))
        .join(safe(config))
        .join(format!("{}.json", safe(split)))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RowCounts {
    files: Vec<FileRows>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FileRows {
    name: String,
    rows: usize,
}

/// Saved counts, if any and readable (an unreadable file is ignored: the counts are found again).
fn read_row_counts(path: &Path) -> Option<Vec<(String, usize)>> {
    let text = std::fs::read_to_string(path).ok()?;
    let counts: RowCounts = serde_json::from_str(&text).ok()?;
    Some(counts.files.into_iter().map(|f| (f.name, f.rows)).collect())
}

/// Saves the counts; failing to is only a debug note (they are found again next time, with network).
fn save_row_counts(path: &Path, names: &[String], counts: &[usize]) {
    let counts = RowCounts {
        files: names
            .iter()
            .zip(counts)
            .map(|(name, &rows)| FileRows {
                name: name.clone(),
                rows,
            })
            .collect(),
    };
    let result = path
        .parent()
        .map_or(Ok(()), |dir| {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
        })
        .and_then(|()| {
            let text = serde_json::to_vec_pretty(&counts).map_err(|e| Error::internal(e.to_string()))?;
            crate::outputs::write_atomically(path, |tmp| std::fs::write(tmp, &text).map_err(|e| Error::io(tmp, e)))
        });
    if let Err(e) = result {
        tracing::debug!("cannot save Parquet row counts: {e}");
    }
}

/// How the image or label bytes are stored in a column.
#[derive(Clone, Debug)]
enum ColumnKind {
    /// `datasets` Image feature: struct {bytes, path}.
    Struct,
    /// Plain binary column.
    Binary,
}

/// One Parquet file's index: its footer, row counts and where the two columns are.
pub struct ParquetFile {
    pub path: PathBuf,
    /// Rows per row group, from the footer.
    pub row_groups: Vec<usize>,
    pub rows: usize,
    metadata: ArrowReaderMetadata,
    /// Root column indices of image and label, or why the file cannot provide them.
    columns: std::result::Result<[(usize, ColumnKind); 2], Problem>,
    column_names: [String; 2],
}

impl ParquetFile {
    /// Reads the footer (only) and checks the columns. A footer that cannot be read is an error (the row count is
    /// unknown); a missing or mistyped column is kept as a per-file problem, reported for each of its rows.
    pub fn open(path: &Path, image_column: &str, label_column: &str) -> Result<ParquetFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| Error::invalid(path.display().to_string(), format!("not a readable Parquet file: {e}")))?;
        let row_groups: Vec<usize> = metadata
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows().max(0) as usize)
            .collect();
        let rows = row_groups.iter().sum();
        let schema = metadata.schema().clone();
        let find = |name: &str| -> std::result::Result<(usize, ColumnKind), Problem> {
            let Ok(index) = schema.index_of(name) else {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(format!("missing column '{name}' (columns: {})", names.join(", ")).into());
            };
            match schema.field(index).data_type() {
                DataType::Struct(fields) => match fields.iter().find(|f| f.name() == "bytes").map(|f| f.data_type()) {
                    Some(DataType::Binary | DataType::LargeBinary | DataType::BinaryView) => {
                        Ok((index, ColumnKind::Struct))
                    }
                    _ => Err(format!("column '{name}' is a struct without a binary 'bytes' field").into()),
                },
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Ok((index, ColumnKind::Binary)),
                other => {
                    Err(format!("column '{name}' has type {other}, expected {{bytes, path}} struct or binary").into())
                }
            }
        };
        let columns = find(image_column).and_then(|i| Ok([i, find(label_column)?]));
        Ok(ParquetFile {
            path: path.to_path_buf(),
            row_groups,
            rows,
            metadata,
            columns,
            column_names: [image_column.to_string(), label_column.to_string()],
        })
    }

    /// Why this file's rows cannot be read (missing column, wrong type), if so.
    pub fn problem(&self) -> Option<&Problem> {
        self.columns.as_ref().err()
    }

    /// Reads rows `range` (file-local) in order, one row group at a time, calling `emit` once per row.
    /// `emit` returns false to stop early.
    pub fn read_rows(&self, range: Range<usize>, emit: &mut dyn FnMut(usize, RawRow) -> bool) {
        let columns = match &self.columns {
            Ok(columns) => columns,
            Err(problem) => {
                for row in range {
                    if !emit(
                        row,
                        RawRow {
                            image_path: None,
                            bytes: Err(problem.clone()),
                        },
                    ) {
                        return;
                    }
                }
                return;
            }
        };
        let mut group_start = 0;
        for (group, &group_rows) in self.row_groups.iter().enumerate() {
            let group_range = group_start..group_start + group_rows;
            group_start += group_rows;
            let lo = range.start.max(group_range.start);
            let hi = range.end.min(group_range.end);
            if lo >= hi {
                continue;
            }
            let mut next_row = lo;
            let outcome = self.read_group(group, group_range.clone(), lo..hi, columns, &mut |row, result| {
                next_row = row + 1;
                emit(row, result)
            });
            match outcome {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    // The rest of the row group is unreadable: every remaining selected row reports it.
                    let why = Problem::from(format!(
                        "cannot read row group {group} (rows {}..{}): {e}",
                        group_range.start, group_range.end
                    ));
                    for row in next_row..hi {
                        if !emit(
                            row,
                            RawRow {
                                image_path: None,
                                bytes: Err(why.clone()),
                            },
                        ) {
                            return;
                        }
                    }
                }
            }
        }
    }

    fn read_group(
        &self,
        group: usize,
        group_range: Range<usize>,
        rows: Range<usize>,
        columns: &[(usize, ColumnKind); 2],
        emit: &mut dyn FnMut(usize, RawRow) -> bool,
    ) -> std::result::Result<bool, Problem> {
        let file = File::open(&self.path).map_err(|e| e.to_string())?;
        let mut selectors = vec![];
        if rows.start > group_range.start {
            selectors.push(RowSelector::skip(rows.start - group_range.start));
        }
        selectors.push(RowSelector::select(rows.len()));
        if group_range.end > rows.end {
            selectors.push(RowSelector::skip(group_range.end - rows.end));
        }
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone());
        let mask = ProjectionMask::roots(builder.parquet_schema(), [columns[0].0, columns[1].0]);
        let reader = builder
            .with_row_groups(vec![group])
            .with_row_selection(RowSelection::from(selectors))
            .with_projection(mask)
            .with_batch_size(ARROW_BATCH_ROWS)
            .build()
            .map_err(|e| e.to_string())?;
        let mut row = rows.start;
        for batch in reader {
            let batch = batch.map_err(|e| e.to_string())?;
            let image = column(&batch, &self.column_names[0])?;
            let label = column(&batch, &self.column_names[1])?;
            for i in 0..batch.num_rows() {
                let image_path = cell_path(image, &columns[0].1, i);
                let bytes = cell_bytes(image, &columns[0].1, i, &self.column_names[0])
                    .and_then(|image| Ok((image, cell_bytes(label, &columns[1].1, i, &self.column_names[1])?)));
                let result = RawRow { image_path, bytes };
                if !emit(row, result) {
                    return Ok(false);
                }
                row += 1;
            }
        }
        if row != rows.end {
            return Err(format!(
                "row group ended after {} of {} selected rows",
                row - rows.start,
                rows.len()
            )
            .into());
        }
        Ok(true)
    }
}

/// One row as read: its image bytes and label bytes, or why they cannot be had.
pub struct RawRow {
    /// The image's stored `path`, when the column is a {bytes, path} struct and it is set.
    pub image_path: Option<String>,
    pub bytes: std::result::Result<(Vec<u8>, Vec<u8>), Problem>,
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> std::result::Result<&'a ArrayRef, Problem> {
    batch
        .column_by_name(name)
        .ok_or_else(|| format!("column '{name}' missing from the decoded batch").into())
}

fn binary_value(array: &dyn Array, i: usize) -> Option<Vec<u8>> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Binary => Some(array.as_binary::<i32>().value(i).to_vec()),
        DataType::LargeBinary => Some(array.as_binary::<i64>().value(i).to_vec()),
        DataType::BinaryView => Some(array.as_binary_view().value(i).to_vec()),
        _ => None,
    }
}

fn string_value(array: &dyn Array, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        _ => None,
    }
}

fn cell_path(array: &ArrayRef, kind: &ColumnKind, i: usize) -> Option<String> {
    match kind {
        ColumnKind::Binary => None,
        ColumnKind::Struct => {
            let array = array.as_struct_opt()?;
            if array.is_null(i) {
                return None;
            }
            cell_path_of(array, i)
        }
    }
}

fn cell_bytes(array: &ArrayRef, kind: &ColumnKind, i: usize, name: &str) -> std::result::Result<Vec<u8>, Problem> {
    if array.is_null(i) {
        return Err(format!("'{name}' is null").into());
    }
    match kind {
        ColumnKind::Binary => binary_value(array.as_ref(), i).ok_or_else(|| format!("'{name}' is not binary").into()),
        ColumnKind::Struct => {
            let array = array
                .as_struct_opt()
                .ok_or_else(|| Problem::from(format!("'{name}' is not a struct")))?;
            match array.column_by_name("bytes").and_then(|b| binary_value(b.as_ref(), i)) {
                Some(bytes) => Ok(bytes),
                None => {
                    let path = cell_path_of(array, i);
                    Err(format!(
                        "'{name}' has no embedded bytes{}",
                        path.map(|p| format!(" (only a path: {p})")).unwrap_or_default()
                    )
                    .into())
                }
            }
        }
    }
}

fn cell_path_of(array: &arrow_array::StructArray, i: usize) -> Option<String> {
    array
        .column_by_name("path")
        .and_then(|p| string_value(p.as_ref(), i))
        .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &[u8] = include_bytes!("../../assets/demo/ade/parquet/scene_parsing/validation/0000.parquet");

    fn demo_rows() -> usize {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/demo/ade/parquet/scene_parsing/validation/0000.parquet"
        );
        let reader = parquet::file::metadata::ParquetMetaDataReader::new()
            .parse_and_finish(&File::open(path).unwrap())
            .unwrap();
        metadata_rows(&reader)
    }

    #[test]
    fn a_footer_is_read_from_the_tail_alone() {
        let size = DEMO.len() as u64;
        let rows = demo_rows();
        assert!(rows > 0);
        assert_eq!(footer_from_tail(DEMO, size), Ok(Footer::Rows(rows)));
        // A tail too short for the footer asks for exactly the footer and its trailer.
        let needed = match footer_from_tail(&DEMO[DEMO.len() - 16..], size).unwrap() {
            Footer::Needs(n) => n,
            other => panic!("{other:?}"),
        };
        assert!(needed > 16 && needed < size, "{needed}");
        let tail = &DEMO[DEMO.len() - needed as usize..];
        assert_eq!(footer_from_tail(tail, size), Ok(Footer::Rows(rows)));
        // Not Parquet, or a length beyond the file: one-line reasons.
        assert!(
            footer_from_tail(b"<html>not parquet</html>", 24)
                .unwrap_err()
                .contains("PAR1")
        );
        let mut lying = DEMO[DEMO.len() - 8..].to_vec();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(footer_from_tail(&lying, 8).unwrap_err().contains("exceeds"));
    }
}
