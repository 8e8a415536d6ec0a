//! The train stage through the real binary: a run killed with SIGKILL (or stopped with
//! Ctrl-C) mid-training resumes from its checkpoint, and its final weights are bit-identical
//! to those of an uninterrupted run.

mod common;
use std::time::{Duration, Instant};

use common::{sigkill, Project};

/// 40 epochs of 3 steps, a checkpoint every 3: a step takes a few milliseconds, so a run lasts
/// long enough (a fraction of a second) for a kill to land mid-training.
fn pipeline() -> String {
    common::example_pipeline("tiny-train", 96, &common::checkpointed_train_stage(40))
}

const STEPS: usize = 120;

/// The step of the checkpoint a resumed run says it started from.
fn resumed_from(p: &Project) -> usize {
    let log = train_log(p);
    log.split("resuming from the checkpoint at step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the run did not resume from a checkpoint:\n{log}"))
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

/// The train stage's last loss is below its first.
fn assert_learned(p: &Project) {
    let summary: serde_json::Value =
        serde_json::from_str(&p.pipe(&["show", "p.yaml", "train", "--json"]).ok().stdout).unwrap();
    let m = &summary["metrics"];
    assert!(
        m["last_loss"].as_f64().unwrap() < m["first_loss"].as_f64().unwrap(),
        "the model learns: {m}"
    );
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
    assert_learned(&reference);

    // SIGKILL mid-training, after the checkpoint at step 3 at least: the steps since the last
    // checkpoint are lost and run again.
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
    let step = resumed_from(&p);
    assert!(
        (3..STEPS).contains(&step) && step.is_multiple_of(3),
        "resumed from step {step}"
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
    assert!((2..STEPS).contains(&resumed_from(&q)));
    assert!(
        weights(&q) == expected,
        "weights after Ctrl-C and resume differ"
    );
}

/// Full fine-tuning with `weights: bf16` through the binary: the plan counts its bf16 states,
/// it learns, its saved weights are bf16 values, and a SIGKILLed run resumes to the same bytes.
#[test]
fn bf16_weights_train_and_resume_to_identical_weights() {
    let stage = common::checkpointed_train_stage(6) + "    dtype: bf16\n    weights: bf16\n";
    let pipeline = common::example_pipeline("bf16-weights", 96, &stage);
    let reference = Project::with_examples(&pipeline);
    reference.pipe(&["run", "p.yaml"]).ok();
    let expected = weights(&reference);
    assert_learned(&reference);
    // The layers' projections were bf16: their saved f32 values have empty low halves.
    let header_len = u64::from_le_bytes(expected[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&expected[8..8 + header_len]).unwrap();
    let data = &expected[8 + header_len..];
    let offsets = &header["model.layers.0.mlp.down_proj.weight"]["data_offsets"];
    let (s, e) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    assert!(data[s..e].chunks_exact(4).all(|c| c[0] == 0 && c[1] == 0));
    let offsets = &header["model.embed_tokens.weight"]["data_offsets"];
    let (s, e) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    assert!(!data[s..e].chunks_exact(4).all(|c| c[0] == 0 && c[1] == 0));

    let p = Project::with_examples(&pipeline);
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_steps(&p, 4);
    sigkill(&mut child);
    p.pipe(&["run", "p.yaml"]).ok();
    assert!(train_log(&p).contains("resuming from the checkpoint"));
    assert!(weights(&p) == expected, "resumed bf16 weights differ");

    // What it needs, said where it is written.
    for (extra, message) in [
        ("    weights: bf16\n", "`weights: bf16` needs `dtype: bf16`"),
        (
            "    dtype: bf16\n    weights: bf16\n    method: lora\n",
            "`weights: bf16` is for full fine-tuning",
        ),
        (
            "    dtype: bf16
    bf16_rounding: stochastic
",
            "`bf16_rounding` is for `weights: bf16`",
        ),
    ] {
        let bad = Project::with_examples(&common::example_pipeline(
            "bf16-weights",
            96,
            &(common::checkpointed_train_stage(6) + extra),
        ));
        let r = bad.pipe(&["check", "p.yaml"]);
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains(message), "{}", r.stderr);
        assert!(r.stderr.contains("p.yaml:"), "{}", r.stderr);
    }
}
