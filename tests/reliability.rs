//! The reliability pass on the real default pipeline (pipelines/tiny.yaml, one epoch): SIGKILL
//! `pipe run` at random moments, run it again after each kill, and check that every store,
//! once its pipeline has finished, equals the store of an uninterrupted run — the same cache
//! keys and the same bytes: model weights, the loss curve, evaluation, export — and that no
//! stage that had completed ever ran again. When a store is complete, the next kills go into a
//! fresh one, so that they land all through a run.
//!
//! `PIPE_TINY_KILLS` sets the number of kills (default 3; `bench/reliability.sh` runs 20).

mod common;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A run's folder holds its store (`store/`) and the export's delivered copy (`delivered/`),
/// which pipe refuses to write inside its store.
fn pipe(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pipe"));
    c.arg("--cache")
        .arg(root.join("store"))
        .args(args)
        .args(["pipelines/tiny.yaml", "--set", "params.epochs=1", "--set"])
        .arg(format!("export.to={}", root.join("delivered").display()))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("PIPE_CACHE")
        .env_remove("PIPE_FAULT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn run_to_completion(root: &Path) {
    let out = pipe(root, &["run"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every finished entry's outputs: `key/out/path` → blake3 of the content. Equal maps mean
/// equal keys (so the same inputs and params all the way down) and byte-identical outputs.
fn artifacts(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
                continue;
            }
            let content = std::fs::read(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(rel, blake3::hash(&content).to_hex().to_string());
        }
    }
    let mut out = BTreeMap::new();
    let stages = root.join("store/stages");
    for e in std::fs::read_dir(&stages).unwrap() {
        let e = e.unwrap().path();
        if e.join("manifest.json").exists() {
            walk(&e.join("out"), &stages, &mut out);
        }
    }
    out
}

/// Finished entries (by key) and how many attempts each has a log of.
fn finished_attempts(root: &Path) -> BTreeMap<String, usize> {
    let cache = root.join("store");
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(cache.join("stages")) else {
        return out;
    };
    for e in rd {
        let e = e.unwrap().path();
        if e.join("manifest.json").exists() {
            let key = e.file_name().unwrap().to_string_lossy().to_string();
            let logs: PathBuf = cache.join("logs").join(&key);
            let n = std::fs::read_dir(logs).map(|r| r.count()).unwrap_or(0);
            out.insert(key, n);
        }
    }
    out
}

#[test]
fn killed_at_random_moments_the_tiny_pipeline_ends_as_if_never_killed() {
    let reference = tempfile::tempdir().unwrap();
    let started = Instant::now();
    run_to_completion(reference.path());
    let full_run = started.elapsed();
    let expected = artifacts(reference.path());

    let kills: u64 = std::env::var("PIPE_TINY_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // Kills go into a store until its pipeline has finished; that store must then equal the
    // reference, and the next kills start a fresh one — so they land all through a run.
    let mut store = tempfile::tempdir().unwrap();
    let mut finished: BTreeMap<String, usize> = BTreeMap::new();
    let (mut landed, mut cycles) = (0, 0);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..kills {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % full_run.as_millis().max(1) as u64);
        let mut child = pipe(store.path(), &["run"]).spawn().unwrap();
        std::thread::sleep(delay);
        let running = child.try_wait().unwrap().is_none();
        landed += running as usize;
        common::sigkill(&mut child);
        let now = finished_attempts(store.path());
        for (key, attempts) in &now {
            if let Some(before) = finished.get(key) {
                assert_eq!(attempts, before, "kill {i}: finished entry {key} ran again");
            }
        }
        eprintln!(
            "kill {i} after {delay:?}{}: {} of 7 stages finished",
            if running { "" } else { " (the run had ended)" },
            now.len()
        );
        finished = now;
        if finished.len() == 7 {
            assert_eq!(artifacts(store.path()), expected, "cycle {cycles}");
            cycles += 1;
            store = tempfile::tempdir().unwrap();
            finished.clear();
        }
    }
    run_to_completion(store.path());
    for (key, attempts) in &finished {
        assert_eq!(
            finished_attempts(store.path())[key],
            *attempts,
            "finished entry {key} ran again in the last run"
        );
    }
    assert_eq!(artifacts(store.path()), expected);
    eprintln!(
        "{kills} kills, {landed} of them during a run; {} stores ended equal to the uninterrupted run's",
        cycles + 1
    );
}
