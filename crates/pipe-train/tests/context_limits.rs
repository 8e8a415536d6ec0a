//! Data longer than the model's context is refused before any step, with an error that says
//! what to change — not a panic inside the model, nor (packed rows) an attention mask of the
//! whole dataset's length squared that aborts the process.

use pipe_data::dataset::{write, Dataset};
use pipe_train::{AdamWSettings, Decay, Method, TrainError, TrainSpec};

mod support;

/// Trains the small Llama (64 positions) on `n` examples of `len` tokens, packed into rows of
/// `pack_to` when given; returns the error.
fn train_error(n: usize, len: usize, pack_to: Option<usize>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.safetensors");
    let examples = support::examples(n, |_| len, |i, t| (i + t) % 38 + 1, |_, _| false);
    write(&file, &examples, pack_to, Default::default()).unwrap();
    let data = Dataset::open(&file).unwrap();
    let spec = TrainSpec {
        method: Method::Full,
        lr: 1e-3,
        decay: Decay::Constant,
        warmup_ratio: 0.0,
        warmup_steps: None,
        epochs: 1,
        max_steps: None,
        batch_size: 1,
        micro_batch_size: 1,
        max_grad_norm: None,
        adamw: AdamWSettings::default(),
        seed: 1,
        save_steps: None,
        save_dtype_bf16: false,
        matmul_precision: Default::default(),
        bf16_weights: false,
        gradient_checkpointing: false,
        eval: Default::default(),
    };
    assert_eq!(support::tiny_config().max_position_embeddings, 64);
    let result = support::train_small(dir.path(), &data, &spec, &|_, _, _| {
        panic!("no step may run")
    });
    match result {
        Err(e @ TrainError::TooLong { .. }) => e.to_string(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn examples_longer_than_the_context_are_refused() {
    let e = train_error(3, 80, None);
    assert!(e.contains("longest example has 80 tokens"), "{e}");
    assert!(e.contains("at most 64 positions"), "{e}");
    assert!(
        e.contains("lower the tokenize stage's max_len to 64 or less"),
        "{e}"
    );
}

#[test]
fn packed_rows_longer_than_the_context_are_refused() {
    // Short examples, but packed 10 to a row of 200 tokens.
    let e = train_error(10, 20, Some(200));
    assert!(e.contains("longest packed row has 200 tokens"), "{e}");
    assert!(e.contains("at most 64 positions"), "{e}");
}
