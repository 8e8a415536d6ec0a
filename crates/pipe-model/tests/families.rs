//! Every model family against transformers 4.57 (fixtures from scripts/make_family_fixtures.py:
//! tiny random models exercising each family's quirks): logits ≤ 1e-4 and loss ≤ 1e-5
//! (unpadded and right-padded), greedy generation token for token (with the key/value cache and
//! without), a PEFT LoRA adapter and its merge, and the config.json pipe writes back.

mod support;

use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::{load_model, CausalLm, KvCache, ModelConfig};
use serde_json::Value;
use support::{check_padded_and_unpadded, expected_at, floats, max_abs_diff, B};

const CASES: &[&str] = &[
    "qwen2",
    "qwen2-tied",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "llama-yarn",
    "llama-dynamic",
];

fn case(name: &str) -> PathBuf {
    support::fixture("families", name)
}

fn model(name: &str) -> CausalLm<B> {
    load_model(&case(name), &Default::default()).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn row(ids: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(ids.to_vec(), [1, ids.len()]),
        &Default::default(),
    )
}

fn argmax(logits: Tensor<B, 2>) -> i64 {
    let values: Vec<f32> = logits.into_data().to_vec().unwrap();
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as i64
}

/// Greedy decoding of `n` tokens after `prompt`, one token per step through the cache.
fn greedy_cached(model: &CausalLm<B>, prompt: &[i64], n: usize) -> Vec<i64> {
    let mut cache = KvCache::default();
    let mut next = argmax(model.forward_cached(row(prompt), &mut cache));
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(model.forward_cached(row(&[next]), &mut cache));
        out.push(next);
    }
    out
}

/// Greedy decoding of `n` tokens after `prompt`, every step a full forward pass.
fn greedy_uncached(model: &CausalLm<B>, prompt: &[i64], n: usize) -> Vec<i64> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let logits = model.forward(row(&seq), None);
        let [_, s, v] = logits.dims();
        seq.push(argmax(logits.narrow(1, s - 1, 1).reshape([1, v])));
    }
    seq.split_off(prompt.len())
}

#[test]
fn logits_and_loss_match_transformers() {
    for name in CASES {
        support::check_model_at(&case(name));
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in CASES {
        let model = model(name);
        let g = &expected_at(&case(name))["generation"];
        let prompts = g["prompts"].as_array().unwrap();
        // transformers' own cached decoding is the reference, except for Phi-3, whose generate()
        // in 4.57 re-runs the sequence without a causal mask when LongRoPE switches to the long
        // factors (scripts/make_family_fixtures.py); its correct cached loop equals the full
        // recompute.
        let cached_reference = if *name == "phi3" {
            "new_tokens_cached_loop"
        } else {
            "new_tokens"
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let prompt = ints(prompt);
            let want_cached = ints(&g[cached_reference][i]);
            let want_uncached = ints(&g["new_tokens_uncached"][i]);
            let n = want_cached.len();
            assert_eq!(
                greedy_cached(&model, &prompt, n),
                want_cached,
                "{name}: prompt {i} ({prompt:?}) with the cache"
            );
            assert_eq!(
                greedy_uncached(&model, &prompt, n),
                want_uncached,
                "{name}: prompt {i} ({prompt:?}) without the cache"
            );
        }
    }
}

#[test]
fn peft_adapters_and_their_merge_match_peft() {
    for name in CASES {
        let dir = case(name).join("lora");
        let e = expected_at(&dir);
        let with_adapter = model(name).load_peft_adapter(&dir, false).unwrap();
        check_padded_and_unpadded(&with_adapter, &e, &format!("{name} + adapter"));
        let merged = with_adapter.merge_lora();
        let ids = support::rows_i64(&e["input_ids"]);
        let logits: Vec<f32> = merged
            .forward(support::ids_tensor(&ids), None)
            .into_data()
            .to_vec()
            .unwrap();
        let d = max_abs_diff(&logits, &floats(&e["merged_logits"]));
        assert!(d <= 1e-4, "{name} merged: max |Δlogit| = {d}");
    }
}

/// Whether two config.json values are the same (numbers within f32 precision).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn written_config_json_is_what_transformers_wrote() {
    for name in CASES {
        let path = case(name).join("config.json");
        let theirs: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let config = ModelConfig::from_file(&path).unwrap();
        let ours = config.hf_config_json();
        // Every field transformers wrote that pipe writes too has the same value …
        for (key, value) in ours.as_object().unwrap() {
            if let Some(theirs) = theirs.get(key) {
                assert!(
                    same(value, theirs),
                    "{name}: `{key}` is {value}, transformers wrote {theirs}"
                );
            }
        }
        // … and reading pipe's file back gives the same model.
        let again = ModelConfig::from_json(&ours.to_string()).unwrap();
        assert_eq!(again, config, "{name}: config.json does not round-trip");
    }
}

#[test]
fn unsupported_configs_are_refused_naming_the_field() {
    let base = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;
    for (extra, words) in [
        (r#""model_type": "gpt2""#, ["model_type", "gpt2", "qwen3"]),
        (
            r#""model_type": "qwen2", "rope_scaling": {"rope_type": "longrope", "factor": 2}"#,
            ["rope_scaling.rope_type", "longrope", "yarn"],
        ),
        (
            r#""model_type": "mistral", "hidden_act": "gelu""#,
            ["hidden_act", "gelu", "silu"],
        ),
        (
            r#""model_type": "gemma2", "hidden_activation": "relu""#,
            ["hidden_activation", "relu", "gelu_pytorch_tanh"],
        ),
        (
            r#""model_type": "phi3", "resid_pdrop": 0.1"#,
            ["resid_pdrop", "0.1", "0.0"],
        ),
        (
            r#""model_type": "llama", "attention_dropout": 0.1"#,
            ["attention_dropout", "0.1", "0.0"],
        ),
        (
            r#""model_type": "qwen2", "layer_types": ["full_attention", "full_attention"]"#,
            ["layer_types", "2", "1"],
        ),
        (
            r#""model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0, 2.0]}"#,
            ["rope_scaling.short_factor", "1", "2"],
        ),
    ] {
        let err = ModelConfig::from_json(&format!("{{{base}, {extra}}}"))
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(err.contains(w), "`{err}` should mention `{w}`");
        }
    }
}

#[test]
fn seeded_models_of_every_family_save_and_load_back() {
    for name in CASES {
        let config = ModelConfig::from_file(&case(name).join("config.json")).unwrap();
        let fresh: CausalLm<B> =
            pipe_model::init_model(&config, 7, 0.02, &Default::default(), false);
        let dir = tempfile::tempdir().unwrap();
        fresh
            .save_hf(dir.path(), pipe_model::SaveDtype::F32)
            .unwrap();
        let back = load_model::<B>(dir.path(), &Default::default()).unwrap();
        let ids = row(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let a: Vec<f32> = fresh
            .forward(ids.clone(), None)
            .into_data()
            .to_vec()
            .unwrap();
        let b: Vec<f32> = back.forward(ids, None).into_data().to_vec().unwrap();
        assert_eq!(a, b, "{name}");
        assert_eq!(back.config, config, "{name}");
    }
}
