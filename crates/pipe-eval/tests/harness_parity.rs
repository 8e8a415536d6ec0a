//! Multiple-choice scoring equals lm-evaluation-harness's on every built-in task format: the
//! same token ids for each context and continuation, the same log-likelihoods (transformers,
//! f32), the same predictions, `acc` and `acc_norm`. Fixtures: scripts/make_eval_fixtures.py
//! (its `eval_reference.py` follows the harness's task YAMLs and `_encode_pair` /
//! `_loglikelihood_tokens`, checked against the harness's own templates).

use std::path::{Path, PathBuf};

use pipe_eval::score::{task_requests, task_result};
use pipe_eval::tasks::{read_docs, FewShot, TaskFormat};
use pipe_model::{load_model, CausalLm};
use serde_json::Value;
use tokenizers::Tokenizer;

type B = pipe_model::CpuBackend;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/eval")
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn check(case: &str, format: TaskFormat, data: &str, shots: Option<(&str, usize)>) {
    let e: Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("expected").join(format!("{case}.json"))).unwrap(),
    )
    .unwrap();
    let model: CausalLm<B> = load_model(&fixtures().join("model"), &Default::default()).unwrap();
    let tok = Tokenizer::from_file(fixtures().join("model/tokenizer.json")).unwrap();
    let docs = read_docs(&fixtures().join(data), format, None).unwrap();
    let fewshot = match shots {
        None => FewShot::None,
        Some((file, k)) => FewShot::FirstOf {
            docs: read_docs(&fixtures().join(file), format, Some(k)).unwrap(),
            k,
        },
    };
    let add_bos = e["add_bos"].as_bool().unwrap();
    let prefix = e["prefix_token_id"].as_u64().unwrap() as u32;
    let (requests, counts) = task_requests(&tok, &docs, &fewshot, prefix, add_bos).unwrap();
    let scored =
        pipe_eval::loglikelihoods(&model, &requests, 3, &Default::default(), &mut |_| true)
            .unwrap();
    let result = task_result(&docs, &scored, &counts);
    let items = e["items"].as_array().unwrap();
    assert_eq!(items.len(), docs.len(), "{case}: items");
    let mut r = 0;
    for (item, got) in items.iter().zip(&result.per_item) {
        let contexts = ids(&item["context_tokens"]);
        let continuations = ids(&item["continuation_tokens"]);
        assert_eq!(
            item["gold"].as_u64().unwrap() as usize,
            got.gold,
            "{case}: {item}"
        );
        for (c, (ctx, cont)) in contexts.iter().zip(&continuations).enumerate() {
            assert_eq!(
                &requests[r].context, ctx,
                "{case} item {}: context {c}",
                got.index
            );
            assert_eq!(
                &requests[r].continuation, cont,
                "{case} item {}: continuation {c}",
                got.index
            );
            r += 1;
        }
        let want: Vec<f64> = serde_json::from_value(item["loglikelihoods"].clone()).unwrap();
        for (w, g) in want.iter().zip(&got.loglikelihoods) {
            assert!(
                (w - g).abs() <= 1e-5 * w.abs().max(1.0),
                "{case} item {}: log-likelihood {g} vs harness {w}",
                got.index
            );
        }
        assert_eq!(
            item["pred"].as_u64().unwrap() as usize,
            got.pred,
            "{case}: pred"
        );
        assert_eq!(
            item["pred_norm"].as_u64().map(|p| p as usize),
            got.pred_norm,
            "{case}: pred_norm"
        );
    }
    assert_eq!(r, requests.len());
    assert_eq!(e["acc"].as_f64().unwrap(), result.acc.value, "{case}: acc");
    let stderr = e["acc_stderr"].as_f64().unwrap();
    assert!((stderr - result.acc.stderr.unwrap()).abs() < 1e-12);
    assert_eq!(
        e["acc_norm"].as_f64(),
        result.acc_norm.map(|a| a.value),
        "{case}: acc_norm"
    );
}

#[test]
fn arc() {
    check("arc", TaskFormat::Arc, "arc.jsonl", None);
}

#[test]
fn arc_two_shot() {
    check(
        "arc_fewshot2",
        TaskFormat::Arc,
        "arc.jsonl",
        Some(("arc_fewshot.jsonl", 2)),
    );
}

#[test]
fn arc_with_bos() {
    check("arc_bos", TaskFormat::Arc, "arc.jsonl", None);
}

#[test]
fn hellaswag() {
    check("hellaswag", TaskFormat::Hellaswag, "hellaswag.jsonl", None);
}

#[test]
fn piqa() {
    check("piqa", TaskFormat::Piqa, "piqa.jsonl", None);
}

#[test]
fn mmlu() {
    check("mmlu", TaskFormat::Mmlu, "mmlu.jsonl", None);
}

#[test]
fn mmlu_two_shot() {
    check(
        "mmlu_fewshot2",
        TaskFormat::Mmlu,
        "mmlu.jsonl",
        Some(("mmlu_fewshot.jsonl", 2)),
    );
}

#[test]
fn winogrande() {
    check(
        "winogrande",
        TaskFormat::Winogrande,
        "winogrande.jsonl",
        None,
    );
}

#[test]
fn winogrande_two_shot() {
    check(
        "winogrande_fewshot2",
        TaskFormat::Winogrande,
        "winogrande.jsonl",
        Some(("winogrande_fewshot.jsonl", 2)),
    );
}

#[test]
fn openbookqa() {
    check(
        "openbookqa",
        TaskFormat::Openbookqa,
        "openbookqa.jsonl",
        None,
    );
}

#[test]
fn boolq() {
    check("boolq", TaskFormat::Boolq, "boolq.jsonl", None);
}

#[test]
fn generic() {
    check("generic", TaskFormat::Generic, "generic.jsonl", None);
}
