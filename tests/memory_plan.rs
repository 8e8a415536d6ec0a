//! The memory plan through the binary: `pipe check` and `pipe run --dry-run` print each train
//! and evaluate stage's estimated peak, and `pipe run` refuses a stage that cannot fit before
//! it loads anything, naming settings that would.

mod common;
use common::Project;

/// Long examples packed into rows of 2048 tokens, and a micro-batch of 512 such rows: a million
/// tokens' logits over a vocabulary of 32,000 (124 GiB), more than any machine here holds, on a
/// model of a million parameters.
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
      init: {vocab_size: 32000, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 2048}
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

/// An evaluation beside the training above: held-out rows of up to 2048 tokens, 4 at a time.
const WITH_EVAL: &str = r#"
  eval:
    kind: evaluate
    model:
      init: {vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 2048}
      seed: 1
    data: tokens
    batch_size: 4
"#;

#[test]
fn check_prints_the_plan_of_each_evaluate_stage() {
    let p = project();
    p.write(
        "p.yaml",
        &format!(
            "{}{WITH_EVAL}",
            PIPELINE.replace("    input: data\n", "    input: data\n    val_size: 0.25\n")
        ),
    );
    let check = p.pipe(&["check", "p.yaml"]).ok();
    assert!(
        check.stdout.contains("eval: about ")
            && check.stdout.contains("its widest batch: 4 × 2048 tokens"),
        "{}",
        check.stdout
    );
    let plan = p.pipe(&["run", "--dry-run", "p.yaml"]).ok();
    assert!(plan.stdout.contains("eval: about "), "{}", plan.stdout);
}

/// One generation whose key/value cache (2 × 8 layers × 2²³ tokens × 2048 values × 4 bytes =
/// 1 TiB) no machine here holds.
const TOO_LONG_A_GENERATION: &str = r#"name: too-long
stages:
  tokenizer:
    kind: download
    source: tokenizer
  eval:
    kind: evaluate
    model:
      init: {vocab_size: 2001, hidden_size: 2048, intermediate_size: 64, num_hidden_layers: 8, num_attention_heads: 128, num_key_value_heads: 128, max_position_embeddings: 8388608}
      seed: 1
    tokenizer: tokenizer
    generate:
      instructions: ["Name three primary colours."]
      max_new_tokens: 8388000
"#;

#[test]
fn an_evaluation_that_cannot_fit_is_refused_before_loading_with_settings_that_would() {
    let p = Project::with_examples(TOO_LONG_A_GENERATION);
    let run = p.pipe(&["run", "p.yaml"]);
    assert_eq!(run.code, 1, "{}", run.all());
    let all = run.all();
    assert!(all.contains("this evaluation needs about "), "{all}");
    assert!(all.contains("a generation of 8388"), "{all}");
    assert!(
        !all.contains("panicked") && !all.contains("a bug in pipe"),
        "{all}"
    );
    let proposed: u64 = all
        .split("settings that would fit: generate.max_new_tokens: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a proposed max_new_tokens: {all}"));
    assert!(proposed < 8388000, "{all}");
    // Nothing was written: no evaluation output anywhere in the store.
    let written = common::files_under(&p.path("cache"));
    assert!(
        !written
            .keys()
            .any(|f| f.ends_with("metrics.json") || f.ends_with("samples.jsonl")),
        "{:?}",
        written.keys().collect::<Vec<_>>()
    );
}
