//! What the training tests share: the small Llama they train and synthetic examples.

use pipe_data::tokenize::Example;
use pipe_model::LlamaConfig;

/// A small Llama (vocab 40, hidden 16, 2 layers, 4 heads over 2 key/value heads).
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig::from_json(
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
