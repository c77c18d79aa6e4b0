//! Datasets stored as separate image and mask files: the ADEChallengeData2016 layout, a generic pair of folders,
//! and list files. Each gives an ordered list of (image, mask) paths; reading and decoding happen in the loader.
//!
//! Listing follows symbolic links but enters each folder once (by device and inode), so a link loop neither recurses
//! forever nor lists a file twice. Entries named like images are listed whatever their type: a FIFO, socket or
//! device is refused when the loader reads it (before opening it), so it is failed or skipped and counted there.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::split_aliases;
use crate::{Error, Result};

/// One example stored as two files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePair {
    /// The image's file stem (its path relative to the image folder, without extension, for nested folders).
    pub id: String,
    pub image: PathBuf,
    pub mask: PathBuf,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// A list file of a million examples with long paths is well under this; a larger one is a mistake, not read whole.
const MAX_LIST_FILE_BYTES: u64 = 1 << 30;

/// The folder under `parent` that holds `split` (`training` for `train`, ...), if any.
pub fn find_split_dir(parent: &Path, split: &str) -> Option<PathBuf> {
    split_aliases(split)
        .into_iter()
        .map(|name| parent.join(name))
        .find(|p| p.is_dir())
}

/// Whether `dir` directly holds at least one image file.
pub fn has_image_files(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().is_file() && is_image(&e.path())))
        .unwrap_or(false)
}

fn is_image(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    IMAGE_EXTENSIONS.contains(&ext.as_str())
}

/// Pairs of the ADE layout: `images/<split>/X.jpg` with `annotations/<split>/X.png`.
pub fn ade_pairs(root: &Path, split: &str) -> Result<Vec<FilePair>> {
    let images = find_split_dir(&root.join("images"), split).ok_or_else(|| {
        Error::not_found(
            format!("ADE dataset {}", root.display()),
            format!(
                "no images/ folder for split '{split}' (looked for {})",
                split_aliases(split).join(", ")
            ),
        )
    })?;
    let name = images.file_name().map(PathBuf::from).unwrap_or_default();
    let masks = root.join("annotations").join(name);
    if !masks.is_dir() {
        let message = format!("ADE dataset {}: missing folder {}", root.display(), masks.display());
        return Err(Error::not_found(masks.display().to_string(), message));
    }
    folder_pairs(&images, &masks)
}

/// Every image under `images` (recursively, sorted by relative path) with the `.png` mask at the same relative
/// path under `masks`. A missing mask is not an error here: the example fails when it is loaded, so that
/// `--on-error skip` can count it.
pub fn folder_pairs(images: &Path, masks: &Path) -> Result<Vec<FilePair>> {
    let mut found = Vec::new();
    let mut visited = HashSet::new();
    let root = std::fs::metadata(images).map_err(|e| Error::io(images, e))?;
    visited.insert((root.dev(), root.ino()));
    collect_images(images, images, &mut visited, &mut found)?;
    found.sort();
    if found.is_empty() {
        return Err(Error::not_found(
            images.display().to_string(),
            format!("image folder {} holds no .jpg/.jpeg/.png files", images.display()),
        ));
    }
    Ok(found
        .into_iter()
        .map(|relative| {
            let stem = relative.with_extension("");
            FilePair {
                id: stem.to_string_lossy().into_owned(),
                image: images.join(&relative),
                mask: masks.join(stem.with_extension("png")),
            }
        })
        .collect())
}

/// Lists the images under `dir`, entering each folder (by device and inode) once.
fn collect_images(root: &Path, dir: &Path, visited: &mut HashSet<(u64, u64)>, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        // `metadata` follows links; a dangling link has none and is listed, so that reading it names it.
        let followed = std::fs::metadata(&path).ok();
        if let Some(meta) = followed.as_ref().filter(|m| m.is_dir()) {
            if visited.insert((meta.dev(), meta.ino())) {
                collect_images(root, &path, visited, out)?;
            } else {
                let target = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
                tracing::warn!(
                    "{} leads to folder {}, already listed (a symbolic link loop or a second link to it): not \
                     entered again",
                    path.display(),
                    target.display()
                );
            }
        } else if is_image(&path)
            && let Ok(relative) = path.strip_prefix(root)
        {
            out.push(relative.to_path_buf());
        }
    }
    Ok(())
}

/// Pairs listed in a text file, one `image<TAB>mask` per line (or two whitespace-separated paths when the line has
/// no tab), relative to the list file's folder. Blank lines and lines starting with `#` are ignored.
pub fn list_file_pairs(path: &Path) -> Result<Vec<FilePair>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_LIST_FILE_BYTES {
        let why = if meta.is_file() {
            format!(
                "list file is {}, more than the {} a list file may be",
                crate::limits::human_bytes(meta.len()),
                crate::limits::human_bytes(MAX_LIST_FILE_BYTES)
            )
        } else {
            "list file is not a regular file; not opened".to_string()
        };
        return Err(Error::invalid(path.display().to_string(), why));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = if line.contains('\t') {
            line.split('\t').collect()
        } else {
            line.split_whitespace().collect()
        };
        let [image, mask] = fields.as_slice() else {
            return Err(Error::invalid(
                format!("{} line {}", path.display(), n + 1),
                format!("expected 'image<TAB>mask', found {} field(s)", fields.len()),
            ));
        };
        let image = base.join(image.trim());
        let id = image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        pairs.push(FilePair {
            id,
            image,
            mask: base.join(mask.trim()),
        });
    }
    if pairs.is_empty() {
        return Err(Error::invalid(
            path.display().to_string(),
            format!("list file {} lists no examples", path.display()),
        ));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("segq-folders-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn list_file_lines_resolve_relative_to_the_file() {
        let dir = temp_dir("list");
        let list = dir.join("val.txt");
        std::fs::write(&list, "# comment\na/x.jpg\tm/x.png\n\nb/y.png  m/y.png\r\n").unwrap();
        let pairs = list_file_pairs(&list).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            pairs[0],
            FilePair {
                id: "x".into(),
                image: dir.join("a/x.jpg"),
                mask: dir.join("m/x.png")
            }
        );
        assert_eq!(pairs[1].mask, dir.join("m/y.png"));
        std::fs::write(&list, "a.jpg\tb.png\nonly-one-field\n").unwrap();
        let e = list_file_pairs(&list).unwrap_err().to_string();
        assert!(e.contains("val.txt line 2") && e.contains("1 field"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn folders_pair_nested_images_by_relative_stem() {
        let dir = temp_dir("pairs");
        for p in ["img/b/2.jpg", "img/a/1.png", "img/notes.md", "mask/a/1.png"] {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let pairs = folder_pairs(&dir.join("img"), &dir.join("mask")).unwrap();
        let ids: Vec<&str> = pairs.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a/1", "b/2"]);
        assert_eq!(pairs[1].mask, dir.join("mask/b/2.png"));
        // A link loop and a second link to a listed folder add nothing.
        std::os::unix::fs::symlink("..", dir.join("img/a/up")).unwrap();
        std::os::unix::fs::symlink("b", dir.join("img/b2")).unwrap();
        let again = folder_pairs(&dir.join("img"), &dir.join("mask")).unwrap();
        assert_eq!(again, pairs);
        let e = folder_pairs(&dir.join("mask/a/none"), &dir).unwrap_err().to_string();
        assert!(e.contains("none"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
