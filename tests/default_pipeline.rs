//! The README's first command runs the embedded default pipeline: keep it true.

use std::process::Command;

#[test]
fn the_default_pipeline_runs_and_then_is_cached() {
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_pipe"))
            .args(["run", "pipelines/demo.yaml", "--cache"])
            .arg(cache.path())
            .arg("--set")
            .arg(format!(
                "export.to={}",
                cache.path().join("delivered").display()
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
    assert_eq!(out.matches(" done ").count(), 8, "{out}");
    let second = run();
    assert_eq!(
        String::from_utf8_lossy(&second.stdout)
            .matches(" cached ")
            .count(),
        8
    );
    assert!(cache.path().join("delivered/config.json").exists());
}
