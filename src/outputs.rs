//! Where outputs may go: an output (a checkpoint folder, merged results, masks) is never one of the run's inputs nor
//! inside an input folder, compared through symlinks; and a file is replaced by renaming a finished temporary file
//! over it, so a killed run leaves either the old file or the new one, never half of one.

use std::path::{Component, Path, PathBuf};

use crate::{Error, Result};

/// `path` made absolute with symlinks resolved, also when it does not exist yet: its longest existing ancestor is
/// canonicalized and the missing rest appended (`..` in the rest is applied lexically, which is exact there: a
/// folder that does not exist cannot be a symlink).
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            let mut out = canonical;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            // Nothing exists, not even the root: compare the path as given.
            _ => return absolute,
        }
    }
}

/// An input the output must not land on: a file, or a folder (the output may be neither the folder nor inside it).
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    File(&'a Path),
    Folder(&'a Path),
}

/// The first of `inputs` that `out` would land on (is, or lies inside when the input is a folder), and whether it is
/// that input itself (`true`) or inside it.
pub fn clashing_input<'a>(out: &Path, inputs: &[Input<'a>]) -> Option<(&'a Path, bool)> {
    let target = resolve(out);
    inputs.iter().find_map(|input| {
        let (path, folder) = match *input {
            Input::File(p) => (p, false),
            Input::Folder(p) => (p, true),
        };
        let resolved = resolve(path);
        if resolved == target {
            Some((path, true))
        } else if folder && target.starts_with(&resolved) {
            Some((path, false))
        } else {
            None
        }
    })
}

/// Refuses `out` (given with `flag`, e.g. `--out`) when it is one of `inputs` or lies inside an input folder, with
/// one line naming both: writing there would replace what the run reads.
pub fn check_not_input(flag: &str, out: &Path, inputs: &[Input<'_>]) -> Result<()> {
    match clashing_input(out, inputs) {
        None => Ok(()),
        Some((input, same)) => Err(Error::config(
            format!("{flag} {}", out.display()),
            format!(
                "{} the input {}; writing there would replace what this run reads (choose another {flag})",
                if same { "is" } else { "is inside" },
                input.display()
            ),
        )),
    }
}

/// Refuses `out` when it exists and is not a folder (a file given where an output folder was expected).
pub fn check_folder(flag: &str, out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::config(
            format!("{flag} {}", out.display()),
            "exists and is not a folder",
        ));
    }
    Ok(())
}

/// Writes `path` by having `write` produce a temporary sibling (a hidden name ending in the same extension, so
/// writers that pick the format from it still do), then renaming it over `path`. On failure the temporary file is
/// removed and `path` is untouched.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::write(path, "output path has no file name"))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("tmp");
    let tmp = path.with_file_name(format!(".{name}.{}.partial.{extension}", std::process::id()));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("segq-outputs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn resolves_paths_that_do_not_exist_yet() {
        let dir = scratch("resolve");
        let canonical = dir.canonicalize().unwrap();
        assert_eq!(resolve(&dir.join("a/b/../c")), canonical.join("a/c"));
        assert_eq!(resolve(&dir.join("./x")), canonical.join("x"));
    }

    #[test]
    fn refuses_an_input_folder_its_inside_and_symlinks_to_it() {
        let dir = scratch("inputs");
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        let inputs = [Input::Folder(&model)];
        for out in [model.clone(), model.join("q"), model.join("q/../..").join("model")] {
            let e = check_not_input("--out", &out, &inputs).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Config);
            assert!(e.to_string().contains("--out"), "{e}");
        }
        #[cfg(unix)]
        {
            let link = dir.join("link");
            std::os::unix::fs::symlink(&model, &link).unwrap();
            assert!(check_not_input("--out", &link, &inputs).is_err());
        }
        check_not_input("--out", &dir.join("model-q"), &inputs).unwrap();
        check_not_input("--out", &dir, &inputs).unwrap();
        let file = model.join("results.json");
        std::fs::write(&file, "{}").unwrap();
        assert!(check_not_input("--out", &file, &[Input::File(&file)]).is_err());
        check_not_input("--out", &model.join("other.json"), &[Input::File(&file)]).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = scratch("atomic");
        let path = dir.join("x.mask.png");
        std::fs::write(&path, "old").unwrap();
        let e = write_atomically(&path, |tmp| {
            assert!(tmp.to_str().unwrap().ends_with(".png"));
            std::fs::write(tmp, "half").unwrap();
            Err(Error::write(tmp, "disk full"))
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        write_atomically(&path, |tmp| std::fs::write(tmp, "new").map_err(|e| Error::io(tmp, e))).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }
}
