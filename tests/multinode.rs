//! Multi-node training on one machine: two `pipe run-stage` processes as the two nodes of a
//! `nodes: 2` train stage, node 0 listening on 127.0.0.1. They train the model that one
//! process with as many replicas trains (to float rounding), a run resumed after a node was
//! SIGKILLed ends bit for bit where an uninterrupted one does, and a node that is missing or
//! dies makes the other stop with a message instead of waiting forever.

mod common;

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{sigkill, Project};

/// 24 steps (12 epochs of 2: 4 micro-batches, then the short rest), a checkpoint every 3.
fn train_stage(placement: &str) -> String {
    let stage =
        common::checkpointed_train_stage(12).replace("    batch_size: 4\n", "    batch_size: 8\n");
    format!("{stage}{placement}")
}

/// Two nodes of two CPU replicas each.
fn two_nodes() -> Project {
    Project::with_examples(&common::example_pipeline(
        "mn",
        96,
        &train_stage("    nodes: 2\n    devices: [cpu, cpu]\n"),
    ))
}

/// Runs the stages before `train` (a local `pipe run` refuses `nodes: 2`, saying how to run it).
fn prepare(p: &Project) {
    let r = p.pipe(&["run", "p.yaml"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("start `pipe run-stage` on each node"),
        "{}",
        r.stderr
    );
}

fn node(p: &Project, rank: usize, port: u16, timeout_s: u64) -> Child {
    node_of(p, 2, rank, port, timeout_s)
}

fn node_of(p: &Project, nodes: usize, rank: usize, port: u16, timeout_s: u64) -> Child {
    p.spawn(&[
        "run-stage",
        "p.yaml",
        "--stage",
        "train",
        "--nodes",
        &nodes.to_string(),
        "--node",
        &rank.to_string(),
        "--coordinator",
        &format!("127.0.0.1:{port}"),
        "--node-timeout",
        &timeout_s.to_string(),
    ])
}

fn finish(child: Child) -> common::Run {
    common::Run::from(child.wait_with_output().expect("wait for a node"))
}

/// Both nodes to the end; then the stage is a cache hit of `pipe run`.
fn train_on_two_nodes(p: &Project) {
    let port = pipe_testkit::free_loopback_port();
    let (a, b) = (node(p, 0, port, 60), node(p, 1, port, 60));
    for (rank, r) in [(0, finish(a)), (1, finish(b))] {
        assert_eq!(r.code, 0, "node {rank}: {}{}", r.stdout, r.stderr);
    }
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn weights_bytes(p: &Project) -> Vec<u8> {
    std::fs::read(p.stage_out("train").join("model/model.safetensors")).unwrap()
}

/// The f32 tensors of a safetensors file, by name.
fn tensors(bytes: &[u8]) -> BTreeMap<String, Vec<f32>> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            assert_eq!(v["dtype"], "F32");
            let o = &v["data_offsets"];
            let (s, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            let values = data[s..e]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k.clone(), values)
        })
        .collect()
}

fn metrics_lines(p: &Project) -> usize {
    std::fs::read_dir(p.path("cache/work"))
        .into_iter()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("state/metrics.jsonl")).ok())
        .map(|m| m.lines().count())
        .max()
        .unwrap_or(0)
}

fn logs(p: &Project) -> String {
    let mut text = String::new();
    for dir in std::fs::read_dir(p.path("cache/logs")).unwrap().flatten() {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            text.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
        }
    }
    text
}

#[test]
fn two_nodes_train_the_model_of_one_process_with_as_many_replicas() {
    // Full fine-tuning, and LoRA (whose frozen weights have no gradients to sum).
    let lora =
        "    method: lora\n    lora: {r: 4, alpha: 8, dropout: 0, target_modules: all-linear}\n";
    for (method, weights) in [
        ("", "model/model.safetensors"),
        (lora, "adapter/adapter_model.safetensors"),
    ] {
        let project = |placement: &str| {
            Project::with_examples(&common::example_pipeline(
                "mn",
                96,
                &train_stage(&format!("{method}{placement}")),
            ))
        };
        let p = project("    nodes: 2\n    devices: [cpu, cpu]\n");
        prepare(&p);
        train_on_two_nodes(&p);
        let reference = project("    devices: [cpu, cpu, cpu, cpu]\n");
        let r = reference.pipe(&["run", "p.yaml"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let read =
            |p: &Project| tensors(&std::fs::read(p.stage_out("train").join(weights)).unwrap());
        let (ours, theirs) = (read(&p), read(&reference));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        let mut worst = 0f32;
        for (name, a) in &ours {
            for (x, y) in a.iter().zip(&theirs[name]) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("{weights}: largest difference to one process with 4 replicas: {worst}");
        assert!(worst <= 1e-5, "{weights}: largest difference {worst}");
        // Node 0 wrote the metrics; the steps are those of the one-process run.
        let metrics = |p: &Project| {
            std::fs::read_to_string(p.stage_out("train").join("metrics.jsonl"))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(metrics(&p), metrics(&reference));
        assert!(metrics(&p) >= 20);
    }
}

#[test]
fn three_nodes_sum_around_a_ring_to_the_model_of_one_process_with_three_replicas() {
    // 3 micro-batches a step: one per node.
    let stage = |placement: &str| {
        train_stage(placement).replace("    batch_size: 8\n", "    batch_size: 6\n")
    };
    let p = Project::with_examples(&common::example_pipeline(
        "mn",
        96,
        &stage("    nodes: 3\n"),
    ));
    prepare(&p);
    let port = pipe_testkit::free_loopback_port();
    let nodes: Vec<Child> = (0..3).map(|r| node_of(&p, 3, r, port, 60)).collect();
    for (rank, n) in nodes.into_iter().enumerate() {
        let r = finish(n);
        assert_eq!(r.code, 0, "node {rank}: {}", r.stderr);
    }
    assert_eq!(p.pipe(&["run", "p.yaml"]).code, 0);
    let reference = Project::with_examples(&common::example_pipeline(
        "mn",
        96,
        &stage("    devices: [cpu, cpu, cpu]\n"),
    ));
    assert_eq!(reference.pipe(&["run", "p.yaml"]).code, 0);
    let (ours, theirs) = (
        tensors(&weights_bytes(&p)),
        tensors(&weights_bytes(&reference)),
    );
    let worst = ours
        .iter()
        .flat_map(|(name, a)| a.iter().zip(&theirs[name]).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    eprintln!("three nodes: largest difference to one process with 3 replicas: {worst}");
    assert!(worst <= 1e-5, "largest difference {worst}");
}

/// The weights of an uninterrupted run on two nodes.
fn uninterrupted_weights() -> &'static [u8] {
    static WEIGHTS: OnceLock<Vec<u8>> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let p = two_nodes();
        prepare(&p);
        train_on_two_nodes(&p);
        weights_bytes(&p)
    })
}

/// Waits until node 0 has logged `steps` steps.
fn wait_steps(p: &Project, steps: usize) {
    let t = Instant::now();
    while metrics_lines(p) < steps {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts both nodes of `p`, SIGKILLs node 1 once 7 steps are done, and waits for node 0:
/// how it ended, and how long that took after the kill.
fn kill_node_1_after_7_steps(p: &Project) -> (common::Run, Duration) {
    prepare(p);
    let port = pipe_testkit::free_loopback_port();
    let (a, mut b) = (node(p, 0, port, 60), node(p, 1, port, 60));
    wait_steps(p, 7);
    sigkill(&mut b);
    let t = Instant::now();
    let r = finish(a);
    (r, t.elapsed())
}

#[test]
fn a_run_resumed_after_a_node_was_killed_ends_bit_for_bit_where_an_uninterrupted_one_does() {
    let p = two_nodes();
    // Node 0 stops at once, saying which node went away, and keeps its last checkpoint.
    let (r, took) = kill_node_1_after_7_steps(&p);
    assert!(took < Duration::from_secs(30));
    assert_ne!(r.code, 0);
    let log = logs(&p);
    assert!(
        log.contains("node 1 closed its connection"),
        "node 0's log:\n{log}"
    );
    assert!(
        metrics_lines(&p) < 24,
        "the kill came too late to test a resume"
    );

    train_on_two_nodes(&p);
    assert!(logs(&p).contains("resuming from the checkpoint at step"));
    assert!(weights_bytes(&p) == uninterrupted_weights());
}

#[test]
fn a_damaged_checkpoint_is_passed_over_by_every_node_and_removed_by_node_0_alone() {
    let p = two_nodes();
    kill_node_1_after_7_steps(&p);
    // Steps 6 (`checkpoint`) and 3 (`checkpoint.old`) are saved; step 6's is damaged.
    let state = std::fs::read_dir(p.path("cache/work"))
        .unwrap()
        .map(|e| e.unwrap().path().join("state"))
        .find(|s| s.join("checkpoint").exists())
        .expect("a checkpoint");
    assert!(state.join("checkpoint.old").exists());
    let optimizer = state.join("checkpoint/optimizer.bin");
    let mut bytes = std::fs::read(&optimizer).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&optimizer, bytes).unwrap();
    train_on_two_nodes(&p);
    let log = logs(&p);
    assert_eq!(
        log.matches("is damaged and is not used").count(),
        2,
        "{log}"
    );
    assert!(weights_bytes(&p) == uninterrupted_weights());
}

#[test]
fn ctrl_c_on_one_node_stops_both_at_one_step_and_the_run_resumes_from_there() {
    let p = two_nodes();
    prepare(&p);
    let port = pipe_testkit::free_loopback_port();
    let (a, b) = (node(&p, 0, port, 60), node(&p, 1, port, 60));
    wait_steps(&p, 5);
    common::signal(&b, libc::SIGINT);
    let (ra, rb) = (finish(a), finish(b));
    assert_eq!((ra.code, rb.code), (130, 130), "{}{}", ra.stderr, rb.stderr);
    let log = logs(&p);
    let stops: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("interrupted at step"))
        .collect();
    assert_eq!(stops.len(), 2, "{log}");
    assert_eq!(stops[0], stops[1], "the nodes stopped at different steps");
    train_on_two_nodes(&p);
    assert!(weights_bytes(&p) == uninterrupted_weights());
}

#[test]
fn a_node_that_never_comes_makes_the_other_stop_with_a_message() {
    let p = two_nodes();
    prepare(&p);
    let port = pipe_testkit::free_loopback_port();
    let t = Instant::now();
    let r = finish(node(&p, 0, port, 3));
    assert!(t.elapsed() < Duration::from_secs(60));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("node 1 did not join within 3 s"),
        "{}",
        r.stderr
    );
    // The other side: no node 0 to join.
    let r = finish(node(&p, 1, pipe_testkit::free_loopback_port(), 3));
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("cannot reach the coordinator (node 0)"),
        "{}",
        r.stderr
    );
}
