//! End-to-end tests of the data module on the demo dataset (assets/demo/ade) and on fixtures built from it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::*;
// A test helper shared with the integration tests; not part of segq's API.
#[path = "../../tests/support/parquet.rs"]
mod parquet_fixture;
use parquet_fixture::{FixtureRow, write_parquet_dataset};

fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/ade")
}

fn ade_root() -> PathBuf {
    demo().join("ADEChallengeData2016")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn options(batch_size: usize, workers: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        workers,
        prefetch_batches: 1,
        ..Default::default()
    }
}

fn load_all(spec: &DatasetSpec, opts: LoaderOptions) -> (Vec<Example>, LoadStats) {
    let mut loader = Loader::new(spec, opts).unwrap();
    let mut all = Vec::new();
    for batch in loader.by_ref() {
        all.extend(batch.unwrap());
    }
    (all, loader.stats())
}

/// The 12 demo examples as raw file bytes (image, annotation, stem).
fn demo_files() -> Vec<(Vec<u8>, Vec<u8>, String)> {
    let pairs = folders::ade_pairs(&ade_root(), "validation").unwrap();
    pairs
        .iter()
        .map(|p| {
            (
                std::fs::read(&p.image).unwrap(),
                std::fs::read(&p.mask).unwrap(),
                p.id.clone(),
            )
        })
        .collect()
}

fn fixture_rows() -> Vec<FixtureRow> {
    demo_files()
        .into_iter()
        .map(|(image, label, id)| FixtureRow {
            image: Some(image),
            label: Some(label),
            path: Some(format!("{id}.jpg")),
        })
        .collect()
}

fn parquet_spec(files: Vec<PathBuf>) -> DatasetSpec {
    DatasetSpec::Parquet {
        files,
        image_column: "image".into(),
        label_column: "annotation".into(),
        rows_before: 0,
        rows_after: 0,
    }
}

#[test]
fn resolve_local_detects_every_layout() {
    let parquet_dir = demo().join("parquet");
    match resolve_local(parquet_dir.to_str().unwrap(), "validation", "image", "annotation").unwrap() {
        DatasetSpec::Parquet { files, .. } => {
            let names: Vec<_> = files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["0000.parquet", "0001.parquet"]);
        }
        other => panic!("{other:?}"),
    }
    let e = resolve_local(parquet_dir.to_str().unwrap(), "train", "image", "annotation")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no Parquet files for split 'train'") && e.contains("validation"),
        "{e}"
    );
    assert_eq!(
        resolve_local(ade_root().to_str().unwrap(), "val", "image", "annotation").unwrap(),
        DatasetSpec::AdeFolder {
            root: ade_root(),
            split: "val".into()
        }
    );
    let file = parquet_dir.join("scene_parsing/validation/0001.parquet");
    assert!(
        matches!(resolve_local(file.to_str().unwrap(), "x", "image", "annotation").unwrap(), DatasetSpec::Parquet { files, .. } if files == vec![file.clone()])
    );
    let images = ade_root().join("images/validation");
    let masks = ade_root().join("annotations/validation");
    let pair = format!("{},{}", images.display(), masks.display());
    assert_eq!(
        resolve_local(&pair, "validation", "image", "annotation").unwrap(),
        DatasetSpec::Folders {
            images: images.clone(),
            masks: masks.clone()
        }
    );
    let e = resolve_local("/nonexistent/segq", "validation", "image", "annotation")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/segq") && e.contains("no such"), "{e}");

    // A folder with images/ and masks/ holding files directly, a list file, hub-style split file names.
    let dir = temp_dir("resolve");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    std::fs::write(dir.join("images/a.jpg"), b"x").unwrap();
    assert_eq!(
        resolve_local(dir.to_str().unwrap(), "validation", "image", "annotation").unwrap(),
        DatasetSpec::Folders {
            images: dir.join("images"),
            masks: dir.join("masks")
        }
    );
    std::fs::write(dir.join("list.tsv"), "images/a.jpg\tmasks/a.png\n").unwrap();
    assert_eq!(
        resolve_local(
            dir.join("list.tsv").to_str().unwrap(),
            "validation",
            "image",
            "annotation"
        )
        .unwrap(),
        DatasetSpec::ListFile {
            path: dir.join("list.tsv")
        }
    );
    let hub = dir.join("hub/data");
    std::fs::create_dir_all(&hub).unwrap();
    for name in [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "validation-00000-of-00001.parquet",
    ] {
        std::fs::write(hub.join(name), b"x").unwrap();
    }
    match resolve_local(dir.join("hub").to_str().unwrap(), "training", "image", "annotation").unwrap() {
        DatasetSpec::Parquet { files, .. } => assert_eq!(files.len(), 2),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn parquet_ade_folders_and_list_file_give_identical_examples() {
    let parquet = resolve_local(
        demo().join("parquet").to_str().unwrap(),
        "validation",
        "image",
        "annotation",
    )
    .unwrap();
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    let folders = DatasetSpec::Folders {
        images: ade_root().join("images/validation"),
        masks: ade_root().join("annotations/validation"),
    };
    let dir = temp_dir("list-same");
    let list: String = (1..=12)
        .map(|i| {
            format!(
                "{0}/images/validation/SYN_val_{i:08}.jpg\t{0}/annotations/validation/SYN_val_{i:08}.png\n",
                ade_root().display()
            )
        })
        .collect();
    std::fs::write(dir.join("val.txt"), list).unwrap();
    let list = DatasetSpec::ListFile {
        path: dir.join("val.txt"),
    };

    let (reference, stats) = load_all(&ade, options(5, 3));
    assert_eq!(reference.len(), 12);
    assert_eq!(stats.decoded, 12);
    assert_eq!(stats.read, 12);
    assert_eq!(reference[0].id, "SYN_val_00000001");
    for (i, e) in reference.iter().enumerate() {
        assert_eq!(e.index, i);
        assert_eq!(e.image.dimensions(), e.label.dimensions());
        assert!((192..=383).contains(&e.image.width()) && (192..=383).contains(&e.image.height()));
    }
    // Raw annotations keep their stored values: 0 (unlabeled) and classes 1..=20.
    let values: BTreeSet<u8> = reference
        .iter()
        .flat_map(|e| e.label.as_raw().iter().copied())
        .collect();
    assert!(values.contains(&0) && values.iter().all(|&v| v <= 20), "{values:?}");

    for spec in [&parquet, &folders, &list] {
        let (got, _) = load_all(spec, options(4, 2));
        assert_eq!(got.len(), reference.len(), "{spec:?}");
        for (a, b) in got.iter().zip(&reference) {
            assert_eq!(a.index, b.index);
            assert_eq!(a.id, b.id, "{spec:?}");
            assert!(a.image == b.image, "{spec:?}: image pixels differ for {}", a.id);
            assert!(a.label == b.label, "{spec:?}: label pixels differ for {}", a.id);
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn reduce_labels_are_applied_by_the_loader() {
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    let sel = Selection {
        shard: None,
        offset: 3,
        limit: Some(2),
    };
    let (raw, _) = load_all(
        &ade,
        LoaderOptions {
            selection: sel,
            ..options(2, 1)
        },
    );
    let labels = LabelOptions {
        reduce_labels: true,
        ..Default::default()
    };
    let (reduced, _) = load_all(
        &ade,
        LoaderOptions {
            selection: sel,
            labels,
            ..options(2, 1)
        },
    );
    assert_eq!(raw.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4]);
    for (r, d) in raw.iter().zip(&reduced) {
        for (a, b) in r.label.as_raw().iter().zip(d.label.as_raw()) {
            assert_eq!(*b, if *a == 0 { 255 } else { a - 1 });
        }
    }
}

#[test]
fn skip_first_continues_a_selection_where_an_interrupted_run_stopped() {
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    let selection = Selection {
        shard: None,
        offset: 2,
        limit: Some(6),
    };
    let (all, _) = load_all(
        &ade,
        LoaderOptions {
            selection,
            ..options(2, 1)
        },
    );
    let resumed = LoaderOptions {
        selection,
        skip_first: 4,
        ..options(2, 1)
    };
    let loader = Loader::new(&ade, resumed.clone()).unwrap();
    assert_eq!(loader.total(), 2);
    drop(loader);
    let (rest, stats) = load_all(&ade, resumed);
    let indices = |examples: &[Example]| examples.iter().map(|e| e.index).collect::<Vec<_>>();
    assert_eq!(indices(&rest), indices(&all[4..]));
    assert_eq!((stats.selected, stats.decoded), (6, 2));
    let too_many = LoaderOptions {
        selection,
        skip_first: 7,
        ..options(2, 1)
    };
    let error = Loader::new(&ade, too_many)
        .err()
        .expect("more skipped than selected")
        .to_string();
    assert!(error.contains("dataset changed"), "{error}");
}

#[test]
fn shards_are_disjoint_and_cover_the_selection() {
    let parquet = resolve_local(
        demo().join("parquet").to_str().unwrap(),
        "validation",
        "image",
        "annotation",
    )
    .unwrap();
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    for spec in [&parquet, &ade] {
        for (offset, limit) in [(0, None), (2, Some(7)), (5, Some(100))] {
            let expected: Vec<usize> = (offset..(offset + limit.unwrap_or(12)).min(12)).collect();
            for n in [1usize, 2, 3, 7, 50] {
                let mut seen = Vec::new();
                for i in 0..n {
                    let selection = Selection {
                        shard: Some((i, n)),
                        offset,
                        limit,
                    };
                    let loader = Loader::new(
                        spec,
                        LoaderOptions {
                            selection,
                            ..options(3, 2)
                        },
                    )
                    .unwrap();
                    let total = loader.total();
                    let got: Vec<usize> = loader.flat_map(|b| b.unwrap()).map(|e| e.index).collect();
                    assert_eq!(got.len(), total);
                    seen.extend(got);
                }
                assert_eq!(
                    seen, expected,
                    "n {n} offset {offset} limit {limit:?}: shards in order make the selection"
                );
            }
        }
    }
}

#[test]
fn order_is_deterministic_whatever_the_workers() {
    let spec = parquet_spec(vec![
        demo().join("parquet/scene_parsing/validation/0000.parquet"),
        demo().join("parquet/scene_parsing/validation/0001.parquet"),
    ]);
    let batches = |workers| -> Vec<Vec<(usize, String, u64)>> {
        Loader::new(&spec, options(5, workers))
            .unwrap()
            .map(|b| {
                b.unwrap()
                    .into_iter()
                    .map(|e| (e.index, e.id, e.image.as_raw().iter().map(|&v| v as u64).sum()))
                    .collect()
            })
            .collect()
    };
    let one = batches(1);
    assert_eq!(one.iter().map(Vec::len).collect::<Vec<_>>(), [5, 5, 2]);
    for workers in [2, 4, 8] {
        for _ in 0..3 {
            assert_eq!(batches(workers), one, "{workers} workers");
        }
    }
}

#[test]
fn in_flight_examples_stay_under_the_bound() {
    // 240 rows of the demo repeated, small row groups; a slow consumer lets the workers run ahead as far as they may.
    let dir = temp_dir("bound");
    let rows: Vec<FixtureRow> = (0..20).flat_map(|_| fixture_rows()).collect();
    let file = dir.join("big.parquet");
    write_parquet_dataset(&file, &rows, 7, "image", "annotation").unwrap();
    let spec = parquet_spec(vec![file]);
    let opts = LoaderOptions {
        batch_size: 3,
        workers: 4,
        prefetch_batches: 2,
        ..Default::default()
    };
    let mut loader = Loader::new(&spec, opts).unwrap();
    let mut count = 0;
    let mut next_index = 0;
    for batch in loader.by_ref() {
        for e in batch.unwrap() {
            assert_eq!(e.index, next_index);
            next_index += 1;
            count += 1;
        }
        if count < 30 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let stats = loader.stats();
    assert_eq!(count, 240);
    assert_eq!(stats.in_flight_bound, 9);
    assert!(stats.peak_in_flight <= 9 && stats.peak_in_flight >= 3, "{stats:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dropping_a_loader_midway_stops_its_threads() {
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    let mut loader = Loader::new(&ade, options(2, 3)).unwrap();
    assert_eq!(loader.next().unwrap().unwrap().len(), 2);
    drop(loader); // joins reader and workers; hangs here if shutdown were broken
}

/// Fixture with a truncated JPEG at row 1, a mask of another example's size at row 3, and a null annotation at row 5.
fn bad_rows() -> Vec<FixtureRow> {
    let mut rows = fixture_rows();
    let len = rows[1].image.as_ref().unwrap().len();
    rows[1].image.as_mut().unwrap().truncate(len / 2);
    let other = rows
        .iter()
        .position(|r| {
            let size = |b: &Option<Vec<u8>>| {
                image::load_from_memory(b.as_ref().unwrap())
                    .unwrap()
                    .to_luma8()
                    .dimensions()
            };
            size(&r.label) != size(&rows[3].label)
        })
        .unwrap();
    rows[3].label = rows[other].label.clone();
    rows[5].label = None;
    rows
}

#[test]
fn bad_examples_fail_with_file_and_row_or_are_skipped_and_counted() {
    let dir = temp_dir("bad");
    let file = dir.join("bad.parquet");
    write_parquet_dataset(&file, &bad_rows(), 4, "image", "annotation").unwrap();
    let spec = parquet_spec(vec![file.clone()]);

    let mut loader = Loader::new(&spec, options(1, 3)).unwrap();
    assert_eq!(loader.next().unwrap().unwrap()[0].index, 0);
    let e = loader.next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains(&format!("{} row 1", file.display())) && e.contains("SYN_val_00000002") && e.contains("truncated"),
        "{e}"
    );
    assert!(loader.next().is_none(), "a failed loader ends");

    let (got, stats) = load_all(
        &spec,
        LoaderOptions {
            on_error: OnError::Skip,
            ..options(4, 3)
        },
    );
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        [0, 2, 4, 6, 7, 8, 9, 10, 11]
    );
    assert_eq!(
        (stats.selected, stats.read, stats.decoded, stats.skipped),
        (12, 12, 9, 3)
    );
    let reasons = &stats.skip_reasons;
    assert!(
        reasons[0].contains("row 1") && reasons[0].contains("JPEG is truncated"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("row 3") && reasons[1].contains("but annotation is"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("row 5")
            && reasons[2].contains("SYN_val_00000006")
            && reasons[2].contains("'annotation' has no embedded bytes (only a path: SYN_val_00000006.png)"),
        "{reasons:?}"
    );

    // Fail mode with a selection that avoids the bad rows reads cleanly.
    let selection = Selection {
        shard: None,
        offset: 6,
        limit: None,
    };
    let (got, stats) = load_all(
        &spec,
        LoaderOptions {
            selection,
            ..options(4, 2)
        },
    );
    assert_eq!((got.len(), stats.skipped), (6, 0));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn skip_reasons_are_capped_but_counts_complete() {
    let dir = temp_dir("cap");
    let rows: Vec<FixtureRow> = (0..30)
        .map(|_| FixtureRow {
            image: Some(b"not an image".to_vec()),
            label: Some(vec![]),
            path: None,
        })
        .collect();
    let file = dir.join("junk.parquet");
    write_parquet_dataset(&file, &rows, 10, "image", "annotation").unwrap();
    let (got, stats) = load_all(
        &parquet_spec(vec![file]),
        LoaderOptions {
            on_error: OnError::Skip,
            ..options(8, 2)
        },
    );
    assert!(got.is_empty());
    assert_eq!(
        (stats.skipped, stats.skip_reasons.len()),
        (30, loader::MAX_SKIP_REASONS)
    );
    assert!(
        stats.skip_reasons[0].contains("junk.parquet row 0 (junk.parquet:0): image: image is neither JPEG nor PNG"),
        "{:?}",
        stats.skip_reasons[0]
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_columns_fail_or_skip_the_file() {
    let dir = temp_dir("columns");
    let good = dir.join("good.parquet");
    let renamed = dir.join("renamed.parquet");
    let rows = fixture_rows();
    write_parquet_dataset(&good, &rows[..4], 4, "image", "annotation").unwrap();
    write_parquet_dataset(&renamed, &rows[4..7], 4, "img", "annotation").unwrap();

    let e = Loader::new(&parquet_spec(vec![good.clone(), renamed.clone()]), options(2, 2))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("renamed.parquet")
            && e.contains("missing column 'image' (columns: img, annotation, scene_category)"),
        "{e}"
    );

    let skip = LoaderOptions {
        on_error: OnError::Skip,
        ..options(2, 2)
    };
    let (got, stats) = load_all(&parquet_spec(vec![renamed.clone(), good.clone()]), skip.clone());
    assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4, 5, 6]);
    assert_eq!((stats.skipped, stats.decoded), (3, 4));
    assert!(
        stats
            .skip_reasons
            .iter()
            .all(|r| r.contains("renamed.parquet row") && r.contains("missing column 'image'"))
    );

    // Missing from every file: a setting to fix, an error even when skipping.
    let e = Loader::new(&parquet_spec(vec![renamed]), skip)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing column 'image'") && e.contains("column names"),
        "{e}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn truncated_parquet_fails_or_is_skipped_with_its_name() {
    let dir = temp_dir("truncated");
    let good = dir.join("a.parquet");
    let cut = dir.join("b.parquet");
    let rows = fixture_rows();
    write_parquet_dataset(&good, &rows[..5], 2, "image", "annotation").unwrap();
    write_parquet_dataset(&cut, &rows[5..], 2, "image", "annotation").unwrap();
    let bytes = std::fs::read(&cut).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();

    let spec = parquet_spec(vec![good, cut.clone()]);
    let e = Loader::new(&spec, options(2, 2)).err().unwrap().to_string();
    assert!(
        e.contains(&cut.display().to_string()) && e.contains("not a readable Parquet file"),
        "{e}"
    );

    let (got, stats) = load_all(
        &spec,
        LoaderOptions {
            on_error: OnError::Skip,
            ..options(2, 2)
        },
    );
    assert_eq!(got.len(), 5);
    assert_eq!((stats.unreadable_files, stats.decoded, stats.skipped), (1, 5, 0));
    assert!(stats.skip_reasons[0].contains("b.parquet"), "{:?}", stats.skip_reasons);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupt_row_group_data_names_the_rows() {
    // Overwrite the first page header of row group 1's image column; the footer still reads.
    let dir = temp_dir("corrupt-group");
    let file = dir.join("c.parquet");
    write_parquet_dataset(&file, &fixture_rows(), 4, "image", "annotation").unwrap();
    let start = {
        let reader =
            ::parquet::file::serialized_reader::SerializedFileReader::new(std::fs::File::open(&file).unwrap()).unwrap();
        use ::parquet::file::reader::FileReader;
        reader.metadata().row_group(1).column(0).byte_range().0 as usize
    };
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[start..start + 24].fill(0xFF);
    std::fs::write(&file, &bytes).unwrap();
    let spec = parquet_spec(vec![file.clone()]);

    let (got, stats) = load_all(
        &spec,
        LoaderOptions {
            on_error: OnError::Skip,
            ..options(3, 2)
        },
    );
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 8, 9, 10, 11]
    );
    assert_eq!(stats.skipped, 4);
    for (reason, row) in stats.skip_reasons.iter().zip(4..) {
        assert!(
            reason.contains(&format!("{} row {row}", file.display()))
                && reason.contains("cannot read row group 1 (rows 4..8)"),
            "{reason}"
        );
    }
    let mut loader = Loader::new(&spec, options(12, 2)).unwrap();
    let e = loader.next().unwrap().unwrap_err().to_string();
    assert!(e.contains("c.parquet row 4"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn folder_errors_name_the_files() {
    let dir = temp_dir("folder-bad");
    let images = dir.join("images");
    let masks = dir.join("masks");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&masks).unwrap();
    for (i, (image, label, id)) in demo_files().into_iter().take(4).enumerate() {
        let image = if i == 2 {
            b"\xFF\xD8\xFF garbage".to_vec()
        } else {
            image
        };
        std::fs::write(images.join(format!("{id}.jpg")), image).unwrap();
        if i != 1 {
            std::fs::write(masks.join(format!("{id}.png")), label).unwrap();
        }
    }
    let spec = DatasetSpec::Folders {
        images: images.clone(),
        masks: masks.clone(),
    };
    let mut loader = Loader::new(&spec, options(1, 2)).unwrap();
    assert!(loader.next().unwrap().is_ok());
    let e = loader.next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("SYN_val_00000002.jpg")
            && e.contains("cannot read annotation")
            && e.contains("SYN_val_00000002.png"),
        "{e}"
    );

    let (got, stats) = load_all(
        &spec,
        LoaderOptions {
            on_error: OnError::Skip,
            ..options(2, 2)
        },
    );
    assert_eq!(
        got.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["SYN_val_00000001", "SYN_val_00000004"]
    );
    assert_eq!(stats.skipped, 2);
    assert!(
        stats.skip_reasons[1].contains("SYN_val_00000003.jpg") && stats.skip_reasons[1].contains("image: JPEG"),
        "{:?}",
        stats.skip_reasons
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn offline_hub_listing_reads_the_cache_layout() {
    let cache_dir = temp_dir("hub-cache");
    let repo_dir = cache_dir.join("datasets--someone--scene_parse_150");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo_dir.join("refs/refs/convert")).unwrap();
    std::fs::write(repo_dir.join("refs/refs/convert/parquet"), commit).unwrap();
    let split_dir = repo_dir.join("snapshots").join(commit).join("scene_parsing/validation");
    std::fs::create_dir_all(&split_dir).unwrap();
    for name in ["0001.parquet", "0000.parquet", "notes.txt"] {
        std::fs::write(split_dir.join(name), b"x").unwrap();
    }
    let repo = |id: &str, rev: &str| {
        crate::hub::HubRepo::dataset(crate::hub::HubId::parse_dataset(id, rev).unwrap())
            .with_cache(cache_dir.clone(), true)
    };
    let files = parquet::hub_parquet_files(
        &repo("someone/scene_parse_150", "refs/convert/parquet"),
        "scene_parsing",
        "val",
        &Selection::default(),
    )
    .unwrap()
    .files;
    assert_eq!(
        files,
        vec![split_dir.join("0000.parquet"), split_dir.join("0001.parquet")]
    );
    let e = parquet::hub_parquet_files(
        &repo("someone/scene_parse_150", "refs/convert/parquet"),
        "scene_parsing",
        "train",
        &Selection::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no Parquet files for scene_parsing/train"), "{e}");
    let e = parquet::hub_parquet_files(&repo("someone/other", "main"), "c", "train", &Selection::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not cached") && e.contains("HF_HUB_OFFLINE"), "{e}");
    std::fs::remove_dir_all(cache_dir).unwrap();
}

#[test]
fn explicit_rows_are_read_in_order_across_parquet_files_and_folders() {
    let parquet = resolve_local(
        demo().join("parquet").to_str().unwrap(),
        "validation",
        "image",
        "annotation",
    )
    .unwrap();
    let ade = DatasetSpec::AdeFolder {
        root: ade_root(),
        split: "validation".into(),
    };
    let (reference, _) = load_all(&ade, options(4, 2));
    // Runs of consecutive rows, single rows, and rows in both Parquet files.
    let rows = vec![0, 3, 4, 5, 9, 11];
    for spec in [&parquet, &ade] {
        let opts = LoaderOptions {
            rows: Some(rows.clone()),
            ..options(4, 2)
        };
        let (got, stats) = load_all(spec, opts);
        assert_eq!(stats.selected, rows.len());
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), rows, "{spec:?}");
        for e in &got {
            assert_eq!(e.id, reference[e.index].id);
            assert!(e.image == reference[e.index].image);
        }
    }
    let past_end = LoaderOptions {
        rows: Some(vec![2, 12]),
        ..options(4, 2)
    };
    let err = Loader::new(&ade, past_end).err().unwrap().to_string();
    assert!(err.contains("row 12") && err.contains("12 rows"), "{err}");
}
