//! `kind: format` — records (JSON, JSON Lines or Parquet; a file, or a split of a Hub dataset
//! directory) → prompt/response pairs (the Alpaca templates, or your own) or conversations
//! (`messages` or ShareGPT), from one input or a seeded mixture of several, split into train
//! and validation sets.
//!
//! ```yaml
//! prompts:
//!   kind: format
//!   input: data                 # a stage or a path: a file, or a directory — its only data
//!                               # file, `file:`, or the files of `split:` (default: train),
//!                               # e.g. data/train-00000-of-00002.parquet …
//!   split: train
//!   template: alpaca            # or {prompt: "Q: {question}\nA:", response: " {answer}"},
//!                               # or messages / sharegpt: conversations, for a chat template
//!   fields: {question: q}       # placeholder → record key, when they differ; for
//!                               # conversations: {messages: dialog, role: from, content: text}
//!   roles: {bot: assistant}     # conversations: role names → system / user / assistant
//!   val_size: 0.02              # a fraction, or a count; 1.0 holds every record out
//!                               # (an evaluation-only split, for `evaluate`)
//!   seed: 42
//!   on_error: fail              # or skip: count and report bad records
//! mix:
//!   kind: format
//!   sources:                    # instead of `input`: a mixture, drawn with `seed`
//!     - {input: chat_a, weight: 0.7}          # weights on every source, or …
//!     - {input: chat_b, weight: 0.3, split: test}
//!   # … counts: {input: a, count: 500} (fewer: a sample; more: repeats); `size:` sets a
//!   # weighted mixture's size (default: as large as it can be without repeating a source)
//!   template: messages
//! ```

use std::collections::BTreeMap;

use pipe_core::diag::{FieldError, Target};
use pipe_core::{
    Input, InputSource, KeyFields, ParseContext, Stage, StageContext, StageInfo, StageKind,
};
use pipe_data::chat::{ChatLayout, ChatReader};
use pipe_data::format::{DataFile, FormatOptions, Formatter, OnError, Source, ValSize};
use pipe_data::mixture::Take;
use pipe_data::prompt::{Template, TemplateSpec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sources::LocalSources;

pub struct FormatKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
enum TemplateField {
    /// `alpaca` (prompt/response pairs), or `messages` / `sharegpt` (conversations).
    Named(String),
    Custom(TemplateSpec),
}

/// One source of a mixture.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SourceField {
    /// A stage or a path, as `input`.
    input: String,
    /// Its name in the outputs and stats (default: `sources[N]`, its place in the list — not
    /// its input, so that renaming a stage or moving a file keeps the key).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    split: Option<String>,
    /// Its share of the mixture (every source then has one).
    #[serde(default)]
    weight: Option<f64>,
    /// How many of its examples to draw (more than it has repeats it).
    #[serde(default)]
    count: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    /// A stage or a path: a file, or a directory (its only data file, `file`, or `split`).
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    file: Option<String>,
    /// Which split of a dataset directory (`data/train-*.parquet`, `test.jsonl`, …).
    #[serde(default)]
    split: Option<String>,
    /// Several inputs mixed by weight or count (instead of `input`).
    #[serde(default)]
    sources: Vec<SourceField>,
    /// A weighted mixture's size.
    #[serde(default)]
    size: Option<u64>,
    #[serde(default = "alpaca")]
    template: TemplateField,
    #[serde(default)]
    fields: BTreeMap<String, String>,
    /// Conversations: role names → system / user / assistant.
    #[serde(default)]
    roles: BTreeMap<String, String>,
    #[serde(default = "no_val")]
    val_size: ValSize,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    on_error: OnError,
}

fn alpaca() -> TemplateField {
    TemplateField::Named("alpaca".into())
}
fn no_val() -> ValSize {
    ValSize::Count(0)
}
fn default_seed() -> u64 {
    42
}

/// What decides a format stage's result (see `pipe_core::key`): which file or split of its
/// input it reads, the template's text (`alpaca` enters as the Alpaca prompts themselves) or
/// the conversation layout, the field and role mappings, the mixture (each source's name —
/// it is written into the outputs —, file, split, weight or count, and the size), the split
/// and what to do with bad records. The inputs are in by content. Fields a stage does not use
/// are left out, so that stages written before them keep their keys.
#[derive(Serialize)]
struct FormatKey<'a> {
    file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<&'a str>,
    template: TemplateKey<'a>,
    fields: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    roles: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sources: Vec<SourceKey<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    val_size: ValSize,
    seed: u64,
    on_error: OnError,
}

#[derive(Serialize)]
#[serde(untagged)]
enum TemplateKey<'a> {
    Pairs {
        prompt: &'a str,
        response: &'a str,
        prompt_no_input: Option<&'a str>,
        input_field: &'a str,
    },
    Chat(ChatLayout),
}

#[derive(Serialize)]
struct SourceKey<'a> {
    name: &'a str,
    file: Option<&'a str>,
    split: Option<&'a str>,
    weight: Option<f64>,
    count: Option<u64>,
}

impl FormatStage {
    fn key(&self) -> FormatKey<'_> {
        FormatKey {
            file: self.fields.file.as_deref(),
            split: self.fields.split.as_deref(),
            template: match (&self.spec, self.layout) {
                (_, Some(layout)) => TemplateKey::Chat(layout),
                (spec, None) => TemplateKey::Pairs {
                    prompt: &spec.prompt,
                    response: &spec.response,
                    prompt_no_input: spec.prompt_no_input.as_deref(),
                    input_field: &spec.input_field,
                },
            },
            fields: &self.fields.fields,
            roles: &self.fields.roles,
            sources: self
                .fields
                .sources
                .iter()
                .zip(&self.source_names)
                .map(|(s, name)| SourceKey {
                    name,
                    file: s.file.as_deref(),
                    split: s.split.as_deref(),
                    weight: s.weight,
                    count: s.count,
                })
                .collect(),
            size: self.fields.size,
            val_size: self.fields.val_size,
            seed: self.fields.seed,
            on_error: self.fields.on_error,
        }
    }
}

struct FormatStage {
    fields: Fields,
    /// The user's file, when the input is the store's copy of it.
    sources: LocalSources,
    spec: TemplateSpec,
    /// Conversations in this layout, instead of pairs through `spec`.
    layout: Option<ChatLayout>,
    formatter: Formatter,
    /// Each mixture source's name.
    source_names: Vec<String>,
    inputs: Vec<Input>,
}

/// The input name of mixture source `i`.
fn source_input(i: usize) -> String {
    format!("sources/{i}")
}

impl StageKind for FormatKind {
    fn name(&self) -> &'static str {
        "format"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "turn records (JSON, JSONL, Parquet; mixtures) into prompt/response pairs (Alpaca templates or your own) or conversations, and split them"
    }
    fn fields_schema(&self) -> serde_json::Value {
        crate::schema_of::<Fields>()
    }
    fn parse(
        &self,
        cx: &ParseContext<'_>,
        fields: serde_yaml::Value,
    ) -> Result<Box<dyn Stage>, FieldError> {
        let fields: Fields = cx.fields(fields)?;
        let (spec, layout) = match &fields.template {
            TemplateField::Named(n) if n == "alpaca" => (TemplateSpec::alpaca(), None),
            TemplateField::Named(n) if n == "messages" => {
                (TemplateSpec::alpaca(), Some(ChatLayout::Messages))
            }
            TemplateField::Named(n) if n == "sharegpt" => {
                (TemplateSpec::alpaca(), Some(ChatLayout::Sharegpt))
            }
            TemplateField::Named(n) => {
                return Err(cx
                    .error("template", format!("unknown template `{n}`"))
                    .with_help("built in: alpaca (prompt/response pairs), messages or sharegpt (conversations, for the model's chat template); or write one: {prompt: \"…{field}…\", response: \"{output}\"}"))
            }
            TemplateField::Custom(s) => (s.clone(), None),
        };
        let formatter = match layout {
            Some(layout) => Formatter::Chat(
                ChatReader::new(layout, &fields.fields, &fields.roles).map_err(|e| {
                    let field = match e {
                        pipe_data::chat::ChatSpecError::UnknownField(_) => "fields",
                        pipe_data::chat::ChatSpecError::UnknownRole { .. } => "roles",
                    };
                    cx.error(field, e.to_string())
                })?,
            ),
            None => {
                if !fields.roles.is_empty() {
                    return Err(cx
                        .error("roles", "`roles` applies to conversations")
                        .with_help("set `template: messages` or `template: sharegpt`"));
                }
                Formatter::Pairs(
                    Template::new(&spec, fields.fields.clone())
                        .map_err(|e| cx.error("template", e.to_string()))?,
                )
            }
        };
        fields
            .val_size
            .check()
            .map_err(|e| cx.error("val_size", e.to_string()))?;
        let source_of = |text: &str, field: &str| {
            let source = cx
                .as_stage_ref(text)
                .unwrap_or_else(|| InputSource::Path(cx.resolve_path(text)));
            if matches!(&source, InputSource::Stage { stage, .. } if stage == cx.stage_id) {
                return Err(cx.error(field, "a stage cannot read its own outputs"));
            }
            Ok(source)
        };
        let mut inputs = Vec::new();
        let mut source_names = Vec::new();
        match (&fields.input, fields.sources.is_empty()) {
            (Some(input), true) => inputs.push(Input {
                name: "input".into(),
                source: source_of(input, "input")?,
                field: cx.path.key("input"),
            }),
            (None, true) => {
                return Err(cx
                    .error("input", "missing field `input`")
                    .with_help("name a stage or a path, or mix several with `sources: [{input: a, weight: 0.7}, …]`"))
            }
            (Some(_), false) => {
                return Err(cx
                    .error("sources", "`input` and `sources` both given")
                    .with_help("one input: `input:`; a mixture: every input under `sources:`"))
            }
            (None, false) => {
                for (field, what) in [
                    ("file", fields.file.is_some()),
                    ("split", fields.split.is_some()),
                ] {
                    if what {
                        return Err(cx
                            .error(field, format!("`{field}` with `sources`"))
                            .with_help(format!("set `{field}:` on each source")));
                    }
                }
                let weighted = fields.sources.iter().filter(|s| s.weight.is_some()).count();
                for (i, s) in fields.sources.iter().enumerate() {
                    let at = cx.path.key("sources").index(i);
                    let err = |k: &str, m: String| FieldError::new(at.key(k), Target::Value, m);
                    if s.weight.is_some() && s.count.is_some() {
                        return Err(err("count", "a source has a `weight` or a `count`, not both".into()));
                    }
                    if let Some(w) = s.weight {
                        if !(w.is_finite() && w > 0.0) {
                            return Err(err("weight", format!("weight {w} is not a positive number")));
                        }
                    }
                    if weighted > 0 && s.weight.is_none() {
                        return Err(err("input", "this source has no `weight` and others have one".into())
                            .with_help("give every source a `weight`, or use `count`s"));
                    }
                    let name = s.name.clone().unwrap_or_else(|| format!("sources[{i}]"));
                    if source_names.contains(&name) {
                        return Err(err("name", format!("two sources are named `{name}`"))
                            .with_help("give one a `name:`"));
                    }
                    source_names.push(name);
                    inputs.push(Input {
                        name: source_input(i),
                        source: source_of(&s.input, "sources")?,
                        field: at.key("input"),
                    });
                }
                if fields.size.is_some() && weighted == 0 {
                    return Err(cx
                        .error("size", "`size` is the size of a weighted mixture")
                        .with_help("give the sources `weight`s, or drop `size`"));
                }
            }
        }
        Ok(Box::new(FormatStage {
            fields,
            sources: LocalSources::default(),
            spec,
            layout,
            formatter,
            source_names,
            inputs,
        }))
    }
}

impl FormatStage {
    /// The files of input `name` (its `file` or `split`), named as the user's own files.
    fn data_files(
        &self,
        cx: &StageContext,
        name: &str,
        file: Option<&str>,
        split: Option<&str>,
    ) -> anyhow::Result<Vec<DataFile>> {
        let input = cx.input(name)?.to_path_buf();
        Ok(pipe_data::format::find_data_files(&input, file, split)?
            .into_iter()
            .map(|path| DataFile {
                shown_as: self.sources.user_path(cx, name, &path),
                name: match path.strip_prefix(&input) {
                    Ok(rel) if !rel.as_os_str().is_empty() => rel.display().to_string(),
                    _ => path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                },
                path,
            })
            .collect())
    }
}

impl Stage for FormatStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.key())
    }
    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec![
            "train.jsonl".into(),
            "val.jsonl".into(),
            "stats.json".into(),
        ])
    }
    fn check_upstream<'a>(
        &self,
        stage: &dyn Fn(&str) -> Option<StageInfo<'a>>,
    ) -> Result<(), FieldError> {
        self.sources.learn(&self.inputs, stage);
        Ok(())
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let sources = if self.fields.sources.is_empty() {
            vec![Source {
                name: "input".into(),
                files: self.data_files(
                    cx,
                    "input",
                    self.fields.file.as_deref(),
                    self.fields.split.as_deref(),
                )?,
                take: Take::All,
            }]
        } else {
            let mut out = Vec::new();
            for (i, (s, name)) in self
                .fields
                .sources
                .iter()
                .zip(&self.source_names)
                .enumerate()
            {
                out.push(Source {
                    name: name.clone(),
                    files: self.data_files(
                        cx,
                        &source_input(i),
                        s.file.as_deref(),
                        s.split.as_deref(),
                    )?,
                    take: match (s.weight, s.count) {
                        (Some(w), _) => Take::Weight(w),
                        (None, Some(c)) => Take::Count(c),
                        (None, None) => Take::All,
                    },
                });
            }
            out
        };
        let opts = FormatOptions {
            on_error: self.fields.on_error,
            val_size: self.fields.val_size,
            seed: self.fields.seed,
            size: self.fields.size,
        };
        let stats = pipe_data::format::run(&sources, &self.formatter, &opts, &cx.out_dir)?;
        for s in &stats.sources {
            cx.log(&format!(
                "source {}: {} of its {} examples ({} repeated)",
                s.name, s.taken, s.examples, s.repeated
            ));
        }
        if let Some(c) = &stats.conversations {
            cx.log(&format!(
                "conversations: {} turns, {} by the assistant; {} with a system turn, {} without an assistant turn, {} empty turns",
                c.turns, c.assistant_turns, c.with_system, c.without_assistant, c.empty_turns
            ));
            if c.without_assistant > 0 {
                tracing::warn!(
                    "{}: {} conversations have no assistant turn: with the default mask they teach nothing",
                    cx.stage_id,
                    c.without_assistant
                );
            }
        }
        cx.log(&format!(
            "{} records: {} train, {} validation, {} with the input template, {} skipped, {} empty responses",
            stats.records, stats.train, stats.val, stats.with_input_template, stats.skipped, stats.empty_responses
        ));
        if stats.train == 0 {
            cx.log("every record is held out: an evaluation-only split (train.jsonl is empty)");
        }
        for s in &stats.skipped_examples {
            cx.log(&format!("skipped {s}"));
        }
        if stats.skipped > 0 {
            tracing::warn!(
                "{}: skipped {} records missing a field (see stats.json)",
                cx.stage_id,
                stats.skipped
            );
        }
        if stats.empty_responses > 0 {
            tracing::warn!(
                "{}: {} records have an empty response",
                cx.stage_id,
                stats.empty_responses
            );
        }
        cx.set_metrics(serde_json::to_value(&stats)?);
        Ok(())
    }
}
