//! Prompt/response pairs → token ids and labels, exactly as Stanford Alpaca's `preprocess`:
//!
//! - the example is `prompt + response + eos_token` (EOS appended as text, so the tokenizer's
//!   added-token matching turns it into the EOS id), the source is `prompt` alone; both are
//!   encoded separately with the tokenizer's own special tokens (e.g. BOS from its
//!   post-processor) and truncated at `max_len` from the right;
//! - labels are the example's ids with the first `source_len` positions set to -100, where
//!   `source_len` counts the source's ids that are not the pad id. So a truncated example loses
//!   its EOS, and one whose prompt fills `max_len` has every label masked.
//! - a tokenizer without a pad token gets one added (`[PAD]`), as Alpaca's
//!   `smart_tokenizer_and_embedding_resize` does; the model's embeddings must then grow.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokenizers::{
    AddedToken, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::dataset::DatasetError;
use crate::format::{FormatError, Pair};

/// The label of a position that does not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// The longest `max_len` accepted: 16,777,216 tokens, far beyond any model's context (the
/// longest are about a million), and small enough that every buffer it sizes can be allocated.
pub const MAX_LEN_LIMIT: usize = 1 << 24;

/// Why a tokenizer cannot be loaded or used, or pairs tokenized. A variant with a source names
/// only what failed; the source says why (`{:#}` on an `anyhow::Error` prints both).
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("max_len must be at least 2")]
    MaxLenTooSmall,
    #[error("max_len {max_len} is more than pipe handles ({} tokens); it should be the context length of the model, e.g. 512 or 4096", MAX_LEN_LIMIT)]
    MaxLenTooLarge { max_len: usize },
    #[error("no tokenizer.json at {} (pipe reads Hugging Face fast-tokenizer files; a model with only tokenizer.model needs converting with transformers first)", file.display())]
    NoTokenizerJson { file: PathBuf },
    #[error("cannot load {}", file.display())]
    Load {
        file: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("{} is not valid JSON", file.display())]
    Config {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot tell the tokenizer's end-of-sequence token: tokenizer_config.json names none; set `eos_token:`")]
    NoEosToken,
    #[error("the EOS token `{token}` is not in the tokenizer's vocabulary")]
    EosNotInVocabulary { token: String },
    #[error("adding the pad token failed")]
    PadTokenNotAdded,
    #[error("cannot truncate at {max_len}")]
    Truncation {
        max_len: usize,
        #[source]
        source: tokenizers::Error,
    },
    /// Record `index` (its prompt alone, with `prompt_only`) cannot be encoded.
    #[error("record {index}: cannot tokenize{}", if *prompt_only { " its prompt" } else { "" })]
    Encode {
        index: usize,
        prompt_only: bool,
        #[source]
        source: tokenizers::Error,
    },
    #[error("cannot write tokenizer.json")]
    SaveTokenizer {
        #[source]
        source: tokenizers::Error,
    },
    #[error(transparent)]
    Pairs(#[from] FormatError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    /// `chat_template` / `train_on` given for prompt/response pairs.
    #[error("`{0}` applies to conversations, and the input holds prompt/response pairs (format them with `template: messages` or `sharegpt` for a chat template)")]
    ChatOptionForPairs(&'static str),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// Writing an output failed.
    #[error(transparent)]
    Write(std::io::Error),
}

/// Why `max_len` cannot be used, if so.
pub fn check_max_len(max_len: usize) -> Result<(), TokenizeError> {
    if max_len < 2 {
        return Err(TokenizeError::MaxLenTooSmall);
    }
    if max_len > MAX_LEN_LIMIT {
        return Err(TokenizeError::MaxLenTooLarge { max_len });
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizeOptions {
    pub max_len: usize,
    /// Learn the prompt too (no masking).
    pub train_on_inputs: bool,
    /// Overrides the tokenizer_config.json's EOS token.
    pub eos_token: Option<String>,
    /// Overrides the tokenizer_config.json's pad token.
    pub pad_token: Option<String>,
    /// The token added when the tokenizer has no pad token.
    pub add_pad_token: String,
    /// Conversations: the chat template (default: tokenizer_config.json's).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Conversations: which tokens count in the loss (default: assistant turns).
    #[serde(default)]
    pub train_on: Option<crate::chat::TrainOn>,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        TokenizeOptions {
            max_len: 512,
            train_on_inputs: false,
            eos_token: None,
            pad_token: None,
            add_pad_token: "[PAD]".into(),
            chat_template: None,
            train_on: None,
        }
    }
}

/// The special tokens a dataset was made with; written to `meta.json` for the train stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Specials {
    pub eos_token: String,
    pub eos_token_id: u32,
    pub bos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub pad_token: String,
    pub pad_token_id: u32,
    /// Tokens this stage added to the vocabulary (the model's embeddings must grow by these).
    pub added_tokens: Vec<String>,
    pub vocab_size_before: usize,
    pub vocab_size_after: usize,
}

/// A tokenizer.json with its tokenizer_config.json (if any).
pub struct LoadedTokenizer {
    pub tokenizer: Tokenizer,
    pub config: Option<Value>,
    pub dir: PathBuf,
}

/// Loads `path`: a tokenizer.json, or a directory holding one (a downloaded model).
pub fn load_tokenizer(path: &Path) -> Result<LoadedTokenizer, TokenizeError> {
    let (file, dir) = if path.is_dir() {
        (path.join("tokenizer.json"), path.to_path_buf())
    } else {
        (
            path.to_path_buf(),
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        )
    };
    if !file.exists() {
        return Err(TokenizeError::NoTokenizerJson { file });
    }
    let tokenizer = match Tokenizer::from_file(&file) {
        Ok(t) => t,
        Err(source) => return Err(TokenizeError::Load { file, source }),
    };
    let config_path = dir.join("tokenizer_config.json");
    let config = match std::fs::read(&config_path) {
        Ok(b) => Some(
            serde_json::from_slice(&b).map_err(|source| TokenizeError::Config {
                file: config_path,
                source,
            })?,
        ),
        Err(_) => None,
    };
    Ok(LoadedTokenizer {
        tokenizer,
        config,
        dir,
    })
}

/// A special token named in tokenizer_config.json: a string or `{"content": …}`.
pub fn config_token(config: Option<&Value>, name: &str) -> Option<String> {
    match config?.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Settles the EOS and pad tokens, adding a pad token if there is none.
pub fn prepare(t: &mut LoadedTokenizer, opts: &TokenizeOptions) -> Result<Specials, TokenizeError> {
    let tok = &mut t.tokenizer;
    let vocab_size_before = tok.get_vocab_size(true);
    let eos_token = opts
        .eos_token
        .clone()
        .or_else(|| config_token(t.config.as_ref(), "eos_token"))
        .ok_or(TokenizeError::NoEosToken)?;
    let eos_token_id =
        tok.token_to_id(&eos_token)
            .ok_or_else(|| TokenizeError::EosNotInVocabulary {
                token: eos_token.clone(),
            })?;
    let bos_token = config_token(t.config.as_ref(), "bos_token");
    let bos_token_id = bos_token.as_deref().and_then(|b| tok.token_to_id(b));
    let pad_token = opts
        .pad_token
        .clone()
        .or_else(|| config_token(t.config.as_ref(), "pad_token"))
        .unwrap_or_else(|| opts.add_pad_token.clone());
    let mut added_tokens = Vec::new();
    let pad_token_id = match tok.token_to_id(&pad_token) {
        Some(id) => id,
        None => {
            tok.add_special_tokens(&[AddedToken::from(pad_token.clone(), true)]);
            added_tokens.push(pad_token.clone());
            tok.token_to_id(&pad_token)
                .ok_or(TokenizeError::PadTokenNotAdded)?
        }
    };
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: opts.max_len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|source| TokenizeError::Truncation {
        max_len: opts.max_len,
        source,
    })?;
    Ok(Specials {
        eos_token,
        eos_token_id,
        bos_token,
        bos_token_id,
        pad_token,
        pad_token_id,
        added_tokens,
        vocab_size_before,
        vocab_size_after: tok.get_vocab_size(true),
    })
}

/// Makes `tok` encode the way the Alpaca preprocessing calls it: truncation at `max_len` from
/// the right, no padding (whatever the tokenizer.json itself says).
pub fn set_encoding(tok: &mut Tokenizer, max_len: usize) -> Result<(), TokenizeError> {
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
        direction: TruncationDirection::Right,
    }))
    .map_err(|source| TokenizeError::Truncation { max_len, source })?;
    Ok(())
}

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub index: usize,
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// Cut at `max_len` (its EOS, and maybe more, is lost).
    pub truncated: bool,
}

impl Example {
    pub fn all_masked(&self) -> bool {
        self.labels.iter().all(|&l| l == IGNORE_INDEX)
    }
}

/// Tokenizes one pair with the library (see the module docs for the exact rules).
pub fn tokenize_pair(
    tok: &Tokenizer,
    sp: &Specials,
    pair: &Pair,
    train_on_inputs: bool,
) -> Result<Example, TokenizeError> {
    let encode_error = |prompt_only| {
        move |source| TokenizeError::Encode {
            index: pair.index,
            prompt_only,
            source,
        }
    };
    let text = format!("{}{}{}", pair.prompt, pair.response, sp.eos_token);
    let full = tok
        .encode_fast(text.as_str(), true)
        .map_err(encode_error(false))?;
    let source_len = if train_on_inputs {
        0
    } else {
        let source = tok
            .encode_fast(pair.prompt.as_str(), true)
            .map_err(encode_error(true))?;
        source
            .get_ids()
            .iter()
            .filter(|&&i| i != sp.pad_token_id)
            .count()
    };
    Ok(example(
        pair.index,
        full.get_ids().to_vec(),
        source_len,
        !full.get_overflowing().is_empty(),
    ))
}

fn example(index: usize, input_ids: Vec<u32>, source_len: usize, truncated: bool) -> Example {
    let mut labels: Vec<i32> = input_ids.iter().map(|&i| i as i32).collect();
    let n = source_len.min(labels.len());
    labels[..n].fill(IGNORE_INDEX);
    Example {
        index,
        input_ids,
        labels,
        truncated,
    }
}

/// Tokenizes all pairs on all cores, keeping their order. SentencePiece-style and byte-level
/// BPE tokenizers go through a [`FastEncoder`](crate::fastbpe::FastEncoder) (same ids, several
/// times faster); others through the library.
pub fn tokenize_all(
    tok: &Tokenizer,
    sp: &Specials,
    pairs: &[Pair],
    train_on_inputs: bool,
) -> Result<Vec<Example>, TokenizeError> {
    let max_len = tok
        .get_truncation()
        .map(|t| t.max_length)
        .unwrap_or(usize::MAX / 2);
    if let Some(fast) = crate::fastbpe::FastEncoder::new(tok, max_len) {
        let chunks: Vec<Vec<Example>> = pairs
            .par_chunks(256)
            .map(|chunk| {
                let mut cache = crate::fastbpe::WordCache::default();
                chunk
                    .iter()
                    .map(|p| {
                        let text = format!("{}{}{}", p.prompt, p.response, sp.eos_token);
                        let (ids, truncated) = fast.encode(&text, &mut cache);
                        let source_len = if train_on_inputs {
                            0
                        } else {
                            let (src, _) = fast.encode(&p.prompt, &mut cache);
                            src.iter().filter(|&&i| i != sp.pad_token_id).count()
                        };
                        example(p.index, ids, source_len, truncated)
                    })
                    .collect()
            })
            .collect();
        return Ok(chunks.into_iter().flatten().collect());
    }
    pairs
        .par_iter()
        .map(|p| tokenize_pair(tok, sp, p, train_on_inputs))
        .collect()
}

/// What a tokenized split looks like.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SplitStats {
    pub examples: usize,
    pub tokens: usize,
    /// Tokens with a label (that count in the loss).
    pub label_tokens: usize,
    pub masked_fraction: f64,
    pub truncated: usize,
    /// Examples whose every label is masked (their prompt filled `max_len`): they teach nothing.
    pub all_masked: usize,
    pub max_length: usize,
    pub mean_length: f64,
    /// Example lengths in buckets of `histogram_bucket` tokens.
    pub histogram_bucket: usize,
    pub histogram: Vec<usize>,
}

pub fn stats(examples: &[Example], max_len: usize) -> SplitStats {
    let tokens: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    let label_tokens: usize = examples
        .iter()
        .map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
        .sum();
    let bucket = (max_len / 16).max(1);
    let mut histogram = vec![0usize; max_len.div_ceil(bucket) + 1];
    for e in examples {
        histogram[e.input_ids.len() / bucket] += 1;
    }
    while histogram.last() == Some(&0) && histogram.len() > 1 {
        histogram.pop();
    }
    SplitStats {
        examples: examples.len(),
        tokens,
        label_tokens,
        masked_fraction: if tokens == 0 {
            0.0
        } else {
            1.0 - label_tokens as f64 / tokens as f64
        },
        truncated: examples.iter().filter(|e| e.truncated).count(),
        all_masked: examples.iter().filter(|e| e.all_masked()).count(),
        max_length: examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(0),
        mean_length: if examples.is_empty() {
            0.0
        } else {
            tokens as f64 / examples.len() as f64
        },
        histogram_bucket: bucket,
        histogram,
    }
}

/// What the `tokenize` stage made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizeReport {
    pub specials: Specials,
    pub max_len: usize,
    pub train_on_inputs: bool,
    pub packing: bool,
    pub train: SplitStats,
    pub val: SplitStats,
    /// For conversations: how they were rendered and masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat: Option<crate::chat::ChatReport>,
}

/// The `tokenize` stage's work: `train.jsonl`/`val.jsonl` in `input` → `train.safetensors`,
/// `val.safetensors`, the (possibly grown) `tokenizer.json` and `tokenizer_config.json`,
/// `meta.json` and `stats.json` in `out`.
pub fn run(
    input: &Path,
    tokenizer: &Path,
    opts: &TokenizeOptions,
    packing: bool,
    out: &Path,
) -> Result<TokenizeReport, TokenizeError> {
    check_max_len(opts.max_len)?;
    let mut loaded = load_tokenizer(tokenizer)?;
    let specials = prepare(&mut loaded, opts)?;
    // The tokenizer as the model will use it: the original plus any added pad token.
    loaded
        .tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|source| TokenizeError::SaveTokenizer { source })?;
    let mut config = loaded
        .config
        .clone()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Value::Object(map) = &mut config {
        map.insert(
            "pad_token".into(),
            Value::String(specials.pad_token.clone()),
        );
        map.insert(
            "eos_token".into(),
            Value::String(specials.eos_token.clone()),
        );
        map.entry("model_max_length")
            .or_insert(Value::from(opts.max_len));
        // A template given in the pipeline is the one the model is trained with, and so the
        // one it must be prompted with.
        if let Some(t) = &opts.chat_template {
            map.insert("chat_template".into(), Value::String(t.clone()));
        }
    }
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .map_err(TokenizeError::Write)?;
    set_encoding(&mut loaded.tokenizer, opts.max_len)?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("max_len".to_string(), opts.max_len.to_string());
    meta.insert(
        "pad_token_id".to_string(),
        specials.pad_token_id.to_string(),
    );
    meta.insert(
        "eos_token_id".to_string(),
        specials.eos_token_id.to_string(),
    );
    let mut split_stats = Vec::new();
    let mut chat = None;
    for split in ["train", "val"] {
        let examples = match crate::format::read_examples(&input.join(format!("{split}.jsonl")))? {
            crate::format::Examples::Pairs(pairs) => {
                if !pairs.is_empty() {
                    if opts.chat_template.is_some() {
                        return Err(TokenizeError::ChatOptionForPairs("chat_template"));
                    }
                    if opts.train_on.is_some() {
                        return Err(TokenizeError::ChatOptionForPairs("train_on"));
                    }
                }
                tokenize_all(&loaded.tokenizer, &specials, &pairs, opts.train_on_inputs)?
            }
            crate::format::Examples::Chat(convs) => {
                if chat.is_none() {
                    chat = Some(crate::chat::ChatTokenizer::new(&loaded, &specials, opts)?);
                }
                let c = chat.as_ref().expect("made above");
                c.tokenize_all(&convs, opts.max_len)?
            }
        };
        split_stats.push(stats(&examples, opts.max_len));
        crate::dataset::write(
            &out.join(format!("{split}.safetensors")),
            &examples,
            packing.then_some(opts.max_len),
            meta.clone(),
        )?;
    }
    let val = split_stats.pop().expect("two splits");
    let train = split_stats.pop().expect("two splits");
    let report = TokenizeReport {
        specials,
        max_len: opts.max_len,
        train_on_inputs: opts.train_on_inputs,
        packing,
        train,
        val,
        chat: chat.map(|c| c.report),
    };
    std::fs::write(
        out.join("meta.json"),
        serde_json::to_vec_pretty(&report.specials).expect("json"),
    )
    .map_err(TokenizeError::Write)?;
    std::fs::write(
        out.join("stats.json"),
        serde_json::to_vec_pretty(&report).expect("json"),
    )
    .map_err(TokenizeError::Write)?;
    Ok(report)
}
