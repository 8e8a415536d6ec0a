//! Four optimizer steps (2 micro-batches each, cosine schedule with warm-up, clipping at 1.0,
//! AdamW) match PyTorch + transformers: full fine-tuning and LoRA (fixtures from
//! scripts/make_llama_fixtures.py).

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::{Int, Tensor, TensorData};
use pipe_model::{load_model_with, CausalLm};
use pipe_testkit::fixtures::{fixture_set, rows_i64};
use pipe_train::step::for_inference;
use pipe_train::{adamw, train_step, AdamWSettings, Decay, MicroBatch, Schedule};
use serde_json::Value;

type B = Autodiff<pipe_model::CpuBackend>;

fn fixtures() -> PathBuf {
    fixture_set("llama")
}

fn close(a: f64, b: f64, rel: f64, what: &str) {
    assert!(
        (a - b).abs() <= rel * b.abs().max(1e-3),
        "{what}: {a} vs {b}"
    );
}

fn run(model: CausalLm<B>, e: &Value) -> CausalLm<B> {
    let steps = e["steps"].as_array().unwrap();
    let schedule = Schedule {
        peak: e["lr_peak"].as_f64().unwrap(),
        decay: Decay::Cosine,
        warmup_steps: 1,
        total_steps: steps.len() as u64,
    };
    let mut optim = adamw::<B>(&AdamWSettings::default());
    let mut model = model;
    for (i, s) in steps.iter().enumerate() {
        let batches: Vec<MicroBatch> = s["micro_batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| MicroBatch {
                input_ids: rows_i64(&m["input_ids"]),
                labels: rows_i64(&m["labels"]),
                attention_mask: None,
                packing: None,
            })
            .collect();
        let lr = schedule.lr(i as u64);
        close(lr, s["lr"].as_f64().unwrap(), 1e-9, &format!("step {i} lr"));
        let (m, stats) = train_step(model, &mut optim, &batches, lr, Some(1.0));
        model = m;
        assert_eq!(
            stats.tokens as u64,
            s["num_target_tokens"].as_u64().unwrap()
        );
        close(
            stats.loss,
            s["loss"].as_f64().unwrap(),
            1e-5,
            &format!("step {i} loss"),
        );
        close(
            stats.grad_norm,
            s["grad_norm"].as_f64().unwrap(),
            1e-4,
            &format!("step {i} grad norm"),
        );
    }
    model
}

fn final_logits(model: &CausalLm<B>, e: &Value) -> f32 {
    let inf = for_inference(model);
    let ids = rows_i64(&e["final_input_ids"]);
    let (b, s) = (ids.len(), ids[0].len());
    let t = Tensor::<pipe_model::CpuBackend, 2, Int>::from_data(
        TensorData::new(ids.into_iter().flatten().collect::<Vec<i64>>(), [b, s]),
        &Default::default(),
    );
    let ours: Vec<f32> = inf.forward(t, None).into_data().to_vec().unwrap();
    let theirs: Vec<f32> = e["final_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    ours.iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Full fine-tuning of the model in `model_dir` against the steps in `train_dir`.
fn check_full_fine_tuning(model_dir: &std::path::Path, train_dir: &std::path::Path) {
    let e: Value =
        serde_json::from_slice(&std::fs::read(train_dir.join("expected.json")).unwrap()).unwrap();
    let model: CausalLm<B> = load_model_with(model_dir, &Default::default(), true).unwrap();
    let model = run(model, &e);
    let d = final_logits(&model, &e);
    assert!(
        d <= 2e-4,
        "{}: final logits: max |Δ| = {d}",
        train_dir.display()
    );
}

/// LoRA from `train_dir/initial_adapter` on the model in `model_dir` against the steps in
/// `train_dir`.
fn check_lora(model_dir: &std::path::Path, train_dir: &std::path::Path) {
    let e: Value =
        serde_json::from_slice(&std::fs::read(train_dir.join("expected.json")).unwrap()).unwrap();
    let model: CausalLm<B> = load_model_with(model_dir, &Default::default(), false).unwrap();
    let model = model
        .load_peft_adapter(&train_dir.join("initial_adapter"), true)
        .unwrap();
    let model = run(model, &e);
    if e.get("final_logits").is_some() {
        let d = final_logits(&model, &e);
        assert!(
            d <= 2e-4,
            "{}: final logits: max |Δ| = {d}",
            train_dir.display()
        );
    }
}

#[test]
fn full_fine_tuning_steps_match_pytorch() {
    check_full_fine_tuning(&fixtures().join("gqa-untied"), &fixtures().join("train"));
}

#[test]
fn lora_steps_match_peft() {
    check_lora(
        &fixtures().join("gqa-untied"),
        &fixtures().join("train-lora"),
    );
}

/// The model families' fixtures (scripts/make_family_fixtures.py), trained by the same recipe.
fn families() -> Vec<PathBuf> {
    let root = fixture_set("families");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("train").is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 9,
        "family fixtures missing under {}",
        root.display()
    );
    cases
}

#[test]
fn every_family_fine_tunes_as_pytorch_does() {
    for case in families() {
        check_full_fine_tuning(&case, &case.join("train"));
    }
}

#[test]
fn every_family_trains_lora_as_peft_does() {
    for case in families() {
        check_lora(&case, &case.join("train-lora"));
    }
}
