//! Training on packed rows is training on the examples they hold: each example keeps its own
//! positions, attends only to itself, and no loss crosses from one example into the next. One
//! optimizer step over the whole set, packed or not, gives the same loss and gradient norm.

use std::path::Path;

use pipe_data::dataset::{write, Dataset};
use pipe_data::tokenize::Example;
use pipe_train::{AdamWSettings, Decay, Method, TrainSpec};

mod support;

fn examples() -> Vec<Example> {
    // `train_on_inputs`-style labels on some examples (every token counts), so that a loss
    // leaking across an example boundary would show.
    support::examples(
        7,
        |i| 5 + (i * 3) % 7,
        |i, t| (i * 11 + t * 5) % 38 + 1,
        |i, t| i % 2 == 0 && t < 2,
    )
}

/// Trains one step over every unit of the dataset; returns metrics.jsonl's first line.
fn one_step(
    dir: &Path,
    pack_to: Option<usize>,
    gradient_checkpointing: bool,
) -> (serde_json::Value, usize) {
    let file = dir.join("train.safetensors");
    write(&file, &examples(), pack_to, Default::default()).unwrap();
    let data = Dataset::open(&file).unwrap();
    let units = pipe_train::run::units(&data);
    let spec = TrainSpec {
        method: Method::Full,
        lr: 1e-3,
        decay: Decay::Constant,
        warmup_ratio: 0.0,
        warmup_steps: None,
        epochs: 1,
        max_steps: Some(1),
        batch_size: units,
        micro_batch_size: units,
        max_grad_norm: None,
        adamw: AdamWSettings::default(),
        seed: 1,
        save_steps: None,
        save_dtype_bf16: false,
        matmul_precision: Default::default(),
        bf16_weights: false,
        gradient_checkpointing,
        eval: Default::default(),
    };
    support::train_small(dir, &data, &spec, &|_, _, _| {}).unwrap();
    let line = std::fs::read_to_string(dir.join("out/metrics.jsonl")).unwrap();
    (
        serde_json::from_str(line.lines().next().unwrap()).unwrap(),
        units,
    )
}

/// Packed rows recompute their layers (gradient checkpointing) under the same masks and
/// positions: the same step, bit for bit.
#[test]
fn packed_rows_recompute_their_layers_to_the_same_step() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (kept, _) = one_step(a.path(), Some(24), false);
    let (recomputed, _) = one_step(b.path(), Some(24), true);
    for k in ["loss", "grad_norm"] {
        assert_eq!(
            kept[k].as_f64().unwrap().to_bits(),
            recomputed[k].as_f64().unwrap().to_bits(),
            "{k}"
        );
    }
}

#[test]
fn packed_rows_train_like_their_examples() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (plain, n_plain) = one_step(a.path(), None, false);
    let (packed, n_rows) = one_step(b.path(), Some(24), false);
    assert_eq!(n_plain, 7);
    assert!(n_rows < n_plain, "{n_rows} rows for {n_plain} examples");
    let close = |k: &str, tol: f64| {
        let (x, y) = (plain[k].as_f64().unwrap(), packed[k].as_f64().unwrap());
        assert!(
            (x - y).abs() <= tol * x.abs().max(1.0),
            "{k}: unpacked {x} vs packed {y}"
        );
    };
    close("loss", 1e-5);
    close("grad_norm", 1e-4);
    assert_eq!(plain["tokens"], packed["tokens"]);
}
