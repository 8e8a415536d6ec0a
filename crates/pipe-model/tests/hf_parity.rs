//! Logits and loss match transformers' LlamaForCausalLM (fixtures from
//! scripts/make_llama_fixtures.py): f32, max |Δlogit| ≤ 1e-4.

mod support;

use std::path::PathBuf;

use pipe_model::{load_model, shifted_cross_entropy, CausalLm};
use serde_json::Value;
use support::{check_case, floats, ids_tensor, max_abs_diff, rows_i64, B};

fn fixtures() -> PathBuf {
    support::fixture("llama", "")
}

fn expected(dir: &str) -> Value {
    support::expected_at(&fixtures().join(dir))
}

fn check_model(dir: &str) {
    support::check_model_at(&fixtures().join(dir));
}

#[test]
fn gqa_untied() {
    check_model("gqa-untied");
}

#[test]
fn tied_embeddings_with_llama3_rope_scaling() {
    check_model("tied-llama3-rope");
}

#[test]
fn linear_rope_scaling_with_one_kv_head() {
    check_model("linear-rope");
}

#[test]
fn bf16_checkpoint() {
    check_model("gqa-untied-bf16");
}

#[test]
fn sharded_checkpoint() {
    check_model("gqa-untied-sharded");
}

#[test]
fn added_pad_token_gets_the_mean_embedding() {
    let e = expected("resize-pad");
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let model = model.resize_embeddings(e["new_vocab_size"].as_u64().unwrap() as usize);
    check_case(&model, &e, "", None, "resize-pad");
}

#[test]
fn pickle_only_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("gqa-untied/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not read").unwrap();
    let err = load_model::<B>(dir.path(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("only pickle weights (pytorch_model.bin)")
            && err.contains("never loads pickle"),
        "{err}"
    );
}

/// The logits of a model with its adapters merged match the fixture's `merged_logits`.
fn check_merged(merged: CausalLm<B>, e: &Value) {
    let ids = rows_i64(&e["input_ids"]);
    let ours: Vec<f32> = merged
        .forward(ids_tensor(&ids), None)
        .into_data()
        .to_vec()
        .unwrap();
    let d = max_abs_diff(&ours, &floats(&e["merged_logits"]));
    assert!(d <= 1e-4, "merged: max |Δlogit| = {d}");
}

#[test]
fn peft_lora_adapter_and_its_merge() {
    let e = expected("lora");
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let model = model
        .load_peft_adapter(&fixtures().join("lora"), false)
        .unwrap();
    check_case(&model, &e, "", None, "lora");
    check_merged(model.merge_lora(), &e);
}

/// PEFT's `modules_to_save`: the adapter carries full copies of `embed_tokens` and `lm_head`
/// (changed from the base), which replace the base's when loaded and survive a merge.
#[test]
fn peft_adapter_with_modules_to_save() {
    let e = expected("lora-modules-to-save");
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let mut model = model
        .load_peft_adapter(&fixtures().join("lora-modules-to-save"), false)
        .unwrap();
    check_case(&model, &e, "", None, "lora-modules-to-save");
    // Saved again under PEFT's names, they are what was loaded.
    let saved = model
        .resolve_saved_modules(&["embed_tokens".into(), "lm_head".into()])
        .unwrap();
    let names: Vec<String> = model
        .saved_module_tensors(&saved)
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        names,
        [
            "base_model.model.model.embed_tokens.weight",
            "base_model.model.lm_head.weight"
        ]
    );
    check_merged(model.merge_lora(), &e);
}

#[test]
fn fresh_adapters_follow_peft_init() {
    use pipe_model::{LoraSpec, Targets};
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::AllLinear,
        modules_to_save: Vec::new(),
    };
    let mut model = model.add_lora(&spec, 1).unwrap();
    let mods = model.linear_modules_mut();
    assert_eq!(
        mods.iter().filter(|(_, p)| p.lora.is_some()).count(),
        14,
        "7 per layer, not lm_head"
    );
    let q = mods
        .iter()
        .find(|(n, _)| n == "model.layers.0.self_attn.q_proj")
        .unwrap();
    let l = q.1.lora.as_ref().unwrap();
    let a: Vec<f32> = l.a.val().into_data().to_vec().unwrap();
    let bound = 1.0 / 64f32.sqrt();
    assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|x| x.abs() > 0.9 * bound));
    let b: Vec<f32> = l.b.val().into_data().to_vec().unwrap();
    assert!(
        b.iter().all(|&x| x == 0.0),
        "B starts at zero, so the adapter starts as a no-op"
    );
}

#[test]
fn save_then_load_gives_the_same_logits() {
    let e = expected("gqa-untied");
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model
        .save_hf(dir.path(), pipe_model::SaveDtype::F32)
        .unwrap();
    let back: CausalLm<B> = load_model(dir.path(), &Default::default()).unwrap();
    let ids = ids_tensor(&rows_i64(&e["input_ids"]));
    let a: Vec<f32> = model
        .forward(ids.clone(), None)
        .into_data()
        .to_vec()
        .unwrap();
    let b: Vec<f32> = back.forward(ids, None).into_data().to_vec().unwrap();
    assert_eq!(a, b, "an f32 round trip is exact");
    // bf16 on disk: the saved file is the rounded weights, readable back.
    model
        .save_hf(dir.path(), pipe_model::SaveDtype::Bf16)
        .unwrap();
    let back: CausalLm<B> = load_model(dir.path(), &Default::default()).unwrap();
    let c: Vec<f32> = back
        .forward(ids_tensor(&rows_i64(&e["input_ids"])), None)
        .into_data()
        .to_vec()
        .unwrap();
    assert!(max_abs_diff(&a, &c) < 0.1);
}

#[test]
fn seeded_init_is_reproducible() {
    let cfg =
        pipe_model::ModelConfig::from_file(&fixtures().join("gqa-untied/config.json")).unwrap();
    let a: CausalLm<B> = pipe_model::init_model(&cfg, 7, 0.02, &Default::default(), false);
    let b: CausalLm<B> = pipe_model::init_model(&cfg, 7, 0.02, &Default::default(), false);
    let c: CausalLm<B> = pipe_model::init_model(&cfg, 8, 0.02, &Default::default(), false);
    let w = |m: &CausalLm<B>| -> Vec<f32> { m.embed_tokens.val().into_data().to_vec().unwrap() };
    assert_eq!(w(&a), w(&b));
    assert_ne!(w(&a), w(&c));
    let std = (w(&a).iter().map(|x| x * x).sum::<f32>() / w(&a).len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.002, "std {std}");
}

/// The real SmolLM2-135M-Instruct checkpoint against transformers (see
/// scripts/check_smollm2.py, which builds it and records the reference logits).
#[test]
#[ignore = "needs PIPE_SMOLLM2_DIR from scripts/check_smollm2.py"]
fn smollm2_matches_transformers() {
    let dir = PathBuf::from(std::env::var("PIPE_SMOLLM2_DIR").expect("set PIPE_SMOLLM2_DIR"));
    let e: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let model: CausalLm<B> = load_model(&dir, &Default::default()).unwrap();
    let ids: Vec<i64> = e["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let labels: Vec<i64> = e["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    let logits = model.forward(ids_tensor(std::slice::from_ref(&ids)), None);
    let ours: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
    let d = max_abs_diff(&ours, &floats(&e["logits"]));
    let (sum, n) = shifted_cross_entropy(logits, &[labels]);
    let loss = sum.into_scalar() / n as f32;
    let want = e["loss"].as_f64().unwrap() as f32;
    println!(
        "SmolLM2-135M: {} tokens, max |Δlogit| = {d:e}, loss {loss} vs {want}",
        ids.len()
    );
    assert!(d <= 1e-3, "max |Δlogit| = {d}");
    assert!((loss - want).abs() <= 1e-4);
}

/// Decoding with the key/value cache — the prompt at once, then one token at a time — gives
/// the logits of a full forward pass at every position.
#[test]
fn cached_decoding_matches_the_full_forward() {
    for dir in ["gqa-untied", "tied-llama3-rope"] {
        let model: CausalLm<B> = load_model(&fixtures().join(dir), &Default::default()).unwrap();
        let e = expected(dir);
        let row = rows_i64(&e["input_ids"])[0].clone();
        let v = model.config.vocab_size;
        let full = model.forward(ids_tensor(std::slice::from_ref(&row)), None);
        let full = full.into_data().to_vec::<f32>().unwrap();
        let mut cache = pipe_model::KvCache::default();
        let prompt = 3;
        let mut got = vec![(
            prompt - 1,
            model.forward_cached(ids_tensor(&[row[..prompt].to_vec()]), &mut cache),
        )];
        for (t, &token) in row.iter().enumerate().skip(prompt) {
            got.push((
                t,
                model.forward_cached(ids_tensor(&[vec![token]]), &mut cache),
            ));
        }
        assert_eq!(cache.len(), row.len());
        for (t, logits) in got {
            let logits = logits.into_data().to_vec::<f32>().unwrap();
            let d = max_abs_diff(&logits, &full[t * v..(t + 1) * v]);
            assert!(d <= 1e-5, "{dir}: position {t} differs by {d}");
        }
    }
}

/// `dtype: bf16` training computes as PyTorch's autocast does for matrix products (bf16
/// operands and result, the parameters f32): its logits and loss are nearer autocast's than the
/// f32 model's are.
#[test]
fn bf16_matmuls_follow_torch_autocast() {
    let e = expected("autocast-bf16");
    let model: CausalLm<B> =
        load_model(&fixtures().join("gqa-untied"), &Default::default()).unwrap();
    let ids = rows_i64(&e["input_ids"]);
    let labels = rows_i64(&e["labels"]);
    let reference = floats(&e["logits"]);
    let run = |m: &CausalLm<B>| {
        let logits = m.forward(ids_tensor(&ids), None);
        let values: Vec<f32> = logits.clone().into_data().to_vec().unwrap();
        let (sum, n) = pipe_model::shifted_cross_entropy(logits, &labels);
        (values, sum.into_scalar() as f64 / n as f64)
    };
    let (f32_logits, f32_loss) = run(&model);
    let mixed = model.with_matmul_precision(pipe_model::MatmulPrecision::Bf16);
    let (mixed_logits, mixed_loss) = run(&mixed);
    let f32_gap = max_abs_diff(&f32_logits, &reference);
    let mixed_gap = max_abs_diff(&mixed_logits, &reference);
    let autocast_loss = e["loss"].as_f64().unwrap();
    eprintln!(
        "max |Δlogit| to autocast: f32 {f32_gap:.5}, mixed {mixed_gap:.5}; loss: f32 {f32_loss:.6}, mixed {mixed_loss:.6}, autocast {autocast_loss:.6}"
    );
    let mean_gap = |a: &[f32]| {
        a.iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .sum::<f32>()
            / a.len() as f32
    };
    eprintln!(
        "mean |Δlogit| to autocast: f32 {:.6}, mixed {:.6}",
        mean_gap(&f32_logits),
        mean_gap(&mixed_logits)
    );
    assert!((f32_gap - e["f32_max_abs_diff"].as_f64().unwrap() as f32).abs() < 1e-3);
    // Elementwise work stays f32 here (autocast runs some of it in bf16), so the two are not
    // equal, but the bf16 products bring pipe most of the way to autocast.
    assert!(
        mixed_gap < f32_gap,
        "max: mixed {mixed_gap} vs f32 {f32_gap}"
    );
    let (f32_mean, mixed_mean) = (mean_gap(&f32_logits), mean_gap(&mixed_logits));
    assert!(
        mixed_mean < 0.7 * f32_mean,
        "mean: mixed {mixed_mean} vs f32 {f32_mean}"
    );
    assert!(
        (mixed_loss - autocast_loss).abs() < 0.5 * (f32_loss - autocast_loss).abs(),
        "loss: mixed {mixed_loss}, f32 {f32_loss}, autocast {autocast_loss}"
    );
    // The output product ran in bf16: every logit is a bf16 value.
    assert!(mixed_logits
        .iter()
        .all(|&x| half::bf16::from_f32(x).to_f32() == x));
}
