//! A train stage's TensorBoard events, read back by TensorBoard's own event reader (the
//! `tensorboard` package that tests/setup.sh installs): the loss, learning rate and gradient
//! norm of every step, as metrics.jsonl has them; `pipe show STAGE --logdir` finds them; and a
//! resumed attempt's restart mark makes TensorBoard drop what the interrupted one logged past
//! its checkpoint.

mod common;

use common::Project;
use pipe_train::tensorboard::EventWriter;

/// The example data through a `tokens` stage ([`common::example_pipeline`]), then a tiny
/// model trained for 6 steps.
fn pipeline() -> String {
    common::example_pipeline("tb", 64, &common::tiny_train_stage(6, &[]))
}

/// TensorBoard's reading of `dir`: tag → [(step, value)].
fn read(dir: &str) -> serde_json::Value {
    serde_json::from_str(&common::tool_python(READ, &[dir.as_ref()])).unwrap()
}

/// The reader, as JSON on stdout.
const READ: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;

#[test]
fn tensorboard_reads_every_step_of_the_train_stage() {
    let p = Project::with_examples(&pipeline());
    p.pipe(&["run", "p.yaml"]).ok();
    let dir = p
        .pipe(&["show", "p.yaml", "train", "--logdir"])
        .ok()
        .stdout
        .trim()
        .to_string();
    assert!(dir.ends_with("tensorboard"), "{dir}");
    let read = read(&dir);
    let metrics = common::train_metrics(&p);
    assert_eq!(metrics.len(), 6);
    for (tag, field) in [
        ("train/loss", "loss"),
        ("train/learning_rate", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/epoch", "epoch"),
    ] {
        let points = read[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no {tag}: {read}"));
        assert_eq!(points.len(), metrics.len(), "{tag}");
        for (point, m) in points.iter().zip(&metrics) {
            assert_eq!(point[0], m["step"], "{tag}");
            // Event files hold f32 values (compared as f32: JSON parsing may round the last
            // bit of a double).
            let expected = m[field].as_f64().unwrap() as f32;
            assert_eq!(
                point[1].as_f64().unwrap() as f32,
                expected,
                "{tag} at {}",
                m["step"]
            );
        }
    }
    let speeds = read["train/tokens_per_second"].as_array().unwrap();
    assert!(speeds.iter().all(|p| p[1].as_f64().unwrap() > 0.0));
    // A second run is a cache hit: the events stay those of the run that trained.
    p.pipe(&["run", "p.yaml"]).ok();
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, 1);
}

#[test]
fn a_stage_without_events_says_so() {
    let p = Project::with_examples(&pipeline());
    p.pipe(&["run", "p.yaml", "--until", "prompts"]).ok();
    let r = p.pipe(&["show", "p.yaml", "prompts", "--logdir"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("stage `prompts` has no TensorBoard events"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_restart_mark_voids_what_an_interrupted_attempt_logged_past_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // The first attempt logged steps 1–5 and was killed; its last checkpoint was step 3.
    let mut first = EventWriter::create(dir.path()).unwrap();
    for step in 1..=5 {
        first.scalars(step, &[("train/loss", step as f64)]).unwrap();
    }
    // The second resumes after step 3 and logs 4–6.
    let mut second = EventWriter::create(dir.path()).unwrap();
    second.start_at(4).unwrap();
    for step in 4..=6 {
        second
            .scalars(step, &[("train/loss", 10.0 * step as f64)])
            .unwrap();
    }
    let read = read(dir.path().to_str().unwrap());
    let loss: Vec<(u64, f64)> = read["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(
        loss,
        [
            (1, 1.0),
            (2, 2.0),
            (3, 3.0),
            (4, 40.0),
            (5, 50.0),
            (6, 60.0)
        ]
    );
}

#[test]
fn held_out_loss_during_training_reaches_metrics_and_tensorboard() {
    let p = Project::with_examples(&pipeline());
    // Without held-out examples there is nothing to evaluate: said at check time.
    let r = p.pipe(&["check", "p.yaml", "--set", "train.eval_steps=2"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("`eval_steps` needs held-out examples, and `prompts` holds none out"),
        "{}",
        r.stderr
    );
    let sets = [
        "--set",
        "prompts.val_size=8",
        "--set",
        "train.eval_steps=2",
        "--set",
        "train.keep=best",
    ];
    let mut args = vec!["run", "p.yaml"];
    args.extend(sets);
    p.pipe(&args).ok();
    let mut show = vec!["show", "p.yaml", "train", "--logdir"];
    show.extend(sets);
    let dir = p.pipe(&show).ok().stdout.trim().to_string();
    let read = read(&dir);
    let evaluated: Vec<(u64, f32)> = common::train_metrics(&p)
        .into_iter()
        .filter(|m| m.get("eval_loss").is_some())
        .map(|m| {
            let loss = m["eval_loss"].as_f64().unwrap() as f32;
            (m["step"].as_u64().unwrap(), loss)
        })
        .collect();
    assert_eq!(evaluated.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 6]);
    let points: Vec<(u64, f32)> = read["eval/loss"]
        .as_array()
        .unwrap_or_else(|| panic!("no eval/loss: {read}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect();
    assert_eq!(points, evaluated);
}
