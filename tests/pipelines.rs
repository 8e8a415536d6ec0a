//! Every pipeline shipped in pipelines/ passes `pipe check`, and `pipe run --dry-run` prints its
//! plan, without network and without a GPU.

use std::process::Command;

fn pipe(args: &[&str]) -> (bool, String) {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .arg("--cache")
        .arg(cache.path())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("PIPE_CACHE")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn shipped_pipelines_check_and_plan() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["alpaca-lora.yaml", "alpaca.yaml", "chat.yaml", "tiny.yaml"]
    );
    for name in &names {
        let file = format!("pipelines/{name}");
        // The Alpaca recipes train on a GPU; a build without the cuda feature refuses that at
        // check time, and checks them on the CPU.
        let mut cpu = Vec::new();
        if name.starts_with("alpaca") && !cfg!(feature = "cuda") {
            let (ok, out) = pipe(&["check", &file]);
            assert!(!ok && out.contains("--features cuda"), "{out}");
            cpu = vec!["--set", "train.device=cpu", "--set", "eval.device=cpu"];
        }
        let (ok, out) = pipe(&[&["check", file.as_str()][..], &cpu].concat());
        assert!(ok, "{out}");
        let (ok, plan) = pipe(&[&["run", "--dry-run", file.as_str()][..], &cpu].concat());
        assert!(ok, "{plan}");
        let prompts = if name == "chat.yaml" {
            "chats"
        } else {
            "prompts"
        };
        for stage in [prompts, "tokens", "train", "eval"] {
            assert!(
                plan.lines()
                    .any(|l| l.contains(&format!(" {stage} ")) || l.trim_end().ends_with(stage)),
                "{name}: no `{stage}` in the plan:\n{plan}"
            );
        }
    }
}

#[test]
fn the_alpaca_recipes_are_the_published_ones() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/alpaca.yaml"),
    )
    .unwrap();
    for line in [
        "sha256: 2eddafc6b977608d778aaab8dfc7e50e547b3af9826dfb9e909d9fc362e4a419",
        "source: hf://meta-llama/Llama-2-7b-hf",
        "template: alpaca",
        "max_len: 512",
        "lr: 2.0e-5",
        "weight_decay: 0.0",
        "schedule: cosine",
        "warmup_ratio: 0.03",
        "epochs: 3",
        "batch_size: 128",
        "micro_batch_size: 4",
        "dtype: bf16",
    ] {
        assert!(text.contains(line), "alpaca.yaml lacks `{line}`");
    }
    let lora = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/alpaca-lora.yaml"),
    )
    .unwrap();
    for line in [
        "method: lora",
        "target_modules: all-linear",
        "alpha: 16",
        "dropout: 0.05",
        "lr: 2.0e-4",
        "batch_size: 8",
        "format: peft",
    ] {
        assert!(lora.contains(line), "alpaca-lora.yaml lacks `{line}`");
    }
}
