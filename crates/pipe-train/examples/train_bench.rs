//! The Rust side of bench/train.sh: full fine-tuning steps of a random Llama on random tokens
//! (AdamW, token-exact loss, clipping), printing tokens/s. The first steps are not timed.
//!
//! cargo run --release -p pipe-train --example train_bench -- DIM LAYERS HEADS VOCAB SEQ BATCH STEPS

use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use pipe_model::{init_llama, LlamaConfig};
use pipe_train::step::{adamw, train_step, AdamWSettings, MicroBatch};

type B = Autodiff<NdArray<f32>>;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("numbers"))
        .collect();
    let [dim, layers, heads, vocab, seq, batch, steps] = a[..] else {
        eprintln!("usage: train_bench DIM LAYERS HEADS VOCAB SEQ BATCH STEPS");
        std::process::exit(2);
    };
    let cfg = LlamaConfig::from_json(&format!(
        r#"{{"vocab_size": {vocab}, "hidden_size": {dim}, "intermediate_size": {}, "num_hidden_layers": {layers},
            "num_attention_heads": {heads}, "num_key_value_heads": {heads}, "max_position_embeddings": {seq}}}"#,
        dim * 8 / 3 / 64 * 64 + 64
    ))
    .unwrap();
    let mut model = init_llama::<B>(&cfg, 0, 0.02, &Default::default(), true);
    let params: usize = {
        use burn::module::Module;
        model.num_params()
    };
    let mut optim = adamw::<B>(&AdamWSettings::default());
    let mut s = 12345u64;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as i64
    };
    let warmup = 2;
    let mut t0 = Instant::now();
    for step in 0..steps + warmup {
        if step == warmup {
            t0 = Instant::now();
        }
        let ids: Vec<Vec<i64>> = (0..batch)
            .map(|_| (0..seq).map(|_| next() % vocab as i64).collect())
            .collect();
        let mb = MicroBatch {
            labels: ids.clone(),
            input_ids: ids,
            attention_mask: None,
            packing: None,
        };
        let (m, _) = train_step(model, &mut optim, &[mb], 1e-4, Some(1.0));
        model = m;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = steps * batch * seq;
    println!(
        "{{\"impl\": \"pipe (burn 0.21 ndarray, f32)\", \"params\": {params}, \"steps\": {steps}, \"tokens\": {tokens}, \"seconds\": {secs:.3}, \"tokens_per_s\": {:.1}}}",
        tokens as f64 / secs
    );
}
