//! Fuzzes the pipeline-file parser, `pipe_core::spec::parse`, with malformed input:
//!
//! - a valid multi-stage pipeline with random character-range deletions, insertions and
//!   replacements drawn from a YAML-ish alphabet (indicators, quotes, anchors, tags, `${`,
//!   tabs, CR, Unicode line separators, non-ASCII);
//! - random structured documents: unknown fields, wrong types at known fields, bad stage ids,
//!   unknown kinds, duplicate keys, `${params.x}` references to missing params, references to
//!   missing stages and outputs;
//! - random `--set` overrides, well-formed and not.
//!
//! What is promised: `parse` never panics, and every error is one a user can act on. A
//! pipeline-file error ([`LoadError::Spec`]) names the file and carries a `line:column` that
//! lies inside the text (counting lines the way YAML does) and is what the rendered
//! `--> file:line:column` shows (for a second YAML document, which serde_yaml reports without
//! a position, its `---` / `...` / `%` line). A bad `--set` ([`LoadError::Override`]) quotes the override it is
//! about.
//!
//! Each property runs 1024 cases; `PROPTEST_CASES=50000 cargo test -p pipe-core --test
//! fuzz_spec` soaks longer.
//!
//! The registry here has two small stand-in kinds (pipe-core cannot depend on pipe-stages):
//! `work`, shaped like `command` (a string field, stage references or paths in `deps`,
//! promised `outs`), and `source`, with typed scalar fields and a nested mapping.

use std::collections::BTreeMap;
use std::path::Path;

use pipe_core::diag::{FieldError, Target};
use pipe_core::spec::{parse, LoadError};
use pipe_core::{
    Input, InputSource, KeyFields, ParseContext, Registry, SpecError, Stage, StageContext,
    StageKind,
};
use proptest::prelude::*;
use serde::Deserialize;

use pipe_testkit::mutation::{self, edit, junk, mutate};

const FILE: &str = "t.yaml";

// ---------------------------------------------------------------------------------------------
// A test registry.

struct WorkKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkFields {
    cmd: String,
    #[serde(default)]
    deps: Vec<String>,
    #[serde(default)]
    outs: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    resumable: bool,
}

struct WorkStage {
    inputs: Vec<Input>,
    outs: Vec<String>,
}

impl StageKind for WorkKind {
    fn name(&self) -> &'static str {
        "work"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "a stand-in for `command`"
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let f: WorkFields = cx.fields(fields)?;
        if f.cmd.trim().is_empty() {
            return Err(cx.error("cmd", "`cmd` is empty"));
        }
        let _ = (&f.env, f.resumable);
        let mut inputs = Vec::new();
        for (i, dep) in f.deps.iter().enumerate() {
            let field = cx.path.key("deps").index(i);
            let source = match cx.as_stage_ref(dep) {
                Some(InputSource::Stage { stage, .. }) if stage == cx.stage_id => {
                    return Err(FieldError::new(
                        field,
                        Target::Value,
                        format!("stage `{stage}` cannot read its own outputs"),
                    ))
                }
                Some(r) => r,
                None => InputSource::Path(cx.resolve_path(dep)),
            };
            inputs.push(Input {
                name: dep.clone(),
                source,
                field,
            });
        }
        Ok(Box::new(WorkStage {
            inputs,
            outs: f.outs,
        }))
    }
}

impl Stage for WorkStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&serde_json::json!({ "outs": self.outs }))
    }
    fn outputs(&self) -> Option<Vec<String>> {
        (!self.outs.is_empty()).then(|| self.outs.clone())
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

struct SourceKind;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFields {
    url: String,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    retries: u32,
    #[serde(default)]
    rate: f64,
    #[serde(default)]
    limits: Option<Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    rows: u64,
    #[serde(default)]
    shards: Vec<u16>,
}

struct SourceStage(serde_json::Value);

impl StageKind for SourceKind {
    fn name(&self) -> &'static str {
        "source"
    }
    fn version(&self) -> u32 {
        2
    }
    fn summary(&self) -> &'static str {
        "a stand-in for `download`"
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let f: SourceFields = cx.fields(fields)?;
        if !f.url.contains("://") {
            return Err(cx.error("url", format!("`{}` is not a URL", f.url)));
        }
        let limits = f.limits.map(|l| (l.rows, l.shards));
        Ok(Box::new(SourceStage(serde_json::json!({
            "url": f.url, "revision": f.revision, "retries": f.retries,
            "rate": f.rate, "limits": limits,
        }))))
    }
}

impl Stage for SourceStage {
    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.0)
    }
    fn run(&self, _: &mut StageContext) -> anyhow::Result<()> {
        Ok(())
    }
}

fn registry() -> Registry {
    Registry::new().with(WorkKind).with(SourceKind)
}

// ---------------------------------------------------------------------------------------------
// The property.

/// The text's lines as YAML counts them: `\r\n`, `\r`, `\n`, NEL, LS and PS each end one.
fn yaml_lines(text: &str) -> Vec<String> {
    let mut lines = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                lines.push(String::new());
            }
            '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => lines.push(String::new()),
            _ => lines.last_mut().expect("one line").push(c),
        }
    }
    lines
}

fn check_spec_error(e: &SpecError, text: &str) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    prop_assert_eq!(e.file.as_path(), Path::new(FILE));
    prop_assert!(!e.message.trim().is_empty(), "empty message:\n{}", shown);
    match (e.line, e.column) {
        (Some(line), Some(column)) => {
            let lines = yaml_lines(text);
            // The YAML scanner ends a last line that has no newline itself, so the end of the
            // input can be reported at column 1 of the line after it.
            let at_end = line == lines.len() + 1 && column == 1;
            prop_assert!(
                (1..=lines.len()).contains(&line) || at_end,
                "line {} outside the text's {} lines:\n{}\n--- text:\n{:?}",
                line,
                lines.len(),
                shown,
                text
            );
            let width = lines.get(line - 1).map_or(0, |l| l.chars().count());
            prop_assert!(
                (1..=width + 1).contains(&column),
                "column {} outside line {} ({} chars):\n{}\n--- text:\n{:?}",
                column,
                line,
                width,
                shown,
                text
            );
            let at = format!("--> {FILE}:{line}:{column}");
            prop_assert!(shown.contains(&at), "expected {:?} in:\n{}", at, shown);
        }
        (None, None) => prop_assert!(
            false,
            "an error without a location:\n{}\n--- text:\n{:?}",
            shown,
            text
        ),
        (l, c) => prop_assert!(false, "half a location: {:?}:{:?}\n{}", l, c, shown),
    }
    Ok(())
}

/// Runs the parser and checks whatever error it returns.
fn check(text: &str, overrides: &[String]) -> Result<(), TestCaseError> {
    match parse(Path::new(FILE), text, overrides, &registry()) {
        Ok(_) => Ok(()),
        Err(LoadError::Spec(e)) => check_spec_error(&e, text),
        Err(LoadError::Override { text: set, message }) => {
            prop_assert!(
                overrides.contains(&set),
                "`--set {}` is not one of {:?}",
                set,
                overrides
            );
            prop_assert!(!message.trim().is_empty());
            Ok(())
        }
        Err(e @ LoadError::Read { .. }) => {
            prop_assert!(false, "parse does not read files, yet: {}", e);
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs.

const VALID: &str = "\
name: fuzz
description: a pipeline to break
params:
  lr: 0.001
  word: hi
  shards: [1, 2]
stages:
  fetch:
    kind: source
    url: https://example.org/data.json
    retries: 3
    limits:
      rows: 1000
      shards: ${params.shards}
  prep:
    kind: work
    cmd: echo ${params.word} $${literal} > out/data
    deps: [fetch, Cargo.toml]
    outs: [data, extra]
    env:
      LR: lr=${params.lr}
  train:
    kind: work
    cmd: |
      train --lr ${params.lr}
      done
    deps:
      - prep.data
      - fetch
    resumable: true
";

/// Characters that matter to YAML (and to `${params.…}`), plus some that stress positions.
const ALPHABET: &[&str] = &[
    ":",
    ": ",
    "-",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ",",
    "\"",
    "'",
    "\n",
    "\n  ",
    " ",
    "  ",
    "\t",
    "&a",
    "*a",
    "!",
    "!!str ",
    "!!binary ",
    "$",
    "${",
    "${params.",
    "}",
    "%",
    "#",
    "|",
    ">",
    "?",
    "@",
    "`",
    "\\",
    "\r",
    "\r\n",
    "\u{feff}",
    "\u{85}",
    "\u{2028}",
    "é",
    "日本",
    "🦀",
    "\u{0}",
    "x",
    "kind",
    "stages",
    "params",
    "name",
    "work",
    "source",
    "prep",
    "prep.data",
    "0",
    "-1",
    "1e9",
    "true",
    "null",
    "~",
    "<<",
    "---",
    "...",
];

/// A YAML scalar or collection, written inline; some of it is wrong on purpose.
fn value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        Just("echo hi".to_string()),
        Just("https://example.org/x".to_string()),
        Just("\"quoted: text\"".to_string()),
        Just("'it''s'".to_string()),
        Just("42".to_string()),
        Just("-7".to_string()),
        Just("3.5".to_string()),
        Just("true".to_string()),
        Just("null".to_string()),
        Just("~".to_string()),
        Just("\"\"".to_string()),
        Just("${params.lr}".to_string()),
        Just("${params.missing}".to_string()),
        Just("x ${params.shards} y".to_string()),
        Just("x ${params.word".to_string()),
        Just("$${params.lr}".to_string()),
        Just("a.x".to_string()),
        Just("a.zz".to_string()),
        Just("b".to_string()),
        Just("nowhere.txt".to_string()),
        Just("Cargo.toml".to_string()),
        Just("!!binary aGk=".to_string()),
        Just("!custom tagged".to_string()),
        Just("*nope".to_string()),
        junk(ALPHABET),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((key(), inner), 0..3).prop_map(|kv| {
                let items: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                format!("{{{}}}", items.join(", "))
            }),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(&[
            "kind", "cmd", "deps", "outs", "env", "resumable", "url", "revision", "retries",
            "rate", "limits", "rows", "shards",
        ][..])
        .prop_map(str::to_string),
        1 => prop::sample::select(&["cmdd", "dpes", "LR", "0", "true", "? x", "\"q k\""][..])
            .prop_map(str::to_string),
    ]
}

fn stage_id() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(&["a", "b", "c"][..]).prop_map(str::to_string),
        1 => prop::sample::select(&["a.b", "", "é", "1", "x y", "-", "[a]", "~"][..])
            .prop_map(str::to_string),
    ]
}

fn kind_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("work".to_string()),
        4 => Just("source".to_string()),
        1 => Just("comand".to_string()),
        1 => Just("[work]".to_string()),
        1 => Just("7".to_string()),
        1 => Just("${params.kind}".to_string()),
    ]
}

/// A stage: optionally a kind, then fields in block or flow style.
fn stage() -> impl Strategy<Value = String> {
    (
        stage_id(),
        prop::option::weighted(0.9, kind_value()),
        prop::collection::vec((key(), value()), 0..5),
        prop::sample::select(&["block", "flow", "scalar"][..]),
    )
        .prop_map(|(id, kind, fields, style)| {
            let mut items: Vec<(String, String)> = Vec::new();
            if let Some(k) = kind {
                items.push(("kind".into(), k));
            }
            items.extend(fields);
            match style {
                "block" => {
                    let mut s = format!("  {id}:\n");
                    for (k, v) in items {
                        s.push_str(&format!("    {k}: {v}\n"));
                    }
                    s
                }
                "flow" => {
                    let inner: Vec<String> =
                        items.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("  {id}: {{{}}}\n", inner.join(", "))
                }
                _ => format!("  {id}: {}\n", items.first().map_or("", |i| &i.1)),
            }
        })
}

/// A whole document from random top-level entries, in random order, some repeated.
fn document() -> impl Strategy<Value = String> {
    let params = prop::collection::vec(
        (
            prop::sample::select(&["lr", "word", "shards", "kind", "lr"][..]),
            value(),
        ),
        0..4,
    )
    .prop_map(|ps| {
        let mut s = "params:\n".to_string();
        for (k, v) in ps {
            s.push_str(&format!("  {k}: {v}\n"));
        }
        s
    });
    let name = prop_oneof![
        12 => Just("name: t\n".to_string()),
        1 => Just("name: \"\"\n".to_string()),
        1 => Just("name: [t]\n".to_string()),
        1 => Just("name: ${params.word}\n".to_string()),
    ];
    let stages =
        prop::collection::vec(stage(), 0..4).prop_map(|s| format!("stages:\n{}", s.concat()));
    let extra = prop_oneof![
        1 => Just("description: d\n".to_string()),
        1 => Just("name: again\n".to_string()),
        1 => (key(), value()).prop_map(|(k, v)| format!("{k}: {v}\n")),
        1 => junk(ALPHABET),
    ];
    (
        prop::option::weighted(0.95, name),
        prop::option::weighted(0.6, params),
        prop::option::weighted(0.95, stages),
        prop::option::weighted(0.2, extra),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(name, params, stages, extra, at)| {
            let mut entries: Vec<String> = [name, params, stages].into_iter().flatten().collect();
            if let Some(x) = extra {
                entries.insert(at.index(entries.len() + 1), x);
            }
            entries.concat()
        })
}

/// `--set` overrides: mostly `path=value` built from real ids and fields, some noise.
fn set() -> impl Strategy<Value = String> {
    let head = prop::sample::select(&["params", "fetch", "prep", "train", "nope", ""][..]);
    let seg = prop::sample::select(
        &[
            "params", "lr", "word", "shards", "fetch", "prep", "train", "kind", "cmd", "deps",
            "outs", "env", "limits", "rows", "0", "1", "9", "nope", "",
        ][..],
    );
    let path = (head, prop::collection::vec(seg, 0..4)).prop_map(|(h, s)| {
        let mut segs = vec![h];
        segs.extend(s);
        segs.join(".")
    });
    let val = prop_oneof![
        Just(String::new()),
        Just("1".to_string()),
        Just("x".to_string()),
        Just("[1, 2]".to_string()),
        Just("{a: 1}".to_string()),
        Just("work".to_string()),
        Just("prep.data".to_string()),
        Just("${params.lr}".to_string()),
        Just("a: b".to_string()),
        Just("=".to_string()),
        junk(ALPHABET),
    ];
    prop_oneof![
        6 => (path, val).prop_map(|(p, v)| format!("{p}={v}")),
        1 => junk(ALPHABET),
    ]
}

proptest! {
    #![proptest_config(mutation::config())]

    #[test]
    fn mutated_pipelines_fail_with_located_errors(
        edits in prop::collection::vec(edit(ALPHABET), 1..6),
    ) {
        check(&mutate(VALID, &edits), &[])?;
    }

    #[test]
    fn random_documents_fail_with_located_errors(doc in document()) {
        check(&doc, &[])?;
    }

    #[test]
    fn random_overrides_are_rejected_or_located(
        sets in prop::collection::vec(set(), 1..4),
        edit in prop::option::weighted(0.2, edit(ALPHABET)),
    ) {
        check(&mutate(VALID, edit.as_slice()), &sets)?;
    }
}

/// Found by this fuzzer: `--set params.params=…` indexed past the end of its path.
#[test]
fn a_param_named_params_is_an_override_error_not_a_panic() {
    for set in ["params.params=1", "params.params.x=1", "params.params"] {
        let e = parse(Path::new(FILE), VALID, &[set.to_string()], &registry())
            .expect_err("no param `params`");
        assert!(
            matches!(&e, LoadError::Override { text, .. } if text == set),
            "{set}: {e}"
        );
    }
}

#[test]
fn the_unmutated_pipeline_parses() {
    let p = parse(Path::new(FILE), VALID, &[], &registry()).expect("valid");
    let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["fetch", "prep", "train"]);
    let p = parse(
        Path::new(FILE),
        VALID,
        &["params.word=bye".into(), "train.resumable=false".into()],
        &registry(),
    )
    .expect("valid overrides");
    assert_eq!(p.stages.len(), 3);
}
