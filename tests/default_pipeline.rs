//! The README's first command runs the embedded default pipeline (pipelines/tiny.yaml): keep
//! it true. One epoch here instead of ten, to keep the test short; the model must still
//! beat its untrained self on held-out loss.

use std::process::Command;

#[test]
fn the_default_pipeline_runs_learns_and_then_is_cached() {
    // The store and the export's delivered copy side by side (pipe refuses a `to:` inside its
    // store).
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("store");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_pipe"))
            .args(["run", "pipelines/tiny.yaml", "--cache"])
            .arg(&cache)
            .args(["--set", "params.epochs=1"])
            .arg("--set")
            .arg(format!(
                "export.to={}",
                root.path().join("delivered").display()
            ))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("PIPE_CACHE")
            .output()
            .unwrap()
    };
    let first = run();
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(out.matches(" done ").count(), 7, "{out}");
    let second = run();
    assert_eq!(
        String::from_utf8_lossy(&second.stdout)
            .matches(" cached ")
            .count(),
        7
    );
    assert!(root.path().join("delivered/config.json").exists());
    assert!(root.path().join("delivered/tokenizer.json").exists());

    let show = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .args(["show", "pipelines/tiny.yaml", "eval", "--json", "--cache"])
        .arg(&cache)
        .args(["--set", "params.epochs=1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let metric = |k: &str| {
        m["metrics"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} in {m}"))
    };
    let (base, tuned) = (metric("base.heldout.loss"), metric("tuned.heldout.loss"));
    assert!(tuned < base / 2.0, "held-out loss {base} → {tuned}");
}
