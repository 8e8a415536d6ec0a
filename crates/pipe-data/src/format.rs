//! Records → prompt/response pairs or conversations, from one source (a file, or the files of
//! a split of a Hub dataset directory) or a mixture of several, with a seeded train/validation
//! split.

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use pipe_rand::SplitMix64;
use serde::{Deserialize, Serialize};

use crate::chat::{BadConversation, ChatReader, Conversation};
use crate::mixture::{MixError, SourceStats, Take};
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
    #[error("{name}")]
    Conversation {
        name: String,
        #[source]
        source: BadConversation,
    },
    /// `splits` as shown: `test, train`.
    #[error("no `{split}` split in {}{}", dir.display(), if splits.is_empty() { String::new() } else { format!(" (its splits: {splits})") })]
    NoSplit {
        split: String,
        dir: PathBuf,
        splits: String,
    },
    #[error(transparent)]
    Mix(#[from] MixError),
    #[error("{} holds both conversations and prompt/response pairs", path.display())]
    MixedItems { path: PathBuf },
    #[error("{} holds conversations, not prompt/response pairs", path.display())]
    NotPairs { path: PathBuf },
    /// Writing an output failed.
    #[error(transparent)]
    Write(std::io::Error),
}

/// One formatted example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// The record's position in the source file.
    pub index: usize,
    /// The source it was drawn from, in a mixture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub prompt: String,
    pub response: String,
}

/// What records become: prompt/response pairs through a template, or conversations.
#[derive(Debug, Clone)]
pub enum Formatter {
    Pairs(Template),
    Chat(ChatReader),
}

/// One formatted example, as a line of `train.jsonl` / `val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Item {
    Chat(Conversation),
    Pair(Pair),
}

impl Item {
    fn set_source(&mut self, name: &str) {
        let s = Some(name.to_string());
        match self {
            Item::Chat(c) => c.source = s,
            Item::Pair(p) => p.source = s,
        }
    }
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
    /// For conversations: how many turns, and of what (in the records read, before a
    /// mixture's draw).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversations: Option<ChatStats>,
    /// The files read (each as its path in its input), when there are several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// For a mixture: what each source gave.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStats>,
    /// For a mixture: its seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixture_seed: Option<u64>,
}

impl FormatStats {
    /// Counts a record left out by `on_error: skip`; the first few are kept with `why`.
    fn note_skipped(&mut self, why: String) {
        const EXAMPLES_KEPT: usize = 20;
        self.skipped += 1;
        if self.skipped_examples.len() < EXAMPLES_KEPT {
            self.skipped_examples.push(why);
        }
    }
}

/// What the conversations hold.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatStats {
    pub turns: usize,
    pub assistant_turns: usize,
    pub with_system: usize,
    /// Conversations without an assistant turn: nothing to learn with the default mask.
    pub without_assistant: usize,
    pub empty_turns: usize,
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
                    source: None,
                    prompt,
                    response,
                });
            }
            Err(e) if on_error == OnError::Skip => stats.note_skipped(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    let (train, val) = split_items(pairs, val_size, seed);
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

/// A data file to read, how errors name it (the user's own file, when `path` is the store's
/// copy of it), and how the stats name it (its path in its input, so that the outputs do not
/// depend on where the input lies).
#[derive(Debug, Clone)]
pub struct DataFile {
    pub path: PathBuf,
    pub shown_as: PathBuf,
    pub name: String,
}

/// One source of a format stage: its files (the shards of a split, read in order as one list)
/// and how much of it goes into a mixture.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub files: Vec<DataFile>,
    pub take: Take,
}

/// The data files of a stage input: `input` itself when it is a file; `file` inside the
/// directory `input`; the files of `split` (`data/train-00000-of-00002.parquet`,
/// `train.jsonl`, `train/part-0.parquet`: a name that is the split or starts with it and `-`,
/// `_` or `.`, or a directory of that name), in name order; or, with neither, the directory's
/// only data file, else its `train` split (as a Hub dataset directory holds them).
pub fn find_data_files(
    input: &Path,
    file: Option<&str>,
    split: Option<&str>,
) -> Result<Vec<PathBuf>, FormatError> {
    const EXTENSIONS: [&str; 3] = ["json", "jsonl", "parquet"];
    if input.is_file() || file.is_some() {
        return find_data_file(input, file, &EXTENSIONS, "").map(|p| vec![p]);
    }
    let mut found = Vec::new();
    collect_data_files(input, &EXTENSIONS, 0, &mut found).map_err(|source| FormatError::Read {
        path: input.to_path_buf(),
        source,
    })?;
    found.sort();
    let split_of = |rel: &Path| -> Vec<String> {
        // Every name on the path that could name a split: directories, and the file's stem up
        // to its first `-`, `_` or `.`.
        let mut names: Vec<String> = rel
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if let Some(stem) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) {
            let head = stem
                .split(['-', '_', '.'])
                .next()
                .unwrap_or_default()
                .to_string();
            names.push(head);
        }
        names
    };
    let in_split = |p: &PathBuf, split: &str| {
        split_of(p.strip_prefix(input).unwrap_or(p))
            .iter()
            .any(|n| n == split)
    };
    let all_splits = || {
        let mut names: Vec<String> = ["train", "validation", "valid", "dev", "test"]
            .into_iter()
            .filter(|s| found.iter().any(|p| in_split(p, s)))
            .map(str::to_string)
            .collect();
        names.dedup();
        names.join(", ")
    };
    let wanted = match split {
        Some(s) => s,
        None if found.len() == 1 => return Ok(found),
        None if found.is_empty() => {
            return Err(FormatError::NoDataFile {
                dir: input.to_path_buf(),
                extensions: ".json, .jsonl or .parquet".into(),
            })
        }
        None if found.iter().any(|p| in_split(p, "train")) => "train",
        None => {
            return Err(FormatError::SeveralDataFiles {
                dir: input.to_path_buf(),
                files: found
                    .iter()
                    .map(|p| p.strip_prefix(input).unwrap_or(p).display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                choose: "name one with `file:`, or a split with `split:`".into(),
            })
        }
    };
    let chosen: Vec<PathBuf> = found
        .iter()
        .filter(|p| in_split(p, wanted))
        .cloned()
        .collect();
    if chosen.is_empty() {
        return Err(FormatError::NoSplit {
            split: wanted.to_string(),
            dir: input.to_path_buf(),
            splits: all_splits(),
        });
    }
    Ok(chosen)
}

/// Data files under `dir`, three levels deep at most, skipping hidden directories (`.cache`).
fn collect_data_files(
    dir: &Path,
    extensions: &[&str],
    depth: usize,
    out: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_dir() {
            if depth < 3 && !hidden {
                collect_data_files(&path, extensions, depth + 1, out)?;
            }
        } else if path
            .extension()
            .is_some_and(|x| extensions.iter().any(|e| x.eq_ignore_ascii_case(e)))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a source's files as one list of records: `index` counts across the files, `line` /
/// `row` within each. Returns the records and the index each file starts at.
fn read_source(files: &[DataFile]) -> Result<(Vec<Record>, Vec<usize>), FormatError> {
    let mut records = Vec::new();
    let mut starts = Vec::with_capacity(files.len());
    for f in files {
        let start = records.len();
        starts.push(start);
        let name = f.shown_as.display().to_string();
        let mut recs = crate::records::read_records_as(&f.path, &name)?;
        for r in &mut recs {
            r.index += start;
        }
        records.extend(recs);
    }
    Ok((records, starts))
}

/// Formats one source's records, counting into `stats`; a bad record is named by its file and
/// its index there.
fn format_source(
    records: &[Record],
    starts: &[usize],
    files: &[DataFile],
    formatter: &Formatter,
    on_error: OnError,
    stats: &mut FormatStats,
) -> Result<Vec<Item>, FormatError> {
    let file_of = |index: usize| starts.partition_point(|&s| s <= index).saturating_sub(1);
    let name = |f: usize| files[f].shown_as.display().to_string();
    let mut items = Vec::with_capacity(records.len());
    for rec in records {
        // A bad record: the error that names its file, and the reason a skip records.
        let result: Result<Item, (FormatError, String)> = match formatter {
            Formatter::Pairs(t) => t
                .format(rec)
                .map(|(prompt, response)| {
                    if response.is_empty() {
                        stats.empty_responses += 1;
                    }
                    if t.uses_input_template(rec) {
                        stats.with_input_template += 1;
                    }
                    Item::Pair(Pair {
                        index: rec.index,
                        source: None,
                        prompt,
                        response,
                    })
                })
                .map_err(|e| {
                    let f = file_of(e.index);
                    let local = MissingField {
                        index: e.index - starts[f],
                        ..e
                    };
                    let why = local.to_string();
                    let name = name(f);
                    (
                        FormatError::Record {
                            name,
                            source: local,
                        },
                        why,
                    )
                }),
            Formatter::Chat(reader) => reader
                .read(rec)
                .map(|messages| {
                    let c = stats.conversations.get_or_insert_with(Default::default);
                    let assistant = messages.iter().filter(|m| m.role == "assistant").count();
                    c.turns += messages.len();
                    c.assistant_turns += assistant;
                    c.with_system += usize::from(messages.iter().any(|m| m.role == "system"));
                    c.without_assistant += usize::from(assistant == 0);
                    c.empty_turns += messages.iter().filter(|m| m.content.is_empty()).count();
                    Item::Chat(Conversation {
                        index: rec.index,
                        source: None,
                        messages,
                    })
                })
                .map_err(|e| {
                    let f = file_of(e.index);
                    let local = BadConversation {
                        index: e.index - starts[f],
                        ..e
                    };
                    let why = local.to_string();
                    let name = name(f);
                    (
                        FormatError::Conversation {
                            name,
                            source: local,
                        },
                        why,
                    )
                }),
        };
        match result {
            Ok(item) => items.push(item),
            Err((_, why)) if on_error == OnError::Skip => stats.note_skipped(why),
            Err((e, _)) => return Err(e),
        }
    }
    Ok(items)
}

/// Splits `items` into train and validation sets: `val_size` of them, chosen by a seeded
/// shuffle of their positions, each set in the original order.
fn split_items<T>(items: Vec<T>, val_size: ValSize, seed: u64) -> (Vec<T>, Vec<T>) {
    let k = val_size.count(items.len()).unwrap_or(0);
    let mut order: Vec<usize> = (0..items.len()).collect();
    shuffle(&mut order, seed);
    let mut is_val = vec![false; items.len()];
    for &i in &order[..k] {
        is_val[i] = true;
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, p) in items.into_iter().enumerate() {
        if is_val[i] {
            val.push(p);
        } else {
            train.push(p);
        }
    }
    (train, val)
}

/// How a format stage reads, formats, mixes and splits.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    pub on_error: OnError,
    pub val_size: ValSize,
    pub seed: u64,
    /// A weighted mixture's size (default: as large as it can be without repeats).
    pub size: Option<u64>,
}

/// The `format` stage's work: read every source, format its records, draw the mixture (with
/// several sources, or counts), split, and write `train.jsonl`, `val.jsonl` and `stats.json`
/// into `out`. Errors name each file as its `shown_as`.
pub fn run(
    sources: &[Source],
    formatter: &Formatter,
    opts: &FormatOptions,
    out: &Path,
) -> Result<FormatStats, FormatError> {
    let mut stats = FormatStats::default();
    let first_name = sources
        .first()
        .and_then(|s| s.files.first())
        .map(|f| f.shown_as.display().to_string())
        .unwrap_or_default();
    let mut formatted = Vec::with_capacity(sources.len());
    let mut files_read = Vec::new();
    for src in sources {
        let (records, starts) = read_source(&src.files)?;
        stats.records += records.len();
        let shown: Vec<String> = src.files.iter().map(|f| f.name.clone()).collect();
        let single = sources.len() == 1;
        if single && records.is_empty() {
            return Err(FormatError::NoRecords { name: first_name });
        }
        if single && src.take == Take::All {
            // One whole source: the split is checked against its records, as it always was.
            if let Err(source) = opts.val_size.count(records.len()) {
                return Err(FormatError::ValSize {
                    name: first_name,
                    source,
                });
            }
        }
        let items = format_source(
            &records,
            &starts,
            &src.files,
            formatter,
            opts.on_error,
            &mut stats,
        )?;
        files_read.extend(shown.iter().cloned());
        formatted.push((items, shown));
    }
    if files_read.len() > 1 {
        stats.files = files_read;
    }
    let items: Vec<Item> = if sources.len() == 1 && sources[0].take == Take::All {
        formatted.pop().map(|(items, _)| items).unwrap_or_default()
    } else {
        let lens: Vec<usize> = formatted.iter().map(|(i, _)| i.len()).collect();
        let takes: Vec<Take> = sources.iter().map(|s| s.take).collect();
        let drawn = crate::mixture::draw(&lens, &takes, opts.size, opts.seed)?;
        let mut mixed = Vec::new();
        for ((src, (items, shown)), picks) in sources.iter().zip(&formatted).zip(&drawn) {
            let mut seen = vec![false; items.len()];
            let mut repeated = 0;
            for &i in picks {
                repeated += usize::from(std::mem::replace(&mut seen[i], true));
                let mut item = items[i].clone();
                item.set_source(&src.name);
                mixed.push(item);
            }
            stats.sources.push(SourceStats {
                name: src.name.clone(),
                examples: items.len(),
                taken: picks.len(),
                repeated,
                weight: match src.take {
                    Take::Weight(w) => Some(w),
                    _ => None,
                },
                count: match src.take {
                    Take::Count(c) => Some(c),
                    _ => None,
                },
                files: shown.clone(),
            });
        }
        // Interleaved: the sources' examples in one seeded order.
        shuffle(&mut mixed, opts.seed);
        stats.mixture_seed = Some(opts.seed);
        if mixed.is_empty() {
            return Err(FormatError::NoRecords {
                name: "the mixture".into(),
            });
        }
        if let Err(source) = opts.val_size.count(mixed.len()) {
            return Err(FormatError::ValSize {
                name: "the mixture".into(),
                source,
            });
        }
        mixed
    };
    let (train, val) = split_items(items, opts.val_size, opts.seed);
    stats.train = train.len();
    stats.val = val.len();
    write_items(&out.join("train.jsonl"), &train).map_err(FormatError::Write)?;
    write_items(&out.join("val.jsonl"), &val).map_err(FormatError::Write)?;
    std::fs::write(
        out.join("stats.json"),
        serde_json::to_vec_pretty(&stats).expect("stats serialise"),
    )
    .map_err(FormatError::Write)?;
    Ok(stats)
}

/// Writes `items` as JSON Lines.
pub fn write_items<T: Serialize>(path: &Path, items: &[T]) -> std::io::Result<()> {
    let mut w = BufWriter::new(std::fs::File::create(path)?);
    for p in items {
        serde_json::to_writer(&mut w, p)?;
        w.write_all(b"\n")?;
    }
    w.flush()
}

/// The examples of a format stage's `train.jsonl` / `val.jsonl`: pairs or conversations.
pub fn read_items(path: &Path) -> Result<Vec<Item>, FormatError> {
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
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|source| FormatError::NotAPair {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })?;
        let item = if value.get("messages").is_some() {
            serde_json::from_value(value).map(Item::Chat)
        } else {
            serde_json::from_value(value).map(Item::Pair)
        };
        out.push(item.map_err(|source| FormatError::NotAPair {
            path: path.to_path_buf(),
            line: i + 1,
            source,
        })?);
    }
    Ok(out)
}

/// The prompt/response pairs of a format stage's `train.jsonl` or `val.jsonl` (an error if it
/// holds conversations).
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>, FormatError> {
    match read_examples(path)? {
        Examples::Pairs(pairs) => Ok(pairs),
        Examples::Chat(_) => Err(FormatError::NotPairs {
            path: path.to_path_buf(),
        }),
    }
}

/// A split's examples, all of one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Examples {
    Pairs(Vec<Pair>),
    Chat(Vec<Conversation>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Pairs(p) => p.len(),
            Examples::Chat(c) => c.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A format stage's `train.jsonl` or `val.jsonl`: prompt/response pairs or conversations (an
/// empty file reads as no pairs).
pub fn read_examples(path: &Path) -> Result<Examples, FormatError> {
    let items = read_items(path)?;
    let chat = items.iter().filter(|i| matches!(i, Item::Chat(_))).count();
    if chat != 0 && chat != items.len() {
        return Err(FormatError::MixedItems {
            path: path.to_path_buf(),
        });
    }
    let (mut pairs, mut convs) = (Vec::new(), Vec::new());
    for i in items {
        match i {
            Item::Pair(p) => pairs.push(p),
            Item::Chat(c) => convs.push(c),
        }
    }
    Ok(if chat == 0 {
        Examples::Pairs(pairs)
    } else {
        Examples::Chat(convs)
    })
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
                row: None,
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
