//! Fuzzes the instruction-data readers with malformed input:
//!
//! - `records::parse_records` on a valid JSON array and a valid JSON Lines file of Alpaca
//!   records, with random character-range deletions, insertions and replacements drawn from a
//!   JSON-ish alphabet (brackets, quotes, escapes, lone surrogates, huge numbers, deep nesting,
//!   BOMs, CR, non-ASCII);
//! - `format::format_records` on whatever records survive, with random split settings;
//! - `prompt::Pattern::parse` (and `render`) on random template strings.
//!
//! What is promised: none of them panics. A records error names the file, and either the
//! `line:column` of bad JSON (inside the text), or the index of the record that is not an
//! object (with its line, for JSON Lines), or says the text is neither shape. A formatting
//! error names the record. A template error quotes the template.
//!
//! (`format::read_pairs` reads only from a path, so it is not fuzzed here.)
//!
//! Each property runs 1024 cases; `PROPTEST_CASES=50000 cargo test -p pipe-data --test
//! fuzz_records` soaks longer.

use std::collections::BTreeMap;

use pipe_data::format::{format_records, OnError, ValSize};
use pipe_data::prompt::{Pattern, Template, TemplateSpec};
use pipe_data::records::{parse_records, Record, RecordError};
use proptest::prelude::*;

use pipe_testkit::mutation::{self, edit, junk, mutate};

const NAME: &str = "data.jsonl";

const ARRAY: &str = r#"[
  {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well."},
  {"instruction": "Translate to French", "input": "good morning", "output": "bonjour", "n": 3},
  {"instruction": "Café \u00e9 日本 🦀", "input": "{x} [y]", "output": ""}
]
"#;

const LINES: &str = "\
{\"instruction\": \"Give three tips for staying healthy.\", \"input\": \"\", \"output\": \"1. Eat well.\"}
{\"instruction\": \"Translate to French\", \"input\": \"good morning\", \"output\": \"bonjour\"}

  {\"instruction\": \"Café \\u00e9 日本 🦀\", \"input\": null, \"output\": true}
{\"instruction\": \"Sum\", \"input\": \"1 2\", \"output\": 3}
";

/// Characters and tokens that matter to JSON, plus some that stress positions and nesting.
const ALPHABET: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u",
    "\\ud800",
    "\\uZZ",
    "\\n",
    "\n",
    "\r",
    "\r\n",
    "\t",
    " ",
    "\u{feff}",
    "\u{a0}",
    "\u{2028}",
    "0",
    "-",
    "-0",
    "1e999",
    "18446744073709551616",
    "1.5",
    "true",
    "null",
    "nul",
    "\"instruction\"",
    "\"output\": ",
    "\"input\": \"\"",
    "{}",
    "[]",
    "é",
    "日本",
    "🦀",
    "\u{0}",
    "x",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    "{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":",
];

/// A valid input to start from, then some edits to it.
fn mutated_input() -> impl Strategy<Value = String> {
    (
        prop::sample::select(&[ARRAY, LINES][..]),
        prop::collection::vec(edit(ALPHABET), 0..6),
    )
        .prop_map(|(base, edits)| mutate(base, &edits))
}

/// Checks a records error against the text it came from.
fn check_record_error(e: &RecordError, text: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert!(
        shown.starts_with(NAME),
        "error does not name the file: {}",
        shown
    );
    let lines: Vec<&str> = text.split('\n').collect();
    match e {
        RecordError::Syntax {
            path, line, column, ..
        } => {
            prop_assert_eq!(path, NAME);
            prop_assert!(
                (1..=lines.len()).contains(line),
                "line {} outside the text's {} lines: {}\n--- text:\n{:?}",
                line,
                lines.len(),
                shown,
                text
            );
            // serde_json counts columns in bytes; 0 is "before the first byte".
            let width = lines[line - 1].len();
            prop_assert!(
                *column <= width + 1,
                "column {} outside line {} ({} bytes): {}\n--- text:\n{:?}",
                column,
                line,
                width,
                shown,
                text
            );
            let at = format!("{NAME}:{line}:{column}: not valid JSON");
            prop_assert!(shown.starts_with(&at), "expected {:?}: {}", at, shown);
        }
        RecordError::NotAnObject {
            path, index, line, ..
        } => {
            prop_assert_eq!(path, NAME);
            prop_assert!(
                shown.starts_with(&format!("{NAME}: record {index}")),
                "{}",
                shown
            );
            if let Some(line) = line {
                prop_assert!((1..=lines.len()).contains(line), "{}", shown);
                prop_assert!(shown.contains(&format!("(line {line})")), "{}", shown);
                // At most one record per non-blank line before it.
                let before = lines[..line - 1]
                    .iter()
                    .filter(|l| !l.trim().is_empty())
                    .count();
                prop_assert!(*index <= before, "record {} on line {}", index, line);
            }
        }
        RecordError::NotUtf8 { .. } => {
            prop_assert!(false, "parsing text cannot find bad UTF-8: {}", shown);
        }
        RecordError::Shape { path } => {
            prop_assert_eq!(path, NAME);
            let start = text.trim_start_matches('\u{feff}').trim_start();
            prop_assert!(
                !start.is_empty() && !start.starts_with(['[', '{']),
                "a shape error for text that starts with {:?}",
                start.chars().next()
            );
        }
        RecordError::Read { .. } => prop_assert!(false, "parse_records read a file: {}", shown),
        RecordError::Parquet { .. } => {
            prop_assert!(false, "parse_records read Parquet: {}", shown)
        }
    }
    Ok(())
}

/// Formats what was read with a template and split settings; checks the error if any.
fn check_format(
    records: &[Record],
    spec: &TemplateSpec,
    on_error: OnError,
    val: ValSize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let t = Template::new(spec, BTreeMap::new()).expect("a valid template");
    match format_records(records, &t, on_error, val, seed) {
        Ok(f) => {
            prop_assert_eq!(f.train.len() + f.val.len() + f.stats.skipped, records.len());
        }
        Err(e) => {
            prop_assert_eq!(on_error, OnError::Fail);
            let shown = e.to_string();
            prop_assert!(
                records.iter().any(|r| r.index == e.index),
                "no record {}",
                e.index
            );
            prop_assert!(
                shown.starts_with(&format!("record {}", e.index)),
                "{}",
                shown
            );
        }
    }
    Ok(())
}

/// A JSON value: mostly Alpaca-shaped objects whose fields may be missing or of the wrong type.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    let field = prop::sample::select(&["instruction", "input", "output", "x", ""][..]);
    let object = prop::collection::vec((field, leaf.clone()), 0..5)
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()));
    prop_oneof![
        6 => object,
        1 => leaf.clone(),
        1 => prop::collection::vec(leaf, 0..3).prop_map(Value::Array),
    ]
}

/// Values written as one JSON array, or as JSON Lines with blank and indented lines.
fn json_file() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((json_value(), 0..3usize, 0..3usize), 0..6),
        any::<bool>(),
    )
        .prop_map(|(values, array)| {
            if array {
                let v: Vec<_> = values.into_iter().map(|(v, ..)| v).collect();
                serde_json::to_string_pretty(&v).expect("serialise")
            } else {
                let mut s = String::new();
                for (v, blank, indent) in values {
                    s.push_str(&"\n".repeat(blank));
                    s.push_str(&" ".repeat(indent));
                    s.push_str(&v.to_string());
                    s.push('\n');
                }
                s
            }
        })
}

fn val_size() -> impl Strategy<Value = ValSize> {
    prop_oneof![
        (0u64..8).prop_map(ValSize::Count),
        any::<u64>().prop_map(ValSize::Count),
        (-1.0f64..2.0).prop_map(ValSize::Fraction),
        Just(ValSize::Fraction(f64::NAN)),
    ]
}

/// Template text: placeholders, escapes and strays, in any order.
fn template_text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(
        &[
            "{",
            "}",
            "{{",
            "}}",
            "{instruction}",
            "{ input }",
            "{output}",
            "{}",
            "{n}",
            "{missing}",
            "{日本}",
            "text ",
            "\n",
            "é",
            "🦀",
            "{{x}}",
            "{a{b}",
            "}x{",
        ][..],
    );
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(mutation::config())]

    #[test]
    fn mutated_records_fail_with_located_errors(
        text in mutated_input(),
        on_error in prop::sample::select(&[OnError::Fail, OnError::Skip][..]),
        val in val_size(),
        seed in any::<u64>(),
    ) {
        match parse_records(&text, NAME) {
            Ok(records) => {
                for (i, r) in records.iter().enumerate() {
                    prop_assert_eq!(r.index, i);
                }
                prop_assert!(records.windows(2).all(|w| w[0].line < w[1].line || w[0].line.is_none()));
                check_format(&records, &TemplateSpec::alpaca(), on_error, val, seed)?;
            }
            Err(e) => check_record_error(&e, &text)?,
        }
    }

    #[test]
    fn records_of_the_wrong_shape_are_named(
        text in json_file(),
        on_error in prop::sample::select(&[OnError::Fail, OnError::Skip][..]),
        val in val_size(),
        seed in any::<u64>(),
    ) {
        match parse_records(&text, NAME) {
            Ok(records) => check_format(&records, &TemplateSpec::alpaca(), on_error, val, seed)?,
            Err(e) => check_record_error(&e, &text)?,
        }
    }

    #[test]
    fn random_text_fails_with_located_errors(text in junk(ALPHABET)) {
        if let Err(e) = parse_records(&text, NAME) {
            check_record_error(&e, &text)?;
        }
    }

    #[test]
    fn templates_parse_or_say_what_is_wrong(
        text in template_text(),
        noise in prop::collection::vec(any::<char>(), 0..8),
    ) {
        for t in [text.clone(), format!("{text}{}", noise.iter().collect::<String>())] {
            match Pattern::parse(&t) {
                Ok(p) => {
                    for f in p.fields() {
                        prop_assert!(!f.is_empty() && f.trim() == f, "field {:?}", f);
                    }
                    let rec = parse_records(LINES, NAME).expect("valid");
                    for r in &rec {
                        if let Err(e) = p.render(r, &BTreeMap::new()) {
                            prop_assert_eq!(e.index, r.index);
                        }
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains(&format!("`{t}`")), "{} does not quote {:?}", e, t),
            }
        }
    }
}

#[test]
fn the_unmutated_inputs_read() {
    assert_eq!(parse_records(ARRAY, NAME).expect("array").len(), 3);
    let lines = parse_records(LINES, NAME).expect("lines");
    assert_eq!(
        lines.iter().map(|r| r.line).collect::<Vec<_>>(),
        [Some(1), Some(2), Some(4), Some(5)]
    );
}
