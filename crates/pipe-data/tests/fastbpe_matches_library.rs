//! FastBpe must give exactly the ids the `tokenizers` library gives. Random texts built from
//! awkward pieces (runs of spaces, `▁` itself, special tokens inside text, byte-fallback
//! characters, control characters) are encoded both ways, with and without truncation.

use std::path::PathBuf;

use pipe_data::fastbpe::{FastBpe, WordCache};
use pipe_data::tokenize::{load_tokenizer, prepare, set_encoding, TokenizeOptions};
use pipe_rand::SplitMix64;

const PIECES: &[&str] = &[
    "a",
    "b",
    "the",
    "ing",
    " ",
    "  ",
    "   ",
    "▁",
    "▁▁",
    "é",
    "e\u{301}",
    "日本語",
    "😀",
    "\n",
    "\t",
    "\r\n",
    "</s>",
    "<s>",
    "<unk>",
    "[PAD]",
    "[PAD",
    "</",
    "{",
    "}",
    ":",
    "::",
    "\u{0}",
    "\u{200b}",
    "\u{a0}",
    "ß",
    "İ",
    "ﬁ",
    "Instruction",
    "### Response:",
    "<0x41>",
    "x",
    "yz",
    "0",
    "123",
    "-",
    ".",
    "אב",
    "🇫🇷",
];

#[test]
fn random_texts_encode_identically() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenize/llama-bpe");
    for max_len in [16usize, 64, 100_000] {
        let mut loaded = load_tokenizer(&dir).unwrap();
        prepare(
            &mut loaded,
            &TokenizeOptions {
                max_len,
                ..Default::default()
            },
        )
        .unwrap();
        set_encoding(&mut loaded.tokenizer, max_len).unwrap();
        let fast = FastBpe::new(&loaded.tokenizer, max_len)
            .expect("a Llama-style tokenizer takes the fast path");
        let mut rng = SplitMix64::new(max_len as u64);
        let mut cache = WordCache::default();
        for case in 0..3000 {
            let n = (rng.next_u64() % 30) as usize;
            let text: String = (0..n)
                .map(|_| PIECES[(rng.next_u64() % PIECES.len() as u64) as usize])
                .collect();
            let lib = loaded.tokenizer.encode(text.as_str(), true).unwrap();
            let (ids, truncated) = fast.encode(&text, &mut cache);
            assert_eq!(
                ids,
                lib.get_ids(),
                "case {case}, max_len {max_len}: {text:?}"
            );
            assert_eq!(
                truncated,
                !lib.get_overflowing().is_empty(),
                "case {case}: {text:?}"
            );
        }
    }
}

#[test]
fn other_tokenizers_are_left_to_the_library() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenize/gpt-neox");
    let loaded = load_tokenizer(&dir).unwrap();
    assert!(
        FastBpe::new(&loaded.tokenizer, 512).is_none(),
        "byte-level BPE is not SentencePiece-style"
    );
}
