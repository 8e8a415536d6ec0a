//! Export through the real binary: Hugging Face layout (sharded, tokenizer files, LoRA merged)
//! and PEFT layout, loaded back by pipe's own loader with the same logits; `to:` delivers the
//! result outside the store, marked as pipe's, on a run and on a cache hit (tests/safety_paths.rs
//! has what it refuses).

mod common;
use std::path::Path;

use common::Project;
use pipe_model::{load_model, CausalLm};

type B = pipe_model::CpuBackend;

/// The example data through a `tokens` stage ([`common::example_pipeline`]), then these
/// stages.
const STAGES: &str = r#"  base:
    kind: train
    data: tokens
    model:
      init: {vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
      seed: 1
    lr: 3.0e-3
    epochs: 2
    batch_size: 4
    micro_batch_size: 2
  lora:
    kind: train
    data: tokens
    model: base
    method: lora
    lora: {r: 4, alpha: 8, target_modules: all-linear}
    lr: 1.0e-2
    epochs: 2
    batch_size: 4
    micro_batch_size: 2
  full_hf:
    kind: export
    model: base
    dtype: f32
    max_shard_size: 100KB
    to: exported/full
  merged_hf:
    kind: export
    model: lora
    base: base
    dtype: f32
  adapter:
    kind: export
    model: lora
    base: base
    base_model_name_or_path: org/tiny-base
    format: peft
    dtype: f32
    to: exported/adapter
"#;

fn pipeline() -> String {
    common::example_pipeline("export", 64, STAGES)
}

fn project() -> Project {
    Project::with_examples(&pipeline())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn hf_and_peft_exports_load_back_with_the_same_logits() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();

    // Full model, sharded at 100 KB.
    let full = p.stage_out("full_hf");
    let names = files(&full);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(names.contains(&f.to_string()), "{f} missing: {names:?}");
    }
    assert!(
        names.iter().filter(|n| n.starts_with("model-0000")).count() >= 2,
        "{names:?}"
    );
    let trained: CausalLm<B> =
        load_model(&p.stage_out("base").join("model"), &Default::default()).unwrap();
    let exported: CausalLm<B> = load_model(&full, &Default::default()).unwrap();
    assert_eq!(
        common::sample_logits(&trained),
        common::sample_logits(&exported),
        "an f32 export is exact"
    );

    // LoRA merged into its base.
    let adapter_dir = p.stage_out("lora").join("adapter");
    let with_adapter = load_model::<B>(&p.stage_out("base").join("model"), &Default::default())
        .unwrap()
        .load_peft_adapter(&adapter_dir, false)
        .unwrap();
    let merged: CausalLm<B> = load_model(&p.stage_out("merged_hf"), &Default::default()).unwrap();
    let d = max_diff(
        &common::sample_logits(&with_adapter),
        &common::sample_logits(&merged),
    );
    assert!(d < 1e-4, "merged export: max |Δlogit| = {d}");
    assert_ne!(
        common::sample_logits(&with_adapter),
        common::sample_logits(&trained),
        "the adapter changed the model"
    );

    // PEFT layout, delivered to a user path; a cache hit delivers it again.
    let peft = p.path("exported/adapter");
    assert_eq!(
        files(&peft),
        vec![
            ".pipe-delivery.json",
            "adapter_config.json",
            "adapter_model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    // What AutoPeftModel loads the base from: the field as given, not the stage's id.
    assert_eq!(cfg["base_model_name_or_path"], "org/tiny-base");
    let from_peft = load_model::<B>(&p.stage_out("base").join("model"), &Default::default())
        .unwrap()
        .load_peft_adapter(&peft, false)
        .unwrap();
    assert_eq!(
        common::sample_logits(&from_peft),
        common::sample_logits(&with_adapter)
    );
    assert!(!std::fs::metadata(peft.join("adapter_config.json"))
        .unwrap()
        .permissions()
        .readonly());
    std::fs::remove_dir_all(p.path("exported")).unwrap();
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(r.stdout.matches(" cached ").count(), 9, "{}", r.stdout);
    assert!(
        p.path("exported/full/config.json").exists()
            && p.path("exported/adapter/adapter_model.safetensors")
                .exists()
    );
}
