//! Datasets: where evaluation examples come from (Parquet from `datasets` / the Hub, the ADEChallengeData2016
//! folders, generic image/mask folders, list files), which rows a run takes (offset, limit, shard), and the
//! parallel, bounded-memory loader that decodes them into RGB images and scored label masks, in a fixed order.
//!
//! Layout: `labels` (label conventions), `shard` (row selection), `decode` (bytes to pixels), `folders`
//! (file-pair layouts), `parquet` (Parquet files, Hub listing), `loader` (the pipeline and the on-error policy).

pub mod decode;
pub mod folders;
pub mod labels;
pub mod loader;
pub mod parquet;
pub mod shard;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use decode::DecodeOptions;
pub use labels::LabelOptions;
pub use loader::{Example, ImageCheck, LoadStats, Loader, LoaderOptions};
pub use parquet::{HubParquetFiles, hub_parquet_files};
pub use shard::{Selection, ShardSpec};

/// The demo dataset's Parquet files, compiled into the binary so `segq eval` works anywhere with no network.
const DEMO_PARQUET: [(&str, &[u8]); 2] = [
    (
        "0000.parquet",
        include_bytes!("../../assets/demo/ade/parquet/scene_parsing/validation/0000.parquet"),
    ),
    (
        "0001.parquet",
        include_bytes!("../../assets/demo/ade/parquet/scene_parsing/validation/0001.parquet"),
    ),
];

/// The embedded demo dataset (12 synthetic scenes in Scene Parse 150's Parquet schema), written once to
/// `$XDG_CACHE_HOME/segq/demo-<version>/` (or `~/.cache/...`) and read from there like any Parquet dataset.
pub fn demo_dataset() -> Result<DatasetSpec> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join("segq").join(format!("demo-{}", crate::VERSION));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let mut files = Vec::new();
    for (name, bytes) in DEMO_PARQUET {
        let path = dir.join(name);
        let fresh = std::fs::metadata(&path)
            .map(|m| m.len() == bytes.len() as u64)
            .unwrap_or(false);
        if !fresh {
            // Atomically, so concurrent runs never read a half-written file.
            crate::outputs::write_atomically(&path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e)))?;
        }
        files.push(path);
    }
    Ok(DatasetSpec::Parquet {
        files,
        image_column: DEFAULT_IMAGE_COLUMN.to_string(),
        label_column: DEFAULT_LABEL_COLUMN.to_string(),
        rows_before: 0,
        rows_after: 0,
    })
}

use crate::{Error, Result};

/// What is wrong with one example (or with every row of a file), as one line without the location: the loader
/// puts the file, row and id in front when it turns it into an [`Error`] or a skip reason. Its own type rather
/// than [`Error`] because it is only ever a part of such a message, never reported alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Problem(String);

impl From<String> for Problem {
    fn from(text: String) -> Self {
        Problem(text)
    }
}

impl From<&str> for Problem {
    fn from(text: &str) -> Self {
        Problem(text.to_string())
    }
}

/// Default column names of Scene Parse 150 (and of `datasets`' Image features in general).
pub const DEFAULT_IMAGE_COLUMN: &str = "image";
pub const DEFAULT_LABEL_COLUMN: &str = "annotation";

/// Resolves a dataset source as users write it (`--dataset`, `dataset.source`) to files on this machine:
/// "embedded"/"demo", an existing path or `IMAGES_DIR,MASKS_DIR` (see [`resolve_local`]), else a Hub dataset id whose
/// Parquet conversion is downloaded (`subset`, `split`): only the files holding the rows `selection` takes (see
/// [`hub_parquet_files`]). Returns the spec and a description for results and logs.
pub fn resolve_source(
    source: &str,
    split: &str,
    subset: &str,
    image_column: &str,
    label_column: &str,
    selection: &Selection,
) -> Result<(DatasetSpec, String)> {
    if source == "embedded" || source == "demo" {
        return Ok((
            demo_dataset()?,
            "embedded demo dataset (12 synthetic scenes, Scene Parse 150 schema)".into(),
        ));
    }
    let spec = if Path::new(source).exists() || source.contains(',') {
        resolve_local(source, split, image_column, label_column)?
    } else {
        let id = crate::hub::HubId::parse_dataset(source, "refs/convert/parquet").ok_or_else(|| {
            Error::not_found(
                format!("--dataset `{source}`"),
                "no such file or folder, and not a Hub dataset id ([owner/]name[@revision])",
            )
        })?;
        let hub = parquet::hub_parquet_files(&crate::hub::HubRepo::dataset(id), subset, split, selection)?;
        DatasetSpec::Parquet {
            files: hub.files,
            image_column: image_column.to_string(),
            label_column: label_column.to_string(),
            rows_before: hub.rows_before,
            rows_after: hub.rows_after,
        }
    };
    Ok((spec, source.to_string()))
}

/// A dataset whose files are on this machine, in one of the supported layouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum DatasetSpec {
    /// Parquet files read in this order; image and label columns hold {bytes, path} structs or raw bytes.
    Parquet {
        files: Vec<PathBuf>,
        image_column: String,
        label_column: String,
        /// Rows of the dataset's files before `files` that were not fetched (a Hub split read in part): global
        /// row numbers start after them.
        #[serde(skip_serializing_if = "is_zero")]
        rows_before: usize,
        /// Rows of the dataset's files after `files` that were not fetched.
        #[serde(skip_serializing_if = "is_zero")]
        rows_after: usize,
    },
    /// `root/images/<split>/*.jpg` with `root/annotations/<split>/<same stem>.png`.
    AdeFolder { root: PathBuf, split: String },
    /// Images (searched recursively) paired with the mask at the same relative path and stem, extension `.png`.
    Folders { images: PathBuf, masks: PathBuf },
    /// Lines `image<TAB>mask`, paths relative to the list file's folder.
    ListFile { path: PathBuf },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What to do with an example that cannot be read or decoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum OnError {
    /// Stop with an error naming the file and row.
    #[default]
    Fail,
    /// Leave it out, count it, and keep its reason (the first few).
    Skip,
}

impl TryFrom<String> for OnError {
    type Error = Error;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl FromStr for OnError {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => Err(Error::config(
                "on_error",
                format!("on_error '{other}': expected 'fail' or 'skip'"),
            )),
        }
    }
}

/// The folder names a split may go by (`train`/`training`, `validation`/`val`, `test`/`testing`).
pub fn split_aliases(split: &str) -> Vec<String> {
    let s = split.trim().to_ascii_lowercase();
    let names: &[&str] = match s.as_str() {
        "train" | "training" => &["train", "training"],
        "validation" | "val" | "valid" => &["validation", "val", "valid"],
        "test" | "testing" => &["test", "testing"],
        _ => &[],
    };
    if names.is_empty() {
        vec![s]
    } else {
        names.iter().map(|n| n.to_string()).collect()
    }
}

/// Works out the layout of a local dataset path:
/// - a `.parquet` file, or a folder holding `.parquet` files (searched recursively; when their paths name splits,
///   as `<config>/<split>/NNNN.parquet` or `<split>-NNNNN-of-NNNNN.parquet` do, only `split`'s files are kept);
/// - an ADE root (`images/<split>/` and `annotations/<split>/`), also when given its parent holding
///   `ADEChallengeData2016/`;
/// - a folder with `images/` and `annotations/` (or `masks/`, `labels/`) holding files directly: generic folders;
/// - `IMAGES_DIR,MASKS_DIR`: generic folders;
/// - a `.txt`, `.tsv` or `.lst` file: a list file.
pub fn resolve_local(spec: &str, split: &str, image_column: &str, label_column: &str) -> Result<DatasetSpec> {
    if let Some((images, masks)) = spec.split_once(',') {
        let (images, masks) = (PathBuf::from(images.trim()), PathBuf::from(masks.trim()));
        for dir in [&images, &masks] {
            if !dir.is_dir() {
                return Err(Error::not_found(
                    dir.display().to_string(),
                    format!(
                        "dataset '{spec}': {} is not a folder (expected IMAGES_DIR,MASKS_DIR)",
                        dir.display()
                    ),
                ));
            }
        }
        return Ok(DatasetSpec::Folders { images, masks });
    }
    let path = PathBuf::from(spec);
    let parquet = |files| DatasetSpec::Parquet {
        files,
        image_column: image_column.to_string(),
        label_column: label_column.to_string(),
        rows_before: 0,
        rows_after: 0,
    };
    if path.is_file() {
        let ext = extension(&path);
        return match ext.as_str() {
            "parquet" => Ok(parquet(vec![path])),
            "txt" | "tsv" | "lst" => Ok(DatasetSpec::ListFile { path }),
            _ => Err(Error::unsupported(
                format!("dataset {}", path.display()),
                "unknown file type (expected .parquet, or a .txt/.tsv/.lst list of image<TAB>mask)",
            )),
        };
    }
    if !path.is_dir() {
        return Err(Error::not_found(
            format!("dataset {}", path.display()),
            "no such file or folder",
        ));
    }
    if path.join("images").is_dir() && path.join("annotations").is_dir() {
        if folders::find_split_dir(&path.join("images"), split).is_some() {
            return Ok(DatasetSpec::AdeFolder {
                root: path,
                split: split.to_string(),
            });
        }
        if folders::has_image_files(&path.join("images")) {
            return Ok(DatasetSpec::Folders {
                images: path.join("images"),
                masks: path.join("annotations"),
            });
        }
    }
    for masks in ["masks", "labels"] {
        if path.join("images").is_dir() && path.join(masks).is_dir() {
            return Ok(DatasetSpec::Folders {
                images: path.join("images"),
                masks: path.join(masks),
            });
        }
    }
    let files = parquet::find_parquet_files(&path, split)?;
    if !files.is_empty() {
        return Ok(parquet(files));
    }
    let ade = path.join("ADEChallengeData2016");
    if ade.join("images").is_dir() && ade.join("annotations").is_dir() {
        return Ok(DatasetSpec::AdeFolder {
            root: ade,
            split: split.to_string(),
        });
    }
    Err(Error::not_found(
        format!("dataset {}", path.display()),
        format!(
            "no layout recognised for split '{split}' (expected .parquet files, an ADE root with images/{split}/ \
             and annotations/{split}/, or images/ and annotations/ folders)"
        ),
    ))
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}
#[cfg(test)]
mod tests;
