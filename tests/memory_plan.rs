//! The memory plan through the binary: `pipe check` and `pipe run --dry-run` print each train
//! stage's estimated peak, and `pipe run` refuses a stage that cannot fit before it loads
//! anything, naming settings that would.

mod common;
use common::Project;

/// Long examples packed into rows of 2048 tokens, and a micro-batch of 512 such rows: far more
/// attention scores than any machine holds, on a model of a few thousand parameters.
const PIPELINE: &str = r#"name: too-big
stages:
  data:
    kind: download
    source: long.json
  tokenizer:
    kind: download
    source: tokenizer
  prompts:
    kind: format
    input: data
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: tokenizer
    max_len: 2048
    packing: true
  train:
    kind: train
    data: tokens
    model:
      init: {vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 2048}
      seed: 1
    lr: 1.0e-3
    batch_size: 512
    micro_batch_size: 512
"#;

fn project() -> Project {
    let p = Project::with_examples(PIPELINE);
    let words = "the model reads every token of this long response and learns from it ";
    let records: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"instruction": "Write at length ({i}).", "input": "", "output": "{}"}}"#,
                words.repeat(30)
            )
        })
        .collect();
    p.write("long.json", &format!("[{}]", records.join(",\n")));
    p
}

#[test]
fn check_and_dry_run_print_the_plan_of_each_train_stage() {
    let p = project();
    let check = p.pipe(&["check", "p.yaml"]).ok();
    assert!(
        check.stdout.contains("train: about ")
            && check.stdout.contains("(micro-batch 512 × 2048 tokens)"),
        "{}",
        check.stdout
    );
    let plan = p.pipe(&["run", "--dry-run", "p.yaml"]).ok();
    assert!(plan.stdout.contains("train: about "), "{}", plan.stdout);
}

#[test]
fn a_run_that_cannot_fit_is_refused_before_loading_with_settings_that_would() {
    let p = project();
    let run = p.pipe(&["run", "p.yaml"]);
    assert_eq!(run.code, 1, "{}", run.all());
    let all = run.all();
    assert!(all.contains("this run needs about "), "{all}");
    assert!(all.contains("free"), "{all}");
    assert!(
        all.contains("settings that would fit: micro_batch_size: "),
        "{all}"
    );
    assert!(
        !all.contains("panicked") && !all.contains("a bug in pipe"),
        "{all}"
    );
    // Refused before a step: the stages before it finished, the train stage left nothing.
    let work = std::fs::read_dir(p.path("cache/work"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().join("state/metrics.jsonl").exists())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(work, 0, "the refused stage trained");

    // The proposal is a smaller micro-batch (pipe_train::memory's tests check that it fits).
    let proposed: usize = all
        .split("settings that would fit: micro_batch_size: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("a proposed micro_batch_size");
    assert!(proposed < 512, "{all}");
}
