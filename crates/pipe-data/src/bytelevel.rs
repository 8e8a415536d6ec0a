//! A lean encoder for byte-level BPE tokenizers (GPT-2, GPT-NeoX, Llama-3, Qwen2, SmolLM…).
//! It gives the ids the `tokenizers` library gives — randomized comparison tests hold it to
//! that — without the library's offset bookkeeping, and with [`FastBpe`]'s per-batch word
//! cache and merges.
//!
//! [`ByteLevelBpe::new`] accepts a tokenizer only when every part is one it reproduces exactly;
//! anything else (`None`) is encoded by the library:
//!
//! - normalizer: none or `NFC` (the library's own NFC, skipped for text below U+0300, which
//!   NFC leaves as it is);
//! - pre-tokenizer: `ByteLevel(add_prefix_space, use_regex)`, alone or last in a `Sequence`
//!   after `Split`s (one of the known regexes below, `Isolated`, not inverted) and `Digits`;
//! - model: BPE over the 256 byte characters (all in the vocabulary), no dropout, no
//!   subword prefix or suffix, `ignore_merges` as the library does it (a word that is a
//!   vocabulary token is that token);
//! - post-processor: none, `ByteLevel`, `TemplateProcessing`, or a `Sequence` of these with
//!   at most one template;
//! - added tokens: matched as the library matches them — leftmost-longest, the non-normalized
//!   ones in the raw text, then the normalized ones in each normalized piece — with `lstrip` and
//!   `rstrip`; `single_word` tokens are refused.
//!
//! The known regexes — GPT-2's (also ByteLevel's own), Llama-3's, Qwen2's — are matched by
//! hand-written scanners that follow Oniguruma's backtracking rule for rule, several times
//! faster than the regex engine. Their character classes (`\p{L}`, `\p{N}`, `\s`) are
//! Oniguruma's own, asked of it once per 256 code points on first use, so that both agree
//! whatever Unicode version each was built with.
//!
//! [`FastBpe`]: crate::fastbpe::FastBpe

use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};

use ahash::AHashMap;
use serde_json::Value;
use tokenizers::utils::SysRegex;
use tokenizers::{NormalizedString, Tokenizer, TruncationDirection};

use crate::fastbpe::{merge, merges, template, vocab, MergeMap, WordCache};

/// GPT-2's pre-tokenizer regex, also the one `ByteLevel(use_regex: true)` applies.
pub const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama-3's `Split` regex.
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's `Split` regex: Llama-3's with one digit a piece.
pub const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct ByteLevelBpe {
    /// The id of each byte's one-character token.
    byte_ids: Box<[u32; 256]>,
    merges: MergeMap,
    /// With `ignore_merges`: the vocabulary by the bytes of its tokens.
    whole_words: Option<AHashMap<Box<[u8]>, u32>>,
    nfc: bool,
    /// Added tokens matched in the raw text.
    raw_added: Added,
    /// Added tokens matched in the normalized pieces between those.
    normalized_added: Added,
    /// The pre-tokenizer, as steps applied to each piece in turn.
    steps: Vec<Step>,
    /// The post-processor's tokens around the sequence.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    max_len: usize,
}

impl ByteLevelBpe {
    /// Builds the encoder if `tok` is a tokenizer it reproduces exactly, truncating at `max_len`.
    pub fn new(tok: &Tokenizer, max_len: usize) -> Option<Self> {
        // Cheap checks first: serialising a large vocabulary only to refuse it costs time.
        if tok.get_pre_tokenizer().is_none()
            || !matches!(tok.get_model(), tokenizers::ModelWrapper::BPE(_))
            || tok.get_padding().is_some()
            || tok.get_added_vocabulary().get_encode_special_tokens()
            || tok.get_truncation().is_some_and(|t| {
                t.stride != 0 || !matches!(t.direction, TruncationDirection::Right)
            })
        {
            return None;
        }
        let json: Value = serde_json::from_str(&tok.to_string(false).ok()?).ok()?;
        let nfc = normalizer_is_nfc(&json["normalizer"])?;
        let steps = pre_tokenizer_steps(&json["pre_tokenizer"])?;
        let model = &json["model"];
        if model["type"] != "BPE"
            || !(model["dropout"].is_null() || model["dropout"].as_f64() == Some(0.0))
            || !model["continuing_subword_prefix"].is_null()
            || !model["end_of_word_suffix"].is_null()
        {
            return None;
        }
        let vocab = vocab(model)?;
        let merges = merges(model, &vocab)?;
        // Every byte that UTF-8 text can hold has its token (GPT-NeoX's vocabulary lacks the
        // others: 0xC0, 0xC1, 0xF5–0xFF), so the model's unknown-token and byte-fallback rules
        // never apply.
        let chars = byte_chars();
        let mut byte_ids = Box::new([u32::MAX; 256]);
        for (b, c) in chars.iter().enumerate() {
            match vocab.get(c.encode_utf8(&mut [0; 4]) as &str) {
                Some(&id) => byte_ids[b] = id,
                None if matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF) => {}
                None => return None,
            }
        }
        let whole_words = if model["ignore_merges"].as_bool().unwrap_or(false) {
            let mut char_byte = AHashMap::new();
            for (b, c) in chars.iter().enumerate() {
                char_byte.insert(*c, b as u8);
            }
            Some(
                vocab
                    .iter()
                    .filter_map(|(t, &id)| {
                        let bytes: Option<Box<[u8]>> =
                            t.chars().map(|c| char_byte.get(&c).copied()).collect();
                        Some((bytes?, id))
                    })
                    .collect(),
            )
        } else {
            None
        };
        let (raw_added, normalized_added) = added_tokens(&json["added_tokens"], nfc)?;
        let (prefix, suffix) = post_processor(&json["post_processor"])?;
        if max_len <= prefix.len() + suffix.len() {
            return None;
        }
        Some(ByteLevelBpe {
            byte_ids,
            merges,
            whole_words,
            nfc,
            raw_added,
            normalized_added,
            steps,
            prefix,
            suffix,
            max_len,
        })
    }

    /// The ids of `text` with the post-processor's special tokens, truncated as the library
    /// truncates (room is kept for the special tokens); and whether it was truncated.
    pub fn encode(&self, text: &str, cache: &mut WordCache) -> (Vec<u32>, bool) {
        let mut ids = Vec::with_capacity(text.len() / 3 + 4 + self.prefix.len());
        ids.extend_from_slice(&self.prefix);
        self.raw_added.split(text, &mut |token, piece| match token {
            Some(id) => ids.push(id),
            None => self.encode_piece(piece, &mut ids, cache),
        });
        let end = self.max_len - self.suffix.len();
        let truncated = ids.len() > end;
        ids.truncate(end);
        ids.extend_from_slice(&self.suffix);
        (ids, truncated)
    }

    /// The pieces the pre-tokenizer cuts `text` into (no added tokens, no normalizer): for
    /// tests, which hold them to the library's.
    #[doc(hidden)]
    pub fn pre_tokenize(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        pre_tokenize(&self.steps, text, &mut |w| out.push(w.to_string()));
        out
    }

    /// One stretch of raw text between added tokens: normalized, cut at the normalized added
    /// tokens, pre-tokenized, each word BPE-encoded.
    fn encode_piece(&self, piece: &str, ids: &mut Vec<u32>, cache: &mut WordCache) {
        let piece = if self.nfc {
            nfc(piece)
        } else {
            Cow::Borrowed(piece)
        };
        self.normalized_added
            .split(&piece, &mut |token, p| match token {
                Some(id) => ids.push(id),
                None => pre_tokenize(&self.steps, p, &mut |word| {
                    self.encode_word(word, ids, cache)
                }),
            });
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<u32>, cache: &mut WordCache) {
        if let [b] = word.as_bytes() {
            // Punctuation, a line break: its byte's token, cheaper than a cache lookup.
            ids.push(self.byte_ids[*b as usize]);
            return;
        }
        if let Some(hit) = cache.get(word) {
            ids.extend_from_slice(hit);
            return;
        }
        let start = ids.len();
        match self
            .whole_words
            .as_ref()
            .and_then(|w| w.get(word.as_bytes()))
        {
            Some(&id) => ids.push(id),
            None if word.len() <= 64 => {
                let mut symbols = [0u32; 64];
                for (s, b) in symbols.iter_mut().zip(word.bytes()) {
                    *s = self.byte_ids[b as usize];
                }
                merge(&self.merges, &symbols[..word.len()], ids);
            }
            None => {
                let symbols: Vec<u32> = word.bytes().map(|b| self.byte_ids[b as usize]).collect();
                merge(&self.merges, &symbols, ids);
            }
        }
        cache.insert(word, &ids[start..]);
    }
}

/// The pieces `regex` (one of the known ones) cuts `text` into, or `None` for another regex:
/// for tests, which hold them to Oniguruma's.
#[doc(hidden)]
pub fn regex_pieces<'t>(regex: &str, text: &'t str) -> Option<Vec<&'t str>> {
    let pattern = Pattern::known(regex)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let end = pattern.piece_end(text, i);
        out.push(&text[i..end]);
        i = end;
    }
    Some(out)
}

/// NFC as the library does it. A text is left as it is when each of its characters is
/// NFC_QC=Yes with combining class 0: all below U+0300 (no byte from 0xCC up), and the general
/// punctuation from U+2002 (quotes, dashes, ellipsis; U+2000 and U+2001 become U+2002 and
/// U+2003).
fn nfc(s: &str) -> Cow<'_, str> {
    if s.bytes().all(|b| b < 0xCC)
        || s.chars()
            .all(|c| (c as u32) < 0x300 || ('\u{2002}'..='\u{206f}').contains(&c))
    {
        return Cow::Borrowed(s);
    }
    let mut n = NormalizedString::from(s);
    n.nfc();
    Cow::Owned(n.get().to_string())
}

/// Whether the normalizer is NFC (`Some(false)`: there is none; `None`: another).
fn normalizer_is_nfc(n: &Value) -> Option<bool> {
    if n.is_null() {
        return Some(false);
    }
    match n["type"].as_str()? {
        "NFC" => Some(true),
        "Sequence" => {
            let parts = n["normalizers"].as_array()?;
            parts
                .iter()
                .all(|p| p["type"] == "NFC")
                .then_some(!parts.is_empty())
        }
        _ => None,
    }
}

/// One pre-tokenizer step, applied to every piece the steps before it made.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    /// ByteLevel's `add_prefix_space`: a piece not starting with a space gets one.
    PrefixSpace,
    /// A split by one of the known regexes, every match a piece (`Isolated`).
    Regex(Pattern),
    /// `Digits`: every numeric character a piece (`individual_digits`), or every run of them.
    Digits { individual: bool },
}

/// The pre-tokenizer as steps, if made only of parts reproduced here, ending in `ByteLevel`
/// (anything after it would see byte characters).
fn pre_tokenizer_steps(pt: &Value) -> Option<Vec<Step>> {
    let parts: Vec<&Value> = match pt["type"].as_str()? {
        "Sequence" => pt["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pt],
    };
    let (last, before) = parts.split_last()?;
    if last["type"] != "ByteLevel" {
        return None;
    }
    let mut steps = Vec::new();
    for p in before {
        match p["type"].as_str()? {
            "Split" => {
                if p["behavior"] != "Isolated" || p["invert"] != false {
                    return None;
                }
                steps.push(Step::Regex(Pattern::known(
                    p["pattern"]["Regex"].as_str()?,
                )?));
            }
            "Digits" => steps.push(Step::Digits {
                individual: p["individual_digits"].as_bool()?,
            }),
            _ => return None,
        }
    }
    if last["add_prefix_space"].as_bool()? {
        steps.push(Step::PrefixSpace);
    }
    if last["use_regex"].as_bool().unwrap_or(true) {
        steps.push(Step::Regex(Pattern::Gpt2));
    }
    Some(steps)
}

/// Runs `steps` over `piece`, handing each final non-empty piece to `f` (the library drops
/// empty pieces at every step).
fn pre_tokenize(steps: &[Step], piece: &str, f: &mut dyn FnMut(&str)) {
    if piece.is_empty() {
        return;
    }
    let Some((step, rest)) = steps.split_first() else {
        return f(piece);
    };
    match *step {
        Step::PrefixSpace => {
            if piece.starts_with(' ') {
                pre_tokenize(rest, piece, f);
            } else {
                pre_tokenize(rest, &format!(" {piece}"), f);
            }
        }
        Step::Regex(pattern) => {
            let mut i = 0;
            while i < piece.len() {
                let end = pattern.piece_end(piece, i);
                pre_tokenize(rest, &piece[i..end], f);
                i = end;
            }
        }
        Step::Digits { individual } => {
            // The library's `char::is_numeric`, cut as `Isolated` or `Contiguous` cuts.
            let mut start = 0;
            let mut prev_numeric = false;
            for (i, c) in piece.char_indices() {
                let numeric = c.is_numeric();
                if i > start && (numeric != prev_numeric || (numeric && individual)) {
                    pre_tokenize(rest, &piece[start..i], f);
                    start = i;
                }
                prev_numeric = numeric;
            }
            pre_tokenize(rest, &piece[start..], f);
        }
    }
}

/// The regexes scanned by hand.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pattern {
    /// [`GPT2_REGEX`].
    Gpt2,
    /// [`LLAMA3_REGEX`] (`max_digits` 3) and [`QWEN2_REGEX`] (1).
    Llama3 { max_digits: usize },
}

impl Pattern {
    fn known(regex: &str) -> Option<Pattern> {
        match regex {
            GPT2_REGEX => Some(Pattern::Gpt2),
            LLAMA3_REGEX => Some(Pattern::Llama3 { max_digits: 3 }),
            QWEN2_REGEX => Some(Pattern::Llama3 { max_digits: 1 }),
            _ => None,
        }
    }

    /// Where the match starting at `i` ends. Both regexes match at every position (each
    /// character is a letter, a number, a space or none of these, and some branch takes each),
    /// so the matches tile the text; the first branch that matches wins, each quantifier as
    /// greedy as the rest of its branch allows — Oniguruma's rule.
    fn piece_end(self, s: &str, i: usize) -> usize {
        match self {
            Pattern::Gpt2 => gpt2_end(s, i),
            Pattern::Llama3 { max_digits } => llama3_end(s, i, max_digits),
        }
    }
}

/// A character's class for the regexes: `\p{L}`, `\p{N}`, `\s`, or none of these
/// (`[^\s\p{L}\p{N}]`). Unicode keeps the three apart (letters and numbers are general
/// categories, and White_Space characters are separators or controls).
const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn gpt2_end(s: &str, i: usize) -> usize {
    let b = s.as_bytes();
    if b[i] == b'\'' {
        match &b[i + 1..] {
            [b's' | b't' | b'm' | b'd', ..] => return i + 2,
            [b'r' | b'v', b'e', ..] | [b'l', b'l', ..] => return i + 3,
            _ => {}
        }
    }
    let (c, len) = char_at(s, i);
    let k = class(c);
    if c == ' ' && i + 1 < s.len() {
        let next = class(char_at(s, i + 1).0);
        if next != SPACE {
            return run_end(s, i + 1, next);
        }
    }
    if k != SPACE {
        return run_end(s, i + len, k);
    }
    space_end(s, i)
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn llama3_end(s: &str, i: usize, max_digits: usize) -> usize {
    let b = s.as_bytes();
    if b[i] == b'\'' {
        if let Some(end) = contraction_ci(s, i + 1) {
            return end;
        }
    }
    let (c, len) = char_at(s, i);
    let k = class(c);
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if k == LETTER {
        return run_end(s, i + len, LETTER);
    }
    if c != '\r'
        && c != '\n'
        && k != NUMBER
        && i + len < s.len()
        && class(char_at(s, i + len).0) == LETTER
    {
        return run_end(s, i + len, LETTER);
    }
    // \p{N}{1,max_digits}
    if k == NUMBER {
        let mut end = i + len;
        for _ in 1..max_digits {
            if end == s.len() {
                break;
            }
            let (d, dlen) = char_at(s, end);
            if class(d) != NUMBER {
                break;
            }
            end += dlen;
        }
        return end;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let others_from = if k == OTHER {
        Some(i)
    } else if c == ' ' && i + 1 < s.len() && class(char_at(s, i + 1).0) == OTHER {
        Some(i + 1)
    } else {
        None
    };
    if let Some(from) = others_from {
        let mut end = run_end(s, from, OTHER);
        while end < s.len() && matches!(b[end], b'\r' | b'\n') {
            end += 1;
        }
        return end;
    }
    // \s*[\r\n]+ : the spaces up to and with the last line break among them.
    let j = run_end(s, i, SPACE);
    if let Some(p) = b[i..j].iter().rposition(|&x| matches!(x, b'\r' | b'\n')) {
        return i + p + 1;
    }
    space_end(s, i)
}

/// `\s+(?!\S)|\s+` at a space: the run of spaces, less its last one when a non-space follows
/// (and the run has more than one).
fn space_end(s: &str, i: usize) -> usize {
    let j = run_end(s, i, SPACE);
    if j == s.len() {
        return j;
    }
    let b = s.as_bytes();
    let mut last = j - 1;
    while b[last] & 0xC0 == 0x80 {
        last -= 1;
    }
    if last > i {
        last
    } else {
        j
    }
}

/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)` after the apostrophe at `i - 1`: where it ends. Oniguruma's
/// case folding takes `ſ` (U+017F) for `s`; no other non-ASCII character folds to one of these
/// letters (a test asks Oniguruma about every character).
fn contraction_ci(s: &str, i: usize) -> Option<usize> {
    fn fold(c: char) -> char {
        if c == 'ſ' {
            's'
        } else {
            c.to_ascii_lowercase()
        }
    }
    if i >= s.len() {
        return None;
    }
    let (c1, len1) = char_at(s, i);
    let second = match fold(c1) {
        's' | 't' | 'm' | 'd' => return Some(i + len1),
        'r' | 'v' => 'e',
        'l' => 'l',
        _ => return None,
    };
    if i + len1 >= s.len() {
        return None;
    }
    let (c2, len2) = char_at(s, i + len1);
    (fold(c2) == second).then_some(i + len1 + len2)
}

#[inline]
fn char_at(s: &str, i: usize) -> (char, usize) {
    let b = s.as_bytes()[i];
    if b < 0x80 {
        (b as char, 1)
    } else {
        let c = s[i..].chars().next().expect("a character boundary");
        (c, c.len_utf8())
    }
}

/// The end of the run of characters of class `k` from `i`.
#[inline]
fn run_end(s: &str, mut i: usize, k: u8) -> usize {
    while i < s.len() {
        let (c, len) = char_at(s, i);
        if class(c) != k {
            break;
        }
        i += len;
    }
    i
}

/// Oniguruma's class of each code point, by blocks of 256.
static BLOCKS: [OnceLock<Box<[u8; 256]>>; 0x1100] = [const { OnceLock::new() }; 0x1100];

/// Later ones win, should Oniguruma ever put a character in two classes (the exhaustive test
/// would then fail, not loop).
static CLASS_REGEXES: LazyLock<[(u8, SysRegex); 3]> = LazyLock::new(|| {
    let re = |p: &str| SysRegex::new(p).expect("a valid regex");
    [
        (SPACE, re(r"\s+")),
        (NUMBER, re(r"\p{N}+")),
        (LETTER, re(r"\p{L}+")),
    ]
});

#[inline]
fn class(c: char) -> u8 {
    let cp = c as u32;
    BLOCKS[(cp >> 8) as usize].get_or_init(|| block_classes(cp >> 8))[(cp & 0xff) as usize]
}

/// Asks Oniguruma which code points of block `block` are letters, numbers and spaces.
fn block_classes(block: u32) -> Box<[u8; 256]> {
    let mut text = String::with_capacity(1024);
    // (byte offset in `text`, low byte of the code point), in order.
    let mut offsets = Vec::with_capacity(256);
    for low in 0..256u32 {
        if let Some(c) = char::from_u32(block << 8 | low) {
            offsets.push((text.len(), low as usize));
            text.push(c);
        }
    }
    let mut out = Box::new([0u8; 256]);
    for (class, re) in CLASS_REGEXES.iter() {
        for (start, end) in re.find_iter(&text) {
            let from = offsets.partition_point(|&(o, _)| o < start);
            for &(o, low) in &offsets[from..] {
                if o >= end {
                    break;
                }
                out[low] = *class;
            }
        }
    }
    out
}

/// GPT-2's map of bytes to printable characters, which byte-level vocabularies are written in.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..=255u8 {
        out[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).expect("below 512")
        };
    }
    out
}

/// The added tokens in a trie, matched leftmost-longest as the library's Aho-Corasick
/// automaton (`MatchKind::LeftmostLongest`) matches them.
struct Added {
    /// Node 0 is the root; a node's children by byte, and the token (index) ending there.
    nodes: Vec<Node>,
    /// The root's children by first byte (0: none), to skip non-starting bytes fast.
    first: Box<[u32; 256]>,
    tokens: Vec<AddedToken>,
}

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    token: Option<usize>,
}

struct AddedToken {
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

impl Added {
    /// `None` if two tokens have the same pattern, a pattern is empty, or an `rstrip` token
    /// shares the trie with one that starts with a space (the library's splits could then
    /// overlap).
    fn new(tokens: Vec<(String, AddedToken)>) -> Option<Added> {
        let any_rstrip = tokens.iter().any(|(_, t)| t.rstrip);
        let mut added = Added {
            nodes: vec![Node::default()],
            first: Box::new([0; 256]),
            tokens: Vec::with_capacity(tokens.len()),
        };
        for (pattern, token) in tokens {
            if pattern.is_empty()
                || (any_rstrip && pattern.chars().next().is_some_and(char::is_whitespace))
            {
                return None;
            }
            let mut node = 0;
            for &byte in pattern.as_bytes() {
                node = match added.nodes[node].children.iter().find(|(b, _)| *b == byte) {
                    Some(&(_, child)) => child as usize,
                    None => {
                        let child = added.nodes.len();
                        added.nodes.push(Node::default());
                        added.nodes[node].children.push((byte, child as u32));
                        if node == 0 {
                            added.first[byte as usize] = child as u32;
                        }
                        child
                    }
                };
            }
            if added.nodes[node].token.is_some() {
                return None;
            }
            added.nodes[node].token = Some(added.tokens.len());
            added.tokens.push(token);
        }
        Some(added)
    }

    /// The longest token starting at `i`: (its length, its index).
    fn longest_at(&self, b: &[u8], i: usize) -> Option<(usize, usize)> {
        let mut node = self.first[b[i] as usize] as usize;
        if node == 0 {
            return None;
        }
        let mut best = self.nodes[node].token.map(|t| (1, t));
        let mut j = i + 1;
        while j < b.len() {
            match self.nodes[node].children.iter().find(|(c, _)| *c == b[j]) {
                Some(&(_, child)) => node = child as usize,
                None => break,
            }
            j += 1;
            if let Some(t) = self.nodes[node].token {
                best = Some((j - i, t));
            }
        }
        best
    }

    /// Cuts `text` at the added tokens as the library's `AddedVocabulary::find_matches`
    /// does, handing `f` each stretch of text (`None`) and each token (`Some(id)`) in order.
    fn split(&self, text: &str, f: &mut dyn FnMut(Option<u32>, &str)) {
        if self.tokens.is_empty() {
            if !text.is_empty() {
                f(None, text);
            }
            return;
        }
        let b = text.as_bytes();
        let mut start_offset = 0;
        let mut i = 0;
        while i < b.len() {
            let Some((len, t)) = self.longest_at(b, i) else {
                i += 1;
                continue;
            };
            let token = &self.tokens[t];
            let (mut start, mut stop) = (i, i + len);
            i = stop;
            if token.lstrip {
                // The library's `\s*$` (the regex crate's `\s` is White_Space, as is
                // `char::is_whitespace`).
                start = text[..start].trim_end().len().max(start_offset);
            }
            if token.rstrip {
                stop += text[stop..].len() - text[stop..].trim_start().len();
            }
            if start_offset < start {
                f(None, &text[start_offset..start]);
            }
            f(Some(token.id), &text[start..stop]);
            start_offset = stop;
        }
        if start_offset < b.len() {
            f(None, &text[start_offset..]);
        }
    }
}

/// The added tokens: those matched in the raw text, and the normalized ones (matched, by their
/// normalized content, in the normalized text).
fn added_tokens(tokens: &Value, nfc: bool) -> Option<(Added, Added)> {
    let (mut raw, mut normalized) = (Vec::new(), Vec::new());
    let mut ids = ahash::AHashSet::new();
    for t in tokens.as_array()? {
        if t["single_word"].as_bool()? {
            return None;
        }
        let id = u32::try_from(t["id"].as_u64()?).ok()?;
        if !ids.insert(id) {
            return None; // the library would take one token's flags for both
        }
        let content = t["content"].as_str()?;
        let token = AddedToken {
            id,
            lstrip: t["lstrip"].as_bool()?,
            rstrip: t["rstrip"].as_bool()?,
        };
        if t["normalized"].as_bool()? {
            let pattern = if nfc {
                self::nfc(content)
            } else {
                Cow::Borrowed(content)
            };
            normalized.push((pattern.into_owned(), token));
        } else {
            raw.push((content.to_string(), token));
        }
    }
    Some((Added::new(raw)?, Added::new(normalized)?))
}

/// The special-token ids the post-processor puts around a single sequence.
fn post_processor(pp: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    if pp.is_null() {
        return Some((Vec::new(), Vec::new()));
    }
    match pp["type"].as_str()? {
        // Offsets only.
        "ByteLevel" => Some((Vec::new(), Vec::new())),
        "TemplateProcessing" => template(pp),
        "Sequence" => {
            let mut out = (Vec::new(), Vec::new());
            let mut templates = 0;
            for p in pp["processors"].as_array()? {
                match p["type"].as_str()? {
                    "ByteLevel" => {}
                    "TemplateProcessing" => {
                        templates += 1;
                        out = template(p)?;
                    }
                    _ => return None,
                }
            }
            (templates <= 1).then_some(out)
        }
        _ => None,
    }
}
