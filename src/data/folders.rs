//! Datasets stored as separate image and mask files: the ADEChallengeData2016 layout, a generic pair of folders,
//! and list files. Each gives an ordered list of (image, mask) paths; reading and decoding happen in the loader.

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
    collect_images(images, images, &mut found)?;
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

fn collect_images(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_dir() {
            collect_images(root, &path, out)?;
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
        let e = folder_pairs(&dir.join("mask/a/none"), &dir).unwrap_err().to_string();
        assert!(e.contains("none"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
