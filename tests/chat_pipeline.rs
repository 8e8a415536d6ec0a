//! The chat example (pipelines/chat.yaml) runs end to end: a Parquet split and a JSON Lines
//! split of one dataset directory mixed with a seed, conversations rendered with the
//! tokenizer's own chat template and masked to the assistant's turns, a small model trained on
//! them, and generation prompted with the template's generation prompt. One epoch here, to keep
//! the test short; the model must still beat its untrained self on held-out loss by a quarter.

use std::path::Path;
use std::process::Command;

fn pipe(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_pipe"))
        .args(args)
        .arg("--cache")
        .arg(cache)
        .args(["--set", "params.epochs=1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("PIPE_CACHE")
        .output()
        .unwrap()
}

fn show(cache: &Path, stage: &str) -> serde_json::Value {
    let out = pipe(cache, &["show", "pipelines/chat.yaml", stage, "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_chat_pipeline_mixes_renders_masks_trains_and_prompts() {
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("store");
    let run = pipe(&cache, &["run", "pipelines/chat.yaml"]);
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(out.matches(" done ").count(), 6, "{out}");

    // The mixture: all 600 conversations of the Parquet split, 40 drawn from the 20 greetings.
    let chats = show(&cache, "chats");
    let m = &chats["metrics"];
    assert_eq!(m["records"], 620, "{m}");
    assert_eq!(
        (m["train"].as_u64(), m["val"].as_u64()),
        (Some(540), Some(100))
    );
    let sources = m["sources"].as_array().unwrap();
    assert_eq!(sources[0]["name"], "tasks");
    // Files are named by their place in the input, not where the input lies.
    assert_eq!(sources[0]["files"][0], "train-00000-of-00001.parquet");
    assert_eq!(
        (
            sources[0]["taken"].as_u64(),
            sources[0]["repeated"].as_u64()
        ),
        (Some(600), Some(0))
    );
    assert_eq!(
        (
            sources[1]["taken"].as_u64(),
            sources[1]["repeated"].as_u64()
        ),
        (Some(40), Some(20))
    );
    // Of the records read: a third of the tasks and half the greetings have a system turn.
    assert_eq!(m["conversations"]["with_system"], 200 + 10);

    // Rendered with the tokenizer's template, the loss on the assistant's turns only.
    let tokens = show(&cache, "tokens");
    let t = &tokens["metrics"];
    assert_eq!(t["chat"]["template_from"], "tokenizer_config.json", "{t}");
    assert_eq!(t["chat"]["train_on"], "assistant");
    let masked = t["train"]["masked_fraction"].as_f64().unwrap();
    assert!((0.5..0.95).contains(&masked), "masked fraction {masked}");
    assert_eq!(t["train"]["truncated"], 0);

    // Generation prompts end with the generation prompt; the reference is the last answer.
    let eval = show(&cache, "eval");
    let dir = cache
        .join("stages")
        .join(eval["key"].as_str().unwrap())
        .join("out");
    let samples = std::fs::read_to_string(dir.join("samples.jsonl")).unwrap();
    let samples: Vec<serde_json::Value> = samples
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        samples.len(),
        2 * 101,
        "base and tuned, 100 held out + 1 instruction"
    );
    for s in &samples {
        let prompt = s["prompt"].as_str().unwrap();
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
    }
    let instruction = samples.iter().find(|s| s["id"] == "instruction:0").unwrap();
    assert_eq!(
        instruction["prompt"],
        "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"
    );
    let metric = |k: &str| {
        eval["metrics"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {}", eval["metrics"]))
    };
    let (base, tuned) = (metric("base.heldout.loss"), metric("tuned.heldout.loss"));
    assert!(tuned < base * 0.75, "held-out loss {base} → {tuned}");
}
