//! Fuzzes the multiple-choice task readers, `tasks::parse_docs`, for every `TaskFormat`:
//!
//! - valid rows of each format with random character-range deletions, insertions and
//!   replacements (JSON syntax, `_` blanks, `[title]` and other bracket tags, multi-byte
//!   characters next to the places the readers cut strings, answer letters and indices);
//! - valid rows with one field removed or given a random JSON value of the wrong type.
//!
//! What is promised: `parse_docs` never panics; every error starts with `name:LINE: record N:`
//! (LINE the row's 1-based line, N the number of items read before it) or says that the file
//! holds no items; and every item it returns can be turned into requests, a solved few-shot
//! example and a few-shot prefix without panicking.
//!
//! Each property runs 1024 cases; `PROPTEST_CASES=50000 cargo test -p pipe-eval --test
//! fuzz_tasks` soaks longer.

use pipe_eval::tasks::{parse_docs, prefix, Doc, FewShot, TaskFormat};
use proptest::prelude::*;
use serde_json::{json, Value};

use pipe_testkit::mutation::{self, edit, mutate};

const NAME: &str = "task.jsonl";

/// Valid rows of each format, as the Hugging Face datasets have them.
fn rows(format: TaskFormat) -> Vec<Value> {
    match format {
        TaskFormat::Arc => vec![
            json!({"question": "Which is a gas?", "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}, "answerKey": "B"}),
            json!({"question": "Café é?", "choices": {"text": ["日本", "🦀"], "label": ["1", "2"]}, "answerKey": "2"}),
        ],
        TaskFormat::Hellaswag => vec![
            json!({"activity_label": "Cooking", "ctx_a": "A man boils water.", "ctx_b": "then he", "endings": ["adds salt [title] Stir.", "sits [step] down", "runs", "é [日本] 🦀"], "label": "0"}),
            json!({"activity_label": "Home [title]", "ctx_a": "x", "ctx_b": "ÉCLAIR", "endings": ["a", "b"], "label": 1}),
        ],
        TaskFormat::Piqa => vec![
            json!({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0}),
            json!({"goal": "日本", "sol1": "🦀", "sol2": "é", "label": "1"}),
        ],
        TaskFormat::Mmlu => vec![
            json!({"question": " 2 + 2 = ? ", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}),
            json!({"question": "é?", "choices": ["日本", "🦀", "c", "d"], "answer": "D"}),
        ],
        TaskFormat::Winogrande => vec![
            json!({"sentence": "The trophy didn't fit in the case because _ was too big.", "option1": "the trophy", "option2": "the case", "answer": "1"}),
            json!({"sentence": "日本_🦀 é", "option1": "é", "option2": "日", "answer": "2"}),
        ],
        TaskFormat::Openbookqa => vec![
            json!({"question_stem": "The sun is", "choices": {"text": ["a star", "a planet", "a moon", "a comet"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"}),
            json!({"question_stem": "é", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": " B"}),
        ],
        TaskFormat::Boolq => vec![
            json!({"passage": "Water is wet.", "question": "is water wet", "label": 1}),
            json!({"passage": "日本", "question": "🦀", "answer": false}),
        ],
        TaskFormat::Generic => vec![
            json!({"context": "Pick one:", "choices": ["yes", "no", "é"], "answer": "no"}),
            json!({"context": "🦀", "choices": ["a", "b"], "answer": 0}),
        ],
    }
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

/// Characters and tokens that matter to JSON and to the readers' string handling.
const ALPHABET: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "\\u00e9",
    "\\ud800",
    "\n",
    "\r",
    "\t",
    " ",
    "  ",
    "_",
    "__",
    " [title]",
    "[step]",
    "[",
    "]",
    "[\n",
    "A",
    "B",
    "D",
    "E",
    "1",
    "2",
    "3",
    "-1",
    "1.5",
    "1e99",
    "99999999999999999999",
    "true",
    "null",
    "\"\"",
    "é",
    "日本",
    "🦀",
    "\u{0}",
    "\u{feff}",
    "\u{2028}",
    "x",
];

/// A JSON value that is probably of the wrong type for the field it lands in.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(json!("A")),
        Just(json!("D")),
        Just(json!("2")),
        Just(json!("_")),
        Just(json!("é_")),
        Just(json!("[é")),
        "[_\\[\\] é日🦀a-zA-Z0-9]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (prop::sample::select(&["text", "label", "x"][..]), inner),
                0..3
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

#[derive(Debug, Clone)]
enum FieldEdit {
    Remove(prop::sample::Index),
    Set(prop::sample::Index, Value),
}

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(FieldEdit::Remove),
        (any::<prop::sample::Index>(), json_value()).prop_map(|(i, v)| FieldEdit::Set(i, v)),
    ]
}

/// Removes a field of a row, or gives it another value.
fn edit_row(row: &mut Value, e: &FieldEdit) {
    let Value::Object(map) = row else { return };
    let keys: Vec<String> = map.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    match e {
        FieldEdit::Remove(i) => {
            map.remove(&keys[i.index(keys.len())]);
        }
        FieldEdit::Set(i, v) => {
            map.insert(keys[i.index(keys.len())].clone(), v.clone());
        }
    }
}

fn format() -> impl Strategy<Value = TaskFormat> {
    prop::sample::select(&TaskFormat::ALL[..])
}

/// Parses, and checks the error or the items.
fn check(text: &str, format: TaskFormat, limit: Option<usize>) -> Result<(), TestCaseError> {
    match parse_docs(text, NAME, format, limit) {
        Ok(docs) => {
            prop_assert!(!docs.is_empty());
            if let Some(l) = limit {
                prop_assert!(docs.len() <= l);
            }
            for (i, d) in docs.iter().enumerate() {
                prop_assert!(d.num_choices() >= 2);
                prop_assert!(d.gold < d.num_choices());
                use_doc(d, &docs, i);
            }
        }
        Err(e) => {
            let shown = e.to_string();
            if shown == format!("{NAME} holds no items") {
                return Ok(());
            }
            let located = shown
                .strip_prefix(&format!("{NAME}:"))
                .and_then(|r| r.split_once(": record "))
                .and_then(|(line, r)| {
                    let (n, _) = r.split_once(": ")?;
                    Some((line.parse::<usize>().ok()?, n.parse::<usize>().ok()?))
                });
            let Some((line, record)) = located else {
                prop_assert!(false, "not `{}:LINE: record N: …`: {}", NAME, shown);
                return Ok(());
            };
            let lines: Vec<&str> = text.lines().collect();
            prop_assert!(
                (1..=lines.len()).contains(&line),
                "line {} of {}: {}",
                line,
                lines.len(),
                shown
            );
            prop_assert!(
                !lines[line - 1].trim().is_empty(),
                "line {} is blank: {}",
                line,
                shown
            );
            let rows_before = lines[..line - 1]
                .iter()
                .filter(|l| !l.trim().is_empty())
                .count();
            prop_assert_eq!(record, rows_before, "{}", shown);
            let fields = format!("a `{}` row has:", format.name());
            prop_assert!(shown.contains(&fields), "{}", shown);
        }
    }
    Ok(())
}

/// Everything the scorer does with an item before the model sees it.
fn use_doc(d: &Doc, all: &[Doc], i: usize) {
    let _ = d.solved();
    let _ = d.choice_lengths();
    for shots in [
        FewShot::None,
        FewShot::Sampled {
            k: 3,
            seed: i as u64,
        },
        FewShot::FirstOf {
            docs: all.to_vec(),
            k: 2,
        },
    ] {
        let p = prefix(d, all, i, &shots);
        assert_eq!(d.requests(&p).len(), d.num_choices());
    }
}

proptest! {
    #![proptest_config(mutation::config())]

    #[test]
    fn mutated_rows_fail_with_located_errors(
        format in format(),
        edits in prop::collection::vec(edit(ALPHABET), 1..6),
        limit in prop::option::weighted(0.2, 0..4usize),
    ) {
        check(&mutate(&jsonl(&rows(format)), &edits), format, limit)?;
    }

    #[test]
    fn rows_with_wrong_fields_fail_with_located_errors(
        format in format(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), field_edit()), 1..4),
        blank_lines in prop::collection::vec(0..3usize, 2),
    ) {
        let mut rows = rows(format);
        for (which, e) in &edits {
            let n = rows.len();
            edit_row(&mut rows[which.index(n)], e);
        }
        let text: String = rows
            .iter()
            .zip(blank_lines)
            .map(|(r, blank)| format!("{}{r}\n", "\n".repeat(blank)))
            .collect();
        check(&text, format, None)?;
    }

    #[test]
    fn rows_of_another_format_fail_with_located_errors(
        read_as in format(),
        written_as in format(),
    ) {
        check(&jsonl(&rows(written_as)), read_as, None)?;
    }
}

#[test]
fn the_unmutated_rows_read() {
    for format in TaskFormat::ALL {
        let docs = parse_docs(&jsonl(&rows(format)), NAME, format, None)
            .unwrap_or_else(|e| panic!("{}: {e}", format.name()));
        assert_eq!(docs.len(), 2, "{}", format.name());
    }
}
