//! The Rust side of the tokenize benchmark (bench/tokenize.sh): the same work that
//! bench/tokenize_reference.py times in Python — Alpaca preprocessing of 52,002 records
//! (a data file cycled to that size), prompts already formatted — and prints examples/s.
//!
//! cargo run --release -p pipe-data --example tokenize_bench -- DATA.json TOKENIZER_DIR [MAX_LEN] [RECORDS]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use pipe_data::format::{format_records, OnError, ValSize};
use pipe_data::prompt::{Template, TemplateSpec};
use pipe_data::records::{read_records, Record};
use pipe_data::tokenize::{load_tokenizer, prepare, set_encoding, tokenize_all, TokenizeOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: tokenize_bench DATA.json TOKENIZER_DIR [MAX_LEN] [RECORDS]");
        std::process::exit(2);
    }
    let data = PathBuf::from(&args[0]);
    let tok_dir = PathBuf::from(&args[1]);
    let max_len: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(52_002);

    let base = read_records(&data).expect("records");
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = base[i % base.len()].clone();
            r.index = i;
            r
        })
        .collect();
    let template = Template::new(&TemplateSpec::alpaca(), BTreeMap::new()).unwrap();
    let pairs = format_records(&records, &template, OnError::Fail, ValSize::Count(0), 0)
        .unwrap()
        .train;
    let mut tok = load_tokenizer(&tok_dir).expect("tokenizer");
    let opts = TokenizeOptions {
        max_len,
        ..Default::default()
    };
    let specials = prepare(&mut tok, &opts).expect("specials");
    set_encoding(&mut tok.tokenizer, max_len).unwrap();
    let path = pipe_data::fastbpe::FastEncoder::new(&tok.tokenizer, max_len)
        .map_or("tokenizers library", |f| f.name());

    let t = Instant::now();
    let examples = tokenize_all(&tok.tokenizer, &specials, &pairs, false).expect("tokenize");
    let secs = t.elapsed().as_secs_f64();
    let tokens: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    println!(
        "{{\"impl\": \"pipe (Rust, {}, rayon {} threads)\", \"examples\": {}, \"tokens\": {}, \"seconds\": {:.3}, \"examples_per_s\": {:.0}}}",
        path,
        rayon::current_num_threads(),
        examples.len(),
        tokens,
        secs,
        examples.len() as f64 / secs
    );
}
