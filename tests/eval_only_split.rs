//! A format stage may hold every record out (`val_size: 1.0`, or the count of records): an
//! evaluation-only split, whose held-out loss `evaluate` scores over the whole file.

mod common;
use common::Project;

fn pipeline(val_size: &str) -> String {
    format!(
        "\
name: eval-only
stages:
  prompts:
    kind: format
    input: instructions.json
    val_size: {val_size}
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: tokenizer
    max_len: 64
  eval:
    kind: evaluate
    model:
      init: {{vocab_size: 2001, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}}
    data: tokens
"
    )
}

#[test]
fn every_record_held_out_is_scored_by_evaluate() {
    // 1.0 holds out everything, and so does the count of records (10).
    for val_size in ["1.0", "10"] {
        let p = Project::with_examples(&pipeline(val_size));
        p.pipe(&["--cache", "cache", "run", "p.yaml"]).ok();
        let show = p
            .pipe(&["--cache", "cache", "show", "p.yaml", "prompts", "--json"])
            .ok();
        let manifest: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
        assert_eq!(manifest["metrics"]["train"], 0, "{val_size}: {manifest}");
        assert_eq!(manifest["metrics"]["val"], 10, "{val_size}: {manifest}");
        let eval = p
            .pipe(&["--cache", "cache", "show", "p.yaml", "eval", "--json"])
            .ok();
        assert!(
            eval.stdout.contains("loss"),
            "{val_size}: no held-out loss in\n{}",
            eval.stdout
        );
    }
}

#[test]
fn training_on_an_evaluation_only_split_is_refused_at_check_time() {
    let text = pipeline("1.0").replace(
        "  eval:\n    kind: evaluate\n",
        "  train:\n    kind: train\n    lr: 1.0e-3\n    batch_size: 2\n",
    );
    let p = Project::with_examples(&text);
    let r = p.pipe(&["--cache", "cache", "check", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    for part in [
        "`tokens` holds no training examples: its input `prompts` holds every record out",
        "--> p.yaml:",
        "field: stages.train.data",
        "kind: evaluate",
    ] {
        assert!(r.stderr.contains(part), "no {part:?} in:\n{}", r.stderr);
    }
}
