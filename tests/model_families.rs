//! Every model family through the stages, from `{init: {model_type: …}}`: full fine-tuning,
//! LoRA on the family's own module names (Phi-3's fused ones), held-out loss and generation,
//! and a merged export whose config.json names the family's transformers class and loads back
//! with the logits of base + adapter. (Numerics against transformers are in pipe-model's and
//! pipe-train's fixture tests.)

mod common;

use common::Project;
use pipe_model::{load_model, CausalLm};

type B = pipe_model::CpuBackend;

/// (model_type, the family's extra config.json fields, its transformers class, a LoRA target
/// only it has)
const FAMILIES: &[(&str, &str, &str, &str)] = &[
    ("llama", "", "LlamaForCausalLM", "q_proj"),
    (
        "mistral",
        ", sliding_window: 8",
        "MistralForCausalLM",
        "q_proj",
    ),
    (
        "qwen2",
        ", use_sliding_window: true, sliding_window: 8, max_window_layers: 1",
        "Qwen2ForCausalLM",
        "q_proj",
    ),
    ("qwen3", ", head_dim: 16", "Qwen3ForCausalLM", "q_proj"),
    (
        "gemma2",
        ", head_dim: 8, query_pre_attn_scalar: 8, sliding_window: 8",
        "Gemma2ForCausalLM",
        "q_proj",
    ),
    (
        "gemma3_text",
        ", head_dim: 8, query_pre_attn_scalar: 8, sliding_window: 8, sliding_window_pattern: 2",
        "Gemma3ForCausalLM",
        "q_proj",
    ),
    (
        "phi3",
        ", original_max_position_embeddings: 128",
        "Phi3ForCausalLM",
        "qkv_proj",
    ),
];

fn stages() -> String {
    let mut s = String::new();
    for (model_type, extra, _, target) in FAMILIES {
        let id = model_type.replace('_', "");
        s.push_str(&format!(
            r#"  {id}:
    kind: train
    data: tokens
    model:
      init: {{model_type: {model_type}, vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128{extra}}}
      seed: 1
    lr: 3.0e-3
    epochs: 1
    batch_size: 4
  {id}_lora:
    kind: train
    data: tokens
    model: {id}
    method: lora
    lora: {{r: 4, alpha: 8, target_modules: [{target}, down_proj]}}
    lr: 1.0e-2
    epochs: 1
    batch_size: 4
  {id}_eval:
    kind: evaluate
    model: {id}_lora
    base: {id}
    data: tokens
    generate:
      instructions: ["Name a colour."]
      max_new_tokens: 4
  {id}_export:
    kind: export
    model: {id}_lora
    base: {id}
    dtype: f32
"#
        ));
    }
    s
}

#[test]
fn every_family_trains_evaluates_and_exports() {
    let pipeline = common::example_pipeline("families", 64, &stages()).replace(
        "  prompts:\n    kind: format\n    input: data\n",
        "  prompts:\n    kind: format\n    input: data\n    val_size: 3\n",
    );
    let p = Project::with_examples(&pipeline);
    p.pipe(&["run", "p.yaml"]).ok();
    for (model_type, _, class, target) in FAMILIES {
        let id = model_type.replace('_', "");
        let adapter = p.stage_out(&format!("{id}_lora")).join("adapter");
        let adapter_cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
                .unwrap();
        let targets = adapter_cfg["target_modules"].to_string();
        assert!(
            targets.contains(&format!("self_attn.{target}")),
            "{id}: {targets}"
        );

        let metrics =
            std::fs::read_to_string(p.stage_out(&format!("{id}_eval")).join("metrics.json"))
                .unwrap();
        let metrics: serde_json::Value = serde_json::from_str(&metrics).unwrap();
        let loss = metrics["tuned"]["heldout"]["loss"].as_f64();
        assert!(loss.is_some_and(f64::is_finite), "{id}: {metrics}");

        let export = p.stage_out(&format!("{id}_export"));
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(export.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["model_type"], *model_type, "{id}");
        assert_eq!(cfg["architectures"][0], *class, "{id}");
        let with_adapter = load_model::<B>(&p.stage_out(&id).join("model"), &Default::default())
            .unwrap()
            .load_peft_adapter(&adapter, false)
            .unwrap();
        let merged: CausalLm<B> = load_model(&export, &Default::default()).unwrap();
        let d = common::sample_logits(&with_adapter)
            .iter()
            .zip(common::sample_logits(&merged))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-4, "{id}: merged export: max |Δlogit| = {d}");
    }
}
