//! ByteLevelBpe must give exactly the ids the `tokenizers` library gives, for byte-level BPE
//! tokenizers: GPT-NeoX-20B's real tokenizer.json (tests/fixtures/tokenize/gpt-neox: NFC,
//! ByteLevel with GPT-2's regex, normalized whitespace added tokens) and a Llama-3-style one
//! (crates/pipe-data/tests/fixtures/llama3-bytelevel, made by make_llama3_bytelevel.py: Llama-3's
//! Split regex, ignore_merges, a BOS template), plus variants of it (Qwen2's regex, SmolLM's
//! Digits, add_prefix_space, NFC, lstrip/rstrip/normalized added tokens). Random adversarial
//! texts — unicode of every width, emoji, combining marks, CJK, RTL, control characters, runs
//! of spaces, tabs and newlines, contractions in both cases, digit runs, added tokens inside
//! text, the empty string — are encoded both ways, with and without truncation.
//!
//! The hand-written regex scanners are also held to Oniguruma itself (the library's engine) on
//! every Unicode scalar value in several contexts. And tokenizers with a part ByteLevelBpe does
//! not reproduce must be refused (`None`), to be encoded by the library.
//!
//! `PROPTEST_CASES=5000 cargo test -p pipe-data --test bytelevel_matches_library` soaks longer.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::LazyLock;

use pipe_data::bytelevel::{regex_pieces, ByteLevelBpe, GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX};
use pipe_data::fastbpe::{FastEncoder, WordCache};
use pipe_data::tokenize::{load_tokenizer, prepare, set_encoding, TokenizeOptions};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokenizers::utils::SysRegex;
use tokenizers::Tokenizer;

fn repo_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenize")
        .join(name)
}

fn crate_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The same tokenizer two ways, at one max_len.
struct Pair {
    lib: Tokenizer,
    fast: ByteLevelBpe,
}

/// A tokenizer as the tokenize stage prepares it (a `[PAD]` token added), at a long and a
/// short max_len.
fn prepared(dir: PathBuf) -> Vec<Pair> {
    let mut loaded = load_tokenizer(&dir).unwrap();
    prepare(&mut loaded, &TokenizeOptions::default()).unwrap();
    [1 << 20, 24]
        .into_iter()
        .map(|max_len| {
            let mut lib = loaded.tokenizer.clone();
            set_encoding(&mut lib, max_len).unwrap();
            let fast = ByteLevelBpe::new(&lib, max_len)
                .unwrap_or_else(|| panic!("{} takes the fast path", dir.display()));
            Pair { lib, fast }
        })
        .collect()
}

/// A tokenizer made from JSON, at a long and a short max_len.
fn from_json(json: &Value) -> Vec<Pair> {
    [1 << 20, 24]
        .into_iter()
        .map(|max_len| {
            let mut lib = Tokenizer::from_str(&json.to_string()).unwrap();
            set_encoding(&mut lib, max_len).unwrap();
            let fast = ByteLevelBpe::new(&lib, max_len)
                .unwrap_or_else(|| panic!("takes the fast path: {}", json["pre_tokenizer"]));
            Pair { lib, fast }
        })
        .collect()
}

fn llama3_json() -> Value {
    let path = crate_fixture("llama3-bytelevel/tokenizer.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Appends an added token to a tokenizer.json (the library numbers it on loading).
fn add_token(json: &mut Value, content: &str, flags: Value) {
    let tokens = json["added_tokens"].as_array_mut().unwrap();
    let id = tokens
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .max()
        .unwrap()
        + 1;
    let mut t = json!({"id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true});
    for (k, v) in flags.as_object().unwrap() {
        t[k] = v.clone();
    }
    tokens.push(t);
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true,
        "use_regex": use_regex})
}

fn split(regex: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

static NEOX: LazyLock<Vec<Pair>> = LazyLock::new(|| prepared(repo_fixture("gpt-neox")));
static LLAMA3: LazyLock<Vec<Pair>> = LazyLock::new(|| prepared(crate_fixture("llama3-bytelevel")));

/// Qwen2's regex, merges applied (ignore_merges off), NFC, a ByteLevel post-processor, and
/// added tokens with lstrip/rstrip and normalized ones (NFC-matched).
static QWEN2_STYLE: LazyLock<Vec<Pair>> = LazyLock::new(|| {
    let mut j = llama3_json();
    j["pre_tokenizer"]["pretokenizers"][0] = split(QWEN2_REGEX);
    j["model"]["ignore_merges"] = json!(false);
    j["normalizer"] = json!({"type": "NFC"});
    j["post_processor"] = byte_level(false, true);
    add_token(&mut j, "<mask>", json!({"lstrip": true}));
    add_token(&mut j, "[SEP]", json!({"rstrip": true}));
    add_token(&mut j, "<both>", json!({"lstrip": true, "rstrip": true}));
    add_token(
        &mut j,
        "café",
        json!({"normalized": true, "special": false}),
    );
    add_token(
        &mut j,
        "e\u{301}t\u{e9}",
        json!({"normalized": true, "special": false}),
    );
    add_token(&mut j, "   ", json!({"normalized": true, "special": false}));
    add_token(
        &mut j,
        "\n\n",
        json!({"normalized": true, "special": false}),
    );
    from_json(&j)
});

/// GPT-2 style: ByteLevel alone with add_prefix_space, no template.
static GPT2_STYLE: LazyLock<Vec<Pair>> = LazyLock::new(|| {
    let mut j = llama3_json();
    j["pre_tokenizer"] = byte_level(true, true);
    j["post_processor"] = Value::Null;
    from_json(&j)
});

/// SmolLM style: Sequence[Digits(individual), ByteLevel(use_regex)].
static SMOLLM_STYLE: LazyLock<Vec<Pair>> = LazyLock::new(|| {
    let mut j = llama3_json();
    j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": true}, byte_level(false, true)]});
    j["model"]["ignore_merges"] = json!(false);
    from_json(&j)
});

/// Everything composed: contiguous Digits, Llama-3's Split, then ByteLevel adding prefix
/// spaces to every piece, and a template with a suffix too.
static COMPOSED: LazyLock<Vec<Pair>> = LazyLock::new(|| {
    let mut j = llama3_json();
    j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": false}, split(LLAMA3_REGEX),
        byte_level(true, false)]});
    let bos = j["post_processor"]["processors"][1]["special_tokens"]["<|begin_of_text|>"].clone();
    let eot = json!({"id": "<|eot_id|>", "ids": [2847], "tokens": ["<|eot_id|>"]});
    j["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": bos, "<|eot_id|>": eot}});
    from_json(&j)
});

/// Awkward pieces the random texts are made of.
const PIECES: &[&str] = &[
    "",
    "a",
    "the",
    "The",
    " the",
    "ing",
    "Hello",
    " tokenization",
    " naïve",
    "日本語",
    "123",
    "'s",
    "'S",
    "'t",
    "'T",
    "'re",
    "'RE",
    "'Re",
    "'rE",
    "'ve",
    "'VE",
    "'m",
    "'M",
    "'ll",
    "'LL",
    "'lL",
    "'d",
    "'D",
    "'ſ",
    "'",
    "''",
    "' s",
    "n't",
    "I'm",
    "we'LL",
    " ",
    "  ",
    "   ",
    "    ",
    "                         ",
    "\t",
    "\t\t",
    " \t",
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\r",
    " \n ",
    "\u{a0}",
    "\u{3000}",
    "\u{2028}",
    "\u{85}",
    "\u{b}",
    "\u{c}",
    "\u{0}",
    "\u{1f}",
    "\u{7f}",
    "\u{200b}",
    "\u{200d}",
    "\u{feff}",
    "\u{fe0f}",
    "é",
    "e\u{301}",
    "cafe\u{301}",
    "café",
    "e\u{301}té",
    "\u{301}",
    "a\u{308}\u{301}",
    "\u{1100}\u{1161}\u{11a8}",
    "한국어",
    "ﬁ",
    "ß",
    "İ",
    "Ω",
    "Å",
    "K",
    "😀",
    "👍🏽",
    "🇫🇷",
    "👨\u{200d}👩\u{200d}👧",
    "❤️",
    "中文",
    "東京",
    "。",
    "שלום",
    "مرحبا",
    "\u{202e}",
    "नमस्ते",
    "٣٤٥",
    "²",
    "½",
    "Ⅻ",
    "①",
    "0",
    "42",
    "1234567",
    "3.14159",
    "-",
    "...",
    "!!!",
    "$",
    "(x)",
    "::",
    "{",
    "}",
    "#",
    "###",
    "<",
    "<|",
    "|>",
    "<|endoftext|>",
    "<|padding|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eot_id|",
    "[PAD]",
    "[PAD",
    "|||EMAIL_ADDRESS|||",
    "|||IP_ADDRESS||",
    "<mask>",
    " <mask> ",
    "[SEP]",
    "[SEP]  x",
    "  <both>  ",
    "### Response:",
    "\u{10d50}",
    "\u{105c0}",
    "\u{1e5d0}",
    "\u{378}",
    "\u{e000}",
    "\u{ffff}",
    "\u{10ffff}",
];

/// Characters from ranges that stress the classes and NFC.
fn awkward_char() -> impl Strategy<Value = char> {
    proptest::char::ranges(
        vec![
            '\u{0}'..='\u{7f}',
            '\u{80}'..='\u{2ff}',
            '\u{300}'..='\u{36f}',
            '\u{370}'..='\u{6ff}',
            '\u{900}'..='\u{97f}',
            '\u{1100}'..='\u{11ff}',
            '\u{2000}'..='\u{206f}',
            '\u{2150}'..='\u{218f}',
            '\u{3000}'..='\u{30ff}',
            '\u{4e00}'..='\u{9fff}',
            '\u{ac00}'..='\u{d7a3}',
            '\u{f900}'..='\u{fb4f}',
            '\u{fe00}'..='\u{ffff}',
            '\u{10000}'..='\u{10fff}',
            '\u{1f300}'..='\u{1faff}',
            '\u{e0000}'..='\u{e01ef}',
        ]
        .into(),
    )
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(PIECES).prop_map(str::to_string),
            3 => awkward_char().prop_map(String::from),
            2 => any::<char>().prop_map(String::from),
            2 => "[ \t\n\r\u{a0}\u{3000}\u{2028}\u{85}]{1,8}",
            1 => "[0-9\u{660}-\u{669}\u{966}-\u{96f}\u{ff10}-\u{ff19}]{1,8}",
            2 => "[a-zA-Z]{1,10}",
            1 => "[ a-z'A-Z]{1,12}",
            // Long words: more than 64 bytes are merged with a heap, shorter ones by a scan.
            1 => "[a-f]{40,140}",
        ],
        0..40,
    )
    .prop_map(|pieces| pieces.concat())
}

fn check(pairs: &[Pair], text: &str) -> Result<(), TestCaseError> {
    for (n, p) in pairs.iter().enumerate() {
        let lib = p.lib.encode(text, true).unwrap();
        let mut cache = WordCache::default();
        // Twice with one cache: the second time from the cache.
        for round in 0..2 {
            let (ids, truncated) = p.fast.encode(text, &mut cache);
            prop_assert_eq!(
                &ids,
                lib.get_ids(),
                "max_len #{}, round {}: {:?}",
                n,
                round,
                text
            );
            prop_assert_eq!(truncated, !lib.get_overflowing().is_empty(), "{:?}", text);
        }
    }
    Ok(())
}

/// 1,000 cases a property, or `PROPTEST_CASES`.
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gpt_neox_matches_the_library(text in text()) {
        check(&NEOX, &text)?;
    }

    #[test]
    fn llama3_style_matches_the_library(text in text()) {
        check(&LLAMA3, &text)?;
    }

    #[test]
    fn qwen2_style_with_stripping_and_normalized_tokens_matches(text in text()) {
        check(&QWEN2_STYLE, &text)?;
    }

    #[test]
    fn gpt2_style_with_prefix_space_matches(text in text()) {
        check(&GPT2_STYLE, &text)?;
    }

    #[test]
    fn smollm_style_digits_match(text in text()) {
        check(&SMOLLM_STYLE, &text)?;
    }

    #[test]
    fn composed_pre_tokenizer_matches(text in text()) {
        check(&COMPOSED, &text)?;
    }

    #[test]
    fn scanners_cut_random_text_as_oniguruma(text in text()) {
        for (re, onig) in REGEXES.iter() {
            prop_assert_eq!(regex_pieces(re, &text).unwrap(), onig_pieces(onig, &text));
        }
    }
}

static REGEXES: LazyLock<Vec<(&str, SysRegex)>> = LazyLock::new(|| {
    [GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX]
        .into_iter()
        .map(|re| (re, SysRegex::new(re).unwrap()))
        .collect()
});

/// Oniguruma's matches, with any text between them (there should be none).
fn onig_pieces<'t>(re: &SysRegex, text: &'t str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut prev = 0;
    for (start, end) in re.find_iter(text) {
        if start > prev {
            out.push(&text[prev..start]);
        }
        out.push(&text[start..end]);
        prev = end;
    }
    if prev < text.len() {
        out.push(&text[prev..]);
    }
    out
}

/// Every Unicode scalar value, in contexts that exercise each branch of `regex`: after an
/// apostrophe (contractions, folded or not), after a space, between letters, digits, spaces
/// and line breaks, doubled, and at the end of the text.
fn cuts_every_character_as_oniguruma(regex: &str) {
    let onig = SysRegex::new(regex).unwrap();
    let chars: Vec<char> = (0..=0x10ffffu32).filter_map(char::from_u32).collect();
    for chunk in chars.chunks(4096) {
        let mut text = String::new();
        for &c in chunk {
            text.push_str(&format!(
                "'{c}'{c}e'r{c}'l{c} {c}{c}a{c}1{c}\n{c}\t {c}\r\n{c} "
            ));
        }
        let ours = regex_pieces(regex, &text).unwrap();
        let theirs = onig_pieces(&onig, &text);
        if ours != theirs {
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            panic!(
                "{regex}: first difference at piece {at:?}: ours {:?}, Oniguruma's {:?}",
                at.map(|i| &ours[i.saturating_sub(2)..(i + 3).min(ours.len())]),
                at.map(|i| &theirs[i.saturating_sub(2)..(i + 3).min(theirs.len())]),
            );
        }
    }
    // A piece ends at the end of the text too.
    for c in [
        "'", "'s", "'l", " ", "  ", "\n", " \n", "a", "1", "1234", "!", " !", "\r\n ",
    ] {
        assert_eq!(
            regex_pieces(regex, c).unwrap(),
            onig_pieces(&onig, c),
            "{c:?}"
        );
    }
}

#[test]
fn gpt2_scanner_cuts_every_character_as_oniguruma() {
    cuts_every_character_as_oniguruma(GPT2_REGEX);
}

#[test]
fn llama3_scanner_cuts_every_character_as_oniguruma() {
    cuts_every_character_as_oniguruma(LLAMA3_REGEX);
}

#[test]
fn qwen2_scanner_cuts_every_character_as_oniguruma() {
    cuts_every_character_as_oniguruma(QWEN2_REGEX);
}

#[test]
fn the_pre_tokenizers_cut_as_the_library() {
    let samples = [
        "Hello world! It's 2024, isn't it?\n\n  Indented\tTab 12345 ١٢٣ x²",
        "'S 'LL 'ſ  \r\n\r\n end  ",
        "",
        " ",
    ];
    for pairs in [
        &*LLAMA3,
        &*QWEN2_STYLE,
        &*GPT2_STYLE,
        &*SMOLLM_STYLE,
        &*COMPOSED,
    ] {
        let p = &pairs[0];
        let pt = p.lib.get_pre_tokenizer().unwrap();
        for s in samples {
            use tokenizers::PreTokenizer;
            let mut pre = tokenizers::PreTokenizedString::from(s);
            pt.pre_tokenize(&mut pre).unwrap();
            let lib: Vec<String> = pre
                .get_splits(
                    tokenizers::OffsetReferential::Original,
                    tokenizers::OffsetType::Byte,
                )
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect();
            let ours: Vec<String> = p
                .fast
                .pre_tokenize(s)
                .iter()
                .map(|w| byte_level_chars(w))
                .collect();
            assert_eq!(ours, lib, "{s:?}");
        }
    }
}

/// GPT-2's byte → character map, as the pre-tokenizer writes pieces.
fn byte_level_chars(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                b as char
            } else {
                let rank = (0..b)
                    .filter(|x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
                    .count();
                char::from_u32(256 + rank as u32).unwrap()
            }
        })
        .collect()
}

#[test]
fn ignore_merges_changes_ids_and_is_followed() {
    // " tokenization" is a vocabulary token without a merge making it: only ignore_merges
    // gives it, so the fixture really tests that flag.
    let with = &LLAMA3[0];
    let mut j = llama3_json();
    j["model"]["ignore_merges"] = json!(false);
    let without = &from_json(&j)[0];
    let text = "Hello tokenization";
    let a = with.lib.encode(text, true).unwrap();
    let b = without.lib.encode(text, true).unwrap();
    assert_ne!(a.get_ids(), b.get_ids());
    let mut cache = WordCache::default();
    assert_eq!(with.fast.encode(text, &mut cache).0, a.get_ids());
    let mut cache = WordCache::default();
    assert_eq!(without.fast.encode(text, &mut cache).0, b.get_ids());
}

#[test]
fn the_fast_encoder_picks_by_kind() {
    let neox = load_tokenizer(&repo_fixture("gpt-neox")).unwrap().tokenizer;
    let llama = load_tokenizer(&repo_fixture("llama-bpe"))
        .unwrap()
        .tokenizer;
    assert_eq!(FastEncoder::new(&neox, 512).unwrap().name(), "ByteLevelBpe");
    assert_eq!(FastEncoder::new(&llama, 512).unwrap().name(), "FastBpe");
    assert!(
        ByteLevelBpe::new(&llama, 512).is_none(),
        "SentencePiece-style BPE is not byte-level"
    );
}

/// Each change makes a tokenizer ByteLevelBpe does not reproduce; the library still loads it.
#[test]
fn unsupported_configurations_are_refused() {
    type Edit = fn(&mut Value);
    let edits: &[(&str, Edit)] = &[
        ("single_word added token", |j| {
            add_token(j, "<w>", json!({"single_word": true}))
        }),
        ("rstrip token beside one starting with a space", |j| {
            add_token(j, "<r>", json!({"rstrip": true}));
            add_token(j, " <s2>", json!({}));
        }),
        ("another regex", |j| {
            j["pre_tokenizer"]["pretokenizers"][0] = split(r"\w+|[^\w\s]+|\s+");
        }),
        ("Split removing its matches", |j| {
            j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = json!("Removed");
        }),
        ("inverted Split", |j| {
            j["pre_tokenizer"]["pretokenizers"][0]["invert"] = json!(true);
        }),
        ("string Split pattern", |j| {
            j["pre_tokenizer"]["pretokenizers"][0]["pattern"] = json!({"String": " "});
        }),
        ("Split after ByteLevel", |j| {
            j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                byte_level(false, false), split(LLAMA3_REGEX)]});
        }),
        ("Whitespace pre-tokenizer", |j| {
            j["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [
                {"type": "Whitespace"}, byte_level(false, false)]});
        }),
        ("Metaspace pre-tokenizer", |j| {
            j["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁",
                "prepend_scheme": "always", "split": true});
        }),
        ("Lowercase normalizer", |j| {
            j["normalizer"] = json!({"type": "Lowercase"});
        }),
        ("NFKC normalizer", |j| {
            j["normalizer"] = json!({"type": "NFKC"});
        }),
        ("dropout", |j| j["model"]["dropout"] = json!(0.1)),
        ("continuing_subword_prefix", |j| {
            j["model"]["continuing_subword_prefix"] = json!("")
        }),
        ("end_of_word_suffix", |j| {
            j["model"]["end_of_word_suffix"] = json!("</w>")
        }),
        ("a byte missing from the vocabulary", |j| {
            // Byte 0x00 (which UTF-8 text can hold) is written U+0100 ("Ā"); drop it and every
            // merge using it.
            j["model"]["vocab"].as_object_mut().unwrap().remove("Ā");
            j["model"]["merges"]
                .as_array_mut()
                .unwrap()
                .retain(|m| !m.to_string().contains('Ā'));
        }),
        ("RobertaProcessing", |j| {
            j["post_processor"] = json!({"type": "RobertaProcessing", "sep": ["</s>", 2],
                "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false});
        }),
        ("two templates", |j| {
            let t = j["post_processor"]["processors"][1].clone();
            j["post_processor"]["processors"]
                .as_array_mut()
                .unwrap()
                .push(t);
        }),
        ("WordPiece model", |j| {
            let vocab = j["model"]["vocab"].clone();
            j["model"] = json!({"type": "WordPiece", "unk_token": "<|end_of_text|>",
                "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
                "vocab": vocab});
        }),
    ];
    for (what, edit) in edits {
        let mut j = llama3_json();
        edit(&mut j);
        let tok = Tokenizer::from_str(&j.to_string())
            .unwrap_or_else(|e| panic!("{what}: the library loads it: {e}"));
        assert!(ByteLevelBpe::new(&tok, 512).is_none(), "{what}: refused");
    }

    let base = Tokenizer::from_str(&llama3_json().to_string()).unwrap();
    assert!(ByteLevelBpe::new(&base, 512).is_some());
    assert!(ByteLevelBpe::new(&base, 1).is_none(), "no room besides BOS");
    let mut t = base.clone();
    t.set_encode_special_tokens(true);
    assert!(
        ByteLevelBpe::new(&t, 512).is_none(),
        "encode_special_tokens"
    );
    let mut t = base.clone();
    t.with_padding(Some(tokenizers::PaddingParams::default()));
    assert!(ByteLevelBpe::new(&t, 512).is_none(), "padding");
    let mut t = base.clone();
    t.with_truncation(Some(tokenizers::TruncationParams {
        direction: tokenizers::TruncationDirection::Left,
        ..Default::default()
    }))
    .unwrap();
    assert!(
        ByteLevelBpe::new(&t, 512).is_none(),
        "truncation from the left"
    );
}
