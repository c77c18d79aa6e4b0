//! The loading pipeline: one reader thread takes the selected rows from the source in order (row group by row
//! group for Parquet, file paths for folders), decode workers turn bytes into pixels in parallel, and the
//! iterator puts results back in row order and hands them out in batches. Memory stays flat however large the
//! dataset: the reader needs a token per example, and tokens only come back when the example leaves the loader
//! (handed out in a batch, or skipped), so at most `batch_size * (prefetch_batches + 1)` examples are in flight.
//!
//! Labels come out ready to score: [`LabelOptions`] (label map, then reduce_labels) is applied here, so the
//! metrics only need `ignore_index`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use image::{GrayImage, RgbImage};
use serde::Serialize;

use super::decode::{self, DecodeOptions, FileProblem};
use super::folders::{self, FilePair};
use super::parquet::ParquetFile;
use super::{DatasetSpec, LabelOptions, OnError, Problem, Selection};
use crate::{Error, Result};

/// How many skip reasons the statistics keep (the count is always complete).
pub const MAX_SKIP_REASONS: usize = 20;

/// One decoded example.
#[derive(Clone, Debug)]
pub struct Example {
    /// Global row index in the dataset (before offset, limit and sharding).
    pub index: usize,
    /// The image's file stem (ADE, folders, list files, and Parquet rows whose image struct has a path), else
    /// `<parquet file name>:<row>`.
    pub id: String,
    /// The image as Pillow's `.convert("RGB")` gives it.
    pub image: RgbImage,
    /// The annotation at the image's size, with [`LabelOptions`] applied (values to score, `ignore_index` to skip).
    pub label: GrayImage,
}

/// How a loader runs.
#[derive(Clone, Debug, Serialize)]
pub struct LoaderOptions {
    pub selection: Selection,
    /// Examples per batch (the last batch may be smaller).
    pub batch_size: usize,
    /// Decode threads.
    pub workers: usize,
    /// Batches decoded ahead of the one being consumed.
    pub prefetch_batches: usize,
    pub on_error: OnError,
    pub labels: LabelOptions,
    /// Examples at the start of the selection that an interrupted run already counted (`eval --resume`): they
    /// are not read again, but they stay in [`LoadStats::selected`].
    #[serde(skip_serializing_if = "is_zero")]
    pub skip_first: usize,
    /// Pixel limit and EXIF orientation.
    pub decode: DecodeOptions,
    /// Explicit global rows in ascending order, taken instead of the selection's window (a calibration sample
    /// spread over the dataset, see [`super::shard::sample_rows`]).
    #[serde(skip)]
    pub rows: Option<Vec<usize>>,
    /// A check of each decoded image's size by a higher layer (the model's smallest input), run in the decode
    /// workers so that a refused image fails or is skipped like any other bad example.
    #[serde(skip)]
    pub image_check: Option<ImageCheck>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Refuses an image from its `(width, height)`, with a reason without the location (the loader adds it).
#[derive(Clone)]
pub struct ImageCheck(pub Arc<dyn Fn(u32, u32) -> std::result::Result<(), String> + Send + Sync>);

impl std::fmt::Debug for ImageCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageCheck")
    }
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            selection: Selection::default(),
            batch_size: 1,
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            prefetch_batches: 2,
            on_error: OnError::Fail,
            labels: LabelOptions::default(),
            skip_first: 0,
            decode: DecodeOptions::default(),
            image_check: None,
            rows: None,
        }
    }
}

/// What a loader read, handed out and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadStats {
    /// Rows selected (after offset, limit, shard).
    pub selected: usize,
    /// Examples taken from the source so far.
    pub read: usize,
    /// Examples decoded and handed out.
    pub decoded: usize,
    /// Examples left out under `--on-error skip`.
    pub skipped: usize,
    /// Parquet files whose footer could not be read (their rows are unknown, so not in `skipped`).
    pub unreadable_files: usize,
    /// The first [`MAX_SKIP_REASONS`] reasons, each naming the file and row.
    pub skip_reasons: Vec<String>,
    /// Most examples ever held by the loader at once, and the bound it must stay under.
    pub peak_in_flight: usize,
    pub in_flight_bound: usize,
}

/// The parallel, ordered, bounded-memory example loader. Iterate it for batches.
pub struct Loader {
    /// Rows of the dataset (all of it, before the selection).
    dataset_rows: usize,
    /// The global rows still to read, ascending: the selection, less `skip_first`.
    rows: Vec<usize>,
    batch_size: usize,
    on_error: OnError,
    next_seq: usize,
    pending: BTreeMap<usize, Outcome>,
    results: Option<Receiver<(usize, Outcome)>>,
    tokens: Option<Sender<()>>,
    shared: Arc<Counters>,
    stats: LoadStats,
    finished: bool,
    threads: Vec<JoinHandle<()>>,
}

/// A decoded example, or the error naming its file, row and id (kept as text if the example is skipped).
type Outcome = Result<Example>;

#[derive(Default)]
struct Counters {
    read: AtomicUsize,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// Where the examples come from, indexed by global row.
enum Source {
    Parquet {
        files: Vec<ParquetFile>,
        starts: Vec<usize>,
        /// Rows of the whole dataset, the files not fetched included.
        total: usize,
    },
    Files(Vec<FilePair>),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Parquet { total, .. } => *total,
            Source::Files(pairs) => pairs.len(),
        }
    }
}

/// The bytes (or files) of one example on its way to a decode worker.
struct RawExample {
    seq: usize,
    index: usize,
    id: String,
    /// File and row (Parquet) or image path, for messages.
    location: String,
    payload: std::result::Result<Payload, Problem>,
}

enum Payload {
    Bytes { image: Vec<u8>, label: Vec<u8> },
    Files { image: PathBuf, label: PathBuf },
}

impl Loader {
    /// Indexes the dataset (Parquet footers or file listings, no pixel data) and starts the reader and workers.
    pub fn new(spec: &DatasetSpec, options: LoaderOptions) -> Result<Loader> {
        if options.batch_size == 0 {
            return Err(Error::config("batch size", "batch size must be at least 1"));
        }
        let mut stats = LoadStats::default();
        let source = open_source(spec, options.on_error, &mut stats)?;
        let total = source.len();
        let mut rows: Vec<usize> = match &options.rows {
            Some(list) => {
                if let Some(&bad) = list.iter().find(|&&r| r >= total) {
                    return Err(Error::invalid(
                        "row selection",
                        format!("row {bad} is past the end of a dataset of {total} rows"),
                    ));
                }
                if list.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(Error::internal("explicit rows must be strictly ascending"));
                }
                list.clone()
            }
            None => options.selection.rows(total).collect(),
        };
        stats.selected = rows.len();
        if options.skip_first > rows.len() {
            return Err(Error::invalid(
                "resumed run",
                format!(
                    "{} examples were already counted, but the selection has only {}: the dataset changed",
                    options.skip_first,
                    rows.len()
                ),
            ));
        }
        rows.drain(..options.skip_first);
        let bound = options.batch_size * (options.prefetch_batches + 1);
        stats.in_flight_bound = bound;
        tracing::debug!(
            "dataset: {total} rows, selected {}..={} ({} rows), batch {}, {} workers, at most {bound} examples in flight",
            rows.first().copied().unwrap_or(0),
            rows.last().copied().unwrap_or(0),
            rows.len(),
            options.batch_size,
            options.workers.max(1)
        );
        let (token_tx, token_rx) = bounded::<()>(bound);
        for _ in 0..bound {
            // Cannot fail: the channel has exactly `bound` slots and its receiver is alive.
            let _ = token_tx.send(());
        }
        let (raw_tx, raw_rx) = bounded::<RawExample>(bound);
        let (result_tx, result_rx) = unbounded::<(usize, Outcome)>();
        let shared = Arc::new(Counters::default());
        let mut threads = Vec::new();
        let spawn_err = |e: std::io::Error| Error::internal(format!("cannot start a loader thread: {e}"));
        {
            let shared = shared.clone();
            let rows = rows.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("segq-data-reader".into())
                    .spawn(move || read_source(&source, rows, &token_rx, &raw_tx, &shared))
                    .map_err(spawn_err)?,
            );
        }
        let settings = Arc::new(DecodeSettings {
            labels: options.labels.clone(),
            decode: options.decode,
            image_check: options.image_check.clone(),
        });
        for worker in 0..options.workers.max(1) {
            let (raw_rx, result_tx, settings) = (raw_rx.clone(), result_tx.clone(), settings.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("segq-data-decode-{worker}"))
                    .spawn(move || decode_worker(&raw_rx, &result_tx, &settings))
                    .map_err(spawn_err)?,
            );
        }
        Ok(Loader {
            dataset_rows: total,
            rows,
            batch_size: options.batch_size,
            on_error: options.on_error,
            next_seq: 0,
            pending: BTreeMap::new(),
            results: Some(result_rx),
            tokens: Some(token_tx),
            shared,
            stats,
            finished: false,
            threads,
        })
    }

    /// Number of examples this loader will hand out or skip (the selection, less those skipped by `skip_first`).
    pub fn total(&self) -> usize {
        self.rows.len()
    }

    /// Rows in the whole dataset, before offset, limit and shard select from them.
    pub fn dataset_rows(&self) -> usize {
        self.dataset_rows
    }

    /// Counts so far (complete once the iterator has returned `None`).
    pub fn stats(&self) -> LoadStats {
        let mut stats = self.stats.clone();
        stats.read = self.shared.read.load(Ordering::Relaxed);
        stats.peak_in_flight = self.shared.peak_in_flight.load(Ordering::Relaxed);
        stats
    }

    /// Gives `n` tokens back to the reader: `n` examples have left the loader.
    fn release(&self, n: usize) {
        self.shared.in_flight.fetch_sub(n, Ordering::SeqCst);
        if let Some(tokens) = &self.tokens {
            for _ in 0..n {
                let _ = tokens.send(());
            }
        }
    }

    fn next_outcome(&mut self) -> Option<Outcome> {
        if let Some(outcome) = self.pending.remove(&self.next_seq) {
            return Some(outcome);
        }
        let results = self.results.as_ref()?;
        loop {
            match results.recv() {
                Ok((seq, outcome)) if seq == self.next_seq => return Some(outcome),
                Ok((seq, outcome)) => {
                    self.pending.insert(seq, outcome);
                }
                Err(_) => return None,
            }
        }
    }

    fn shutdown(&mut self) {
        self.finished = true;
        // Closing both ends unblocks the reader (no more tokens) and the workers (nobody to send to).
        self.tokens = None;
        self.results = None;
        self.pending.clear();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Iterator for Loader {
    type Item = Result<Vec<Example>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let mut batch = Vec::with_capacity(self.batch_size);
        while batch.len() < self.batch_size && self.next_seq < self.rows.len() {
            let Some(outcome) = self.next_outcome() else {
                let row = self.rows[self.next_seq];
                self.shutdown();
                return Some(Err(Error::internal(format!(
                    "data loader stopped before row {row} (a loader thread ended)"
                ))));
            };
            self.next_seq += 1;
            match outcome {
                Ok(example) => batch.push(example),
                Err(error) => match self.on_error {
                    OnError::Fail => {
                        self.shutdown();
                        return Some(Err(error));
                    }
                    OnError::Skip => {
                        let reason = error.to_string();
                        tracing::warn!("skipped: {reason}");
                        self.stats.skipped += 1;
                        if self.stats.skip_reasons.len() < MAX_SKIP_REASONS {
                            self.stats.skip_reasons.push(reason);
                        }
                        self.release(1);
                    }
                },
            }
        }
        if batch.is_empty() {
            self.shutdown();
            return None;
        }
        self.stats.decoded += batch.len();
        self.release(batch.len());
        Some(Ok(batch))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn open_source(spec: &DatasetSpec, on_error: OnError, stats: &mut LoadStats) -> Result<Source> {
    match spec {
        DatasetSpec::AdeFolder { root, split } => Ok(Source::Files(folders::ade_pairs(root, split)?)),
        DatasetSpec::Folders { images, masks } => Ok(Source::Files(folders::folder_pairs(images, masks)?)),
        DatasetSpec::ListFile { path } => Ok(Source::Files(folders::list_file_pairs(path)?)),
        DatasetSpec::Parquet {
            files: paths,
            image_column,
            label_column,
            rows_before,
            rows_after,
        } => {
            if paths.is_empty() && rows_before + rows_after > 0 {
                // A Hub split none of whose files holds a selected row.
                return Ok(Source::Parquet {
                    files: Vec::new(),
                    starts: Vec::new(),
                    total: rows_before + rows_after,
                });
            }
            if paths.is_empty() {
                return Err(Error::not_found("Parquet files", "no Parquet files to read"));
            }
            let mut files = Vec::with_capacity(paths.len());
            for path in paths {
                match ParquetFile::open(path, image_column, label_column) {
                    Ok(file) => files.push(file),
                    Err(e) if on_error == OnError::Skip => {
                        tracing::warn!("skipped file: {e}");
                        stats.unreadable_files += 1;
                        if stats.skip_reasons.len() < MAX_SKIP_REASONS {
                            stats.skip_reasons.push(e.to_string());
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
            if files.is_empty() {
                return Err(Error::invalid(
                    "Parquet files",
                    format!("none of the {} Parquet files could be read", paths.len()),
                ));
            }
            let with_problems = files.iter().filter(|f| f.problem().is_some()).count();
            if let Some((file, problem)) = files.iter().find_map(|f| f.problem().map(|p| (f, p))) {
                // A column missing everywhere is a setting to fix (--image-column / --label-column), not bad data.
                if on_error == OnError::Fail || with_problems == files.len() {
                    return Err(Error::invalid(
                        file.path.display().to_string(),
                        format!("{problem} (set the dataset's image and label column names)"),
                    ));
                }
            }
            let mut starts = Vec::with_capacity(files.len());
            let mut start = *rows_before;
            for f in &files {
                starts.push(start);
                start += f.rows;
            }
            Ok(Source::Parquet {
                files,
                starts,
                total: start + rows_after,
            })
        }
    }
}

/// The reader thread: takes the selected rows in order, one token per example.
fn read_source(
    source: &Source,
    rows: Vec<usize>,
    tokens: &Receiver<()>,
    out: &Sender<RawExample>,
    counters: &Counters,
) {
    let mut seq = 0;
    let mut send = |index: usize, id: String, location: String, payload| -> bool {
        if tokens.recv().is_err() {
            return false;
        }
        let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counters.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        counters.read.fetch_add(1, Ordering::Relaxed);
        let raw = RawExample {
            seq,
            index,
            id,
            location,
            payload,
        };
        seq += 1;
        out.send(raw).is_ok()
    };
    match source {
        Source::Files(pairs) => {
            for index in rows {
                let pair = &pairs[index];
                let payload = Ok(Payload::Files {
                    image: pair.image.clone(),
                    label: pair.mask.clone(),
                });
                if !send(index, pair.id.clone(), pair.image.display().to_string(), payload) {
                    return;
                }
            }
        }
        Source::Parquet { files, starts, .. } => {
            // The rows as runs of consecutive rows within one file, read a run at a time.
            let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
            for &row in &rows {
                let Some(f) = starts.iter().rposition(|&s| s <= row) else {
                    continue;
                };
                if row >= starts[f] + files[f].rows {
                    continue;
                }
                let local = row - starts[f];
                match runs.last_mut() {
                    Some((last, run)) if *last == f && run.end == local => run.end += 1,
                    _ => runs.push((f, local..local + 1)),
                }
            }
            for (f, local) in runs {
                let (file, start) = (&files[f], starts[f]);
                let name = file
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mut keep_going = true;
                file.read_rows(local, &mut |row, raw| {
                    let id = raw
                        .image_path
                        .as_deref()
                        .and_then(|p| Path::new(p).file_stem())
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| format!("{name}:{row}"));
                    let location = format!("{} row {row}", file.path.display());
                    let payload = raw.bytes.map(|(image, label)| Payload::Bytes { image, label });
                    keep_going = send(start + row, id, location, payload);
                    keep_going
                });
                if !keep_going {
                    return;
                }
            }
        }
    }
}

/// What every decode worker applies to every example.
struct DecodeSettings {
    labels: LabelOptions,
    decode: DecodeOptions,
    image_check: Option<ImageCheck>,
}

fn decode_worker(input: &Receiver<RawExample>, output: &Sender<(usize, Outcome)>, settings: &DecodeSettings) {
    let mut jpeg = None;
    while let Ok(raw) = input.recv() {
        let seq = raw.seq;
        let outcome = decode_example(raw, settings, &mut jpeg);
        if output.send((seq, outcome)).is_err() {
            return;
        }
    }
}

fn decode_example(raw: RawExample, settings: &DecodeSettings, jpeg: &mut Option<decode::JpegDecoder>) -> Outcome {
    let RawExample {
        index,
        id,
        location,
        payload,
        ..
    } = raw;
    let origin = format!("{location} ({id})");
    let fail = |why: String| Error::invalid(&origin, why);
    // A missing image or mask file (folder and list layouts) is NotFound, so callers can tell it from bad bytes.
    let unreadable = |problem: FileProblem, why: String| match problem {
        FileProblem::Io(e) if e.kind() == std::io::ErrorKind::NotFound => Error::not_found(&origin, why),
        _ => Error::invalid(&origin, why),
    };
    let options = &settings.decode;
    // Mask files are named in their errors too (the location names the image).
    let annotation = match &payload {
        Ok(Payload::Files { label, .. }) => format!("annotation {}", label.display()),
        _ => "annotation".to_string(),
    };
    let (image_bytes, label_bytes) = match payload.map_err(|p| fail(p.to_string()))? {
        Payload::Bytes { image, label } => (image, label),
        Payload::Files { image, label } => {
            let image = decode::read_file(&image, options).map_err(|e| {
                let why = format!("cannot read image: {e}");
                unreadable(e, why)
            })?;
            let label = decode::read_file(&label, options).map_err(|e| {
                let why = format!("cannot read annotation {}: {e}", label.display());
                unreadable(e, why)
            })?;
            (image, label)
        }
    };
    let image = decode::decode_image(&image_bytes, jpeg, options).map_err(|e| fail(format!("image: {e}")))?;
    drop(image_bytes);
    if let Some(ImageCheck(check)) = &settings.image_check {
        check(image.width(), image.height()).map_err(fail)?;
    }
    let mut label = decode::decode_mask(&label_bytes, options).map_err(|e| fail(format!("{annotation}: {e}")))?;
    if image.dimensions() != label.dimensions() {
        return Err(fail(format!(
            "image is {}x{} but annotation is {}x{} (masks are never resized)",
            image.width(),
            image.height(),
            label.width(),
            label.height()
        )));
    }
    settings.labels.apply(&mut label);
    Ok(Example {
        index,
        id,
        image,
        label,
    })
}
