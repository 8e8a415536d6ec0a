//! Conversations: reading them from records (`messages` lists of `{role, content}`, ShareGPT's
//! `conversations` of `{from, value}`, or other names through a field mapping), rendering them
//! with a model's own chat template (the Jinja template of its tokenizer_config.json, rendered
//! as transformers' `apply_chat_template` renders it), and tokenizing them with a loss mask.
//!
//! # Tokens
//! The rendered text is encoded with `add_special_tokens=False`, as `apply_chat_template(...,
//! tokenize=True)` does (the template writes BOS itself), and cut at `max_len` from the right.
//!
//! # Loss masks
//! - `assistant` (default): every assistant turn; `last_assistant`: the last one; `all`: every
//!   token.
//! - A template with `{% generation %}` … `{% endgeneration %}` markers: the tokens of the
//!   marked text, exactly as transformers' `return_assistant_tokens_mask` finds them (the token
//!   holding the first character of a span through the token holding its last).
//! - A template without markers: assistant turn *k* is what the model must write once the
//!   conversation before it is rendered with `add_generation_prompt` — the tokens of the whole
//!   conversation after the longest common prefix with `render(messages[:k],
//!   add_generation_prompt=True)`, up to the longest common prefix with
//!   `render(messages[:k+1])`. So the turn's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`,
//!   `</s>`, `<end_of_turn>`) is learnt, and the next turn's header is not. A template that
//!   renders the earlier turns differently once later ones follow (the prompt is not a prefix
//!   of the whole conversation) cannot be masked this way: that record is refused, naming the
//!   options.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JValue};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::prompt::place;
use crate::records::Record;
use crate::tokenize::{Example, IGNORE_INDEX};

/// The roles a conversation holds once read.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One conversation, as the `format` stage writes it to `train.jsonl` / `val.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The record's position in its source (across the shards of a split).
    pub index: usize,
    /// The source it was drawn from, in a mixture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub messages: Vec<Message>,
}

/// How conversations are laid out in records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChatLayout {
    /// `messages: [{role, content}]` (OpenAI / TRL).
    Messages,
    /// `conversations: [{from, value}]` with `human` / `gpt` / `system`.
    Sharegpt,
}

/// A record that cannot be read as a conversation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("record {index}{}: {problem}", place(*line, *row))]
pub struct BadConversation {
    pub index: usize,
    pub line: Option<usize>,
    pub row: Option<usize>,
    pub problem: String,
}

/// Reads conversations from records: the layout's field names (renamed by `fields`: `messages`,
/// `role`, `content` → the record's keys) and role names (mapped by `roles`, on top of
/// ShareGPT's `human` → user, `gpt` → assistant).
#[derive(Debug, Clone)]
pub struct ChatReader {
    messages: String,
    role: String,
    content: String,
    roles: BTreeMap<String, String>,
}

/// Why a chat field mapping cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChatSpecError {
    #[error("`{0}` is not a field of a conversation; map `messages`, `role` or `content`")]
    UnknownField(String),
    #[error("role `{from}` is mapped to `{to}`, which is not one of system, user, assistant")]
    UnknownRole { from: String, to: String },
}

impl ChatReader {
    pub fn new(
        layout: ChatLayout,
        fields: &BTreeMap<String, String>,
        roles: &BTreeMap<String, String>,
    ) -> Result<Self, ChatSpecError> {
        let (mut messages, mut role, mut content) = match layout {
            ChatLayout::Messages => ("messages", "role", "content"),
            ChatLayout::Sharegpt => ("conversations", "from", "value"),
        };
        for (k, v) in fields {
            match k.as_str() {
                "messages" => messages = v,
                "role" => role = v,
                "content" => content = v,
                _ => return Err(ChatSpecError::UnknownField(k.clone())),
            }
        }
        let mut map: BTreeMap<String, String> = ROLES
            .iter()
            .map(|r| (r.to_string(), r.to_string()))
            .collect();
        if layout == ChatLayout::Sharegpt {
            map.insert("human".into(), "user".into());
            map.insert("gpt".into(), "assistant".into());
        }
        for (from, to) in roles {
            if !ROLES.contains(&to.as_str()) {
                return Err(ChatSpecError::UnknownRole {
                    from: from.clone(),
                    to: to.clone(),
                });
            }
            map.insert(from.clone(), to.clone());
        }
        Ok(ChatReader {
            messages: messages.to_string(),
            role: role.to_string(),
            content: content.to_string(),
            roles: map,
        })
    }

    /// The conversation in `rec`.
    pub fn read(&self, rec: &Record) -> Result<Vec<Message>, BadConversation> {
        let bad = |problem: String| BadConversation {
            index: rec.index,
            line: rec.line,
            row: rec.row,
            problem,
        };
        let list = match rec.fields.get(&self.messages) {
            Some(Value::Array(a)) => a,
            None | Some(Value::Null) => {
                return Err(bad(format!(
                    "field `{}` is missing{}",
                    self.messages,
                    self.hint(rec)
                )))
            }
            Some(_) => {
                return Err(bad(format!(
                    "field `{}` is not a list of messages",
                    self.messages
                )))
            }
        };
        if list.is_empty() {
            return Err(bad(format!("`{}` holds no messages", self.messages)));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let at = format!("{}[{i}]", self.messages);
            let Value::Object(m) = m else {
                return Err(bad(format!(
                    "`{at}` is not an object with `{}` and `{}`",
                    self.role, self.content
                )));
            };
            let role = match m.get(&self.role) {
                Some(Value::String(r)) => r,
                _ => return Err(bad(format!("`{at}.{}` is missing or not text", self.role))),
            };
            let Some(canonical) = self.roles.get(role) else {
                let known: Vec<&str> = self.roles.keys().map(String::as_str).collect();
                return Err(bad(format!(
                    "`{at}.{}` is `{role}`, not one of {}; map it with `roles: {{{role}: assistant}}` (or user, system)",
                    self.role,
                    known.join(", ")
                )));
            };
            let content = match m.get(&self.content) {
                Some(Value::String(c)) => c.clone(),
                None | Some(Value::Null) => {
                    return Err(bad(format!("`{at}.{}` is missing", self.content)))
                }
                Some(_) => return Err(bad(format!("`{at}.{}` is not text", self.content))),
            };
            out.push(Message {
                role: canonical.clone(),
                content,
            });
        }
        Ok(out)
    }

    /// `; it has `conversations` (ShareGPT: write `template: sharegpt`)` and the like, when
    /// the record looks like another layout.
    fn hint(&self, rec: &Record) -> String {
        if self.messages != "conversations" && rec.fields.contains_key("conversations") {
            "; it has `conversations` (ShareGPT: write `template: sharegpt`)".into()
        } else if self.messages != "messages" && rec.fields.contains_key("messages") {
            "; it has `messages` (write `template: messages`)".into()
        } else if rec.fields.contains_key("instruction") {
            "; it looks like an Alpaca record (write `template: alpaca`)".into()
        } else {
            String::new()
        }
    }
}

/// Which tokens count in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    /// Every assistant turn.
    #[default]
    Assistant,
    /// The last assistant turn only.
    LastAssistant,
    /// Every token (system and user turns too).
    All,
}

/// Why a chat template cannot be had, rendered or used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the tokenizer has no chat template ({} has no `chat_template`)\n  = help: give one with `chat_template:` in the tokenize stage (the Jinja text, as in a tokenizer_config.json), use a tokenizer that has one, or format the records as prompt/response pairs (`template: alpaca` or your own)", config)]
    NoTemplate { config: String },
    #[error("tokenizer_config.json's `chat_template` is neither text nor a list of named templates with a `default`")]
    TemplateShape,
    #[error("the chat template does not compile: {0:#}")]
    Compile(JinjaError),
    #[error("record {index}: the chat template fails: {detail}")]
    Render { index: usize, detail: String },
    #[error("record {index}: cannot tokenize the rendered conversation")]
    Encode {
        index: usize,
        #[source]
        source: tokenizers::Error,
    },
    #[error("record {index}: the chat template renders the conversation before assistant turn {turn} differently once later turns follow, so the turn cannot be located\n  = help: give a template with `{{% generation %}}` … `{{% endgeneration %}}` around the assistant's text (`chat_template:`), or set `train_on: all`")]
    NotPrefixStable { index: usize, turn: usize },
}

/// The special tokens a template sees (`bos_token`, `eos_token`, … as transformers' tokenizer
/// passes its `special_tokens_map`).
pub fn special_tokens(config: Option<&Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let Some(Value::Object(c)) = config else {
        return out;
    };
    for name in [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ] {
        match c.get(name) {
            Some(Value::String(s)) => {
                out.insert(name.to_string(), Value::from(s.as_str()));
            }
            Some(Value::Object(o)) => {
                if let Some(s) = o.get("content").and_then(Value::as_str) {
                    out.insert(name.to_string(), Value::from(s));
                }
            }
            _ => {}
        }
    }
    if let Some(Value::Array(a)) = c.get("additional_special_tokens") {
        let names: Vec<Value> = a
            .iter()
            .filter_map(|t| match t {
                Value::String(s) => Some(Value::from(s.as_str())),
                Value::Object(o) => o.get("content").cloned(),
                _ => None,
            })
            .collect();
        if !names.is_empty() {
            out.insert("additional_special_tokens".into(), Value::Array(names));
        }
    }
    out
}

/// The chat template of a tokenizer_config.json: its `chat_template` text, or the `default` of
/// a list of named templates.
pub fn config_template(config: Option<&Value>) -> Result<Option<String>, ChatError> {
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(|s| Some(s.to_string()))
            .ok_or(ChatError::TemplateShape),
        Some(_) => Err(ChatError::TemplateShape),
    }
}

const GEN_START: &str = "\u{E000}pipe:generation\u{E001}";
const GEN_END: &str = "\u{E000}pipe:endgeneration\u{E001}";

/// A compiled chat template with the variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    specials: Arc<BTreeMap<String, Value>>,
    /// Whether the template marks the assistant's text with `{% generation %}`.
    pub has_generation_markers: bool,
}

/// A rendered conversation: its text, and the byte spans of its `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<(usize, usize)>,
}

impl ChatTemplate {
    /// Compiles `source` as transformers does (trim_blocks, lstrip_blocks, loop controls,
    /// `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, Python string
    /// methods); `specials` are the special tokens the template sees.
    pub fn new(source: &str, specials: BTreeMap<String, Value>) -> Result<Self, ChatError> {
        let (source, has_generation_markers) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(ChatError::Compile)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<JValue, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| strftime_now(&format));
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", source)
            .map_err(ChatError::Compile)?;
        Ok(ChatTemplate {
            env,
            specials: Arc::new(specials),
            has_generation_markers,
        })
    }

    /// Renders `messages` (record `index`, for errors).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        index: usize,
    ) -> Result<Rendered, ChatError> {
        let mut ctx: BTreeMap<String, JValue> = self
            .specials
            .iter()
            .map(|(k, v)| (k.clone(), JValue::from(Serde(v))))
            .collect();
        ctx.insert("messages".into(), JValue::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".into(),
            JValue::from(add_generation_prompt),
        );
        // transformers passes these as None when there are none: defined, and none.
        ctx.insert("tools".into(), JValue::from(()));
        ctx.insert("documents".into(), JValue::from(()));
        let raw = self
            .env
            .get_template("chat_template")
            .and_then(|t| t.render(JValue::from(ctx)))
            .map_err(|e| ChatError::Render {
                index,
                detail: render_error(&e),
            })?;
        Ok(strip_generation_marks(&raw))
    }
}

/// `raise_exception`'s message alone; other errors with their place in the template.
fn render_error(e: &JinjaError) -> String {
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(d) = e.detail() {
            return d.to_string();
        }
    }
    format!("{e:#}")
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker tags) become
/// blocks that write marks, keeping the tags' whitespace control: `{%- generation %}` →
/// `{%- if true %}{{ MARK }}{% if true %}`. Returns the template and whether it had any.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The closing `%}` after the opening `{%` (in `{%}` they overlap).
        let Some(close) = tag[2..].find("%}").map(|c| c + 2) else {
            out.push_str(tag);
            return (out, found);
        };
        let inner = &tag[2..close];
        let (left, inner) = match inner.strip_prefix(['-', '+']) {
            Some(r) => (&inner[..1], r),
            None => ("", inner),
        };
        let (inner, right) = match inner.strip_suffix(['-', '+']) {
            Some(r) => (r, &inner[inner.len() - 1..]),
            None => (inner, ""),
        };
        match inner.trim() {
            "generation" => {
                found = true;
                out.push_str(&format!(
                    "{{%{left} if true %}}{{{{ \"{GEN_START}\" }}}}{{% if true {right}%}}"
                ));
            }
            "endgeneration" => {
                out.push_str(&format!(
                    "{{%{left} endif %}}{{{{ \"{GEN_END}\" }}}}{{% endif {right}%}}"
                ));
            }
            _ => out.push_str(&tag[..close + 2]),
        }
        rest = &tag[close + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// The text without generation marks, and the byte spans they enclosed.
fn strip_generation_marks(raw: &str) -> Rendered {
    if !raw.contains(GEN_START) {
        return Rendered {
            text: raw.to_string(),
            generation: Vec::new(),
        };
    }
    let mut text = String::with_capacity(raw.len());
    let mut generation = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let mut rest = raw;
    loop {
        let s = rest.find(GEN_START);
        let e = rest.find(GEN_END);
        let (at, is_start) = match (s, e) {
            (Some(s), Some(e)) if s < e => (s, true),
            (Some(s), None) => (s, true),
            (_, Some(e)) => (e, false),
            (None, None) => break,
        };
        text.push_str(&rest[..at]);
        if is_start {
            open.push(text.len());
            rest = &rest[at + GEN_START.len()..];
        } else {
            if let Some(start) = open.pop() {
                generation.push((start, text.len()));
            }
            rest = &rest[at + GEN_END.len()..];
        }
    }
    text.push_str(rest);
    Rendered { text, generation }
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent)` — keys in their
/// order, non-ASCII kept, nothing escaped for HTML.
fn tojson(value: &JValue, kwargs: Kwargs) -> Result<JValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(JValue::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    v: &JValue,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), JinjaError> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let (true, Some(i)) = (v.is_integer(), v.as_i64()) {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else if f.is_finite() {
                    out.push_str(&f.to_string());
                } else {
                    out.push_str(if f.is_nan() {
                        "NaN"
                    } else if f > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    });
                }
            }
        }
        ValueKind::String => out.push_str(
            &serde_json::to_string(v.as_str().unwrap_or_default()).expect("a string is JSON"),
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<JValue> = v.try_iter()?.collect();
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let keys: Vec<JValue> = v.try_iter()?.collect();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                let key = k
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| k.to_string());
                out.push_str(&serde_json::to_string(&key).expect("a string is JSON"));
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => out.push_str(&serde_json::to_string(&v.to_string()).expect("a string is JSON")),
    }
    Ok(())
}

/// Python's `datetime.now().strftime(format)` for the directives templates use (`%d %b %Y`,
/// `%Y-%m-%d`, `%B`, `%A`, `%H:%M:%S`, …), in UTC.
pub fn strftime_now(format: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(format, secs)
}

/// `strftime(format)` of the UTC time `secs` after the Unix epoch.
pub fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (h, mi, s) = (tod / 3600, tod % 3600 / 60, tod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('B') => out.push_str(month),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Token span of byte span `start..end` of the encoded text, as transformers'
/// `return_assistant_tokens_mask` takes it: the token holding the first character through the
/// token holding the last one (to the end, when that one has none).
fn mark_span(
    enc: &tokenizers::Encoding,
    text: &str,
    start: usize,
    end: usize,
    mask: &mut [bool],
) -> bool {
    let Some(first) = enc.char_to_token(start, 0) else {
        return false;
    };
    // The byte where the span's last character begins (Python's `end - 1` in characters).
    let last_char = text[..end].char_indices().next_back().map(|(i, _)| i);
    let last = last_char.and_then(|i| enc.char_to_token(i, 0));
    let stop = match last {
        Some(t) if t != 0 => t + 1,
        _ => mask.len(),
    };
    for m in mask.iter_mut().take(stop).skip(first) {
        *m = true;
    }
    true
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The input ids and assistant mask of a conversation, before truncation.
pub fn encode_conversation(
    tok: &Tokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
    train_on: TrainOn,
) -> Result<(Vec<u32>, Vec<bool>), ChatError> {
    let index = conv.index;
    let encode = |text: &str| {
        tok.encode_fast(text, false)
            .map_err(|source| ChatError::Encode { index, source })
    };
    let full = template.render(&conv.messages, false, index)?;
    // Offsets are needed only to place generation spans.
    let enc = if template.has_generation_markers && train_on != TrainOn::All {
        tok.encode(full.text.as_str(), false)
            .map_err(|source| ChatError::Encode { index, source })?
    } else {
        encode(&full.text)?
    };
    let ids = enc.get_ids().to_vec();
    let mut mask = vec![false; ids.len()];
    if train_on == TrainOn::All {
        mask.fill(true);
        return Ok((ids, mask));
    }
    if template.has_generation_markers {
        let spans: &[(usize, usize)] = match train_on {
            TrainOn::LastAssistant => match full.generation.last() {
                Some(s) => std::slice::from_ref(s),
                None => &[],
            },
            _ => &full.generation,
        };
        for &(s, e) in spans {
            if !mark_span(&enc, &full.text, s, e, &mut mask) {
                break;
            }
        }
        return Ok((ids, mask));
    }
    let mut turns: Vec<usize> = conv
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    if train_on == TrainOn::LastAssistant {
        turns = turns.pop().into_iter().collect();
    }
    for k in turns {
        let prompt = template.render(&conv.messages[..k], true, index)?;
        if !full.text.starts_with(&prompt.text) {
            return Err(ChatError::NotPrefixStable { index, turn: k });
        }
        let upto = template.render(&conv.messages[..=k], false, index)?;
        let start = common_prefix(encode(&prompt.text)?.get_ids(), &ids);
        let end = common_prefix(encode(&upto.text)?.get_ids(), &ids);
        for m in mask.iter_mut().take(end).skip(start) {
            *m = true;
        }
    }
    Ok((ids, mask))
}

/// A conversation as a training example: ids cut at `max_len`, labels -100 where the mask is
/// off.
pub fn tokenize_conversation(
    tok: &Tokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
    train_on: TrainOn,
    max_len: usize,
) -> Result<Example, ChatError> {
    let (mut ids, mask) = encode_conversation(tok, template, conv, train_on)?;
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    let labels = ids
        .iter()
        .zip(&mask)
        .map(|(&id, &m)| if m { id as i32 } else { IGNORE_INDEX })
        .collect();
    Ok(Example {
        index: conv.index,
        input_ids: ids,
        labels,
        truncated,
    })
}

/// How a tokenize stage rendered and masked conversations; in its stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatReport {
    /// `tokenizer_config.json` or `pipeline` (a `chat_template:` field).
    pub template_from: String,
    pub generation_markers: bool,
    pub train_on: TrainOn,
}

/// A tokenizer and chat template ready for conversations: the tokenizer encodes without
/// truncation (the example is cut at `max_len` after its mask is known).
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    train_on: TrainOn,
    pub report: ChatReport,
}

impl ChatTokenizer {
    pub fn new(
        loaded: &crate::tokenize::LoadedTokenizer,
        specials: &crate::tokenize::Specials,
        opts: &crate::tokenize::TokenizeOptions,
    ) -> Result<Self, ChatError> {
        let (source, from) = match &opts.chat_template {
            Some(t) => (t.clone(), "pipeline"),
            None => match config_template(loaded.config.as_ref())? {
                Some(t) => (t, "tokenizer_config.json"),
                None => {
                    return Err(ChatError::NoTemplate {
                        config: loaded
                            .dir
                            .join("tokenizer_config.json")
                            .display()
                            .to_string(),
                    })
                }
            },
        };
        let mut tokens = special_tokens(loaded.config.as_ref());
        tokens.insert("eos_token".into(), Value::from(specials.eos_token.as_str()));
        let template = ChatTemplate::new(&source, tokens)?;
        let mut tokenizer = loaded.tokenizer.clone();
        tokenizer
            .with_truncation(None)
            .expect("no truncation is valid");
        let train_on = opts.train_on.unwrap_or_default();
        Ok(ChatTokenizer {
            tokenizer,
            report: ChatReport {
                template_from: from.to_string(),
                generation_markers: template.has_generation_markers,
                train_on,
            },
            template,
            train_on,
        })
    }

    /// Every conversation as an example, on all cores, in order.
    pub fn tokenize_all(
        &self,
        convs: &[Conversation],
        max_len: usize,
    ) -> Result<Vec<Example>, ChatError> {
        use rayon::prelude::*;
        convs
            .par_iter()
            .map(|c| {
                tokenize_conversation(&self.tokenizer, &self.template, c, self.train_on, max_len)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Broken tags are left to the template parser to report, never a panic here.
    #[test]
    fn malformed_tags_pass_through() {
        for source in ["{%}", "{%", "a {%- %} b", "{%-}", "{% generation -%}{%"] {
            let (out, _) = rewrite_generation_tags(source);
            assert!(out.contains("{%"), "{source} -> {out}");
        }
        let (out, found) = rewrite_generation_tags("{%- generation %}x{% endgeneration -%}");
        assert!(
            found && out.contains("if true") && out.contains("endif"),
            "{out}"
        );
    }

    fn msgs(turns: &[(&str, &str)]) -> Vec<Message> {
        turns
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    fn specials() -> BTreeMap<String, Value> {
        BTreeMap::from([
            ("bos_token".to_string(), Value::from("<s>")),
            ("eos_token".to_string(), Value::from("</s>")),
        ])
    }

    #[test]
    fn renders_as_jinja_with_transformers_settings() {
        // trim_blocks / lstrip_blocks, loop variables, filters and Python string methods.
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}\n  {% if loop.first and m.role == 'system' %}[{{ m.content.strip() | upper }}]\n  {% else %}{{ m.role }}: {{ m['content'] | trim }}{{ eos_token if m.role == 'assistant' }}\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}\n",
            specials(),
        )
        .unwrap();
        let m = msgs(&[
            ("system", " be brief "),
            ("user", " hi "),
            ("assistant", "yo"),
        ]);
        let r = t.render(&m, true, 0).unwrap();
        assert_eq!(
            r.text,
            "<s>[BE BRIEF]\nuser: hi\nassistant: yo</s>\nassistant:"
        );
        assert!(r.generation.is_empty());
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_record() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
            specials(),
        )
        .unwrap();
        let e = t
            .render(&msgs(&[("system", "x")]), false, 7)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "record 7: the chat template fails: System role not supported"
        );
        let bad = ChatTemplate::new("{% for %}", specials()).err().unwrap();
        assert!(
            bad.to_string()
                .starts_with("the chat template does not compile"),
            "{bad}"
        );
    }

    #[test]
    fn generation_markers_keep_whitespace_control_and_give_spans() {
        let t = ChatTemplate::new(
            "{%- for m in messages %}\n    {%- if m.role == 'assistant' %}\n        {{- 'A: ' }}\n        {%- generation %}\n        {{- m.content + '.' }}\n        {%- endgeneration %}\n        {{- '\\n' }}\n    {%- else %}\n        {{- 'U: ' + m.content + '\\n' }}\n    {%- endif %}\n{%- endfor %}",
            specials(),
        )
        .unwrap();
        assert!(t.has_generation_markers);
        let r = t
            .render(
                &msgs(&[
                    ("user", "a"),
                    ("assistant", "bé"),
                    ("user", "c"),
                    ("assistant", ""),
                ]),
                false,
                0,
            )
            .unwrap();
        assert_eq!(r.text, "U: a\nA: bé.\nU: c\nA: .\n");
        let spans: Vec<&str> = r.generation.iter().map(|&(s, e)| &r.text[s..e]).collect();
        assert_eq!(spans, ["bé.", "."]);
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new(
            "{{ {'b': 'é<', 'a': [1, 2.0, none, true]} | tojson }}|{{ [1] | tojson(indent=2) }}",
            specials(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false, 0).unwrap().text,
            "{\"b\": \"é<\", \"a\": [1, 2.0, null, true]}|[\n  1\n]"
        );
    }

    #[test]
    fn strftime_matches_python() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %A %B %j %%", t),
            "2024-07-26 13:05:09 Friday July 208 %"
        );
        assert_eq!(strftime("%d %B %Y", 0), "01 January 1970");
        let now = ChatTemplate::new("{{ strftime_now('%Y') }}", specials()).unwrap();
        assert_eq!(now.render(&[], false, 0).unwrap().text.len(), 4);
    }

    #[test]
    fn reading_layouts_roles_and_errors() {
        let rec = |json: &str| Record {
            index: 2,
            line: Some(3),
            row: None,
            fields: serde_json::from_str(json).unwrap(),
        };
        let none = BTreeMap::new();
        let sharegpt = ChatReader::new(ChatLayout::Sharegpt, &none, &none).unwrap();
        let m = sharegpt
            .read(&rec(r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}"#))
            .unwrap();
        assert_eq!(
            m,
            msgs(&[("system", "s"), ("user", "q"), ("assistant", "")])
        );
        let e = sharegpt
            .read(&rec(
                r#"{"conversations": [{"from": "bot", "value": "s"}]}"#,
            ))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "record 2 (line 3): `conversations[0].from` is `bot`, not one of assistant, gpt, human, system, user; map it with `roles: {bot: assistant}` (or user, system)");
        let messages = ChatReader::new(ChatLayout::Messages, &none, &none).unwrap();
        let e = messages
            .read(&rec(r#"{"conversations": []}"#))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "record 2 (line 3): field `messages` is missing; it has `conversations` (ShareGPT: write `template: sharegpt`)");
        let renamed = ChatReader::new(
            ChatLayout::Messages,
            &BTreeMap::from([
                ("messages".into(), "dialog".into()),
                ("role".into(), "speaker".into()),
                ("content".into(), "text".into()),
            ]),
            &BTreeMap::from([("bot".into(), "assistant".into())]),
        )
        .unwrap();
        let m = renamed
            .read(&rec(r#"{"dialog": [{"speaker": "user", "text": "q"}, {"speaker": "bot", "text": "a"}]}"#))
            .unwrap();
        assert_eq!(m, msgs(&[("user", "q"), ("assistant", "a")]));
        let e = renamed
            .read(&rec(r#"{"dialog": [{"speaker": "user", "text": 3}]}"#))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("`dialog[0].text` is not text"), "{e}");
        assert_eq!(
            ChatReader::new(
                ChatLayout::Messages,
                &BTreeMap::from([("prompt".into(), "x".into())]),
                &none
            )
            .unwrap_err()
            .to_string(),
            "`prompt` is not a field of a conversation; map `messages`, `role` or `content`"
        );
        assert!(ChatReader::new(
            ChatLayout::Messages,
            &none,
            &BTreeMap::from([("bot".into(), "model".into())])
        )
        .is_err());
    }
}
