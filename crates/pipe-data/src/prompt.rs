//! Prompt templates: the two Stanford Alpaca templates, verbatim, and user templates with
//! Python-style `{field}` placeholders (`{{` and `}}` for literal braces).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::records::Record;

/// Stanford Alpaca's `PROMPT_DICT["prompt_input"]` (tatsu-lab/stanford_alpaca, train.py).
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

/// Stanford Alpaca's `PROMPT_DICT["prompt_no_input"]`.
pub const ALPACA_PROMPT_NO_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// A template as written in a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// The prompt, e.g. `"Question: {question}\nAnswer:"`.
    pub prompt: String,
    /// What the model learns to produce.
    #[serde(default = "default_response")]
    pub response: String,
    /// The prompt to use instead when `input_field` is missing or empty.
    #[serde(default)]
    pub prompt_no_input: Option<String>,
    #[serde(default = "default_input_field")]
    pub input_field: String,
}

fn default_response() -> String {
    "{output}".into()
}
fn default_input_field() -> String {
    "input".into()
}

impl TemplateSpec {
    /// Alpaca: `prompt_input` when `input` is non-empty, else `prompt_no_input`; the response is
    /// the `output` field.
    pub fn alpaca() -> Self {
        TemplateSpec {
            prompt: ALPACA_PROMPT_INPUT.into(),
            response: default_response(),
            prompt_no_input: Some(ALPACA_PROMPT_NO_INPUT.into()),
            input_field: default_input_field(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(String),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    pieces: Vec<Piece>,
}

impl Pattern {
    /// Parses `{field}` placeholders; `{{`/`}}` are literal braces.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let mut pieces = Vec::new();
        let mut buf = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    buf.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    buf.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(PatternError::Unclosed {
                                    template: text.to_string(),
                                })
                            }
                            Some(ch) => name.push(ch),
                        }
                    }
                    let name = name.trim().to_string();
                    if name.is_empty() {
                        return Err(PatternError::Empty {
                            template: text.to_string(),
                        });
                    }
                    if !buf.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut buf)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => {
                    return Err(PatternError::Stray {
                        template: text.to_string(),
                    })
                }
                _ => buf.push(c),
            }
        }
        if !buf.is_empty() {
            pieces.push(Piece::Text(buf));
        }
        Ok(Pattern { pieces })
    }

    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field(f) => Some(f.as_str()),
            Piece::Text(_) => None,
        })
    }

    /// Fills the placeholders from a record; `rename` maps a placeholder to the record's key.
    pub fn render(
        &self,
        rec: &Record,
        rename: &BTreeMap<String, String>,
    ) -> Result<String, MissingField> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => {
                    let key = rename.get(f).unwrap_or(f);
                    match rec.fields.get(key) {
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Number(n)) => out.push_str(&n.to_string()),
                        Some(Value::Bool(b)) => out.push_str(if *b { "True" } else { "False" }),
                        Some(Value::Null) | None => {
                            return Err(MissingField {
                                index: rec.index,
                                line: rec.line,
                                row: rec.row,
                                field: key.clone(),
                                reason: "missing",
                            })
                        }
                        Some(_) => {
                            return Err(MissingField {
                                index: rec.index,
                                line: rec.line,
                                row: rec.row,
                                field: key.clone(),
                                reason: "not text",
                            })
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Where a record is, after its index: ` (line 4)` in JSON Lines, ` (row 3)` in Parquet.
pub fn place(line: Option<usize>, row: Option<usize>) -> String {
    match (line, row) {
        (Some(l), _) => format!(" (line {l})"),
        (None, Some(r)) => format!(" (row {r})"),
        (None, None) => String::new(),
    }
}

/// Why a template string cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("unclosed `{{` in template `{template}` (write `{{{{` for a literal brace)")]
    Unclosed { template: String },
    #[error("empty `{{}}` in template `{template}`")]
    Empty { template: String },
    #[error("stray `}}` in template `{template}` (write `}}}}` for a literal brace)")]
    Stray { template: String },
}

/// A record that lacks a field its template needs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("record {index}{}: field `{field}` is {reason}", place(*line, *row))]
pub struct MissingField {
    pub index: usize,
    pub line: Option<usize>,
    /// The record's row in its Parquet file.
    pub row: Option<usize>,
    pub field: String,
    pub reason: &'static str,
}

/// A checked template, ready to format records.
#[derive(Debug, Clone)]
pub struct Template {
    prompt: Pattern,
    prompt_no_input: Option<Pattern>,
    response: Pattern,
    input_field: String,
    rename: BTreeMap<String, String>,
}

impl Template {
    pub fn new(
        spec: &TemplateSpec,
        rename: BTreeMap<String, String>,
    ) -> Result<Self, PatternError> {
        Ok(Template {
            prompt: Pattern::parse(&spec.prompt)?,
            prompt_no_input: spec
                .prompt_no_input
                .as_deref()
                .map(Pattern::parse)
                .transpose()?,
            response: Pattern::parse(&spec.response)?,
            input_field: spec.input_field.clone(),
            rename,
        })
    }

    fn has_input(&self, rec: &Record) -> bool {
        let key = self
            .rename
            .get(&self.input_field)
            .unwrap_or(&self.input_field);
        match rec.fields.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(_) => true,
        }
    }

    /// Whether `rec` gets the with-input prompt of a two-prompt template.
    pub fn uses_input_template(&self, rec: &Record) -> bool {
        self.prompt_no_input.is_some() && self.has_input(rec)
    }

    /// The prompt and response for a record (Alpaca: the input template iff `input` != "").
    pub fn format(&self, rec: &Record) -> Result<(String, String), MissingField> {
        let prompt = match (&self.prompt_no_input, self.has_input(rec)) {
            (Some(alt), false) => alt,
            _ => &self.prompt,
        };
        Ok((
            prompt.render(rec, &self.rename)?,
            self.response.render(rec, &self.rename)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(json: &str) -> Record {
        Record {
            index: 3,
            line: None,
            row: None,
            fields: serde_json::from_str(json).unwrap(),
        }
    }

    #[test]
    fn alpaca_picks_the_template_by_input() {
        let t = Template::new(&TemplateSpec::alpaca(), BTreeMap::new()).unwrap();
        let (p, r) = t
            .format(&rec(
                r#"{"instruction": "Add {x}.", "input": "", "output": "2"}"#,
            ))
            .unwrap();
        assert!(p.starts_with("Below is an instruction that describes a task. Write"));
        assert!(p.ends_with("### Instruction:\nAdd {x}.\n\n### Response:"));
        assert_eq!(r, "2");
        let (p, _) = t
            .format(&rec(
                r#"{"instruction": "Add.", "input": "1 1", "output": "2"}"#,
            ))
            .unwrap();
        assert!(p.ends_with("### Input:\n1 1\n\n### Response:"), "{p}");
        let e = t
            .format(&rec(r#"{"instruction": "Add.", "input": "1"}"#))
            .unwrap_err();
        assert_eq!(e.to_string(), "record 3: field `output` is missing");
    }

    #[test]
    fn custom_templates_with_renamed_fields_and_escapes() {
        let spec = TemplateSpec {
            prompt: "Q: {question} {{literal}}\nA:".into(),
            response: " {answer}".into(),
            prompt_no_input: None,
            input_field: "input".into(),
        };
        let t = Template::new(&spec, BTreeMap::from([("question".into(), "q".into())])).unwrap();
        let (p, r) = t.format(&rec(r#"{"q": "why?", "answer": 42}"#)).unwrap();
        assert_eq!((p.as_str(), r.as_str()), ("Q: why? {literal}\nA:", " 42"));
        assert_eq!(
            Pattern::parse("{open").unwrap_err().to_string(),
            "unclosed `{` in template `{open` (write `{{` for a literal brace)"
        );
        assert_eq!(
            Pattern::parse("close}").unwrap_err().to_string(),
            "stray `}` in template `close}` (write `}}` for a literal brace)"
        );
        assert_eq!(
            Pattern::parse("{}").unwrap_err().to_string(),
            "empty `{}` in template `{}`"
        );
    }
}
