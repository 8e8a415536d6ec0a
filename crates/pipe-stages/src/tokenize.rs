//! `kind: tokenize` — prompt/response pairs → token ids and loss labels, exactly as Stanford
//! Alpaca's preprocessing makes them; or conversations → the model's chat template rendered and
//! tokenized as transformers' `apply_chat_template(..., tokenize=True)` does, with a loss mask
//! on the assistant's turns (see `pipe_data::chat`) — in a memory-mapped dataset.
//!
//! ```yaml
//! tokens:
//!   kind: tokenize
//!   input: prompts            # a `format` stage
//!   tokenizer: model          # a stage or directory with tokenizer.json, or the file itself
//!   max_len: 512
//!   train_on_inputs: false    # true: the prompt counts in the loss too
//!   packing: false            # true: whole examples packed first-fit into max_len rows
//!   # eos_token / pad_token override tokenizer_config.json; a missing pad token is added
//!   # as `add_pad_token` ([PAD]) and the tokenizer in the output grows by it.
//!   # Conversations (a format stage with `template: messages` or `sharegpt`):
//!   train_on: assistant       # or last_assistant, or all
//!   chat_template: "{% for m in messages %}…"   # default: tokenizer_config.json's
//! ```

use pipe_core::diag::FieldError;
use pipe_core::{Input, InputSource, KeyFields, ParseContext, Stage, StageContext, StageKind};
use pipe_data::chat::TrainOn;
use pipe_data::tokenize::TokenizeOptions;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::sources::LocalSources;

pub struct TokenizeKind;

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Fields {
    input: String,
    tokenizer: String,
    #[serde(default = "default_max_len")]
    max_len: usize,
    #[serde(default)]
    train_on_inputs: bool,
    #[serde(default)]
    packing: bool,
    #[serde(default)]
    eos_token: Option<String>,
    #[serde(default)]
    pad_token: Option<String>,
    #[serde(default = "default_pad")]
    add_pad_token: String,
    /// Conversations: the chat template (Jinja, as in tokenizer_config.json), instead of the
    /// tokenizer's own.
    #[serde(default)]
    chat_template: Option<String>,
    /// Conversations: which tokens count in the loss (`assistant`, `last_assistant`, `all`).
    #[serde(default)]
    train_on: Option<TrainOn>,
}

fn default_max_len() -> usize {
    512
}
fn default_pad() -> String {
    "[PAD]".into()
}

/// What decides a tokenize stage's result (see `pipe_core::key`): every field but its two
/// inputs (the pairs and the tokenizer, which are in by content). The chat fields enter only
/// when set, so that stages written before them keep their keys.
#[derive(Serialize)]
struct TokenizeKey<'a> {
    max_len: usize,
    train_on_inputs: bool,
    packing: bool,
    eos_token: Option<&'a str>,
    pad_token: Option<&'a str>,
    add_pad_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat_template: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    train_on: Option<TrainOn>,
}

impl Fields {
    fn key(&self) -> TokenizeKey<'_> {
        TokenizeKey {
            max_len: self.max_len,
            train_on_inputs: self.train_on_inputs,
            packing: self.packing,
            eos_token: self.eos_token.as_deref(),
            pad_token: self.pad_token.as_deref(),
            add_pad_token: &self.add_pad_token,
            chat_template: self.chat_template.as_deref(),
            train_on: self.train_on,
        }
    }
}

struct TokenizeStage {
    /// The user's files that inputs are store copies of, for error messages.
    sources: LocalSources,
    fields: Fields,
    inputs: Vec<Input>,
}

impl StageKind for TokenizeKind {
    fn name(&self) -> &'static str {
        "tokenize"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "tokenize prompt/response pairs (masking the prompt, exactly as the Alpaca recipe does) or conversations (the model's chat template, masking all but the assistant)"
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
        pipe_data::tokenize::check_max_len(fields.max_len)
            .map_err(|e| cx.error("max_len", e.to_string()))?;
        let input = cx.stage_ref(&cx.path.key("input"), &fields.input)?;
        let tokenizer = cx
            .as_stage_ref(&fields.tokenizer)
            .unwrap_or_else(|| InputSource::Path(cx.resolve_path(&fields.tokenizer)));
        let inputs = vec![
            Input {
                name: "input".into(),
                source: input,
                field: cx.path.key("input"),
            },
            Input {
                name: "tokenizer".into(),
                source: tokenizer,
                field: cx.path.key("tokenizer"),
            },
        ];
        Ok(Box::new(TokenizeStage {
            sources: LocalSources::default(),
            fields,
            inputs,
        }))
    }
}

impl Stage for TokenizeStage {
    fn inputs(&self) -> Vec<Input> {
        self.inputs.clone()
    }
    fn key_fields(&self) -> KeyFields {
        KeyFields::of(&self.fields.key())
    }
    fn outputs(&self) -> Option<Vec<String>> {
        Some(
            [
                "train.safetensors",
                "val.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "meta.json",
                "stats.json",
            ]
            .map(String::from)
            .to_vec(),
        )
    }
    fn check_upstream<'a>(
        &self,
        stage: &dyn Fn(&str) -> Option<pipe_core::StageInfo<'a>>,
    ) -> Result<(), FieldError> {
        self.sources.learn(&self.inputs, stage);
        Ok(())
    }
    fn run(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        self.run_stage(cx)
            .map_err(|e| self.sources.rename_in(cx, e))
    }
}

impl TokenizeStage {
    fn run_stage(&self, cx: &mut StageContext) -> anyhow::Result<()> {
        let f = &self.fields;
        let opts = TokenizeOptions {
            max_len: f.max_len,
            train_on_inputs: f.train_on_inputs,
            eos_token: f.eos_token.clone(),
            pad_token: f.pad_token.clone(),
            add_pad_token: f.add_pad_token.clone(),
            chat_template: f.chat_template.clone(),
            train_on: f.train_on,
        };
        let input = cx.input("input")?.to_path_buf();
        let tokenizer = cx.input("tokenizer")?.to_path_buf();
        let r = pipe_data::tokenize::run(&input, &tokenizer, &opts, f.packing, &cx.out_dir)?;
        if !r.specials.added_tokens.is_empty() {
            cx.log(&format!(
                "added {:?} to the vocabulary ({} → {} tokens): the model's embeddings grow to match",
                r.specials.added_tokens, r.specials.vocab_size_before, r.specials.vocab_size_after
            ));
        }
        for (name, s) in [("train", &r.train), ("val", &r.val)] {
            cx.log(&format!(
                "{name}: {} examples, {} tokens ({:.1}% masked), {} truncated at {}, {} with every label masked",
                s.examples,
                s.tokens,
                100.0 * s.masked_fraction,
                s.truncated,
                f.max_len,
                s.all_masked
            ));
            if s.all_masked > 0 {
                tracing::warn!(
                    "{}: {} {name} examples have every label masked (their prompt fills max_len {}); they teach nothing",
                    cx.stage_id,
                    s.all_masked,
                    f.max_len
                );
            }
        }
        if let Some(c) = &r.chat {
            cx.log(&format!(
                "conversations: the chat template of {} ({} generation markers), loss on {}",
                c.template_from,
                if c.generation_markers {
                    "with"
                } else {
                    "without"
                },
                match c.train_on {
                    TrainOn::Assistant => "every assistant turn",
                    TrainOn::LastAssistant => "the last assistant turn",
                    TrainOn::All => "every token",
                }
            ));
        }
        cx.set_metrics(serde_json::to_value(&r)?);
        Ok(())
    }
}
