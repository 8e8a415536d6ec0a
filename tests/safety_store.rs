//! What the store keeps, holds and lets in (issue 11 "Safety"), through the real binary on the
//! real file system: gc after a killed run, gc of resume state, outputs that are symbolic or
//! hard links to files outside the workspace, damaged objects found before they are read, the
//! lock against a deleted lock file and simultaneous starts, and the exit status of a run
//! limited with --until/--only.

mod common;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{sigkill, Project};

/// `one` writes the value of `params.v`; `two` copies it, after waiting for a `release` file
/// when `params.hold` is 1 (so a test can kill the run while `two` is running).
const TWO_STEPS: &str = r#"name: steps
params:
  v: "1"
  hold: 0
stages:
  one:
    kind: command
    cmd: echo one >> runs.log; echo ${params.v} > ${out}/v
  two:
    kind: command
    cmd: |
      echo two >> runs.log; touch two.started
      if [ ${params.hold} = 1 ]; then while [ ! -e release ]; do sleep 0.05; done; fi
      cat ${one}/v > ${out}/v
    deps: [one]
"#;

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `run` with `sets`, waits until stage `two` is running, and SIGKILLs pipe.
fn kill_while_two_runs(p: &Project, sets: &[&str]) {
    let _ = fs::remove_file(p.path("two.started"));
    let _ = fs::remove_file(p.path("release"));
    let mut args = vec!["run", "p.yaml", "--set", "params.hold=1"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let mut child = p.spawn(&args);
    wait_until("stage `two` starts", || p.path("two.started").exists());
    sigkill(&mut child);
    // The orphaned command ends; its writes land in a work dir pipe no longer uses.
    p.write("release", "");
}

#[test]
fn gc_keep_last_keeps_what_a_killed_run_committed() {
    let p = Project::new();
    p.write("p.yaml", TWO_STEPS);
    p.pipe(&["run", "p.yaml"]).ok();
    // A new value: `one` commits a new entry, then the run is killed while `two` runs. The
    // killed run is the latest; before, it left no run record and gc dropped its entry.
    kill_while_two_runs(&p, &["params.v=2"]);
    assert_eq!(p.runs_of("one"), 2);
    // Only `one` of the first run goes: `two`'s ref still points at its first result.
    let r = p.pipe(&["gc", "--keep-last", "1"]).ok();
    assert!(r.stdout.contains(", 1 entry,"), "{}", r.stdout);
    let st = p
        .pipe(&["status", "p.yaml", "--set", "params.v=2"])
        .ok()
        .stdout;
    assert!(st.contains("cached     one"), "{st}");
    p.pipe(&["run", "p.yaml", "--set", "params.v=2"]).ok();
    assert_eq!(
        p.runs_of("one"),
        2,
        "the killed run's finished stage ran again"
    );
    assert_eq!(
        p.outputs("cache")
            .iter()
            .filter(|(path, text)| path.ends_with("/v") && text == "2\n")
            .count(),
        2
    );
}

#[test]
fn gc_keeps_entries_that_refs_point_at() {
    // The first run's entries are used by no kept run, but they are the last results of
    // another pipeline's stages: `status` of that pipeline must still find them.
    let p = Project::new();
    p.write("p.yaml", TWO_STEPS)
        .write("q.yaml", &TWO_STEPS.replace("name: steps", "name: other"));
    p.pipe(&["run", "q.yaml", "--set", "params.v=7"]).ok();
    p.pipe(&["run", "p.yaml"]).ok();
    p.pipe(&["gc", "--keep-last", "1"]).ok();
    let st = p
        .pipe(&["status", "q.yaml", "--set", "params.v=7"])
        .ok()
        .stdout;
    assert_eq!(st.matches("cached").count(), 2, "{st}");
}

/// A resumable stage that counts to 12, one step per 0.1 s, keeping its count in ${work}.
fn counting(start_from: &str) -> String {
    format!(
        r#"name: res
params:
  tag: {start_from}
stages:
  count:
    kind: command
    resumable: true
    cmd: |
      echo ${{params.tag}} > /dev/null
      n=$(cat ${{work}}/n 2>/dev/null || echo 0)
      while [ $n -lt 12 ]; do n=$((n+1)); echo step $n >> steps.log; echo $n > ${{work}}/n; sleep 0.1; done
      cp ${{work}}/n ${{out}}/n
"#
    )
}

fn kill_counting_after(p: &Project, steps: usize) {
    let _ = fs::remove_file(p.path("steps.log"));
    let mut child = p.spawn(&["run", "p.yaml"]);
    wait_until("the stage counts", || {
        p.read("steps.log").lines().count() >= steps
    });
    sigkill(&mut child);
    std::thread::sleep(Duration::from_millis(300));
}

fn work_dirs(p: &Project) -> usize {
    fs::read_dir(p.path("cache/work")).map_or(0, |d| d.count())
}

#[test]
fn gc_work_keeps_the_checkpoint_the_next_run_resumes_from() {
    let p = Project::new();
    // An older attempt (another key) and the latest one, both killed half-way.
    p.write("p.yaml", &counting("old"));
    kill_counting_after(&p, 3);
    p.write("p.yaml", &counting("new"));
    kill_counting_after(&p, 3);
    assert_eq!(work_dirs(&p), 2);
    let r = p.pipe(&["gc", "--work"]).ok();
    assert!(
        r.stdout
            .contains("removed 0 objects (0 B), 0 entries, 1 work dir;")
            && r.stdout
                .contains("kept 1 work dir that the latest run of a pipeline resumes from"),
        "{}",
        r.stdout
    );
    assert_eq!(work_dirs(&p), 1);
    let before = p.read("steps.log").lines().count();
    p.pipe(&["run", "p.yaml"]).ok();
    let steps: Vec<String> = p.read("steps.log").lines().map(String::from).collect();
    assert_ne!(
        steps.get(before).map(String::as_str),
        Some("step 1"),
        "the latest run's stage resumes after gc --work: {steps:?}"
    );

    // --work-all is the explicit way to drop even that.
    p.write("p.yaml", &counting("third"));
    kill_counting_after(&p, 3);
    let r = p.pipe(&["gc", "--work-all"]).ok();
    assert!(r.stdout.contains("removed 0 objects"), "{}", r.stdout);
    assert_eq!(work_dirs(&p), 0);
    let help = p.pipe(&["gc", "--help"]).ok().stdout;
    assert!(
        help.contains("resume state") && help.contains("--work-all"),
        "{help}"
    );
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir`, with whether it is a symbolic link.
fn links_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                found.push(path.display().to_string());
            } else if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

#[test]
fn outputs_linked_to_files_outside_are_stored_as_bytes() {
    let outside = tempfile::tempdir().unwrap();
    let file = outside.path().join("notes.txt");
    let linked = outside.path().join("linked.txt");
    let dir = outside.path().join("dir");
    fs::write(&file, "outside bytes\n").unwrap();
    fs::write(&linked, "hard-linked bytes\n").unwrap();
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("inner.txt"), "inner bytes\n").unwrap();
    for f in [&file, &linked, &dir.join("inner.txt")] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    let p = Project::new();
    p.write(
        "p.yaml",
        &format!(
            "name: links\nstages:\n  s:\n    kind: command\n    cmd: ln -s {} ${{out}}/sym.txt; ln -s {} ${{out}}/d; ln {} ${{out}}/hard.txt\n",
            file.display(),
            dir.display(),
            linked.display()
        ),
    );
    p.pipe(&["run", "p.yaml"]).ok();
    for f in [&file, &linked, &dir.join("inner.txt")] {
        assert_eq!(mode(f), 0o644, "pipe changed the mode of {}", f.display());
        assert!(f.exists());
    }
    assert_eq!(links_under(&p.path("cache")), Vec::<String>::new());
    assert_eq!(
        fs::metadata(&linked).unwrap().nlink(),
        1,
        "the store shares the user's inode"
    );
    // Later changes to the outside files do not reach the stored results.
    fs::write(&file, "changed\n").unwrap();
    fs::write(&linked, "changed\n").unwrap();
    fs::write(dir.join("inner.txt"), "changed\n").unwrap();
    let outs = p.outputs("cache");
    let text = |name: &str| {
        outs.iter()
            .find(|(path, _)| path.ends_with(name))
            .map(|(_, t)| t.clone())
    };
    assert_eq!(text("out/sym.txt").as_deref(), Some("outside bytes\n"));
    assert_eq!(text("out/hard.txt").as_deref(), Some("hard-linked bytes\n"));
    assert_eq!(text("out/d/inner.txt").as_deref(), Some("inner bytes\n"));
    assert!(p
        .pipe(&["cache", "verify"])
        .ok()
        .stdout
        .contains("ok: 1 entry"));
}

use std::os::unix::fs::MetadataExt;

#[test]
fn an_output_directory_replaced_by_a_link_is_copied_not_moved() {
    let outside = tempfile::tempdir().unwrap();
    let file = outside.path().join("weights.bin");
    fs::write(&file, "user's weights\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let p = Project::new();
    p.write(
        "p.yaml",
        &format!(
            "name: swapped\nstages:\n  s:\n    kind: command\n    cmd: rmdir ${{out}} && ln -s {} ${{out}}\n",
            outside.path().display()
        ),
    );
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(fs::read_to_string(&file).unwrap(), "user's weights\n");
    assert_eq!(mode(&file), 0o644);
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        1,
        "pipe wrote into the linked directory"
    );
    let outs = p.outputs("cache");
    assert!(
        outs.iter()
            .any(|(path, t)| path.ends_with("out/weights.bin") && t == "user's weights\n"),
        "{outs:?}"
    );
    assert_eq!(links_under(&p.path("cache")), Vec::<String>::new());
}

#[test]
fn a_dangling_output_link_fails_the_stage_naming_it() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: dangling\nstages:\n  s:\n    kind: command\n    cmd: ln -s /nonexistent/pipe-target ${out}/gone.txt\n",
    );
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains("output `gone.txt` is a symbolic link to /nonexistent/pipe-target"),
        "{}",
        r.stderr
    );
    assert!(!r.all().contains("a bug in pipe"));
}

/// upper ← data.txt; exclaim ← upper. Each appends its id to runs.log.
const UPPER: &str = r#"name: e2e
params:
  suffix: "!"
stages:
  upper:
    kind: command
    cmd: echo upper >> runs.log; tr a-z A-Z < ${data.txt} > ${out}/upper.txt
    deps: [data.txt]
  exclaim:
    kind: command
    cmd: echo exclaim >> runs.log; sed 's/$/${params.suffix}/' ${upper}/upper.txt > ${out}/final.txt
    deps: [upper]
"#;

fn upper_project() -> Project {
    let p = Project::new();
    p.write("p.yaml", UPPER).write("data.txt", "hello\n");
    p
}

/// Overwrites the stored `upper.txt` with bytes of the same length (so its size still fits).
fn corrupt_upper(p: &Project) {
    let view = fs::read_dir(p.path("cache/stages"))
        .unwrap()
        .map(|e| e.unwrap().path().join("out/upper.txt"))
        .find(|v| v.exists())
        .unwrap();
    fs::set_permissions(&view, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&view, "XXXXX\n").unwrap();
}

fn final_texts(p: &Project) -> Vec<String> {
    p.outputs("cache")
        .into_iter()
        .filter(|(path, _)| path.ends_with("final.txt"))
        .map(|(_, t)| t)
        .collect()
}

#[test]
fn a_damaged_input_is_remade_before_a_stage_reads_it() {
    let p = upper_project();
    p.pipe(&["run", "p.yaml"]).ok();
    corrupt_upper(&p);
    let st = p.pipe(&["status", "p.yaml"]).ok().stdout;
    assert!(
        st.contains("stale      upper") && st.contains("its stored outputs are damaged"),
        "{st}"
    );
    let r = p.pipe(&["run", "p.yaml", "--set", "params.suffix=?"]).ok();
    assert!(
        r.stderr.contains("cache entry damaged: stage `upper`")
            && r.stderr.contains("output upper.txt should hash to"),
        "{}",
        r.stderr
    );
    assert_eq!((p.runs_of("upper"), p.runs_of("exclaim")), (2, 2));
    assert!(final_texts(&p).contains(&"HELLO?\n".to_string()));
    assert!(!final_texts(&p).iter().any(|t| t.contains('X')));
}

#[test]
fn an_input_damaged_during_the_run_is_remade_before_it_is_read() {
    // `spoil` runs after `upper` and before `exclaim`, and overwrites upper's stored output.
    let p = Project::new();
    p.write("data.txt", "hello\n").write(
        "p.yaml",
        r#"name: spoiled
stages:
  upper:
    kind: command
    cmd: echo upper >> runs.log; tr a-z A-Z < ${data.txt} > ${out}/upper.txt
    deps: [data.txt]
  spoil:
    kind: command
    cmd: chmod u+w ${upper}/upper.txt; printf 'XXXXX\n' > ${upper}/upper.txt; echo > ${out}/done
    deps: [upper]
  exclaim:
    kind: command
    cmd: echo exclaim >> runs.log; sed 's/$/!/' ${upper}/upper.txt > ${out}/final.txt
    deps: [upper, spoil]
"#,
    );
    p.pipe(&["run", "p.yaml", "-j", "1"]).ok();
    assert_eq!(p.runs_of("upper"), 2);
    assert_eq!(final_texts(&p), vec!["HELLO!\n".to_string()]);
}

#[test]
fn verify_drops_entries_built_from_a_corrupt_one() {
    let p = upper_project();
    p.pipe(&["run", "p.yaml"]).ok();
    corrupt_upper(&p);
    let r = p.pipe(&["cache", "verify"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr
            .contains("built from corrupt data: stage `exclaim`")
            && r.stderr
                .contains("its input `upper` came from stage `upper`"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr
            .contains("2 entries removed from the cache (1 built from corrupt data)"),
        "{}",
        r.stderr
    );
    p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!((p.runs_of("upper"), p.runs_of("exclaim")), (2, 2));
    assert_eq!(final_texts(&p), vec!["HELLO!\n".to_string()]);
}

/// A stage that holds the lock until a `release` file appears.
const HOLD: &str = "name: lock\nstages:\n  slow:\n    kind: command\n    cmd: touch started; while [ ! -e release ]; do sleep 0.05; done\n";

#[test]
fn deleting_the_lock_file_does_not_let_a_second_run_in() {
    let p = Project::new();
    p.write("p.yaml", HOLD);
    let mut first = p.spawn(&["run", "p.yaml"]);
    assert!(p.wait_for("started", Duration::from_secs(20)));
    fs::remove_file(p.path("cache/lock")).unwrap();
    let r = p.pipe(&["run", "p.yaml"]);
    p.write("release", "");
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains(&format!(
            "in use by another pipe process (pid {}",
            first.id()
        )),
        "{}",
        r.stderr
    );
    assert_eq!(first.wait().unwrap().code(), Some(0));
}

#[test]
fn two_runs_started_at_once_name_each_other() {
    for round in 0..4 {
        let p = Project::new();
        p.write("p.yaml", HOLD);
        let mut a = p.spawn(&["run", "p.yaml"]);
        let mut b = p.spawn(&["run", "p.yaml"]);
        // The loser ends on its own; the winner holds the lock until `release` appears.
        let t = Instant::now();
        let a_lost = loop {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "round {round}: no refusal"
            );
            if a.try_wait().unwrap().is_some() {
                break true;
            }
            if b.try_wait().unwrap().is_some() {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (loser, winner) = if a_lost { (a, b) } else { (b, a) };
        let winner_pid = winner.id();
        let out = loser.wait_with_output().unwrap();
        p.write("release", "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "round {round}: {stderr}");
        assert!(
            stderr.contains(&format!("in use by another pipe process (pid {winner_pid}")),
            "round {round}: {stderr}"
        );
        assert!(!stderr.contains("pid 0"), "round {round}: {stderr}");
        assert!(winner.wait_with_output().unwrap().status.success());
    }
}

/// a ← b ← c, each writing one file.
const CHAIN: &str = r#"name: chain
stages:
  a:
    kind: command
    cmd: echo a > ${out}/a
  b:
    kind: command
    cmd: cat ${a}/a > ${out}/b
    deps: [a]
  c:
    kind: command
    cmd: cat ${b}/b > ${out}/c
    deps: [b]
"#;

#[test]
fn a_selection_that_succeeds_exits_zero_and_says_what_was_left_out() {
    for selection in ["--until", "--only"] {
        let p = Project::new();
        p.write("p.yaml", CHAIN);
        let r = p.pipe(&["run", "p.yaml", selection, "a"]);
        assert_eq!(r.code, 0, "{selection}: {}", r.all());
        assert!(
            r.stdout
                .contains("left out (not selected, not in the cache): `b`, `c`"),
            "{selection}: {}",
            r.stdout
        );
        assert!(!r.all().contains("did not run"), "{}", r.all());
    }
    // A selected stage whose input is missing is still a failure.
    let p = Project::new();
    p.write("p.yaml", CHAIN);
    let r = p.pipe(&["run", "p.yaml", "--only", "b"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("it reads `a`, which is not selected"),
        "{}",
        r.stderr
    );
}

#[test]
fn counts_agree_with_their_nouns() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "name: one\nstages:\n  a:\n    kind: command\n    cmd: echo a > ${out}/a\n",
    );
    let r = p.pipe(&["check", "p.yaml"]).ok();
    assert!(r.stdout.contains("1 stage: a (command)"), "{}", r.stdout);
    p.pipe(&["run", "p.yaml"]).ok();
    let r = p.pipe(&["cache", "verify"]).ok();
    assert!(
        r.stdout.contains("ok: 1 entry, 1 object verified"),
        "{}",
        r.stdout
    );
    let view = fs::read_dir(p.path("cache/stages"))
        .unwrap()
        .map(|e| e.unwrap().path().join("out/a"))
        .find(|v| v.exists())
        .unwrap();
    fs::set_permissions(&view, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&view, "b\n").unwrap();
    let r = p.pipe(&["cache", "verify"]);
    assert!(
        r.stderr
            .contains("1 problem; 1 entry removed from the cache"),
        "{}",
        r.stderr
    );
    let r = p.pipe(&["gc"]).ok();
    assert!(
        r.stdout
            .contains("removed 0 objects (0 B), 0 entries, 0 work dirs"),
        "{}",
        r.stdout
    );
}
