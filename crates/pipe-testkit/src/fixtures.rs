//! The committed reference fixtures (`tests/fixtures/`, written by the scripts in `scripts/`)
//! and readers for the JSON they hold.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// `tests/fixtures/<set>`.
pub fn fixture_set(set: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(set)
}

/// `tests/fixtures/<set>/<case>`.
pub fn fixture(set: &str, case: &str) -> PathBuf {
    fixture_set(set).join(case)
}

/// A fixture directory's `expected.json`.
pub fn expected_at(dir: &Path) -> Value {
    let path = dir.join("expected.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON array of arrays of integers (token ids, labels).
pub fn rows_i64(v: &Value) -> Vec<Vec<i64>> {
    v.as_array()
        .expect("an array of rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("a row")
                .iter()
                .map(|x| x.as_i64().expect("an integer"))
                .collect()
        })
        .collect()
}

/// A JSON array of numbers, as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("an array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}
