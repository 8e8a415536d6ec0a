//! Reading instruction records: a JSON array of objects, JSON Lines, or a Parquet file (see
//! [`crate::columnar`]). A bad record is named by its index (and line, for JSONL; row, for
//! Parquet).

use std::path::Path;

use serde_json::{Map, Value};

/// One record and where it was in its file.
#[derive(Debug, Clone)]
pub struct Record {
    /// 0-based position in the file.
    pub index: usize,
    /// 1-based line, for JSON Lines.
    pub line: Option<usize>,
    /// 0-based row of its file, for Parquet (when `index` counts across several files).
    pub row: Option<usize>,
    pub fields: Map<String, Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Names the file; its source says why (`{:#}` on an `anyhow::Error` prints both).
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: not valid JSON: {detail}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        detail: String,
    },
    #[error("{path}: record {index}{}: expected a JSON object, found {found}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    NotAnObject {
        path: String,
        index: usize,
        line: Option<usize>,
        found: &'static str,
    },
    #[error("{path}: expected a JSON array of records or JSON Lines (one object per line)")]
    Shape { path: String },
    #[error("{path}: cannot read it as Parquet: {detail}")]
    Parquet { path: String, detail: String },
    #[error("{path}:{line}:{column}: not valid UTF-8 (byte {byte} of the file); save it as UTF-8")]
    NotUtf8 {
        path: String,
        line: usize,
        column: usize,
        /// 0-based offset of the first byte that is not UTF-8.
        byte: usize,
    },
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads all records of a JSON array, JSON Lines or (by its `.parquet` extension) Parquet file.
pub fn read_records(path: &Path) -> Result<Vec<Record>, RecordError> {
    read_records_as(path, &path.display().to_string())
}

/// [`read_records`], naming the file `name` in errors.
pub fn read_records_as(path: &Path, name: &str) -> Result<Vec<Record>, RecordError> {
    if crate::columnar::is_parquet(path) {
        return crate::columnar::read_parquet(path, name);
    }
    let bytes = std::fs::read(path).map_err(|source| RecordError::Read {
        path: name.to_string(),
        source,
    })?;
    let text = text_of(bytes, name)?;
    parse_records(&text, name)
}

/// Reads a text file that must be UTF-8; one that is not is named with the line, column and
/// byte offset of its first bad byte.
pub fn read_text(path: &Path) -> Result<String, RecordError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| RecordError::Read {
        path: name.clone(),
        source,
    })?;
    text_of(bytes, &name)
}

/// `bytes` as text, or where they stop being UTF-8 (`name` is used in the error).
pub fn text_of(bytes: Vec<u8>, name: &str) -> Result<String, RecordError> {
    String::from_utf8(bytes).map_err(|e| {
        let byte = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..byte];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        // Both prefixes are valid UTF-8, so the column counts characters.
        let column =
            std::str::from_utf8(&before[line_start..]).map_or(0, |l| l.chars().count()) + 1;
        RecordError::NotUtf8 {
            path: name.to_string(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column,
            byte,
        }
    })
}

/// Parses records from text; `name` is used in errors.
pub fn parse_records(text: &str, name: &str) -> Result<Vec<Record>, RecordError> {
    // `column_offset`: bytes trimmed off the start of a JSON Lines line before parsing.
    let syntax =
        |e: serde_json::Error, line_offset: usize, column_offset: usize| RecordError::Syntax {
            path: name.to_string(),
            line: e.line() + line_offset,
            column: e.column() + column_offset,
            detail: e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string(),
        };
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .map_err(|e| syntax(e, 0, 0))?;
        return values
            .into_iter()
            .enumerate()
            .map(|(index, v)| match v {
                Value::Object(fields) => Ok(Record {
                    index,
                    line: None,
                    row: None,
                    fields,
                }),
                other => Err(RecordError::NotAnObject {
                    path: name.to_string(),
                    index,
                    line: None,
                    found: kind_of(&other),
                }),
            })
            .collect();
    }
    if !trimmed.starts_with('{') && !trimmed.is_empty() {
        return Err(RecordError::Shape {
            path: name.to_string(),
        });
    }
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let v: Value = serde_json::from_str(l).map_err(|e| syntax(e, i, indent))?;
        let index = out.len();
        match v {
            Value::Object(fields) => out.push(Record {
                index,
                line: Some(i + 1),
                row: None,
                fields,
            }),
            other => {
                return Err(RecordError::NotAnObject {
                    path: name.to_string(),
                    index,
                    line: Some(i + 1),
                    found: kind_of(&other),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_lines() {
        let r = parse_records(r#"[{"a": 1}, {"a": 2}]"#, "x.json").unwrap();
        assert_eq!(r.len(), 2);
        let r = parse_records("{\"a\": 1}\n\n{\"a\": 2}\n", "x.jsonl").unwrap();
        assert_eq!((r[1].index, r[1].line), (1, Some(3)));
    }

    #[test]
    fn errors_name_the_record_and_place() {
        let e = parse_records(r#"[{"a": 1}, 7]"#, "x.json")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "x.json: record 1: expected a JSON object, found a number"
        );
        let e = parse_records("{\"a\": 1}\n{\"a\": }\n", "x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.jsonl:2:7: not valid JSON"), "{e}");
        // Indentation counts: the column is where the mistake is in the file.
        let e = parse_records("{\"a\": 1}\n    {\"a\": }\n", "x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.jsonl:2:11: not valid JSON"), "{e}");
        let e = parse_records("hello", "x.txt").unwrap_err().to_string();
        assert!(e.contains("expected a JSON array"), "{e}");
    }

    #[test]
    fn invalid_utf8_is_located_by_line_column_and_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.jsonl");
        std::fs::write(&p, b"{\"a\": 1}\n{\"a\": \"\xc3\xa9\xff\"}\n").unwrap();
        let e = read_records(&p).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:2:9: not valid UTF-8 (byte 18 of the file); save it as UTF-8",
                p.display()
            )
        );
    }
}
