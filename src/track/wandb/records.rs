//! The few `wandb_internal.Record` protobuf messages segq writes into a `.wandb` transaction log.
//!
//! Field numbers follow wandb's public `wandb/proto/wandb_internal.proto` (checked against wandb 0.31's
//! generated descriptors); only the fields segq fills are declared, which protobuf readers accept since
//! every omitted field is optional.

/// One entry of the transaction log: exactly one of the record kinds below is set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Position of the record in the log, counting from 1.
    #[prost(int64, tag = "1")]
    pub num: i64,
    #[prost(oneof = "RecordType", tags = "2, 3, 5, 6, 17, 18")]
    pub record_type: Option<RecordType>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum RecordType {
    #[prost(message, tag = "2")]
    History(HistoryRecord),
    #[prost(message, tag = "3")]
    Summary(SummaryRecord),
    #[prost(message, tag = "5")]
    Config(ConfigRecord),
    #[prost(message, tag = "6")]
    Files(FilesRecord),
    #[prost(message, tag = "17")]
    Run(RunRecord),
    #[prost(message, tag = "18")]
    Exit(RunExitRecord),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunRecord {
    #[prost(string, tag = "1")]
    pub run_id: String,
    #[prost(string, tag = "2")]
    pub entity: String,
    #[prost(string, tag = "3")]
    pub project: String,
    #[prost(message, optional, tag = "4")]
    pub config: Option<ConfigRecord>,
    #[prost(string, tag = "6")]
    pub run_group: String,
    #[prost(string, tag = "7")]
    pub job_type: String,
    #[prost(string, tag = "8")]
    pub display_name: String,
    #[prost(string, repeated, tag = "10")]
    pub tags: Vec<String>,
    #[prost(string, tag = "13")]
    pub host: String,
    #[prost(message, optional, tag = "17")]
    pub start_time: Option<Timestamp>,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigRecord {
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<ConfigItem>,
}

/// A top-level config key and its value as JSON text.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "16")]
    pub value_json: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryRecord {
    #[prost(message, repeated, tag = "1")]
    pub item: Vec<HistoryItem>,
    #[prost(message, optional, tag = "2")]
    pub step: Option<HistoryStep>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "16")]
    pub value_json: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryStep {
    #[prost(int64, tag = "1")]
    pub num: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryRecord {
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<SummaryItem>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryItem {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "16")]
    pub value_json: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesRecord {
    #[prost(message, repeated, tag = "1")]
    pub files: Vec<FilesItem>,
}

/// A file under the run's `files/` folder that sync must upload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FilesItem {
    /// Path relative to `files/`, with `/` separators.
    #[prost(string, tag = "1")]
    pub path: String,
    #[prost(enumeration = "FileType", tag = "3")]
    pub r#type: i32,
}

/// `wandb_internal.FilesItem.FileType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum FileType {
    Other = 0,
    Wandb = 1,
    Media = 2,
    Artifact = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunExitRecord {
    #[prost(int32, tag = "1")]
    pub exit_code: i32,
    /// Run time in whole seconds.
    #[prost(int32, tag = "2")]
    pub runtime: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn field_numbers_match_wandb_internal_proto() {
        // Record{num: 1, exit: {exit_code: 3, runtime: 2}}: tag 1 varint, tag 18 length-delimited.
        let record = Record {
            num: 1,
            record_type: Some(RecordType::Exit(RunExitRecord {
                exit_code: 3,
                runtime: 2,
            })),
        };
        assert_eq!(
            record.encode_to_vec(),
            vec![0x08, 0x01, 0x92, 0x01, 0x04, 0x08, 0x03, 0x10, 0x02]
        );
        // ConfigItem.value_json is field 16: tag bytes 0x82 0x01.
        let item = ConfigItem {
            key: "a".into(),
            value_json: "1".into(),
        };
        assert_eq!(item.encode_to_vec(), vec![0x0a, 0x01, b'a', 0x82, 0x01, 0x01, b'1']);
        // FilesItem.type is field 3.
        let file = FilesItem {
            path: "x".into(),
            r#type: FileType::Media as i32,
        };
        assert_eq!(file.encode_to_vec(), vec![0x0a, 0x01, b'x', 0x18, 0x02]);
    }
}
