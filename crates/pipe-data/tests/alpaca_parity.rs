//! Token-for-token parity with the reference: transformers + Stanford Alpaca's `preprocess`,
//! as recorded by scripts/make_tokenize_fixtures.py in tests/fixtures/tokenize.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pipe_data::format::{format_records, OnError, ValSize};
use pipe_data::prompt::{Template, TemplateSpec};
use pipe_data::records::read_records;
use pipe_data::tokenize::{load_tokenizer, prepare, set_encoding, tokenize_all, TokenizeOptions};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenize")
}

fn pairs() -> Vec<pipe_data::format::Pair> {
    let records = read_records(&fixtures().join("records.json")).unwrap();
    let t = Template::new(&TemplateSpec::alpaca(), BTreeMap::new()).unwrap();
    format_records(&records, &t, OnError::Fail, ValSize::Count(0), 0)
        .unwrap()
        .train
}

#[test]
fn prompts_match_the_alpaca_templates() {
    let expected: Vec<Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("prompts.json")).unwrap()).unwrap();
    let ours = pairs();
    assert_eq!(ours.len(), expected.len());
    for (i, (p, e)) in ours.iter().zip(&expected).enumerate() {
        assert_eq!(
            p.prompt,
            e["prompt"].as_str().unwrap(),
            "record {i}: prompt"
        );
        assert_eq!(
            p.response,
            e["response"].as_str().unwrap(),
            "record {i}: response"
        );
    }
}

fn check(tokenizer: &str, max_len: usize) {
    let expected: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join(format!("expected-{tokenizer}-{max_len}.json"))).unwrap(),
    )
    .unwrap();
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    let mut loaded = load_tokenizer(&fixtures().join(tokenizer)).unwrap();
    let opts = TokenizeOptions {
        max_len,
        ..Default::default()
    };
    let sp = prepare(&mut loaded, &opts).unwrap();
    assert_eq!(
        sp.pad_token_id as u64,
        expected["pad_token_id"].as_u64().unwrap()
    );
    assert_eq!(sp.eos_token, expected["eos_token"].as_str().unwrap());
    assert_eq!(
        sp.vocab_size_before as u64,
        expected["vocab_size_before"].as_u64().unwrap()
    );
    assert_eq!(
        sp.vocab_size_after as u64,
        expected["vocab_size_after"].as_u64().unwrap()
    );
    assert_eq!(sp.added_tokens, vec!["[PAD]".to_string()]);
    set_encoding(&mut loaded.tokenizer, max_len).unwrap();
    let ours = tokenize_all(&loaded.tokenizer, &sp, &pairs(), false).unwrap();
    let theirs = expected["examples"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let ids = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        let case = cases.get(i).map(|c| c.to_string()).unwrap_or_default();
        let got: Vec<i64> = o.input_ids.iter().map(|&x| x as i64).collect();
        assert_eq!(
            got,
            ids(&t["input_ids"]),
            "{tokenizer}/{max_len} record {i} ({case}): input_ids"
        );
        let got: Vec<i64> = o.labels.iter().map(|&x| x as i64).collect();
        assert_eq!(
            got,
            ids(&t["labels"]),
            "{tokenizer}/{max_len} record {i} ({case}): labels"
        );
    }
}

#[test]
fn llama_bpe_512() {
    check("llama-bpe", 512);
}

#[test]
fn llama_bpe_48() {
    check("llama-bpe", 48);
}

#[test]
fn gpt_neox_512() {
    check("gpt-neox", 512);
}

#[test]
fn gpt_neox_48() {
    check("gpt-neox", 48);
}
