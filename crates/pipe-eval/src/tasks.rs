//! Multiple-choice task readers: Hugging Face dataset rows (JSONL) → the contexts and
//! continuations lm-evaluation-harness scores, with its prompt formats and preprocessing.
//!
//! | format       | context                                                        | choices                 |
//! |--------------|----------------------------------------------------------------|-------------------------|
//! | `arc`        | `Question: {question}\nAnswer:`                                | `choices.text`          |
//! | `hellaswag`  | `{activity_label}: {ctx_a} {Ctx_b}` (preprocessed)             | `endings` (preprocessed)|
//! | `piqa`       | `Question: {goal}\nAnswer:`                                    | `sol1`, `sol2`          |
//! | `mmlu`       | `{question}\nA. …\nB. …\nC. …\nD. …\nAnswer:` (+ description)  | `A`…`D`                 |
//! | `winogrande` | the sentence up to `_` with each option (one context per choice) | the rest of the sentence |
//! | `openbookqa` | `{question_stem}`                                              | `choices.text`          |
//! | `boolq`      | `{passage}\nQuestion: {question}?\nAnswer:`                    | `no`, `yes`             |
//! | `generic`    | `{context}`                                                    | `choices`               |
//!
//! Continuations are the choices after the harness's target delimiter `" "`; few-shot examples
//! are joined with `"\n\n"`.

use std::path::Path;

use pipe_data::records::RecordError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a task file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(transparent)]
    Read(#[from] RecordError),
    /// A row that is not an item of its format: where it is, what is wrong, and the fields
    /// such a row has.
    #[error("{name}:{line}: record {record}: {problem} (a `{}` row has: {})", format.name(), format.fields())]
    Row {
        name: String,
        line: usize,
        record: usize,
        format: TaskFormat,
        problem: RowError,
    },
    #[error("{name} holds no items")]
    Empty { name: String },
}

/// What is wrong with a row. Shown inside [`TaskError::Row`]'s message (not linked as its
/// source, which `{:#}` would print again after the message's end).
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("not a JSON object: {0}")]
    Json(serde_json::Error),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("{0} choice(s); at least 2 are needed")]
    TooFewChoices(usize),
    /// A field missing, of the wrong type, or not agreeing with the others.
    #[error("{0}")]
    Field(String),
}

/// Between a context and its answer.
pub const TARGET_DELIMITER: &str = " ";
/// Between few-shot examples, and between the last one and the question.
pub const FEWSHOT_DELIMITER: &str = "\n\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskFormat {
    Arc,
    Hellaswag,
    Piqa,
    Mmlu,
    Winogrande,
    Openbookqa,
    Boolq,
    Generic,
}

impl TaskFormat {
    pub const ALL: [TaskFormat; 8] = [
        TaskFormat::Arc,
        TaskFormat::Hellaswag,
        TaskFormat::Piqa,
        TaskFormat::Mmlu,
        TaskFormat::Winogrande,
        TaskFormat::Openbookqa,
        TaskFormat::Boolq,
        TaskFormat::Generic,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::Arc => "arc",
            TaskFormat::Hellaswag => "hellaswag",
            TaskFormat::Piqa => "piqa",
            TaskFormat::Mmlu => "mmlu",
            TaskFormat::Winogrande => "winogrande",
            TaskFormat::Openbookqa => "openbookqa",
            TaskFormat::Boolq => "boolq",
            TaskFormat::Generic => "generic",
        }
    }

    /// The fields a row of this format needs (for error messages).
    fn fields(self) -> &'static str {
        match self {
            TaskFormat::Arc => "question, choices {text, label}, answerKey",
            TaskFormat::Hellaswag => "activity_label, ctx_a, ctx_b, endings, label",
            TaskFormat::Piqa => "goal, sol1, sol2, label",
            TaskFormat::Mmlu => "question, choices, answer (and subject)",
            TaskFormat::Winogrande => "sentence, option1, option2, answer",
            TaskFormat::Openbookqa => "question_stem, choices {text, label}, answerKey",
            TaskFormat::Boolq => "passage, question, label (or answer)",
            TaskFormat::Generic => "context, choices, answer",
        }
    }
}

/// What is scored for one item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Query {
    /// One context; each choice is a continuation of it.
    Shared {
        context: String,
        choices: Vec<String>,
    },
    /// One context per choice, all followed by the same continuation (WinoGrande's partial
    /// scoring).
    PerChoice {
        contexts: Vec<String>,
        continuation: String,
    },
}

/// One multiple-choice item.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Doc {
    /// The row's position in its file (0-based).
    pub index: usize,
    pub query: Query,
    pub gold: usize,
    /// Text put before the (few-shot examples and the) context, e.g. MMLU's subject line.
    pub description: String,
}

impl Doc {
    pub fn num_choices(&self) -> usize {
        match &self.query {
            Query::Shared { choices, .. } => choices.len(),
            Query::PerChoice { contexts, .. } => contexts.len(),
        }
    }

    /// The item with its answer, as a few-shot example.
    pub fn solved(&self) -> String {
        match &self.query {
            Query::Shared { context, choices } => {
                format!("{context}{TARGET_DELIMITER}{}", choices[self.gold])
            }
            Query::PerChoice {
                contexts,
                continuation,
            } => format!("{}{TARGET_DELIMITER}{continuation}", contexts[self.gold]),
        }
    }

    /// `(context, continuation)` for each choice, with `prefix` (description and few-shot
    /// examples) before every context.
    pub fn requests(&self, prefix: &str) -> Vec<(String, String)> {
        match &self.query {
            Query::Shared { context, choices } => choices
                .iter()
                .map(|c| {
                    (
                        format!("{prefix}{context}"),
                        format!("{TARGET_DELIMITER}{c}"),
                    )
                })
                .collect(),
            Query::PerChoice {
                contexts,
                continuation,
            } => contexts
                .iter()
                .map(|c| {
                    (
                        format!("{prefix}{c}"),
                        format!("{TARGET_DELIMITER}{continuation}"),
                    )
                })
                .collect(),
        }
    }

    /// The choices' lengths in characters, for `acc_norm`; `None` where the choices are
    /// contexts (the continuation is the same for all).
    pub fn choice_lengths(&self) -> Option<Vec<usize>> {
        match &self.query {
            Query::Shared { choices, .. } => {
                Some(choices.iter().map(|c| c.chars().count()).collect())
            }
            Query::PerChoice { .. } => None,
        }
    }
}

/// Where few-shot examples come from.
#[derive(Debug, Clone, PartialEq)]
pub enum FewShot {
    None,
    /// The first `k` items of a separate (dev) file, in file order (the harness's `first_n`).
    FirstOf {
        docs: Vec<Doc>,
        k: usize,
    },
    /// `k` items drawn with a seeded generator from the task's own items, never the item
    /// being asked.
    Sampled {
        k: usize,
        seed: u64,
    },
}

/// The text before each item's context: the description, then the few-shot examples.
pub fn prefix(doc: &Doc, all: &[Doc], position: usize, fewshot: &FewShot) -> String {
    let shots: Vec<&Doc> = match fewshot {
        FewShot::None => Vec::new(),
        FewShot::FirstOf { docs, k } => docs.iter().take(*k).collect(),
        FewShot::Sampled { k, seed } => {
            let mut rng = pipe_rand::SplitMix64::new(
                *seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let mut pool: Vec<usize> = (0..all.len()).filter(|&i| i != position).collect();
            let take = (*k).min(pool.len());
            // A partial Fisher–Yates shuffle: the first `take` are a uniform sample.
            for i in 0..take {
                let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
                pool.swap(i, j);
            }
            pool[..take].iter().map(|&i| &all[i]).collect()
        }
    };
    let mut text = doc.description.clone();
    if !shots.is_empty() {
        let solved: Vec<String> = shots.iter().map(|d| d.solved()).collect();
        text.push_str(&solved.join(FEWSHOT_DELIMITER));
        text.push_str(FEWSHOT_DELIMITER);
    }
    text
}

/// Reads a JSONL file of Hugging Face dataset rows in `format`, up to `limit` items.
pub fn read_docs(
    path: &Path,
    format: TaskFormat,
    limit: Option<usize>,
) -> Result<Vec<Doc>, TaskError> {
    let text = pipe_data::records::read_text(path)?;
    parse_docs(&text, &path.display().to_string(), format, limit)
}

/// [`read_docs`] on text already read; `name` is used in error messages.
pub fn parse_docs(
    text: &str,
    name: &str,
    format: TaskFormat,
    limit: Option<usize>,
) -> Result<Vec<Doc>, TaskError> {
    let mut docs = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if limit.is_some_and(|l| docs.len() >= l) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let located = |problem: RowError| TaskError::Row {
            name: name.to_string(),
            line: line_no + 1,
            record: docs.len(),
            format,
            problem,
        };
        let row: Value = serde_json::from_str(line).map_err(|e| located(RowError::Json(e)))?;
        if !row.is_object() {
            return Err(located(RowError::NotAnObject));
        }
        let doc =
            doc_from_row(&row, format, docs.len()).map_err(|e| located(RowError::Field(e)))?;
        if doc.num_choices() < 2 {
            return Err(located(RowError::TooFewChoices(doc.num_choices())));
        }
        docs.push(doc);
    }
    if docs.is_empty() {
        return Err(TaskError::Empty {
            name: name.to_string(),
        });
    }
    Ok(docs)
}

fn doc_from_row(row: &Value, format: TaskFormat, index: usize) -> Result<Doc, String> {
    let mut description = String::new();
    let (query, gold) = match format {
        TaskFormat::Arc | TaskFormat::Openbookqa => {
            let context = if format == TaskFormat::Arc {
                format!("Question: {}\nAnswer:", string(row, "question")?)
            } else {
                string(row, "question_stem")?.to_string()
            };
            let choices = row.get("choices").ok_or("missing field `choices`")?;
            let texts = strings(choices, "text").map_err(|e| format!("choices: {e}"))?;
            let labels = strings(choices, "label").map_err(|e| format!("choices: {e}"))?;
            let key = string(row, "answerKey")?.trim_start();
            let gold = labels
                .iter()
                .position(|l| l == key)
                .ok_or_else(|| format!("answerKey `{key}` is not one of the labels {labels:?}"))?;
            if texts.len() != labels.len() {
                return Err(format!(
                    "{} choice texts but {} labels",
                    texts.len(),
                    labels.len()
                ));
            }
            (
                Query::Shared {
                    context,
                    choices: texts,
                },
                gold,
            )
        }
        TaskFormat::Hellaswag => {
            let ctx = format!(
                "{} {}",
                string(row, "ctx_a")?,
                capitalize(string(row, "ctx_b")?)
            );
            let context =
                hellaswag_preprocess(&format!("{}: {ctx}", string(row, "activity_label")?));
            let choices = strings(row, "endings")?
                .iter()
                .map(|e| hellaswag_preprocess(e))
                .collect();
            (
                Query::Shared { context, choices },
                index_field(row, "label")?,
            )
        }
        TaskFormat::Piqa => (
            Query::Shared {
                context: format!("Question: {}\nAnswer:", string(row, "goal")?),
                choices: vec![string(row, "sol1")?.into(), string(row, "sol2")?.into()],
            },
            index_field(row, "label")?,
        ),
        TaskFormat::Mmlu => {
            let choices = strings(row, "choices")?;
            if choices.len() != 4 {
                return Err(format!("{} choices; MMLU items have 4", choices.len()));
            }
            if let Some(subject) = row.get("subject").and_then(Value::as_str) {
                description = format!(
                    "The following are multiple choice questions (with answers) about {}.\n\n",
                    subject.replace('_', " ")
                );
            }
            let context = format!(
                "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
                string(row, "question")?.trim(),
                choices[0],
                choices[1],
                choices[2],
                choices[3]
            );
            let gold = match row.get("answer") {
                Some(Value::String(s)) if s.len() == 1 && ("A"..="D").contains(&s.as_str()) => {
                    (s.as_bytes()[0] - b'A') as usize
                }
                _ => index_field(row, "answer")?,
            };
            (
                Query::Shared {
                    context,
                    choices: ["A", "B", "C", "D"].map(String::from).to_vec(),
                },
                gold,
            )
        }
        TaskFormat::Winogrande => {
            let sentence = string(row, "sentence")?;
            let blank = sentence.find('_').ok_or("the sentence has no `_` blank")?;
            let options = [string(row, "option1")?, string(row, "option2")?];
            let gold = match string(row, "answer")? {
                "1" => 0,
                "2" => 1,
                other => return Err(format!("answer `{other}` is neither \"1\" nor \"2\"")),
            };
            (
                Query::PerChoice {
                    contexts: options
                        .iter()
                        .map(|o| format!("{}{o}", &sentence[..blank]))
                        .collect(),
                    continuation: sentence[blank + 1..].trim().to_string(),
                },
                gold,
            )
        }
        TaskFormat::Boolq => {
            let gold = match (row.get("label"), row.get("answer")) {
                (Some(_), _) => index_field(row, "label")?,
                (None, Some(Value::Bool(b))) => *b as usize,
                _ => return Err("missing field `label` (0/1) or `answer` (true/false)".into()),
            };
            (
                Query::Shared {
                    context: format!(
                        "{}\nQuestion: {}?\nAnswer:",
                        string(row, "passage")?,
                        string(row, "question")?
                    ),
                    choices: vec!["no".into(), "yes".into()],
                },
                gold,
            )
        }
        TaskFormat::Generic => {
            let choices = strings(row, "choices")?;
            let gold = match row.get("answer") {
                Some(Value::String(s)) => choices
                    .iter()
                    .position(|c| c == s)
                    .ok_or_else(|| format!("answer `{s}` is not one of the choices"))?,
                _ => index_field(row, "answer")?,
            };
            (
                Query::Shared {
                    context: string(row, "context")?.to_string(),
                    choices,
                },
                gold,
            )
        }
    };
    let doc = Doc {
        index,
        query,
        gold,
        description,
    };
    if doc.gold >= doc.num_choices() {
        return Err(format!(
            "the answer is choice {} of {}",
            doc.gold,
            doc.num_choices()
        ));
    }
    Ok(doc)
}

fn string<'a>(row: &'a Value, field: &str) -> Result<&'a str, String> {
    match row.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{field}` is {other}, not a string")),
        None => Err(format!("missing field `{field}`")),
    }
}

fn strings(row: &Value, field: &str) -> Result<Vec<String>, String> {
    match row.get(field) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| format!("field `{field}` holds {v}, not a string"))
            })
            .collect(),
        Some(other) => Err(format!("field `{field}` is {other}, not a list of strings")),
        None => Err(format!("missing field `{field}`")),
    }
}

/// A 0-based index given as a number or a numeric string.
fn index_field(row: &Value, field: &str) -> Result<usize, String> {
    match row.get(field) {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
        Some(Value::String(s)) => s.trim().parse().ok(),
        None => return Err(format!("missing field `{field}`")),
        _ => None,
    }
    .ok_or_else(|| format!("field `{field}` is not a choice index"))
}

/// Python's `str.capitalize`: the first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// HellaSwag's cleanup of WikiHow artefacts: strip, ` [title]` → `. `, drop `[…]` tags, and
/// collapse double spaces (one pass, as `str.replace` does).
fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        // `\[.*?\]`: the shortest bracketed run on one line.
        match rest[open..].find([']', '\n']) {
            Some(close) if rest.as_bytes()[open + close] == b']' => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_capitalize() {
        assert_eq!(capitalize("then the MAN jumps"), "Then the man jumps");
        assert_eq!(capitalize(""), "");
    }

    #[test]
    fn hellaswag_cleanup() {
        assert_eq!(
            hellaswag_preprocess(" How to cook [title] Boil water. [step] Add salt. "),
            "How to cook. Boil water. Add salt."
        );
        assert_eq!(hellaswag_preprocess("a [b c"), "a [b c");
    }

    #[test]
    fn bad_rows_name_their_line_and_fields() {
        let text = "{\"question\": \"q\", \"choices\": {\"text\": [\"a\", \"b\"], \"label\": [\"A\", \"B\"]}, \"answerKey\": \"A\"}\n{\"question\": \"q\"}\n";
        let err = parse_docs(text, "arc.jsonl", TaskFormat::Arc, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("arc.jsonl:2: record 1: missing field `choices`"),
            "{err}"
        );
        let err = parse_docs("[1]", "x.jsonl", TaskFormat::Piqa, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.jsonl:1: record 0: not a JSON object"),
            "{err}"
        );
        let err = parse_docs(
            "{\"context\": \"c\", \"choices\": [\"a\", \"b\"], \"answer\": 5}",
            "g",
            TaskFormat::Generic,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the answer is choice 5 of 2"), "{err}");
    }

    #[test]
    fn sampled_shots_never_include_the_item_and_are_seeded() {
        let docs: Vec<Doc> = (0..6)
            .map(|i| Doc {
                index: i,
                query: Query::Shared {
                    context: format!("q{i}"),
                    choices: vec!["x".into(), "y".into()],
                },
                gold: 0,
                description: String::new(),
            })
            .collect();
        let shots = FewShot::Sampled { k: 3, seed: 1234 };
        for (i, d) in docs.iter().enumerate() {
            let p = prefix(d, &docs, i, &shots);
            assert_eq!(p.matches("\n\n").count(), 3, "{p}");
            assert!(!p.contains(&format!("q{i} ")), "{p}");
            assert_eq!(p, prefix(d, &docs, i, &shots));
        }
    }
}
