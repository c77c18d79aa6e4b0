//! Writes a [`PreparedRun`] as W&B's offline run folder: `offline-run-<stamp>-<id>/run-<id>.wandb` (Run, Config,
//! History, Files, Summary and Exit records) plus the media under `files/`, which `wandb sync` uploads.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use prost::Message;
use serde_json::{Map, Value};

use super::records::{
    ConfigItem, ConfigRecord, FileType, FilesItem, FilesRecord, HistoryItem, HistoryRecord, HistoryStep, Record,
    RecordType, RunExitRecord, RunRecord, SummaryItem, SummaryRecord, Timestamp,
};
use super::txlog::TxLogWriter;
use super::{PreparedRun, run_folder};
use crate::{Error, Result};

fn json_text(value: &Value) -> String {
    // serde_json only fails on non-string map keys, which a Value cannot hold.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn config_items(config: &Map<String, Value>) -> Vec<ConfigItem> {
    config
        .iter()
        .map(|(key, value)| ConfigItem {
            key: key.clone(),
            value_json: json_text(value),
        })
        .collect()
}

/// The records of a run, in the order `wandb sync` expects them, numbered from 1.
pub fn run_records(run: &PreparedRun) -> Vec<Record> {
    let since_epoch = run.start_time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut kinds = vec![
        RecordType::Run(RunRecord {
            run_id: run.run_id.clone(),
            entity: run.entity.clone(),
            project: run.project.clone(),
            config: Some(ConfigRecord {
                update: config_items(&run.config),
            }),
            run_group: run.group.clone(),
            job_type: String::new(),
            display_name: run.display_name.clone(),
            tags: run.tags.clone(),
            host: String::new(),
            start_time: Some(Timestamp {
                seconds: since_epoch.as_secs() as i64,
                nanos: since_epoch.subsec_nanos() as i32,
            }),
        }),
        RecordType::Config(ConfigRecord {
            update: config_items(&run.full_config()),
        }),
    ];
    for row in &run.history {
        let step = row.get("_step").and_then(Value::as_i64).unwrap_or(0);
        let item = row.iter().map(|(key, value)| HistoryItem {
            key: key.clone(),
            value_json: json_text(value),
        });
        kinds.push(RecordType::History(HistoryRecord {
            item: item.collect(),
            step: Some(HistoryStep { num: step }),
        }));
    }
    if !run.media.is_empty() {
        let files = run
            .media
            .iter()
            .map(|file| FilesItem {
                path: file.path.clone(),
                r#type: FileType::Media as i32,
            })
            .collect();
        kinds.push(RecordType::Files(FilesRecord { files }));
    }
    let summary = run.summary.iter().map(|(key, value)| SummaryItem {
        key: key.clone(),
        value_json: json_text(value),
    });
    kinds.push(RecordType::Summary(SummaryRecord {
        update: summary.collect(),
    }));
    kinds.push(RecordType::Exit(RunExitRecord {
        exit_code: run.exit_code,
        runtime: run.runtime_s.round() as i32,
    }));
    kinds
        .into_iter()
        .zip(1..)
        .map(|(kind, num)| Record {
            num,
            record_type: Some(kind),
        })
        .collect()
}

/// Writes the run folder under `wandb_dir` and returns its path.
pub fn write_run(wandb_dir: &Path, run: &PreparedRun) -> Result<PathBuf> {
    let dir = run_folder(wandb_dir, run);
    let files_dir = dir.join("files");
    std::fs::create_dir_all(&files_dir).map_err(|e| Error::io(&files_dir, e))?;
    for file in &run.media {
        let path = files_dir.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, &file.bytes).map_err(|e| Error::io(&path, e))?;
    }
    let log_path = dir.join(format!("run-{}.wandb", run.run_id));
    let file = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;
    let mut writer = TxLogWriter::new(std::io::BufWriter::new(file)).map_err(|e| Error::io(&log_path, e))?;
    for record in run_records(run) {
        writer
            .append(&record.encode_to_vec())
            .map_err(|e| Error::io(&log_path, e))?;
    }
    writer.finish().map_err(|e| Error::io(&log_path, e))?;
    Ok(dir)
}

/// After an upload, renames `offline-run-...` to `run-...` (W&B's name for a run that reached the server), so
/// that a later `wandb sync` of the wandb folder does not upload it twice.
pub fn mark_synced(dir: &Path) -> Result<PathBuf> {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return Ok(dir.to_path_buf());
    };
    let Some(online_name) = name.strip_prefix("offline-") else {
        return Ok(dir.to_path_buf());
    };
    let target = dir.with_file_name(online_name);
    std::fs::rename(dir, &target).map_err(|e| Error::io(dir, e))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::super::{prepare_run, tests::sample_log, txlog};
    use super::*;
    use crate::track::TrackingSettings;

    #[test]
    fn written_folder_reads_back_record_by_record() {
        let root = std::env::temp_dir().join(format!("segq-offline-{}", std::process::id()));
        let run = prepare_run(&TrackingSettings::default(), &sample_log(), "abcd1234".into()).unwrap();
        let dir = write_run(&root, &run).unwrap();
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("offline-run-") && name.ends_with("-abcd1234"),
            "{name}"
        );
        let bytes = std::fs::read(dir.join("run-abcd1234.wandb")).unwrap();
        let payloads = txlog::read_records(&bytes).unwrap();
        let records: Vec<Record> = payloads.iter().map(|p| Record::decode(p.as_slice()).unwrap()).collect();
        let kinds: Vec<&str> = records
            .iter()
            .map(|r| match r.record_type.as_ref().unwrap() {
                RecordType::Run(_) => "run",
                RecordType::Config(_) => "config",
                RecordType::History(_) => "history",
                RecordType::Files(_) => "files",
                RecordType::Summary(_) => "summary",
                RecordType::Exit(_) => "exit",
            })
            .collect();
        assert_eq!(
            kinds,
            ["run", "config", "history", "history", "files", "summary", "exit"]
        );
        assert_eq!(
            records.iter().map(|r| r.num).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        let Some(RecordType::Run(run_record)) = &records[0].record_type else {
            unreachable!()
        };
        assert_eq!(
            (run_record.run_id.as_str(), run_record.project.as_str()),
            ("abcd1234", "segq")
        );
        let Some(RecordType::History(history)) = &records[3].record_type else {
            unreachable!()
        };
        assert_eq!(history.step.as_ref().unwrap().num, 1);
        let Some(RecordType::Files(files)) = &records[4].record_type else {
            unreachable!()
        };
        for item in &files.files {
            assert!(dir.join("files").join(&item.path).is_file(), "{}", item.path);
        }
        let synced = mark_synced(&dir).unwrap();
        assert!(synced.file_name().unwrap().to_str().unwrap().starts_with("run-"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
