//! `run --dry-run`, `status --explain` and `run` make one decision (Engine::decide): for a set
//! of edits, the stages the plan says will run are the stages the run runs, for the reason
//! that status gives. And a store made by an older pipe (another cache format) is never
//! misread: its entries are misses, said once, and `gc` removes them.

mod common;
use std::collections::BTreeMap;

use common::{Project, THREE_COMMANDS as PIPELINE};

const STAGES: [&str; 3] = ["upper", "exclaim", "side"];

fn project() -> Project {
    let p = Project::new();
    p.write("p.yaml", PIPELINE).write("data.txt", "hello\n");
    p
}

fn runs(p: &Project) -> BTreeMap<&'static str, usize> {
    STAGES.iter().map(|s| (*s, p.runs_of(s))).collect()
}

/// What `run --dry-run` says of each stage: `run (why)`, `cached`, `skip` or `run?`.
fn plan(p: &Project, args: &[&str]) -> BTreeMap<String, (String, String)> {
    let mut a = vec!["run", "p.yaml", "--dry-run"];
    a.extend(args);
    let out = p.pipe(&a).ok().stdout;
    out.lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let word = parts.next().unwrap().to_string();
            let stage = parts.next().unwrap().to_string();
            let why = l
                .split_once("  (")
                .map(|(_, w)| w.trim_end_matches(')').to_string())
                .unwrap_or_default();
            (stage, (word, why))
        })
        .collect()
}

/// What `status --explain` says of each stage: its state and its first reason.
fn status(p: &Project, args: &[&str]) -> BTreeMap<String, (String, String)> {
    let mut a = vec!["status", "p.yaml", "--explain"];
    a.extend(args);
    let out = p.pipe(&a).ok().stdout;
    let mut rows: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut last = String::new();
    for line in out.lines().skip(1) {
        if let Some(reason) = line.trim_start().strip_prefix("- ") {
            let row = rows.get_mut(&last).unwrap();
            if row.1.is_empty() {
                row.1 = reason.to_string();
            }
        } else if !line.trim_start().starts_with("note:") {
            let (word, rest) = if let Some(rest) = line.trim_start().strip_prefix("never run") {
                ("never run".to_string(), rest)
            } else {
                let t = line.trim_start();
                let (w, r) = t.split_once(' ').unwrap();
                (w.to_string(), r)
            };
            last = rest.split_whitespace().next().unwrap().to_string();
            rows.insert(last.clone(), (word, String::new()));
        }
    }
    rows
}

/// Plans, states and runs with `args`, and checks that they agree and that `expect_run` ran.
fn agree(p: &Project, args: &[&str], expect_run: &[&str]) {
    let planned = plan(p, args);
    // `status` takes the pipeline's `--set`s, not the run's selection.
    let sets: Vec<&str> = args
        .windows(2)
        .filter(|w| w[0] == "--set")
        .flat_map(|w| w.iter().copied())
        .collect();
    let stated = status(p, &sets);
    let before = runs(p);
    let mut a = vec!["run", "p.yaml"];
    a.extend(args);
    p.pipe(&a).ok();
    let after = runs(p);
    let ran: Vec<&str> = STAGES
        .iter()
        .copied()
        .filter(|s| after[s] > before[s])
        .collect();
    assert_eq!(ran, expect_run, "after {args:?}: {planned:?}");
    for s in STAGES {
        let (word, why) = &planned[s];
        match word.as_str() {
            "run" => {
                assert!(ran.contains(&s), "{args:?}: the plan ran `{s}` ({why})");
                // Selection and --force are run options that status does not take.
                if !args.iter().any(|a| a.starts_with("--")) || !why.contains("forced") {
                    let (state, first) = &stated[s];
                    assert_ne!(state, "cached", "{args:?}: status calls `{s}` cached");
                    if state == "stale" {
                        assert!(
                            why.starts_with(first.as_str()),
                            "{args:?}: `{s}`: plan says ({why}), status says ({first})"
                        );
                    }
                }
            }
            "cached" | "skip" => {
                assert!(!ran.contains(&s), "{args:?}: `{s}` ran, planned {word}")
            }
            // `run?`: its key is known only once its upstream stage has run.
            _ => {}
        }
    }
}

#[test]
fn dry_run_status_and_run_make_the_same_decision() {
    let p = project();
    agree(&p, &[], &["upper", "exclaim", "side"]);
    agree(&p, &[], &[]);
    // A param that only `exclaim` reads.
    agree(&p, &["--set", "params.suffix=?"], &["exclaim"]);
    // New bytes upstream: `exclaim` waits on `upper`'s output, which changes too.
    p.write("data.txt", "bye\n");
    agree(&p, &[], &["upper", "exclaim"]);
    // The same bytes again from an edited upstream: early cutoff.
    agree(
        &p,
        &[
            "--set",
            "upper.cmd=echo upper >> runs.log; tr a-z A-Z < ${data.txt} > ${out}/upper.txt; true",
        ],
        &["upper"],
    );
    agree(&p, &["--force", "side"], &["side"]);
    agree(&p, &["--set", "params.suffix=#", "--only", "side"], &[]);
    // A stored output damaged behind pipe's back.
    let out = p.path("cache/stages");
    let entry = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|e| e.join("out/side.txt").exists())
        .unwrap();
    let file = entry.join("out/side.txt");
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, "SIDE\n").unwrap();
    let planned = plan(&p, &[]);
    assert!(
        planned["side"]
            .1
            .starts_with("its stored outputs are damaged"),
        "{planned:?}"
    );
    agree(&p, &[], &["side"]);
}

#[test]
fn entries_of_an_older_cache_format_are_misses_said_once_and_collected() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    as_if_made_by_format_1(&p);
    let st = p.pipe(&["status", "p.yaml", "--explain"]).ok().stdout;
    assert!(
        st.contains("its last result was made by a pipe with another cache format (1)"),
        "{st}"
    );
    let verify = p.pipe(&["cache", "verify"]).ok();
    assert!(
        verify.stdout.contains("3 entries of another cache format"),
        "{}",
        verify.stdout
    );
    agree(&p, &[], &["upper", "exclaim", "side"]);
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(!r.stdout.contains("another cache format"), "{}", r.stdout);
    as_if_made_by_format_1(&p);
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(
        r.stdout.matches("another cache format").count(),
        1,
        "said once: {}",
        r.stdout
    );
    as_if_made_by_format_1(&p);
    let gc = p.pipe(&["gc"]).ok();
    assert!(
        gc.stdout.contains("3 entries of another cache format"),
        "{}",
        gc.stdout
    );
    let verify = p.pipe(&["cache", "verify"]).ok();
    assert!(verify.stdout.contains("ok: 0 entries"), "{}", verify.stdout);
    agree(&p, &[], &["upper", "exclaim", "side"]);
}

/// Rewrites every entry's manifest as a pipe with cache format 1 wrote it (format 1 keys were
/// other keys, so such entries are only ever found through a stage's last ref).
fn as_if_made_by_format_1(p: &Project) {
    for e in std::fs::read_dir(p.path("cache/stages")).unwrap() {
        let manifest = e.unwrap().path().join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        m["format"] = 1.into();
        let mut perms = std::fs::metadata(&manifest).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&manifest, perms).unwrap();
        std::fs::write(&manifest, serde_json::to_vec(&m).unwrap()).unwrap();
    }
}
