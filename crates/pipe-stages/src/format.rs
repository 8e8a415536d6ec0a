//! `kind: format` — instruction records → prompt/response pairs (the Alpaca templates, or your
//! own), split into train and validation sets.
//!
//! ```yaml
//! prompts:
//!   kind: format
//!   input: data                 # a stage (its only .json/.jsonl, or `file:`), or a path
//!   template: alpaca            # or {prompt: "Q: {question}\nA:", response: " {answer}"}
//!   fields: {question: q}       # placeholder → record key, when they differ
//!   val_size: 0.02              # a fraction, or a count; 1.0 holds every record out
//!                               # (an evaluation-only split, for `evaluate`)
//!   seed: 42
//!   on_error: fail              # or skip: count and report records missing a field
//! ```

use std::collections::BTreeMap;

use pipe_core::diag::FieldError;
use pipe_core::{
    Input, InputSource, KeyFields, ParseContext, Stage, StageContext, StageInfo, StageKind,
};
use pipe_data::format::{OnError, ValSize};
use pipe_data::prompt::{Template, TemplateSpec};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sources::LocalSources;

pub struct FormatKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
enum TemplateField {
    Named(String),
    Custom(TemplateSpec),
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    input: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default = "alpaca")]
    template: TemplateField,
    #[serde(default)]
    fields: BTreeMap<String, String>,
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

/// What decides a format stage's result (see `pipe_core::key`): which file of its input it
/// reads, the template's text (`alpaca` enters as the Alpaca prompts themselves), the field
/// mapping, the split and what to do with bad records. The input is in by content.
#[derive(Serialize)]
struct FormatKey<'a> {
    file: Option<&'a str>,
    template: TemplateKey<'a>,
    fields: &'a BTreeMap<String, String>,
    val_size: ValSize,
    seed: u64,
    on_error: OnError,
}

#[derive(Serialize)]
struct TemplateKey<'a> {
    prompt: &'a str,
    response: &'a str,
    prompt_no_input: Option<&'a str>,
    input_field: &'a str,
}

impl FormatStage {
    fn key(&self) -> FormatKey<'_> {
        FormatKey {
            file: self.fields.file.as_deref(),
            template: TemplateKey {
                prompt: &self.spec.prompt,
                response: &self.spec.response,
                prompt_no_input: self.spec.prompt_no_input.as_deref(),
                input_field: &self.spec.input_field,
            },
            fields: &self.fields.fields,
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
    template: Template,
    inputs: Vec<Input>,
}

impl StageKind for FormatKind {
    fn name(&self) -> &'static str {
        "format"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "turn instruction records into prompt/response pairs (Alpaca templates or your own) and split them"
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
        let spec = match &fields.template {
            TemplateField::Named(n) if n == "alpaca" => TemplateSpec::alpaca(),
            TemplateField::Named(n) => {
                return Err(cx
                    .error("template", format!("unknown template `{n}`"))
                    .with_help("built in: alpaca; or write one: {prompt: \"…{field}…\", response: \"{output}\"}"))
            }
            TemplateField::Custom(s) => s.clone(),
        };
        let template = Template::new(&spec, fields.fields.clone())
            .map_err(|e| cx.error("template", e.to_string()))?;
        fields
            .val_size
            .check()
            .map_err(|e| cx.error("val_size", e.to_string()))?;
        let source = cx
            .as_stage_ref(&fields.input)
            .unwrap_or_else(|| InputSource::Path(cx.resolve_path(&fields.input)));
        if matches!(&source, InputSource::Stage { stage, .. } if stage == cx.stage_id) {
            return Err(cx.error("input", "a stage cannot read its own outputs"));
        }
        let inputs = vec![Input {
            name: "input".into(),
            source,
            field: cx.path.key("input"),
        }];
        Ok(Box::new(FormatStage {
            fields,
            sources: LocalSources::default(),
            spec,
            template,
            inputs,
        }))
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
        let input = cx.input("input")?.to_path_buf();
        let file = pipe_data::format::find_records_file(&input, self.fields.file.as_deref())?;
        let shown_as = self.sources.user_path(cx, "input", &file);
        let stats = pipe_data::format::run(
            &file,
            &shown_as,
            &self.template,
            self.fields.on_error,
            self.fields.val_size,
            self.fields.seed,
            &cx.out_dir,
        )?;
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
