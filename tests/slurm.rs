//! The Slurm executor against a real two-node Slurm cluster (slurmctld, two slurmd and munged
//! from Debian's packages, started by tests/setup.sh through tests/slurm-cluster.sh on
//! 127.0.0.1): every stage of the example pipeline submitted as a batch job, a training on
//! two nodes (one job, a task per node through srun), a killed `pipe run` that
//! re-attaches to its running job, Ctrl-C that leaves no job behind, a requeued (preempted)
//! training job that resumes from its checkpoint, and jobs that fail (time limit, exit status)
//! with Slurm's reason. Final weights are compared with a local run's, byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{sigkill, Project};

/// The training of tests/train_stage.rs, longer (120 steps: long enough to interrupt).
fn train() -> String {
    common::checkpointed_train_stage(40)
}

/// The cluster's configuration; fails the test with what to do when it is not up.
fn slurm_conf() -> PathBuf {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/slurm/slurm.conf");
    let up = conf.exists()
        && Command::new("scontrol")
            .arg("ping")
            .env("SLURM_CONF", &conf)
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("UP"));
    assert!(
        up,
        "the test Slurm cluster is not running: run `bash tests/setup.sh` (it installs slurm-wlm and munge and starts the cluster)"
    );
    conf
}

/// The example pipeline `name` with [`train`], every stage on Slurm (`slurm:` as given).
fn slurm_pipeline(name: &str, slurm: &str, stages: &str) -> String {
    let local = common::example_pipeline(name, 96, stages);
    local.replacen(
        &format!("name: {name}\n"),
        &format!("name: {name}\nexecutor: slurm\nslurm: {slurm}\n"),
        1,
    )
}

fn cmd(p: &Project, args: &[&str]) -> Command {
    let mut c = p.cmd(args);
    c.env("SLURM_CONF", slurm_conf());
    c
}

fn run(p: &Project) -> common::Run {
    common::Run::from(cmd(p, &["run", "p.yaml"]).output().expect("run pipe"))
}

fn spawn(p: &Project) -> Child {
    cmd(p, &["run", "p.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pipe")
}

fn slurm(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("SLURM_CONF", slurm_conf())
        .output()
        .expect("run a Slurm command");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The weights a local (non-Slurm) run of the same training makes.
fn local_weights() -> &'static [u8] {
    static WEIGHTS: OnceLock<Vec<u8>> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let p = Project::with_examples(&common::example_pipeline("local", 96, &train()));
        p.pipe(&["run", "p.yaml"]).ok();
        weights(&p)
    })
}

fn weights(p: &Project) -> Vec<u8> {
    std::fs::read(p.stage_out("train").join("model/model.safetensors")).unwrap()
}

/// The train stage's work dir (it holds metrics.jsonl while training runs).
fn train_work(p: &Project) -> Option<PathBuf> {
    std::fs::read_dir(p.path("cache/work"))
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|w| w.join("state/metrics.jsonl").exists())
}

fn wait_steps(p: &Project, n: usize) {
    let t = Instant::now();
    loop {
        let done = train_work(p)
            .and_then(|w| std::fs::read_to_string(w.join("state/metrics.jsonl")).ok())
            .map_or(0, |m| m.lines().count());
        if done >= n {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "training did not reach step {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The Slurm job id recorded in the train stage's work dir.
fn train_job(p: &Project) -> String {
    let w = train_work(p).expect("training started");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join("slurm-job.json")).unwrap()).unwrap();
    record["job_id"].as_str().unwrap().to_string()
}

fn assert_train_done(r: &common::Run) {
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("train") && l.contains("done")),
        "{}",
        r.stdout
    );
}

fn logs_of(p: &Project, stage: &str) -> String {
    let key = {
        let m: serde_json::Value = serde_json::from_str(
            &cmd(p, &["show", "p.yaml", stage, "--json"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap(),
        )
        .unwrap_or_default();
        m["key"].as_str().unwrap_or_default().to_string()
    };
    let mut all = String::new();
    let dirs: Vec<PathBuf> = if key.is_empty() {
        std::fs::read_dir(p.path("cache/logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    } else {
        vec![p.path("cache/logs").join(key)]
    };
    for d in dirs {
        let mut files: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            all.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        }
    }
    all
}

#[test]
fn every_stage_runs_as_a_job_and_makes_what_a_local_run_makes() {
    let p = Project::with_examples(&slurm_pipeline("sl-all", "{time: \"10\"}", &train()));
    let local = Project::with_examples(&common::example_pipeline("sl-all", 96, &train()));
    let r = run(&p).ok();
    for stage in ["data", "tokenizer", "prompts", "tokens", "train"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(stage) && l.contains("done")),
            "{stage}: {}",
            r.stdout
        );
        let log = logs_of(&p, stage);
        assert!(log.contains("submitted to Slurm"), "{stage}: {log}");
        assert!(log.contains("# pipe: Slurm job "), "{stage}: {log}");
        assert!(log.contains("# pipe: committed"), "{stage}: {log}");
    }
    // The executor is a run setting: the same keys, the same bytes as a local run.
    local.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(p.outputs("cache"), local.outputs("cache"));
    assert!(
        weights(&p) == local_weights(),
        "weights differ from a local run's"
    );
    // Nothing is submitted again.
    let again = run(&p).ok();
    assert_eq!(
        again.stdout.matches("cached").count(),
        5,
        "{}",
        again.stdout
    );
    assert_eq!(
        logs_of(&p, "train").matches("submitted to Slurm").count(),
        1
    );
}

#[test]
fn a_training_on_two_nodes_runs_as_one_job_of_two_tasks_and_makes_the_local_two_replica_model() {
    let two_nodes = train().replace("    save_steps: 3\n", "    save_steps: 3\n    nodes: 2\n");
    let p = Project::with_examples(&slurm_pipeline("sl-nodes", "{time: \"10\"}", &two_nodes));
    let r = run(&p).ok();
    assert_train_done(&r);
    let log = logs_of(&p, "train");
    assert!(log.contains("--nodes=2 --ntasks-per-node=1"), "{log}");
    assert!(
        log.contains("all 2 nodes joined; training on 2 replicas"),
        "{log}"
    );
    assert!(log.contains("started as node 1 of 2"), "{log}");
    // One process with two replicas sums the same two gradients in the same order.
    let local = Project::with_examples(&common::example_pipeline(
        "sl-nodes",
        96,
        &train().replace(
            "    save_steps: 3\n",
            "    save_steps: 3\n    devices: [cpu, cpu]\n",
        ),
    ));
    local.pipe(&["run", "p.yaml"]).ok();
    assert!(
        weights(&p) == weights(&local),
        "weights differ from one process's with two replicas"
    );
}

#[test]
fn a_killed_run_reattaches_to_its_running_job_instead_of_submitting_another() {
    let p = Project::with_examples(&slurm_pipeline("sl-attach", "{time: \"10\"}", &train()));
    let mut child = spawn(&p);
    wait_steps(&p, 4);
    sigkill(&mut child);
    let job = train_job(&p);
    let state = slurm(&["squeue", "-h", "-j", &job, "-o", "%T"]);
    assert_eq!(state, "RUNNING", "the job outlives the killed submitter");
    let r = run(&p).ok();
    assert_train_done(&r);
    let log = logs_of(&p, "train");
    assert!(
        log.contains(&format!("re-attached to Slurm job {job}")),
        "{log}"
    );
    assert_eq!(log.matches("submitted to Slurm").count(), 1, "{log}");
    assert!(
        weights(&p) == local_weights(),
        "weights differ from a local run's"
    );
}

#[test]
fn ctrl_c_cancels_the_job_and_the_next_run_resumes_from_its_checkpoint() {
    let p = Project::with_examples(&slurm_pipeline("sl-cancel", "{time: \"10\"}", &train()));
    let child = spawn(&p);
    wait_steps(&p, 4);
    let job = train_job(&p);
    common::ctrl_c(child);
    // No job of this pipeline is left queued or running.
    assert_eq!(slurm(&["squeue", "-h", "-n", "pipe:sl-cancel:train"]), "");
    assert_eq!(
        slurm(&["squeue", "-h", "--states=all", "-j", &job, "-o", "%T"]),
        "CANCELLED"
    );
    let r = run(&p).ok();
    assert!(r.stdout.contains("done"), "{}", r.stdout);
    assert_resumed_to_local_weights(&p);
}

/// The train stage's logs show a resume from a checkpoint, and its weights are a local run's.
fn assert_resumed_to_local_weights(p: &Project) {
    let log = logs_of(p, "train");
    assert!(
        log.contains("resuming from the checkpoint at step"),
        "{log}"
    );
    assert!(
        weights(p) == local_weights(),
        "weights differ from a local run's"
    );
}

#[test]
fn a_requeued_training_job_resumes_from_its_checkpoint() {
    let p = Project::with_examples(&slurm_pipeline("sl-requeue", "{time: \"10\"}", &train()));
    let child = spawn(&p);
    wait_steps(&p, 4);
    let job = train_job(&p);
    // What preemption with PreemptMode=REQUEUE does: the job is stopped and queued again.
    slurm(&["scontrol", "requeue", &job]);
    let t = Instant::now();
    while slurm(&["squeue", "-h", "-j", &job, "-o", "%T"]) != "PENDING" {
        assert!(t.elapsed() < Duration::from_secs(60), "not requeued");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A requeued job waits two minutes before it is eligible again; let it start sooner, but
    // not at once: slurmd refuses to relaunch a job it has just killed ("already killed, do
    // not launch batch job"), which a real requeue's wait never meets.
    std::thread::sleep(Duration::from_secs(5));
    slurm(&[
        "scontrol",
        "update",
        &format!("JobId={job}"),
        "StartTime=now",
    ]);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = logs_of(&p, "train");
    assert!(log.contains("DUE TO JOB REQUEUE"), "{log}");
    assert_eq!(log.matches("submitted to Slurm").count(), 1, "{log}");
    assert_resumed_to_local_weights(&p);
}

#[test]
fn failed_jobs_say_why_in_slurms_terms() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: sl-fail
executor: slurm
stages:
  slow:
    kind: command
    cmd: sleep 600
    slurm: {time: \"1\"}
  broken:
    kind: command
    cmd: echo about to fail; exit 3
",
    );
    let r = run(&p);
    assert_eq!(r.code, 1, "{}", r.all());
    let err = r.all();
    assert!(
        err.contains("reached its time limit (slurm.time: 1)"),
        "{err}"
    );
    assert!(err.contains("raise `slurm.time`"), "{err}");
    assert!(err.contains("status 3") || err.contains("code 3"), "{err}");
    assert!(logs_of(&p, "slow").contains("DUE TO TIME LIMIT"));
}

#[test]
fn slurm_settings_are_checked_where_they_are_written() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: sl-bad\nexecutor: slurm\nslurm: {partition: gpu, tme: \"10\"}\nstages:\n  a:\n    kind: command\n    cmd: true\n",
    );
    let r = p.pipe(&["check", "p.yaml"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("unknown field `tme` in `slurm`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("p.yaml:3:"), "{}", r.stderr);
}
