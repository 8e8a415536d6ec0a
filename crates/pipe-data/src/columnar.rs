//! Reading records from Parquet, the format of most Hugging Face Hub datasets: each row becomes
//! a record whose fields are its columns, as JSON values — nested lists and structs (a
//! `messages` column of `{role, content}` structs) included, so that a Parquet file and its
//! JSON Lines twin read to the same records.
//!
//! Strings, integers, floats, booleans, lists, structs, maps and dictionary-encoded columns are
//! read; columns of other types (binary data such as images, dates) read as `null`, so a
//! template that needs one says the field is missing.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
    UInt32Type, UInt64Type, UInt8Type,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value};

use crate::records::{Record, RecordError};

/// Whether `path` names a Parquet file (by its extension).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Reads every row of a Parquet file as a record (`row` and `index`: its 0-based row); `name`
/// is how errors name the file.
pub fn read_parquet(path: &Path, name: &str) -> Result<Vec<Record>, RecordError> {
    let bad = |detail: String| RecordError::Parquet {
        path: name.to_string(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|source| RecordError::Read {
        path: name.to_string(),
        source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(e.to_string()))?
        .with_batch_size(1024)
        .build()
        .map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("row {}: {e}", out.len())))?;
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut fields = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                fields.insert(field.name().clone(), value_at(column, i));
            }
            let row = out.len();
            out.push(Record {
                index: row,
                line: None,
                row: Some(row),
                fields,
            });
        }
    }
    Ok(out)
}

fn float(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Element `i` of `a` as JSON.
fn value_at(a: &ArrayRef, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => Value::from(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Value::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Value::from(a.as_primitive::<UInt8Type>().value(i)),
        DataType::UInt16 => Value::from(a.as_primitive::<UInt16Type>().value(i)),
        DataType::UInt32 => Value::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Value::from(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float16 => float(a.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::from(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(a.as_string_view().value(i)),
        DataType::List(_) => list(&a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => list(&a.as_list::<i64>().value(i)),
        DataType::FixedSizeList(..) => list(&a.as_fixed_size_list().value(i)),
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), value_at(c, i)))
                    .collect(),
            )
        }
        DataType::Map(..) => {
            let m = a.as_map();
            let entries = m.value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            Value::Object(
                (0..entries.len())
                    .map(|j| {
                        let k = match value_at(keys, j) {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (k, value_at(values, j))
                    })
                    .collect(),
            )
        }
        DataType::Dictionary(..) => {
            let d = a.as_any_dictionary();
            match d.normalized_keys().get(i) {
                Some(&k) => value_at(d.values(), k),
                None => Value::Null,
            }
        }
        _ => Value::Null,
    }
}

fn list(items: &ArrayRef) -> Value {
    Value::Array((0..items.len()).map(|j| value_at(items, j)).collect())
}
