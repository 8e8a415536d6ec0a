//! What the training tests share: the small Llama they train and synthetic examples.

use std::path::Path;

use burn::backend::Autodiff;
use pipe_data::dataset::Dataset;
use pipe_data::tokenize::Example;
use pipe_model::ModelConfig;
use pipe_train::{train, BaseModel, DataMeta, Dirs, Hooks, Splits, TrainError, TrainSpec, Trained};

/// A small Llama (vocab 40, hidden 16, 2 layers, 4 heads over 2 key/value heads).
pub fn tiny_config() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"vocab_size": 40, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}"#,
    )
    .unwrap()
}

/// `n` examples: example `i` has `len(i)` tokens, token `t` is `token(i, t)`, and its label is
/// -100 where `masked(i, t)`, the token itself elsewhere.
pub fn examples(
    n: usize,
    len: impl Fn(usize) -> usize,
    token: impl Fn(usize, usize) -> usize,
    masked: impl Fn(usize, usize) -> bool,
) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let input_ids: Vec<u32> = (0..len(i)).map(|t| token(i, t) as u32).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &x)| if masked(i, t) { -100 } else { x as i32 })
                .collect();
            Example {
                index: i,
                input_ids,
                labels,
                truncated: false,
            }
        })
        .collect()
}

/// Trains the small Llama (seed 4) on `data` in `dir` (`work/`, `out/`): no held-out split, no
/// event files, no special tokens; `progress` hears of each step, and a warning fails the test.
#[allow(dead_code)]
pub fn train_small(
    dir: &Path,
    data: &Dataset,
    spec: &TrainSpec,
    progress: &dyn Fn(u64, u64, f64),
) -> Result<Trained, TrainError> {
    let meta = DataMeta {
        pad_token_id: 0,
        vocab_size_after: 40,
        added_tokens: vec![],
        eos_token_id: None,
        bos_token_id: None,
    };
    let hooks = Hooks {
        cancelled: &|| false,
        progress,
        log: &|_: &str| {},
        warn: &|w: &str| panic!("unexpected warning: {w}"),
        scalars: &|_, _| {},
    };
    let (work, out) = (dir.join("work"), dir.join("out"));
    std::fs::create_dir_all(&out).unwrap();
    train::<Autodiff<pipe_model::CpuBackend>>(
        &BaseModel::Init {
            config: Box::new(tiny_config()),
            seed: 4,
        },
        &Splits {
            train: data,
            heldout: None,
        },
        &meta,
        spec,
        &Dirs {
            work: &work,
            out: &out,
            events: None,
            nodes: None,
        },
        &hooks,
        &[Default::default()],
    )
}
