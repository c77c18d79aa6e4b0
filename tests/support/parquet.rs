//! Writes Parquet datasets in the schema Hugging Face `datasets` uses for Scene Parse 150, for tests that need
//! corrupt or unusual files. Shared by the integration tests (`#[path = "support/parquet.rs"] mod ...`) and the data
//! module's unit tests (`#[path]` from src/data/tests.rs), so it uses only std and the arrow/parquet crates.
#![allow(dead_code)]

use std::error::Error;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};

/// One row for [`write_parquet_dataset`]: image and label bytes (None writes a null cell) and the image's path.
pub struct FixtureRow {
    pub image: Option<Vec<u8>>,
    pub label: Option<Vec<u8>>,
    pub path: Option<String>,
}

/// Writes a Parquet file with the schema `datasets` uses for Scene Parse 150: `image` and `annotation` as
/// {bytes, path} structs and `scene_category` as int64, `row_group_rows` rows per row group.
/// `image_column`/`label_column` rename the two columns.
pub fn write_parquet_dataset(
    path: &Path,
    rows: &[FixtureRow],
    row_group_rows: usize,
    image_column: &str,
    label_column: &str,
) -> Result<(), Box<dyn Error>> {
    let struct_fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let image_struct = |get: &dyn Fn(&FixtureRow) -> Option<Vec<u8>>, with_path: bool| -> ArrayRef {
        let bytes: BinaryArray = rows.iter().map(get).collect();
        let paths: StringArray = rows
            .iter()
            .map(|r| {
                if with_path {
                    r.path.clone()
                } else {
                    r.path
                        .as_ref()
                        .map(|p| Path::new(p).with_extension("png").to_string_lossy().into_owned())
                }
            })
            .collect();
        Arc::new(StructArray::new(
            struct_fields.clone(),
            vec![Arc::new(bytes), Arc::new(paths)],
            None,
        ))
    };
    let image = image_struct(&|r| r.image.clone(), true);
    let label = image_struct(&|r| r.label.clone(), false);
    let category: ArrayRef = Arc::new(Int64Array::from_iter_values((0..rows.len() as i64).map(|i| i % 3)));
    let schema = Arc::new(Schema::new(vec![
        Field::new(image_column, DataType::Struct(struct_fields.clone()), true),
        Field::new(label_column, DataType::Struct(struct_fields.clone()), true),
        Field::new("scene_category", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![image, label, category])?;
    let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let props = ::parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build();
    let mut writer = ::parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
