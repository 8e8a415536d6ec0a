//! `format: gguf`: a model as one llama.cpp file — the weights (`pipe_model::gguf`) and the
//! tokenizer and chat template as llama.cpp's `convert_hf_to_gguf.py` describes them, so that
//! llama.cpp, Ollama and LM Studio tokenize and template prompts as transformers does.
//!
//! The tokenizer part covers what that converter writes for the two vocabularies of Llama
//! models: a SentencePiece model (`tokenizer.model`, Llama 2's and Mistral's:
//! `tokenizer.ggml.model: llama`, every piece with its score and type) or a byte-level BPE
//! `tokenizer.json` (Llama 3's, SmolLM's: `gpt2`, with the merges and the pre-tokenizer's
//! llama.cpp name); for both, every id's token and type (control, user-defined, normal, or
//! `[PADn]` for ids the tokenizer lacks), the special token ids (tokenizer_config.json, then
//! config.json), whether BOS/EOS/SEP are added (the post-processor's template first, as the
//! converter reads it), and the chat template.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use pipe_model::gguf::{FileType, GgufFile, Value, ValueType};
use pipe_model::{CausalLm, ModelConfig};
use serde_json::Value as Json;

type Cpu = pipe_model::CpuBackend;

/// Llama 3's pre-tokenizer split, as its tokenizer.json writes it (llama.cpp: `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The special tokens llama.cpp's converter looks up, in its order.
const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// Writes `model` (with the tokenizer found in `tokenizer_dirs`, first match wins) to `path`.
pub fn write_gguf(
    model: &CausalLm<Cpu>,
    tokenizer_dirs: &[&Path],
    name: &str,
    file_type: FileType,
    path: &Path,
) -> anyhow::Result<()> {
    let c = &model.config;
    let arch = pipe_model::gguf::llama_architecture(c)?;
    let mut file = GgufFile::default();
    file.set("general.architecture", Value::String(arch.into()));
    file.set("general.type", Value::String("model".into()));
    file.set("general.name", Value::String(name.into()));
    pipe_model::gguf::llama_metadata(c, &mut file);
    file.set("general.file_type", Value::U32(file_type.id()));
    file.set("general.quantization_version", Value::U32(2));
    tokenizer_metadata(tokenizer_dirs, c, &mut file)?;
    file.tensors = model.gguf_tensors(file_type)?;
    file.write(path)?;
    Ok(())
}

fn find(dirs: &[&Path], file: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(file)).find(|p| p.is_file())
}

fn read_json(path: &Path) -> anyhow::Result<Json> {
    serde_json::from_slice(&std::fs::read(path)?)
        .with_context(|| format!("{} is not valid JSON", path.display()))
}

/// llama.cpp's name for a byte-level BPE pre-tokenizer it implements, by its structure.
/// (The converter tells them apart by hashing the ids a test text encodes to, which only works
/// for the published vocabularies it lists; the structure is what decides the split.)
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let is = |v: &Json, ty: &str| v["type"] == ty;
    let byte_level = |v: &Json, regex: bool| {
        is(v, "ByteLevel") && v["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"]
        .as_array()
        .filter(|_| is(pre, "Sequence"))?;
    match parts.as_slice() {
        [digits, bl]
            if is(digits, "Digits")
                && digits["individual_digits"] == true
                && byte_level(bl, true) =>
        {
            Some("smollm")
        }
        [split, bl]
            if is(split, "Split")
                && split["pattern"]["Regex"] == LLAMA3_SPLIT
                && byte_level(bl, false) =>
        {
            Some("llama-bpe")
        }
        _ => None,
    }
}

/// Added tokens that llama.cpp's converter marks as control tokens though they are not
/// flagged special (`does_token_look_special`).
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// An added token (from tokenizer.json's `added_tokens` or tokenizer_config.json's
/// `added_tokens_decoder`) as the converter writes it: a control token when special or looking
/// so, else user-defined, with SentencePiece's `▁` written as the space it stands for.
fn added_token(text: &str, special: bool) -> (String, i32) {
    if special || looks_special(text) {
        (text.to_string(), CONTROL)
    } else {
        (text.replace('\u{2581}', " "), USER_DEFINED)
    }
}

fn tokenizer_metadata(
    dirs: &[&Path],
    config: &ModelConfig,
    file: &mut GgufFile,
) -> anyhow::Result<()> {
    let tokenizer_path = find(dirs, "tokenizer.json").ok_or_else(|| {
        anyhow!("GGUF export needs the model's tokenizer.json (llama.cpp tokenizes with the vocabulary in the file), and there is none beside the model")
    })?;
    let tok = read_json(&tokenizer_path)?;
    let mut tc = match find(dirs, "tokenizer_config.json") {
        Some(p) => read_json(&p)?,
        None => Json::Null,
    };
    if let Some(prefix) = tc["add_prefix_space"].as_bool() {
        file.set("tokenizer.ggml.add_space_prefix", Value::Bool(prefix));
    }
    let added = tok["added_tokens"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    // As llama.cpp's converter: a SentencePiece model file, when there is one, is the vocabulary.
    // The converter checks special ids against the SentencePiece vocabulary's size only.
    let id_limit = match find(dirs, "tokenizer.model") {
        Some(sp) => sentencepiece_vocabulary(&sp, &tc, config, file)?,
        None => {
            byte_level_vocabulary(&tokenizer_path, &tok, added, config, file)?;
            usize::MAX
        }
    };
    let added = tok["added_tokens"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let special = SpecialTokens::read(&tok, &mut tc, added, config);
    for (typ, id) in special
        .ids
        .iter()
        .filter(|(_, id)| (*id as usize) < id_limit)
    {
        let key = match *typ {
            "unk" => "tokenizer.ggml.unknown_token_id".to_string(),
            "pad" => "tokenizer.ggml.padding_token_id".to_string(),
            "sep" => "tokenizer.ggml.seperator_token_id".to_string(),
            other => format!("tokenizer.ggml.{other}_token_id"),
        };
        file.set(&key, Value::U32(*id));
    }
    for (typ, on) in &special.add {
        file.set(&format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*on));
    }
    if let Some(t) = chat_template(dirs, &tc)? {
        file.set("tokenizer.chat_template", Value::String(t));
    }
    let mut lowercase = None;
    let mut strip_accents = None;
    normalizer_flags(&tok["normalizer"], &mut lowercase, &mut strip_accents);
    if let Some(v) = lowercase {
        file.set("tokenizer.ggml.normalizer.lowercase", Value::Bool(v));
    }
    if let Some(v) = strip_accents {
        file.set("tokenizer.ggml.normalizer.strip_accents", Value::Bool(v));
    }
    // llama.cpp's converter turns BOS off for any Llama whose vocabulary has 49,152 tokens
    // (IBM Granite's small models, and SmolLM's, which add no BOS either).
    if config.vocab_size == 49152 {
        file.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }
    Ok(())
}

/// A byte-level BPE vocabulary (`tokenizer.ggml.model: gpt2`) from tokenizer.json.
fn byte_level_vocabulary(
    tokenizer_path: &Path,
    tok: &Json,
    added: &[Json],
    config: &ModelConfig,
    file: &mut GgufFile,
) -> anyhow::Result<()> {
    let model = &tok["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        bail!(
            "{} is a {}{} tokenizer: llama.cpp reads such a vocabulary (Llama 2's, Mistral's) from the SentencePiece model it was converted from, and there is no tokenizer.model beside the model\n  = help: download it with the model (the download stage's `files:` default includes tokenizer.model), or set the export's `tokenizer:` to a directory that holds it",
            tokenizer_path.display(),
            model["type"].as_str().unwrap_or("?"),
            if model["byte_fallback"] == true { " (byte-fallback BPE)" } else { "" }
        );
    }
    let pre = pre_tokenizer_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        anyhow!(
            "GGUF export knows the byte-level pre-tokenizers llama.cpp calls gpt-2, smollm and llama-bpe, and {}'s pre_tokenizer is none of them: {}",
            tokenizer_path.display(),
            tok["pre_tokenizer"]
        )
    })?;

    // Every id below the model's vocabulary size gets a token.
    let n_vocab = config.vocab_size;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n_vocab];
    let mut place = |id: u64, text: String, ty: i32| -> anyhow::Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!("the tokenizer has id {id} ({text:?}), past the model's {n_vocab} embeddings")
        })?;
        *slot = Some((text, ty));
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("{} has no model.vocab", tokenizer_path.display()))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| anyhow!("vocab entry {text:?} has no id"))?;
        place(id, text.clone(), NORMAL)?;
    }
    for a in added {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let (text, ty) = added_token(text, a["special"] == true);
        place(id, text, ty)?;
    }
    let (texts, types): (Vec<String>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, ty)) => (text, Value::I32(ty)),
            None => (format!("[PAD{i}]"), Value::I32(UNUSED)),
        })
        .unzip();

    file.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    file.set("tokenizer.ggml.pre", Value::String(pre.into()));
    file.set("tokenizer.ggml.tokens", Value::strings(texts));
    file.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types),
    );
    let merges = merges(&model["merges"])?;
    if !merges.is_empty() {
        file.set("tokenizer.ggml.merges", Value::strings(merges));
    }
    Ok(())
}

/// A SentencePiece vocabulary (`tokenizer.ggml.model: llama`), as llama.cpp's converter builds
/// it: tokenizer.model's pieces with their scores and types, then added_tokens.json's tokens
/// (user-defined) and tokenizer_config.json's `added_tokens_decoder` (control when special),
/// `[PADn]` for ids none of them names; returns the number of tokens written.
fn sentencepiece_vocabulary(
    path: &Path,
    tc: &Json,
    config: &ModelConfig,
    file: &mut GgufFile,
) -> anyhow::Result<usize> {
    let n_vocab = config.vocab_size;
    let mut texts: Vec<String> = (0..n_vocab).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; n_vocab];
    let mut types = vec![UNUSED; n_vocab];
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let pieces = sentencepiece_pieces(&bytes)
        .with_context(|| format!("{} is not a SentencePiece model", path.display()))?;
    for (id, piece) in pieces.into_iter().enumerate().take(n_vocab) {
        texts[id] = piece.text;
        scores[id] = piece.score;
        // SentencePiece numbers its piece types as GGUF does; its user-defined pieces (and
        // any type it may add) the converter writes as normal.
        types[id] = match piece.kind {
            UNKNOWN | CONTROL | UNUSED | BYTE => piece.kind,
            _ => NORMAL,
        };
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Ok(added) = std::fs::read(dir.join("added_tokens.json")) {
        let added: serde_json::Map<String, Json> =
            serde_json::from_slice(&added).with_context(|| {
                format!(
                    "{} is not a JSON object",
                    dir.join("added_tokens.json").display()
                )
            })?;
        for (text, id) in added {
            if let Some(id) = id.as_u64().map(|i| i as usize).filter(|i| *i < n_vocab) {
                texts[id] = text;
                scores[id] = -1000.0;
                types[id] = USER_DEFINED;
            }
        }
    }
    if let Some(decoder) = tc["added_tokens_decoder"].as_object() {
        for (id, entry) in decoder {
            let (Some(id), Some(text)) = (
                id.parse::<usize>().ok().filter(|i| *i < n_vocab),
                entry["content"].as_str(),
            ) else {
                continue;
            };
            (texts[id], types[id]) = added_token(text, entry["special"] == true);
            scores[id] = -1000.0;
        }
    }
    file.set("tokenizer.ggml.model", Value::String("llama".into()));
    file.set("tokenizer.ggml.pre", Value::String("default".into()));
    file.set("tokenizer.ggml.tokens", Value::strings(texts));
    file.set(
        "tokenizer.ggml.scores",
        Value::Array(ValueType::F32, scores.into_iter().map(Value::F32).collect()),
    );
    file.set(
        "tokenizer.ggml.token_type",
        Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()),
    );
    Ok(n_vocab)
}

struct Piece {
    text: String,
    score: f32,
    kind: i32,
}

/// The pieces of a SentencePiece `ModelProto` (field 1, repeated `SentencePiece`: piece = 1,
/// score = 2, type = 3), read with the protobuf wire format; the other fields are skipped.
fn sentencepiece_pieces(bytes: &[u8]) -> anyhow::Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut r = Wire { bytes, at: 0 };
    while let Some((field, value)) = r.field()? {
        if let (1, WireValue::Bytes(msg)) = (field, value) {
            let mut p = Piece {
                text: String::new(),
                score: 0.0,
                kind: 1,
            };
            let mut m = Wire { bytes: msg, at: 0 };
            while let Some((field, value)) = m.field()? {
                match (field, value) {
                    (1, WireValue::Bytes(b)) => {
                        p.text = String::from_utf8(b.to_vec())
                            .map_err(|_| anyhow!("piece {} is not UTF-8", pieces.len()))?
                    }
                    (2, WireValue::Fixed32(v)) => p.score = f32::from_bits(v),
                    (3, WireValue::Varint(v)) => p.kind = v as i32,
                    _ => {}
                }
            }
            pieces.push(p);
        }
    }
    if pieces.is_empty() {
        bail!("it holds no pieces");
    }
    Ok(pieces)
}

enum WireValue<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Wire<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> anyhow::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| anyhow!("truncated at byte {}", self.at))?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("a varint longer than 10 bytes at {}", self.at)
    }
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| anyhow!("truncated at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    /// The next field number and value; `None` at the end.
    fn field(&mut self) -> anyhow::Result<Option<(u64, WireValue<'a>)>> {
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => WireValue::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                WireValue::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                WireValue::Bytes(self.take(n)?)
            }
            5 => WireValue::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            w => bail!("wire type {w} at byte {}", self.at),
        };
        Ok(Some((tag >> 3, value)))
    }
}

/// `model.merges`: `"a b"` strings, or `[a, b]` pairs (spaces inside written as U+0120, as
/// llama.cpp reads them).
fn merges(v: &Json) -> anyhow::Result<Vec<String>> {
    let Some(list) = v.as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => {
                let part = |p: &Json| {
                    p.as_str()
                        .map(|s| s.replace(' ', "\u{120}"))
                        .ok_or_else(|| anyhow!("a merge that is not two strings: {m}"))
                };
                Ok(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
            }
            other => bail!("a merge that is neither \"a b\" nor [a, b]: {other}"),
        })
        .collect()
}

fn normalizer_flags(n: &Json, lowercase: &mut Option<bool>, strip: &mut Option<bool>) {
    match n["type"].as_str() {
        Some("Lowercase") => *lowercase = Some(true),
        Some("StripAccents") => *strip = Some(true),
        Some("BertNormalizer") => {
            if let Some(v) = n["lowercase"].as_bool() {
                *lowercase = Some(v);
            }
            if let Some(v) = n["strip_accents"].as_bool() {
                *strip = Some(v);
            }
        }
        Some("Sequence") => {
            for m in n["normalizers"].as_array().into_iter().flatten() {
                normalizer_flags(m, lowercase, strip);
            }
        }
        _ => {}
    }
}

/// tokenizer_config.json's `chat_template` (a string), else chat_template.jinja, else
/// chat_template.json's.
fn chat_template(dirs: &[&Path], tc: &Json) -> anyhow::Result<Option<String>> {
    match &tc["chat_template"] {
        Json::String(s) => return Ok(Some(s.clone())),
        Json::Null => {}
        _ => bail!("tokenizer_config.json's chat_template is a list of named templates; GGUF export writes a single template"),
    }
    if let Some(p) = find(dirs, "chat_template.jinja") {
        return Ok(Some(
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?,
        ));
    }
    if let Some(p) = find(dirs, "chat_template.json") {
        return Ok(read_json(&p)?["chat_template"].as_str().map(String::from));
    }
    Ok(None)
}

/// The special token ids and add-BOS/EOS/SEP flags, as llama.cpp's converter (its
/// `SpecialVocab`) derives them.
struct SpecialTokens {
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
}

impl SpecialTokens {
    fn read(tok: &Json, tc: &mut Json, added: &[Json], config: &ModelConfig) -> SpecialTokens {
        let mut add: Vec<(&'static str, bool)> = Vec::new();
        let set_add = |add: &mut Vec<(&'static str, bool)>,
                       typ: &'static str,
                       on: bool,
                       keep: bool| {
            match add.iter_mut().find(|(t, _)| *t == typ) {
                Some(slot) if !keep => slot.1 = on,
                Some(_) => {}
                None => add.push((typ, on)),
            }
        };
        let has_config = tc.is_object();
        let text = |tc: &Json, k: &str| pipe_data::tokenize::config_token(Some(tc), k);
        let mut bos = text(tc, "bos_token");
        let mut cls = text(tc, "cls_token");
        let mut eos = text(tc, "eos_token");
        let mut sep = text(tc, "sep_token");
        if bos.is_none() && cls.is_some() && has_config {
            bos.clone_from(&cls);
            tc["bos_token"] = Json::from(bos.clone());
        }
        if eos.is_none() && sep.is_some() && has_config {
            eos.clone_from(&sep);
            tc["eos_token"] = Json::from(eos.clone());
        }
        let post = &tok["post_processor"];
        let processors: Vec<&Json> = match post["processors"].as_array() {
            Some(list) => list.iter().collect(),
            None if post.is_object() => vec![post],
            None => Vec::new(),
        };
        let special_id = |v: &Json| v["SpecialToken"]["id"].as_str().map(String::from);
        for p in processors {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    set_add(&mut add, "bos", false, true);
                    set_add(&mut add, "eos", false, true);
                }
                Some("RobertaProcessing") => {
                    for typ in ["bos", "eos", "sep"] {
                        set_add(&mut add, typ, true, false);
                    }
                    if cls.is_none() && has_config {
                        cls = p["cls"][0].as_str().map(String::from).or(bos.clone());
                        tc["cls_token"] = Json::from(cls.clone());
                    }
                    if sep.is_none() && has_config {
                        sep = p["sep"][0].as_str().map(String::from).or(eos.clone());
                        tc["sep_token"] = Json::from(sep.clone());
                    }
                }
                Some("TemplateProcessing") => {
                    let single = p["single"].as_array().map_or(&[][..], Vec::as_slice);
                    let mut first = None;
                    let mut last = None;
                    if single.len() > 1 {
                        first = special_id(&single[0]);
                        if let Some(f) = &first {
                            let known = bos.as_ref() == Some(f) || cls.as_ref() == Some(f);
                            if !has_config {
                                bos = Some(f.clone());
                            } else if !known {
                                if bos.is_none() {
                                    bos = Some(f.clone());
                                    tc["bos_token"] = Json::from(f.clone());
                                }
                                if cls.is_none() {
                                    cls = Some(f.clone());
                                    tc["cls_token"] = Json::from(f.clone());
                                }
                            }
                            let known = bos.as_ref() == Some(f) || cls.as_ref() == Some(f);
                            set_add(&mut add, "bos", known, false);
                        }
                        last = special_id(&single[single.len() - 1]);
                        if let Some(l) = &last {
                            if !has_config {
                                eos = Some(l.clone());
                            } else if eos.as_ref() != Some(l) {
                                // The converter keeps the old EOS as end-of-turn.
                                tc["eot_token"] = Json::from(eos.clone());
                                eos = Some(l.clone());
                                tc["eos_token"] = Json::from(l.clone());
                            }
                            set_add(&mut add, "eos", eos.as_ref() == Some(l), false);
                        }
                    }
                    let pair = p["pair"].as_array().map_or(&[][..], Vec::as_slice);
                    if !pair.is_empty() {
                        let mut inner = pair;
                        if first.is_some() && special_id(&inner[0]) == first {
                            inner = &inner[1..];
                        }
                        if last.is_some() && inner.last().and_then(special_id) == last {
                            inner = &inner[..inner.len() - 1];
                        }
                        fn seq(v: Option<&Json>) -> Option<&str> {
                            v.and_then(|v| v["Sequence"]["id"].as_str())
                        }
                        if !inner.is_empty()
                            && seq(inner.first()) == Some("A")
                            && seq(inner.last()) == Some("B")
                            && inner.len() > 2
                        {
                            let middle = &inner[1..inner.len() - 1];
                            let is_sep = |e: &Option<String>| {
                                e.is_some()
                                    && (e.as_ref() == sep.as_ref() || e.as_ref() == eos.as_ref())
                            };
                            let mut add_sep = false;
                            let e0 = special_id(&middle[0]);
                            if is_sep(&e0) && last.is_none() {
                                add_sep = true;
                            }
                            if middle.len() == 2 && is_sep(&special_id(&middle[1])) {
                                add_sep = true;
                            }
                            set_add(&mut add, "sep", add_sep, false);
                            if add_sep && sep.is_none() && has_config {
                                tc["sep_token"] = Json::from(eos.clone());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let mut ids: Vec<(&'static str, u32)> = Vec::new();
        let mut types: Vec<&'static str> = SPECIAL_TYPES.to_vec();
        if tc.get("eot_token").is_some() {
            types.push("eot");
        }
        if has_config {
            for typ in &types {
                if let Some(on) = tc[format!("add_{typ}_token")].as_bool() {
                    set_add(&mut add, typ, on, true);
                }
                let Some(content) =
                    pipe_data::tokenize::config_token(Some(tc), &format!("{typ}_token"))
                else {
                    continue;
                };
                let id = added
                    .iter()
                    .find(|a| a["content"] == content)
                    .and_then(|a| a["id"].as_u64());
                if let Some(id) = id {
                    if !ids.iter().any(|(t, _)| t == typ) {
                        ids.push((typ, id as u32));
                    }
                }
            }
        }
        // Then config.json's ids, for the types still unset.
        for (typ, id) in [
            ("bos", config.bos_token_id),
            ("eos", config.eos_token_id),
            ("pad", config.pad_token_id),
        ] {
            if let Some(id) = id {
                if !ids.iter().any(|(t, _)| *t == typ) {
                    ids.push((typ, id));
                }
            }
        }
        SpecialTokens { ids, add }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizers_are_named_by_structure() {
        let j = |s: &str| serde_json::from_str::<Json>(s).unwrap();
        assert_eq!(
            pre_tokenizer_name(&j(
                r#"{"type":"ByteLevel","add_prefix_space":false,"use_regex":true}"#
            )),
            Some("gpt-2")
        );
        assert_eq!(
            pre_tokenizer_name(&j(
                r#"{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},{"type":"ByteLevel","use_regex":true}]}"#
            )),
            Some("smollm")
        );
        let llama3 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated"},
            {"type": "ByteLevel", "use_regex": false}]});
        assert_eq!(pre_tokenizer_name(&llama3), Some("llama-bpe"));
        assert_eq!(
            pre_tokenizer_name(&j(r#"{"type":"Metaspace","replacement":"▁"}"#)),
            None
        );
    }

    #[test]
    fn merge_pairs_keep_their_spaces_apart() {
        let m = serde_json::json!([["a", "b c"], ["x", "y"]]);
        assert_eq!(merges(&m).unwrap(), vec!["a b\u{120}c", "x y"]);
        assert_eq!(merges(&serde_json::json!(["a b"])).unwrap(), vec!["a b"]);
        assert!(merges(&serde_json::json!([1])).is_err());
    }
}
