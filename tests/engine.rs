//! The engine end to end, through the real binary: caching, early cutoff, concurrency,
//! failures, selection, kills at every step, signals, the lock, corruption and gc.

mod common;
use std::time::{Duration, Instant};

use common::{sigkill, signal, Project, THREE_COMMANDS as PIPELINE};

fn project() -> Project {
    let p = Project::new();
    p.write("p.yaml", PIPELINE).write("data.txt", "hello\n");
    p
}

fn counts(p: &Project) -> (usize, usize, usize) {
    (p.runs_of("upper"), p.runs_of("exclaim"), p.runs_of("side"))
}

#[test]
fn second_run_is_all_cache_hits() {
    let p = project();
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(
        r.stdout.contains("upper") && r.stdout.contains("done"),
        "{}",
        r.stdout
    );
    let outs = p.outputs("cache");
    assert!(
        outs.iter()
            .any(|(path, text)| path.ends_with("out/final.txt") && text == "HELLO!\n"),
        "{outs:?}"
    );
    assert_eq!(counts(&p), (1, 1, 1));
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(r.stdout.matches("cached").count(), 3, "{}", r.stdout);
    assert_eq!(counts(&p), (1, 1, 1));
}

#[test]
fn identical_upstream_output_does_not_invalidate_downstream() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    // Different input, same upper-cased output: `upper` re-runs, `exclaim` is a cache hit.
    p.write("data.txt", "HELLO\n");
    let r = p.pipe(&["status", "p.yaml", "--explain"]).ok();
    assert!(
        r.stdout.contains("input `data.txt` changed"),
        "{}",
        r.stdout
    );
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(counts(&p), (2, 1, 1));
}

#[test]
fn a_param_change_reruns_only_what_depends_on_it() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    let r = p
        .pipe(&["run", "p.yaml", "--set", "params.suffix=?", "--dry-run"])
        .ok();
    assert!(r.stdout.contains("cached      upper"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("run         exclaim  (param `cmd` changed"),
        "{}",
        r.stdout
    );
    assert_eq!(counts(&p), (1, 1, 1), "a dry run runs nothing");
    p.pipe(&["run", "p.yaml", "--set", "params.suffix=?"]).ok();
    assert_eq!(counts(&p), (1, 2, 1));
    assert!(p.outputs("cache").iter().any(|(_, t)| t == "HELLO?\n"));
}

#[test]
fn keys_are_stable_across_processes_and_directories() {
    // The key of `upper` is a pure function of its kind, params and the bytes of data.txt; a
    // change to the recipe must be deliberate (and bump `pipe-key-v2` or the kind version).
    let a = project();
    let b = project();
    let ka = a.pipe(&["status", "p.yaml"]).ok().stdout;
    let kb = b.pipe(&["status", "p.yaml"]).ok().stdout;
    let key = |s: &str| {
        s.lines()
            .find(|l| l.contains(" upper "))
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap()
            .to_string()
    };
    assert_eq!(key(&ka), key(&kb));
    assert_eq!(key(&ka), "a2240598e494", "the cache key recipe changed");
}

#[test]
fn independent_stages_run_concurrently() {
    // Each stage waits for the other's flag: they only both finish if they run at once.
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"name: conc
stages:
  a:
    kind: command
    cmd: touch a.flag; i=0; while [ ! -e b.flag ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; test -e b.flag && echo a > ${out}/a
  b:
    kind: command
    cmd: touch b.flag; i=0; while [ ! -e a.flag ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; test -e a.flag && echo b > ${out}/b
"#,
    );
    let r = p.pipe(&["run", "p.yaml", "--jobs", "2"]).ok();
    assert_eq!(r.stdout.matches("done").count(), 2, "{}", r.stdout);
}

#[test]
fn a_failure_stops_dependents_and_names_the_log() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"name: fail
stages:
  bad:
    kind: command
    cmd: echo preparing; echo boom >&2; exit 3
  after:
    kind: command
    cmd: echo after >> runs.log
    deps: [bad]
  good:
    kind: command
    cmd: sleep 0.3; echo good >> runs.log; echo ok > ${out}/ok
"#,
    );
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    for part in [
        "stage `bad` failed: command exited with status 3",
        "boom",
        "log: cache/logs/",
        "stage `after` did not run: upstream stage `bad` did not complete",
    ] {
        assert!(
            r.stderr.contains(part),
            "{part:?} missing from:\n{}",
            r.stderr
        );
    }
    assert_eq!(p.runs_of("good"), 1, "the independent branch finishes");
    assert_eq!(p.runs_of("after"), 0);
    let log = r
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("log: "))
        .unwrap();
    assert!(p.read(log).contains("boom"));
    // Fixed, the run resumes: `good` is a cache hit.
    p.write("p.yaml", &p.read("p.yaml").replace("exit 3", "exit 0"));
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!((p.runs_of("good"), p.runs_of("after")), (1, 1));
}

#[test]
fn only_until_force_select_stages() {
    let p = project();
    let r = p.pipe(&["run", "p.yaml", "--only", "exclaim"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("it reads `upper`, which is not selected and not in the cache"),
        "{}",
        r.stderr
    );
    p.pipe(&["run", "p.yaml", "--until", "upper"]).ok();
    assert_eq!(counts(&p), (1, 0, 0));
    p.pipe(&["run", "p.yaml", "--only", "exclaim"]).ok();
    assert_eq!(counts(&p), (1, 1, 0));
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(counts(&p), (1, 1, 1));
    let r = p
        .pipe(&["run", "p.yaml", "--force", "upper", "--dry-run"])
        .ok();
    assert!(
        r.stdout.contains("run         upper  (forced)") && r.stdout.contains("cached      side"),
        "{}",
        r.stdout
    );
    p.pipe(&["run", "p.yaml", "--force", "upper"]).ok();
    assert_eq!(counts(&p), (2, 2, 1));
    let r = p.pipe(&["run", "p.yaml", "--until", "nope"]);
    assert!(
        r.code == 1 && r.stderr.contains("no stage `nope`"),
        "{}",
        r.stderr
    );
}

/// A kill (SIGKILL) at each step of a stage's commit, then a plain re-run: the result equals
/// an uninterrupted run, and a stage whose commit finished is never run again.
#[test]
fn kill_at_every_commit_step_then_resume() {
    let reference = project();
    reference.pipe(&["run", "p.yaml", "-j", "1"]).ok();
    let expected = reference.outputs("cache");
    for point in [
        "attempt-started",
        "commit-objects-stored",
        "commit-view-built",
        "commit-manifest-written",
    ] {
        // The kill hits the second stage; the first (`upper`) has completed by then.
        let p = project();
        let killed = p
            .cmd(&["run", "p.yaml", "-j", "1"])
            .env("PIPE_FAULT", format!("{point}:2"))
            .output()
            .unwrap();
        assert_eq!(
            killed.status.code(),
            None,
            "{point}: expected death by SIGKILL"
        );
        assert_eq!(p.runs_of("upper"), 1);
        let r = p.pipe(&["run", "p.yaml", "-j", "1"]).ok();
        assert!(
            r.stderr.contains("cleared a stale lock"),
            "{point}: {}",
            r.stderr
        );
        assert_eq!(p.runs_of("upper"), 1, "{point}: a finished stage ran again");
        let exclaim_runs = if matches!(point, "attempt-started" | "commit-manifest-written") {
            1
        } else {
            2
        };
        assert_eq!(p.runs_of("exclaim"), exclaim_runs, "{point}");
        assert_eq!(p.outputs("cache"), expected, "{point}");
        let v = p.pipe(&["cache", "verify"]).ok();
        assert!(v.stdout.contains("ok: 3 entries"), "{point}: {}", v.stdout);
    }
}

/// SIGKILL at arbitrary moments, re-running after each: the final artifacts equal those of an
/// uninterrupted run, and no stage that had completed ever runs again.
#[test]
fn kill_at_random_moments_then_resume() {
    let yaml = r#"name: slow
stages:
  one:
    kind: command
    cmd: echo one >> runs.log; sleep 0.2; echo 1 > ${out}/v
  two:
    kind: command
    cmd: echo two >> runs.log; sleep 0.2; cat ${one}/v > ${out}/v; echo 2 >> ${out}/v
    deps: [one]
  three:
    kind: command
    cmd: echo three >> runs.log; sleep 0.2; cat ${two}/v > ${out}/v; echo 3 >> ${out}/v
    deps: [two]
"#;
    let reference = Project::new();
    reference.write("p.yaml", yaml);
    reference.pipe(&["run", "p.yaml"]).ok();
    let p = Project::new();
    p.write("p.yaml", yaml);
    let iterations: u64 = std::env::var("PIPE_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut completed: std::collections::BTreeMap<String, usize> = Default::default();
    for _ in 0..iterations {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = p.spawn(&["run", "p.yaml"]);
        std::thread::sleep(Duration::from_millis(seed % 900));
        sigkill(&mut child);
        // Whatever has a manifest now is finished and must never run again.
        for id in ["one", "two", "three"] {
            let st = p.pipe(&["status", "p.yaml"]).ok().stdout;
            if st
                .lines()
                .any(|l| l.contains("cached") && l.contains(&format!(" {id} ")))
            {
                completed
                    .entry(id.to_string())
                    .or_insert_with(|| p.runs_of(id));
            }
        }
    }
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(p.outputs("cache"), reference.outputs("cache"));
    for (id, runs) in completed {
        assert_eq!(
            p.runs_of(&id),
            runs,
            "stage `{id}` ran again after it had completed"
        );
    }
}

#[test]
fn ctrl_c_stops_the_command_and_releases_the_lock() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: int\nstages:\n  slow:\n    kind: command\n    cmd: sleep 30 & echo $! > sleep.pid; wait\n",
    );
    let child = p.spawn(&["run", "p.yaml"]);
    assert!(p.wait_for("sleep.pid", Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "pipe must not wait for the command to finish"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    let pid: i32 = p.read("sleep.pid").trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // Gone, or a zombie waiting for init to reap it.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = state
        .rsplit_once(") ")
        .map(|(_, r)| r.chars().next().unwrap_or('?'))
        .unwrap_or('X');
    assert!(
        matches!(state, 'X' | 'Z'),
        "the command's children must be stopped (state {state})"
    );
    assert_eq!(p.read("cache/lock"), "", "the lock is released");
    p.write("p.yaml", &p.read("p.yaml").replace("sleep 30", "sleep 0"));
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(!r.stderr.contains("stale lock"), "{}", r.stderr);
}

#[test]
fn resumable_command_continues_after_a_kill() {
    // The script saves its counter by renaming a finished file over it, as a resumable script
    // must: a kill between `>`'s truncation and its write would leave an empty counter.
    let step_loop = |resumable: bool| {
        format!(
            r#"name: res
stages:
  count:
    kind: command
    resumable: {resumable}
    cmd: |
      n=$(cat ${{work}}/n 2>/dev/null || echo 0)
      while [ $n -lt 12 ]; do n=$((n+1)); echo step $n >> steps.log; echo $n > ${{work}}/n.new; mv ${{work}}/n.new ${{work}}/n; sleep 0.1; done
      cp ${{work}}/n ${{out}}/n
"#
        )
    };
    for resumable in [true, false] {
        let p = Project::new();
        p.write("p.yaml", &step_loop(resumable));
        let mut child = p.spawn(&["run", "p.yaml"]);
        let t = Instant::now();
        while p.read("steps.log").lines().count() < 4 && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        sigkill(&mut child);
        let before = p.read("steps.log").lines().count();
        std::thread::sleep(Duration::from_millis(200));
        p.pipe(&["run", "p.yaml"]).ok();
        let steps: Vec<String> = p.read("steps.log").lines().map(String::from).collect();
        let restart = &steps[before.min(steps.len())..];
        assert_eq!(p.outputs("cache")[0].1, "12\n");
        if resumable {
            assert_ne!(
                restart.first().map(String::as_str),
                Some("step 1"),
                "a resumable stage continues: {steps:?}"
            );
            assert!(steps.len() <= 13, "{steps:?}");
        } else {
            assert_eq!(
                restart.first().map(String::as_str),
                Some("step 1"),
                "a non-resumable stage starts over: {steps:?}"
            );
        }
    }
}

#[test]
fn a_second_run_on_the_same_store_is_refused() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: lock\nstages:\n  slow:\n    kind: command\n    cmd: touch started; sleep 30\n",
    );
    let mut first = p.spawn(&["run", "p.yaml"]);
    assert!(p.wait_for("started", Duration::from_secs(20)));
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&format!(
            "in use by another pipe process (pid {}",
            first.id()
        )),
        "{}",
        r.stderr
    );
    signal(&first, libc::SIGTERM);
    assert_eq!(first.wait().unwrap().code(), Some(130));
}

#[test]
fn corrupt_objects_are_detected_and_remade() {
    use std::os::unix::fs::PermissionsExt;
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    let manifest_of = |stage: &str| -> serde_json::Value {
        let j = p.pipe(&["show", "p.yaml", stage, "--json"]).ok().stdout;
        serde_json::from_str(&j).unwrap()
    };
    let digest = manifest_of("exclaim")["outputs"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let object = p.path(&format!("cache/objects/{}/{}", &digest[..2], &digest[2..]));
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, "XXXXXX!\n").unwrap(); // same length as "HELLO!\n"
    let r = p.pipe(&["cache", "verify"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains(&format!("expected digest {digest}, contents hash to")),
        "{}",
        r.stderr
    );
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(
        counts(&p),
        (1, 2, 1),
        "the corrupt entry is re-made, the rest are hits"
    );
    assert!(p
        .pipe(&["cache", "verify"])
        .ok()
        .stdout
        .contains("ok: 3 entries"));
    // A damaged file that the cheap check can see (its size changed) is not used either.
    let digest = manifest_of("side")["outputs"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let object = p.path(&format!("cache/objects/{}/{}", &digest[..2], &digest[2..]));
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, "truncated").unwrap();
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(counts(&p), (1, 2, 2));
}

#[test]
fn gc_removes_what_no_kept_run_uses() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    p.pipe(&["run", "p.yaml", "--set", "params.suffix=?"]).ok();
    let r = p.pipe(&["gc"]).ok();
    assert!(r.stdout.contains("removed 0 objects"), "{}", r.stdout);
    let r = p.pipe(&["gc", "--keep-last", "1"]).ok();
    assert!(
        r.stdout.contains("removed 1 object (") && r.stdout.contains("1 entry,"),
        "{}",
        r.stdout
    );
    let st = p
        .pipe(&["status", "p.yaml", "--set", "params.suffix=?"])
        .ok()
        .stdout;
    assert_eq!(st.matches("cached").count(), 3, "{st}");
    let st = p.pipe(&["status", "p.yaml", "--explain"]).ok().stdout;
    assert!(st.contains("stale      exclaim"), "{st}");
}

#[test]
fn dag_formats_and_cache_location() {
    let p = project();
    let text = p.pipe(&["dag", "p.yaml"]).ok().stdout;
    assert!(text.contains("exclaim (command) <- upper"), "{text}");
    let mermaid = p
        .pipe(&["dag", "p.yaml", "--format", "mermaid"])
        .ok()
        .stdout;
    assert!(
        mermaid.starts_with("flowchart TD") && mermaid.contains("upper --> exclaim"),
        "{mermaid}"
    );
    let dot = p.pipe(&["dag", "p.yaml", "--format", "dot"]).ok().stdout;
    assert!(dot.contains("\"upper\" -> \"exclaim\";"), "{dot}");
    let r = p
        .cmd(&["run", "p.yaml"])
        .env("PIPE_CACHE", "elsewhere")
        .output()
        .unwrap();
    assert!(r.status.success());
    assert!(p.path("elsewhere/stages").is_dir() && !p.path("cache").exists());
    p.pipe(&["run", "p.yaml", "--cache", "third"]).ok();
    assert!(p.path("third/stages").is_dir());
}
