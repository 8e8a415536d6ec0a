//! Records → prompt/response pairs, with a seeded train/validation split.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use pipe_rand::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::prompt::{MissingField, Template};
use crate::records::{Record, RecordError};

/// Why a `val_size` cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValSizeError {
    /// A fraction outside [0, 1], or not a number; a whole one (`3.0`) is probably a count.
    #[error("val_size {value:?} is neither a fraction from 0 to 1 nor a whole count{}", count_hint(*value))]
    NotAFraction { value: f64 },
    #[error("val_size {count} is more than the {records} records there are")]
    MoreThanRecords { count: u64, records: usize },
}

/// `; for a count of 3 records write 3` for a whole fraction above 1, like `3.0`.
fn count_hint(f: f64) -> String {
    if f > 1.0 && f.fract() == 0.0 && f < 1e15 {
        format!("; for a count of {n} records write {n}", n = f as u64)
    } else {
        String::new()
    }
}

/// Why records cannot be formatted, or a data file found or read. A variant with a source
/// names only what failed; the source says why (`{:#}` on an `anyhow::Error` prints both).
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A read failed part-way through the file.
    #[error("{}", path.display())]
    ReadLine {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not a prompt/response pair", path.display())]
    NotAPair {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("no file `{file}` in {}", dir.display())]
    NoSuchFile { file: String, dir: PathBuf },
    /// `extensions` as shown: `.json or .jsonl`.
    #[error("no {extensions} file in {}", dir.display())]
    NoDataFile { dir: PathBuf, extensions: String },
    /// `files` as shown, `a.jsonl, b.jsonl`; `choose` tells how to pick one.
    #[error("{} holds several data files ({files}); {choose}", dir.display())]
    SeveralDataFiles {
        dir: PathBuf,
        files: String,
        choose: String,
    },
    #[error(transparent)]
    Records(#[from] RecordError),
    #[error("{name} holds no records")]
    NoRecords { name: String },
    #[error("{name}")]
    ValSize {
        name: String,
        #[source]
        source: ValSizeError,
    },
    #[error("{name}")]
    Record {
        name: String,
        #[source]
        source: MissingField,
    },
    /// Writing an output failed.
    #[error(transparent)]
    Write(std::io::Error),
}

/// One formatted example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The record's position in the source file.
    pub index: usize,
    pub prompt: String,
    pub response: String,
}

/// How big the validation split is: a fraction of the records (0 ≤ f ≤ 1), or a count. Every
/// record held out (`1.0`, or the count of records) makes an evaluation-only split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ValSize {
    Count(u64),
    Fraction(f64),
}

impl schemars::JsonSchema for ValSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ValSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A fraction of the records from 0 to 1 (1.0: all of them), or a whole count",
            "type": "number",
            "minimum": 0
        })
    }
}

impl<'de> Deserialize<'de> for ValSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ValSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a fraction of the records from 0 to 1 (0.05), or a whole count (200)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ValSize, E> {
                Ok(ValSize::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ValSize, E> {
                u64::try_from(v)
                    .map(ValSize::Count)
                    .map_err(|_| E::custom(format!("val_size {v} is negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ValSize, E> {
                Ok(ValSize::Fraction(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl ValSize {
    /// Why this size can hold out no split at all, if so: a fraction outside [0, 1] (named as
    /// written, `1.5`), or not a number.
    pub fn check(&self) -> Result<(), ValSizeError> {
        match *self {
            ValSize::Fraction(f) if (0.0..=1.0).contains(&f) => Ok(()),
            ValSize::Fraction(value) => Err(ValSizeError::NotAFraction { value }),
            ValSize::Count(_) => Ok(()),
        }
    }

    /// The number of validation records out of `n` (a fraction rounds up, as the `datasets`
    /// library's `train_test_split` does).
    pub fn count(&self, n: usize) -> Result<usize, ValSizeError> {
        self.check()?;
        match *self {
            ValSize::Count(c) if c as u128 <= n as u128 => Ok(c as usize),
            ValSize::Count(count) => Err(ValSizeError::MoreThanRecords { count, records: n }),
            ValSize::Fraction(f) => Ok((((n as f64) * f).ceil() as usize).min(n)),
        }
    }

    /// Whether every record is held out (an evaluation-only split).
    pub fn holds_out_everything(&self, n: usize) -> bool {
        self.count(n) == Ok(n)
    }
}

/// What to do with a record that lacks a field.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FormatStats {
    pub records: usize,
    pub train: usize,
    pub val: usize,
    pub with_input_template: usize,
    pub skipped: usize,
    /// The first skipped records and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_examples: Vec<String>,
    pub empty_responses: usize,
}

pub struct Formatted {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub stats: FormatStats,
}

/// Formats every record and splits them.
pub fn format_records(
    records: &[Record],
    template: &Template,
    on_error: OnError,
    val_size: ValSize,
    seed: u64,
) -> Result<Formatted, MissingField> {
    let mut stats = FormatStats {
        records: records.len(),
        ..Default::default()
    };
    let mut pairs = Vec::with_capacity(records.len());
    for rec in records {
        match template.format(rec) {
            Ok((prompt, response)) => {
                if response.is_empty() {
                    stats.empty_responses += 1;
                }
                if template.uses_input_template(rec) {
                    stats.with_input_template += 1;
                }
                pairs.push(Pair {
                    index: rec.index,
                    prompt,
                    response,
                });
            }
            Err(e) if on_error == OnError::Skip => {
                stats.skipped += 1;
                if stats.skipped_examples.len() < 20 {
                    stats.skipped_examples.push(e.to_string());
                }
            }
            Err(e) => return Err(e),
        }
    }
    let k = val_size.count(pairs.len()).unwrap_or(0);
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    shuffle(&mut order, seed);
    let mut is_val = vec![false; pairs.len()];
    for &i in &order[..k] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, p) in pairs.into_iter().enumerate() {
        if is_val[i] {
            val.push(p);
        } else {
            train.push(p);
        }
    }
    stats.train = train.len();
    stats.val = val.len();
    Ok(Formatted { train, val, stats })
}

/// A Fisher–Yates shuffle driven by pipe-rand's SplitMix64: fixed there, so a split never
/// changes with a dependency's version.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

pub fn write_pairs(path: &Path, pairs: &[Pair]) -> std::io::Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    for p in pairs {
        serde_json::to_writer(&mut w, p)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

pub fn read_pairs(path: &Path) -> Result<Vec<Pair>, FormatError> {
    let f = std::fs::File::open(path).map_err(|source| FormatError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| FormatError::ReadLine {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|source| FormatError::NotAPair {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?,
        );
    }
    Ok(out)
}

/// The file to read from a `format` stage's input: the file itself, `file` inside a directory,
/// or the directory's only `.json`/`.jsonl` file.
pub fn find_records_file(input: &Path, file: Option<&str>) -> Result<PathBuf, FormatError> {
    find_data_file(input, file, &["json", "jsonl"], "name one with `file:`")
}

/// A data file given as a stage input: `input` itself when it is a file, `file` inside the
/// directory `input`, or the directory's only file with one of `extensions` (a download
/// stage's output); `choose` tells the user how to pick one when there are several.
pub fn find_data_file(
    input: &Path,
    file: Option<&str>,
    extensions: &[&str],
    choose: &str,
) -> Result<PathBuf, FormatError> {
    if input.is_file() {
        return Ok(input.to_path_buf());
    }
    if let Some(f) = file {
        let p = input.join(f);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(FormatError::NoSuchFile {
                file: f.to_string(),
                dir: input.to_path_buf(),
            })
        };
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(input)
        .map_err(|source| FormatError::Read {
            path: input.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|x| extensions.iter().any(|e| x == *e))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(FormatError::NoDataFile {
            dir: input.to_path_buf(),
            extensions: extensions
                .iter()
                .map(|e| format!(".{e}"))
                .collect::<Vec<_>>()
                .join(" or "),
        }),
        _ => Err(FormatError::SeveralDataFiles {
            dir: input.to_path_buf(),
            files: found
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy())
                .collect::<Vec<_>>()
                .join(", "),
            choose: choose.to_string(),
        }),
    }
}

/// The `format` stage's work: read, format, split, write `train.jsonl`, `val.jsonl` and
/// `stats.json` into `out`. Errors name the file as `shown_as` (the user's own file, when
/// `records_file` is the store's copy of it).
pub fn run(
    records_file: &Path,
    shown_as: &Path,
    template: &Template,
    on_error: OnError,
    val_size: ValSize,
    seed: u64,
    out: &Path,
) -> Result<FormatStats, FormatError> {
    let name = shown_as.display().to_string();
    let bytes = std::fs::read(records_file).map_err(|source| FormatError::Read {
        path: shown_as.to_path_buf(),
        source,
    })?;
    let text = crate::records::text_of(bytes, &name)?;
    let records = crate::records::parse_records(&text, &name)?;
    if records.is_empty() {
        return Err(FormatError::NoRecords { name });
    }
    if let Err(source) = val_size.count(records.len()) {
        return Err(FormatError::ValSize { name, source });
    }
    let f = match format_records(&records, template, on_error, val_size, seed) {
        Ok(f) => f,
        Err(source) => return Err(FormatError::Record { name, source }),
    };
    write_pairs(&out.join("train.jsonl"), &f.train).map_err(FormatError::Write)?;
    write_pairs(&out.join("val.jsonl"), &f.val).map_err(FormatError::Write)?;
    std::fs::write(
        out.join("stats.json"),
        serde_json::to_vec_pretty(&f.stats).expect("stats serialise"),
    )
    .map_err(FormatError::Write)?;
    Ok(f.stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_file_is_the_path_or_the_one_matching_file_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let find = |file: Option<&str>| find_data_file(d, file, &["jsonl"], "pick one");
        assert_eq!(
            find(None).unwrap_err().to_string(),
            format!("no .jsonl file in {}", d.display())
        );
        std::fs::write(d.join("b.jsonl"), "{}\n").unwrap();
        std::fs::write(d.join("notes.txt"), "").unwrap();
        assert_eq!(find(None).unwrap(), d.join("b.jsonl"));
        assert_eq!(
            find_data_file(&d.join("notes.txt"), None, &["jsonl"], "").unwrap(),
            d.join("notes.txt")
        );
        std::fs::write(d.join("a.jsonl"), "{}\n").unwrap();
        let e = find(None).unwrap_err().to_string();
        assert!(
            e.ends_with("holds several data files (a.jsonl, b.jsonl); pick one"),
            "{e}"
        );
        assert_eq!(find(Some("a.jsonl")).unwrap(), d.join("a.jsonl"));
        assert!(find(Some("c.jsonl"))
            .unwrap_err()
            .to_string()
            .starts_with("no file `c.jsonl` in"));
        let records = find_records_file(d, None).unwrap_err().to_string();
        assert!(records.ends_with("name one with `file:`"), "{records}");
    }
    use crate::prompt::TemplateSpec;
    use std::collections::BTreeMap;

    fn records(n: usize) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                index: i,
                line: None,
                fields: serde_json::from_value(serde_json::json!({
                    "instruction": format!("task {i}"), "input": if i % 2 == 0 { "" } else { "x" }, "output": if i == 3 { "" } else { "y" }
                }))
                .unwrap(),
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let t = Template::new(&TemplateSpec::alpaca(), BTreeMap::new()).unwrap();
        let a =
            format_records(&records(100), &t, OnError::Fail, ValSize::Fraction(0.1), 7).unwrap();
        let b =
            format_records(&records(100), &t, OnError::Fail, ValSize::Fraction(0.1), 7).unwrap();
        let c =
            format_records(&records(100), &t, OnError::Fail, ValSize::Fraction(0.1), 8).unwrap();
        assert_eq!((a.train.len(), a.val.len()), (90, 10));
        assert_eq!(a.val, b.val);
        assert_ne!(a.val, c.val);
        let mut all: Vec<usize> = a.train.iter().chain(&a.val).map(|p| p.index).collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(a.stats.empty_responses, 1);
        assert_eq!(a.stats.with_input_template, 50);
        let d = format_records(&records(10), &t, OnError::Fail, ValSize::Count(3), 1).unwrap();
        assert_eq!(d.val.len(), 3);
        // Every record held out: an evaluation-only split.
        assert_eq!(ValSize::Count(10).count(10), Ok(10));
        assert_eq!(ValSize::Fraction(1.0).count(10), Ok(10));
        let all =
            format_records(&records(10), &t, OnError::Fail, ValSize::Fraction(1.0), 1).unwrap();
        assert_eq!((all.train.len(), all.val.len()), (0, 10));
        assert_eq!(
            ValSize::Count(11).count(10).unwrap_err().to_string(),
            "val_size 11 is more than the 10 records there are"
        );
        assert_eq!(
            ValSize::Fraction(1.5).count(10).unwrap_err().to_string(),
            "val_size 1.5 is neither a fraction from 0 to 1 nor a whole count"
        );
        assert_eq!(
            ValSize::Fraction(3.0).check().unwrap_err().to_string(),
            "val_size 3.0 is neither a fraction from 0 to 1 nor a whole count; for a count of 3 records write 3"
        );
    }

    #[test]
    fn skip_counts_bad_records_and_fail_names_them() {
        let t = Template::new(&TemplateSpec::alpaca(), BTreeMap::new()).unwrap();
        let mut recs = records(5);
        recs[2].fields.remove("instruction");
        let e = format_records(&recs, &t, OnError::Fail, ValSize::Count(0), 1)
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "record 2: field `instruction` is missing");
        let ok = format_records(&recs, &t, OnError::Skip, ValSize::Count(0), 1).unwrap();
        assert_eq!((ok.stats.skipped, ok.train.len()), (1, 4));
    }
}
