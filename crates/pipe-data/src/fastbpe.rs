//! A lean encoder for SentencePiece-style BPE tokenizers (Llama-2, TinyLlama, Mistral…):
//! normalizer `Prepend("▁") + Replace(" ", "▁")`, no pre-tokenizer, BPE with byte fallback,
//! a `TemplateProcessing` post-processor. It gives the ids the `tokenizers` library gives —
//! the Alpaca parity fixtures and a randomized comparison test hold it to that — without the
//! library's offset bookkeeping, and with a per-batch cache of word merges.
//!
//! [`FastBpe::new`] accepts a tokenizer only when every part is one it reproduces exactly;
//! anything else (`None`) is encoded by the library — or, for byte-level BPE, by
//! [`ByteLevelBpe`](crate::bytelevel::ByteLevelBpe), which shares this module's merges and
//! templates; [`FastEncoder`] picks whichever fits.
//!
//! Why words: when no vocabulary token has `▁` after another character, no merge can cross
//! the start of a `▁` run, so BPE over the cut-up text equals BPE over the whole text.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use serde_json::Value;
use tokenizers::Tokenizer;

pub use crate::bytelevel::ByteLevelBpe;

pub struct FastBpe {
    vocab: AHashMap<String, u32>,
    merges: MergeMap,
    /// `<0xNN>` ids, when byte fallback is on (all 256 present).
    bytes: Option<Vec<u32>>,
    unk: Option<u32>,
    fuse_unk: bool,
    /// Added tokens matched in the raw text (content, id), longest first.
    added: Vec<(String, u32)>,
    /// The post-processor's tokens around the sequence.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    /// Whether the text may be cut into words at `▁` runs (see the module docs).
    split_words: bool,
    max_len: usize,
}

/// Word → ids, for one batch: the ids of all its words in one buffer, so that a new word costs
/// one allocation (its key) and dropping the cache a few.
#[derive(Default)]
pub struct WordCache {
    /// Word → (start, length) in `ids`.
    words: AHashMap<Box<str>, (usize, usize)>,
    ids: Vec<u32>,
}

impl WordCache {
    pub(crate) fn get(&self, word: &str) -> Option<&[u32]> {
        self.words
            .get(word)
            .map(|&(start, len)| &self.ids[start..start + len])
    }

    pub(crate) fn insert(&mut self, word: &str, ids: &[u32]) {
        self.words.insert(word.into(), (self.ids.len(), ids.len()));
        self.ids.extend_from_slice(ids);
    }
}

/// The fast encoder for a tokenizer, if one reproduces it: [`FastBpe`] for SentencePiece-style
/// BPE, [`ByteLevelBpe`] for byte-level BPE (GPT-2, GPT-NeoX, Llama-3, Qwen2…). `None`: the
/// library encodes.
pub enum FastEncoder {
    SentencePiece(FastBpe),
    ByteLevel(ByteLevelBpe),
}

impl FastEncoder {
    pub fn new(tok: &Tokenizer, max_len: usize) -> Option<Self> {
        if let Some(f) = FastBpe::new(tok, max_len) {
            return Some(FastEncoder::SentencePiece(f));
        }
        ByteLevelBpe::new(tok, max_len).map(FastEncoder::ByteLevel)
    }

    /// As [`FastBpe::encode`].
    pub fn encode(&self, text: &str, cache: &mut WordCache) -> (Vec<u32>, bool) {
        match self {
            FastEncoder::SentencePiece(f) => f.encode(text, cache),
            FastEncoder::ByteLevel(f) => f.encode(text, cache),
        }
    }

    /// The encoder's name, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            FastEncoder::SentencePiece(_) => "FastBpe",
            FastEncoder::ByteLevel(_) => "ByteLevelBpe",
        }
    }
}

impl FastBpe {
    /// Builds the encoder if `tok` is a tokenizer it reproduces exactly, truncating at `max_len`.
    pub fn new(tok: &Tokenizer, max_len: usize) -> Option<Self> {
        // Cheap checks first: serialising a large vocabulary only to refuse it costs time.
        if tok.get_pre_tokenizer().is_some()
            || !matches!(tok.get_model(), tokenizers::ModelWrapper::BPE(_))
        {
            return None;
        }
        let json: Value = serde_json::from_str(&tok.to_string(false).ok()?).ok()?;
        let expected_normalizer = serde_json::json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]});
        if json.get("normalizer") != Some(&expected_normalizer) || !json["pre_tokenizer"].is_null()
        {
            return None;
        }
        let model = &json["model"];
        if model["type"] != "BPE"
            || !model["dropout"].is_null()
            || !model["continuing_subword_prefix"].is_null()
            || !model["end_of_word_suffix"].is_null()
            || model["ignore_merges"].as_bool().unwrap_or(false)
        {
            return None;
        }
        let vocab = vocab(model)?;
        let merges = merges(model, &vocab)?;
        let bytes = if model["byte_fallback"].as_bool().unwrap_or(false) {
            // With a missing byte token the library mixes unk and byte tokens in an order this
            // encoder does not copy; such vocabularies go to the library.
            Some(
                (0..=255u8)
                    .map(|b| vocab.get(&format!("<0x{b:02X}>")).copied())
                    .collect::<Option<Vec<u32>>>()?,
            )
        } else {
            None
        };
        let unk = match &model["unk_token"] {
            Value::String(u) => Some(*vocab.get(u)?),
            _ => None,
        };
        if bytes.is_none() && unk.is_none() {
            return None; // the library fails on unknown characters; let it say so
        }
        let mut added = Vec::new();
        for t in json["added_tokens"].as_array()? {
            if t["normalized"].as_bool()?
                || t["lstrip"].as_bool()?
                || t["rstrip"].as_bool()?
                || t["single_word"].as_bool()?
            {
                return None;
            }
            added.push((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32));
        }
        added.sort_by_key(|a| std::cmp::Reverse(a.0.len()));
        let (prefix, suffix) = template(&json["post_processor"])?;
        let split_words = vocab.contains_key("▁")
            && !vocab.keys().any(|t| {
                let mut prev: Option<char> = None;
                t.chars().any(|c| {
                    let hit = c == '▁' && prev.is_some_and(|p| p != '▁');
                    prev = Some(c);
                    hit
                })
            });
        if max_len <= prefix.len() + suffix.len() {
            return None;
        }
        Some(FastBpe {
            vocab,
            merges,
            bytes,
            unk,
            fuse_unk: model["fuse_unk"].as_bool().unwrap_or(false),
            added,
            prefix,
            suffix,
            split_words,
            max_len,
        })
    }

    /// The ids of `text` with the post-processor's special tokens, truncated as the library
    /// truncates (room is kept for the special tokens); and whether it was truncated.
    pub fn encode(&self, text: &str, cache: &mut WordCache) -> (Vec<u32>, bool) {
        let mut ids = Vec::with_capacity(text.len() / 3 + 4);
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_added(rest) {
                Some((start, len, id)) => {
                    self.encode_piece(&rest[..start], &mut ids, cache);
                    ids.push(id);
                    rest = &rest[start + len..];
                }
                None => {
                    self.encode_piece(rest, &mut ids, cache);
                    break;
                }
            }
        }
        let room = self.max_len - self.prefix.len() - self.suffix.len();
        let truncated = ids.len() > room;
        ids.truncate(room);
        let mut out = Vec::with_capacity(ids.len() + self.prefix.len() + self.suffix.len());
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(&ids);
        out.extend_from_slice(&self.suffix);
        (out, truncated)
    }

    /// The leftmost added token in `text` (the longest, among those starting there).
    fn next_added(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (content, id) in &self.added {
            if let Some(pos) = text.find(content.as_str()) {
                if best.is_none_or(|(b, _, _)| pos < b) {
                    best = Some((pos, content.len(), *id));
                }
            }
        }
        best
    }

    /// Normalizes one stretch of text between added tokens and BPE-encodes it.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>, cache: &mut WordCache) {
        if piece.is_empty() {
            return;
        }
        let mut normalized = String::with_capacity(piece.len() + 8);
        normalized.push('▁');
        for c in piece.chars() {
            normalized.push(if c == ' ' { '▁' } else { c });
        }
        if !self.split_words {
            ids.extend(self.bpe_word(&normalized));
            return;
        }
        // Cut before each run of `▁` that follows another character.
        let mut start = 0;
        let mut prev_is_space = true;
        for (i, c) in normalized.char_indices() {
            let is_space = c == '▁';
            if is_space && !prev_is_space {
                self.cached_word(&normalized[start..i], ids, cache);
                start = i;
            }
            prev_is_space = is_space;
        }
        self.cached_word(&normalized[start..], ids, cache);
    }

    fn cached_word(&self, word: &str, ids: &mut Vec<u32>, cache: &mut WordCache) {
        if let Some(hit) = cache.get(word) {
            ids.extend_from_slice(hit);
            return;
        }
        let out = self.bpe_word(word);
        ids.extend_from_slice(&out);
        cache.insert(word, &out);
    }

    /// BPE of one word (see [`merge`]).
    fn bpe_word(&self, word: &str) -> Vec<u32> {
        let mut symbols: Vec<u32> = Vec::with_capacity(word.len());
        let mut pending_unk: Option<u32> = None;
        for (i, c) in word.char_indices() {
            let s = &word[i..i + c.len_utf8()];
            if let Some(&id) = self.vocab.get(s) {
                if let Some(u) = pending_unk.take() {
                    symbols.push(u);
                }
                symbols.push(id);
            } else if let Some(bytes) = &self.bytes {
                symbols.extend(s.bytes().map(|b| bytes[b as usize]));
            } else if let Some(unk) = self.unk {
                match pending_unk {
                    Some(_) if self.fuse_unk => {}
                    Some(u) => {
                        symbols.push(u);
                        pending_unk = Some(unk);
                    }
                    None => pending_unk = Some(unk),
                }
            }
        }
        if let Some(u) = pending_unk {
            symbols.push(u);
        }
        let mut out = Vec::with_capacity(symbols.len());
        merge(&self.merges, &symbols, &mut out);
        out
    }
}

/// (left, right) → (rank, merged id), as the library's BPE keeps its merges.
pub(crate) type MergeMap = AHashMap<(u32, u32), (u32, u32)>;

/// A BPE model's vocabulary (token → id) from its tokenizer.json `model`.
pub(crate) fn vocab(model: &Value) -> Option<AHashMap<String, u32>> {
    model["vocab"]
        .as_object()?
        .iter()
        .map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
        .collect()
}

/// A BPE model's merges, ranked in file order (a repeated pair keeps its last rank, as in the
/// library); `None` if one names a token outside `vocab`.
pub(crate) fn merges(model: &Value, vocab: &AHashMap<String, u32>) -> Option<MergeMap> {
    let mut merges = AHashMap::new();
    for (rank, m) in model["merges"].as_array()?.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => s.split_once(' ')?,
            Value::Array(p) if p.len() == 2 => (p[0].as_str()?, p[1].as_str()?),
            _ => return None,
        };
        let merged = vocab.get(&format!("{a}{b}"))?;
        merges.insert((*vocab.get(a)?, *vocab.get(b)?), (rank as u32, *merged));
    }
    Some(merges)
}

/// BPE-merges `ids` (one word's symbols) into `out`, merging the lowest-ranked pair first
/// (leftmost among equals), as the library's `Word::merge_all` does.
///
/// The library keeps a heap of candidate pairs and drops stale ones as it pops them; an entry
/// is live exactly when its pair is still there (the merged token names the pair), so it always
/// applies the live pair of least (rank, position). Short words get the same order from a scan
/// of the pairs' ranks (no heap, no allocation); long ones from a heap, as the library does.
pub(crate) fn merge(merges: &MergeMap, ids: &[u32], out: &mut Vec<u32>) {
    if ids.len() < 2 {
        out.extend_from_slice(ids);
        return;
    }
    if ids.len() <= SHORT_WORD {
        return merge_short(merges, ids, out);
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(ids.len());
    for &id in ids {
        push(&mut symbols, id);
    }
    let mut queue = BinaryHeap::with_capacity(symbols.len());
    for i in 0..symbols.len() - 1 {
        if let Some(&(rank, new_id)) = merges.get(&(symbols[i].id, symbols[i + 1].id)) {
            queue.push(Merge {
                pos: i,
                rank,
                new_id,
            });
        }
    }
    while let Some(top) = queue.pop() {
        if symbols[top.pos].removed {
            continue;
        }
        let Some(next) = symbols[top.pos].next else {
            continue;
        };
        let pair = (symbols[top.pos].id, symbols[next].id);
        if merges.get(&pair).is_none_or(|&(_, id)| id != top.new_id) {
            continue; // a stale entry: one side has changed since it was queued
        }
        symbols[top.pos].id = top.new_id;
        symbols[next].removed = true;
        let after = symbols[next].next;
        symbols[top.pos].next = after;
        if let Some(a) = after {
            symbols[a].prev = Some(top.pos);
        }
        if let Some(p) = symbols[top.pos].prev {
            if let Some(&(rank, new_id)) = merges.get(&(symbols[p].id, top.new_id)) {
                queue.push(Merge {
                    pos: p,
                    rank,
                    new_id,
                });
            }
        }
        if let Some(a) = after {
            if let Some(&(rank, new_id)) = merges.get(&(top.new_id, symbols[a].id)) {
                queue.push(Merge {
                    pos: top.pos,
                    rank,
                    new_id,
                });
            }
        }
    }
    out.extend(symbols.iter().filter(|s| !s.removed).map(|s| s.id));
}

/// The longest word [`merge_short`] takes.
const SHORT_WORD: usize = 64;

/// [`merge`] for words of 2 to [`SHORT_WORD`] symbols.
fn merge_short(merges: &MergeMap, ids: &[u32], out: &mut Vec<u32>) {
    const NONE: (u32, u32) = (u32::MAX, 0);
    let pair = |a: u32, b: u32| merges.get(&(a, b)).copied().unwrap_or(NONE);
    let mut len = ids.len();
    let mut symbols = [0u32; SHORT_WORD];
    symbols[..len].copy_from_slice(ids);
    // (rank, merged id) of each adjacent pair.
    let mut pairs = [NONE; SHORT_WORD];
    for i in 0..len - 1 {
        pairs[i] = pair(symbols[i], symbols[i + 1]);
    }
    loop {
        let mut at = 0;
        for i in 1..len - 1 {
            if pairs[i].0 < pairs[at].0 {
                at = i;
            }
        }
        if pairs[at].0 == u32::MAX {
            break;
        }
        symbols[at] = pairs[at].1;
        symbols.copy_within(at + 2..len, at + 1);
        if at + 3 < len {
            pairs.copy_within(at + 2..len - 1, at + 1);
        }
        len -= 1;
        if at > 0 {
            pairs[at - 1] = pair(symbols[at - 1], symbols[at]);
        }
        if at + 1 < len {
            pairs[at] = pair(symbols[at], symbols[at + 1]);
        } else {
            pairs[at] = NONE;
        }
        if len == 1 {
            break;
        }
    }
    out.extend_from_slice(&symbols[..len]);
}

fn push(symbols: &mut Vec<Symbol>, id: u32) {
    let i = symbols.len();
    if let Some(last) = symbols.last_mut() {
        last.next = Some(i);
    }
    symbols.push(Symbol {
        id,
        prev: i.checked_sub(1),
        next: None,
        removed: false,
    });
}

/// The special-token ids a `TemplateProcessing` puts before and after a single sequence.
pub(crate) fn template(pp: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    if pp.is_null() {
        return Some((Vec::new(), Vec::new()));
    }
    if pp["type"] != "TemplateProcessing" {
        return None;
    }
    let (mut prefix, mut suffix, mut seen_a) = (Vec::new(), Vec::new(), false);
    for piece in pp["single"].as_array()? {
        if let Some(tok) = piece.get("SpecialToken") {
            let name = tok["id"].as_str()?;
            let ids: Vec<u32> = pp["special_tokens"][name]["ids"]
                .as_array()?
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32))
                .collect::<Option<_>>()?;
            if seen_a {
                suffix.extend(ids);
            } else {
                prefix.extend(ids);
            }
        } else if piece.get("Sequence").is_some() && !seen_a {
            seen_a = true;
        } else {
            return None;
        }
    }
    seen_a.then_some((prefix, suffix))
}

struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    removed: bool,
}

#[derive(PartialEq, Eq)]
struct Merge {
    pos: usize,
    rank: u32,
    new_id: u32,
}

impl Ord for Merge {
    // A max-heap that pops the lowest rank first, then the leftmost position.
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then(other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
