//! Stages' `resources:` on the local executor: two stages that need one GPU never overlap, a
//! GPU count is served by free GPUs (given to commands as CUDA_VISIBLE_DEVICES), declared CPUs
//! are never oversubscribed, a stage that needs more GPUs than the machine has fails with a
//! clear message, and resources are not part of a key. Each stage records when it started
//! and ended (in ns), so overlaps are measured, not assumed.

mod common;

use common::Project;

/// A command stage `id` that records its start, its CUDA_VISIBLE_DEVICES and its end, taking
/// about a second, with these `resources`.
fn stage(id: &str, resources: &str) -> String {
    format!(
        "  {id}:\n    kind: command\n    cmd: echo {id} > ${{out}}/id; date +%s%N > ${{out}}/start; (printenv CUDA_VISIBLE_DEVICES || echo unset) > ${{out}}/gpus; sleep 1; date +%s%N > ${{out}}/end\n    outs: [id, start, gpus, end]\n    resources: {resources}\n"
    )
}

fn pipeline(stages: &[(&str, &str)]) -> String {
    let mut p = String::from("name: res\nstages:\n");
    for (id, r) in stages {
        p.push_str(&stage(id, r));
    }
    p
}

fn project(stages: &[(&str, &str)]) -> Project {
    let p = Project::new();
    p.write("p.yaml", &pipeline(stages));
    p
}

fn run(p: &Project, args: &[&str]) -> common::Run {
    let mut all = vec!["run", "p.yaml"];
    all.extend_from_slice(args);
    common::Run::from(
        p.cmd(&all)
            .env_remove("CUDA_VISIBLE_DEVICES")
            .output()
            .expect("run pipe"),
    )
}

/// When stage `id` ran: (start, end) in ns.
fn span(p: &Project, id: &str) -> (u128, u128) {
    let out = p.stage_out(id);
    let read = |f: &str| {
        std::fs::read_to_string(out.join(f))
            .unwrap()
            .trim()
            .parse::<u128>()
            .unwrap()
    };
    (read("start"), read("end"))
}

fn gpus(p: &Project, id: &str) -> String {
    std::fs::read_to_string(p.stage_out(id).join("gpus"))
        .unwrap()
        .trim()
        .to_string()
}

fn overlap(a: (u128, u128), b: (u128, u128)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[test]
fn two_stages_that_need_one_gpu_never_overlap_and_others_run_beside_them() {
    let p = project(&[
        ("a", "{gpus: [0]}"),
        ("b", "{gpus: [0]}"),
        ("c", "{gpus: [1]}"),
    ]);
    run(&p, &["-j", "3", "--gpus", "0,1"]).ok();
    let (a, b, c) = (span(&p, "a"), span(&p, "b"), span(&p, "c"));
    assert!(!overlap(a, b), "a {a:?} and b {b:?} both held GPU 0");
    assert!(overlap(c, a) || overlap(c, b), "c ran beside them");
    assert_eq!(
        (gpus(&p, "a"), gpus(&p, "b"), gpus(&p, "c")),
        ("0".into(), "0".into(), "1".into())
    );
}

#[test]
fn a_gpu_count_is_served_by_free_gpus() {
    let p = project(&[("d", "{gpus: 1}"), ("e", "{gpus: 1}"), ("f", "{cpus: 1}")]);
    run(&p, &["-j", "3", "--gpus", "0,1"]).ok();
    assert!(overlap(span(&p, "d"), span(&p, "e")));
    let mut given = [gpus(&p, "d"), gpus(&p, "e")];
    given.sort();
    assert_eq!(given, ["0".to_string(), "1".to_string()]);
    assert_eq!(gpus(&p, "f"), "unset", "a stage without GPUs sees none set");
}

#[test]
fn declared_cpus_are_never_oversubscribed() {
    let p = project(&[("x", "{cpus: 3}"), ("y", "{cpus: 2}"), ("z", "{cpus: 1}")]);
    run(&p, &["-j", "3", "--cpus", "4"]).ok();
    let (x, y, z) = (span(&p, "x"), span(&p, "y"), span(&p, "z"));
    assert!(
        !overlap(x, y),
        "3 + 2 CPUs on a 4-CPU machine: x {x:?}, y {y:?}"
    );
    assert!(
        overlap(z, x) || overlap(z, y),
        "z's one CPU fits beside either"
    );
}

#[test]
fn more_gpus_than_the_machine_has_is_a_clear_failure() {
    let p = project(&[("big", "{gpus: 2}"), ("small", "{cpus: 1}")]);
    let out = run(&p, &["--gpus", "0"]);
    assert_eq!(out.code, 1, "{}", out.all());
    assert!(
        out.stderr.contains(
            "stage `big` failed: cannot run here: it needs 2 GPUs, and this machine offers 1"
        ),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("small") && out.stderr.contains("done"),
        "{}",
        out.stderr
    );
}

#[test]
fn resources_are_not_part_of_the_key_and_mistakes_are_located() {
    let p = project(&[("a", "{gpus: [0]}")]);
    run(&p, &["--gpus", "0"]).ok();
    p.write(
        "p.yaml",
        &pipeline(&[("a", "{gpus: [1], cpus: 2, memory: 1GiB}")]),
    );
    let status = p.pipe(&["status", "p.yaml"]).ok();
    assert!(status.stdout.contains("cached"), "{}", status.stdout);

    p.write("p.yaml", &pipeline(&[("a", "{gpu: 1}")]));
    let check = p.pipe(&["check", "p.yaml"]);
    assert_ne!(check.code, 0);
    assert!(
        check.stderr.contains("p.yaml:7:") && check.stderr.contains("unknown field `gpu`"),
        "{}",
        check.stderr
    );
    p.write("p.yaml", &pipeline(&[("a", "{memory: lots}")]));
    let check = p.pipe(&["check", "p.yaml"]);
    assert!(
        check.stderr.contains("`lots` is not a size"),
        "{}",
        check.stderr
    );
}
