//! The train stage through the real binary: a run killed with SIGKILL (or stopped with
//! Ctrl-C) mid-training resumes from its checkpoint, and its final weights are bit-identical
//! to those of an uninterrupted run.

mod common;
use std::time::{Duration, Instant};

use common::{sigkill, Project};

fn pipeline() -> String {
    common::example_pipeline("tiny-train", 96, &common::checkpointed_train_stage(6))
}

fn project() -> Project {
    Project::with_examples(&pipeline())
}

fn weights(p: &Project) -> Vec<u8> {
    let stages = p.path("cache/stages");
    for e in std::fs::read_dir(stages).unwrap() {
        let w = e.unwrap().path().join("out/model/model.safetensors");
        if w.exists() {
            return std::fs::read(w).unwrap();
        }
    }
    panic!("no trained model in the store");
}

/// Lines of metrics.jsonl the running train stage has written so far.
fn steps_done(p: &Project) -> usize {
    let Ok(rd) = std::fs::read_dir(p.path("cache/work")) else {
        return 0;
    };
    rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("state/metrics.jsonl")).ok())
        .map(|t| t.lines().count())
        .max()
        .unwrap_or(0)
}

fn wait_steps(p: &Project, n: usize) {
    let t = Instant::now();
    while steps_done(p) < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "training did not reach step {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn train_log(p: &Project) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(p.path("cache/logs")).unwrap() {
        for f in std::fs::read_dir(e.unwrap().path()).unwrap() {
            all.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap_or_default());
        }
    }
    all
}

#[test]
fn sigkill_and_ctrl_c_during_training_resume_to_identical_weights() {
    let reference = project();
    let r = reference.pipe(&["run", "p.yaml"]).ok();
    assert!(
        r.stdout.contains("train") && r.stdout.contains("done"),
        "{}",
        r.stdout
    );
    let expected = weights(&reference);
    let summary: serde_json::Value = serde_json::from_str(
        &reference
            .pipe(&["show", "p.yaml", "train", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    let m = &summary["metrics"];
    assert!(
        m["last_loss"].as_f64().unwrap() < m["first_loss"].as_f64().unwrap(),
        "the model learns: {m}"
    );

    // SIGKILL after the checkpoint at step 3, before the one at step 6.
    let p = project();
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_steps(&p, 4);
    sigkill(&mut child);
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(
        r.stdout.contains("cached") && r.stdout.contains("done"),
        "{}",
        r.stdout
    );
    assert!(
        train_log(&p).contains("resuming from the checkpoint at step 3"),
        "{}",
        train_log(&p)
    );
    assert!(
        weights(&p) == expected,
        "weights after a SIGKILL and resume differ"
    );

    // Ctrl-C: the stage saves a checkpoint where it stands and the run exits 130.
    let q = project();
    let child = q.spawn(&["run", "p.yaml"]);
    wait_steps(&q, 2);
    common::ctrl_c(child);
    q.pipe(&["run", "p.yaml"]).ok();
    assert!(
        train_log(&q).contains("resuming from the checkpoint at step"),
        "{}",
        train_log(&q)
    );
    assert!(
        weights(&q) == expected,
        "weights after Ctrl-C and resume differ"
    );
}
