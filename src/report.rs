//! What pipe prints about a run: the plan (`run --dry-run`), the stage states (`status`) and
//! the final table. The engine returns data ([`PlanRow`], [`RunSummary`]); the words are here.
//! `--dry-run` and `status --explain` say why a stage runs with the same [`why_text`], from the
//! same [`pipe_core::Engine::decide`] that the run follows.

use std::path::{Path, PathBuf};

use pipe_core::remote::{Traffic, Transfers};
use pipe_core::runner::{Decision, Outcome, PlanRow, PlanState, Skip, Status, Why};
use pipe_core::{Pipeline, RunSummary};

/// Why a stage runs, in one line (the first change, when its key changed).
pub fn why_text(why: &Why) -> String {
    match why {
        Why::Forced => "forced".into(),
        Why::NeverRun => "never run".into(),
        Why::Missing => "its last result is no longer in the store".into(),
        Why::Changed(changes) => first_and_more(changes, "key changed"),
        Why::OtherFormat(format) => other_format_text(*format),
        Why::Damaged(damage) => format!(
            "its stored outputs are damaged: {}",
            first_and_more(damage, "unknown damage")
        ),
    }
}

/// The first of `items`, and how many more there are.
fn first_and_more(items: &[impl ToString], none: &str) -> String {
    match items {
        [] => none.to_string(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{} (+{} more)", first.to_string(), rest.len()),
    }
}

fn other_format_text(format: u32) -> String {
    format!(
        "its last result was made by a pipe with another cache format ({format}), which pipe never reuses"
    )
}

/// Every reason a stage runs, one a line (`status --explain`).
fn why_lines(why: &Why) -> Vec<String> {
    match why {
        Why::Changed(changes) => changes.iter().map(|c| c.to_string()).collect(),
        Why::Damaged(damage) => damage
            .iter()
            .map(|d| format!("its stored outputs are damaged: {d}"))
            .collect(),
        Why::NeverRun => Vec::new(),
        other => vec![why_text(other)],
    }
}

fn waits_on_text(ups: &[String]) -> String {
    ups.iter()
        .map(|u| format!("`{u}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line of `run --dry-run`: what the run will do with the stage, and why.
pub fn plan_line(row: &PlanRow) -> String {
    let stage = &row.stage;
    match &row.state {
        PlanState::Decided(Decision::Reuse(_)) => format!("cached      {stage}"),
        PlanState::Decided(Decision::Pull(_)) => {
            format!("pull        {stage}  (its result is in the remote cache)")
        }
        PlanState::Decided(Decision::Run(why)) => {
            format!("run         {stage}  ({})", why_text(why))
        }
        PlanState::Decided(Decision::LeaveOut(_)) => format!("skip        {stage}  (not selected)"),
        PlanState::WaitsOn(ups) => format!(
            "run?        {stage}  (after {} run: only if their outputs change)",
            waits_on_text(ups)
        ),
        PlanState::Error(e) => format!("error       {stage}  ({e})"),
    }
}

/// `pipe status`: each stage's state and key; with `explain`, every reason it would run.
pub fn status_text(p: &Pipeline, rows: &[PlanRow], explain: bool) -> String {
    let mut s = format!("pipeline `{}` ({})\n", p.name, p.file.display());
    for row in rows {
        let key = row.key.as_deref().map(|k| &k[..12]).unwrap_or("-");
        let (word, detail, always): (&str, Vec<String>, bool) = match &row.state {
            PlanState::Decided(Decision::Reuse(_)) => ("cached", vec![], false),
            PlanState::Decided(Decision::Pull(_)) => (
                "remote",
                vec!["its result is in the remote cache: a run pulls it".to_string()],
                false,
            ),
            PlanState::Decided(
                Decision::Run(Why::NeverRun) | Decision::LeaveOut(Why::NeverRun),
            ) => ("never run", vec![], false),
            PlanState::Decided(Decision::Run(why) | Decision::LeaveOut(why)) => {
                ("stale", why_lines(why), matches!(why, Why::Damaged(_)))
            }
            PlanState::WaitsOn(ups) => (
                "stale",
                vec![format!(
                    "reads {}, which must run first; it re-runs only if their outputs change",
                    waits_on_text(ups)
                )],
                false,
            ),
            PlanState::Error(e) => ("error", vec![e.clone()], true),
        };
        s.push_str(&format!("  {word:10} {:16} {key}\n", row.stage));
        for note in &row.notes {
            s.push_str(&format!("             note: {note}\n"));
        }
        if explain || always {
            for d in detail {
                s.push_str(&format!("             - {d}\n"));
            }
        }
    }
    s
}

/// The word and the detail the live view shows for a stage that ended.
pub fn outcome_words(o: &Outcome) -> (&'static str, String) {
    let detail = match &o.status {
        Status::Cached => o
            .key
            .as_deref()
            .map(|k| k[..12].to_string())
            .unwrap_or_default(),
        Status::Pulled => format!("pulled in {:.1}s", o.wall.as_secs_f64()),
        Status::Done => format!("{:.1}s", o.wall.as_secs_f64()),
        Status::Failed(e) => first_line(e),
        Status::Skipped(Skip::Interrupted) => "interrupted before it started".into(),
        Status::Skipped(skip) => skip.to_string(),
        Status::Interrupted => "state saved".into(),
    };
    (status_word(&o.status), detail)
}

fn status_word(status: &Status) -> &'static str {
    match status {
        Status::Cached => "cached",
        Status::Pulled => "pulled",
        Status::Done => "done",
        Status::Failed(_) => "FAILED",
        Status::Skipped(_) => "skipped",
        Status::Interrupted => "interrupted",
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(100).collect()
}

/// The final table: stage, status, wall time, key prefix, artifact location; then, for each
/// failure, why and where its log is; then what was left out, and notes.
pub fn summary_table(summary: &RunSummary) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    let rel = |p: &PathBuf| relative_to(p, &cwd);
    let outcomes = &summary.outcomes;
    let w = outcomes
        .iter()
        .map(|o| o.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut s = format!(
        "{:w$}  {:11}  {:>8}  {:12}  artifacts\n",
        "stage", "status", "time", "key"
    );
    for o in outcomes {
        let time = match o.status {
            Status::Done | Status::Pulled | Status::Failed(_) | Status::Interrupted => {
                format!("{:.1}s", o.wall.as_secs_f64())
            }
            _ => "-".into(),
        };
        let key = o.key.as_deref().map(|k| &k[..12]).unwrap_or("-");
        let loc = o.artifacts.as_ref().map(rel).unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "{:w$}  {:11}  {:>8}  {:12}  {}\n",
            o.stage,
            status_word(&o.status),
            time,
            key,
            loc
        ));
    }
    for o in outcomes {
        match &o.status {
            Status::Failed(why) => {
                s.push_str(&format!(
                    "\nstage `{}` failed: {}\n",
                    o.stage,
                    why.trim_end()
                ));
                if let Some(log) = &o.log {
                    s.push_str(&format!("  log: {}\n", rel(log)));
                }
            }
            Status::Skipped(skip) if *skip != Skip::NotSelected => {
                s.push_str(&format!("stage `{}` did not run: {skip}\n", o.stage));
            }
            _ => {}
        }
    }
    let left_out: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status == Status::Skipped(Skip::NotSelected))
        .map(|o| format!("`{}`", o.stage))
        .collect();
    if !left_out.is_empty() {
        s.push_str(&format!(
            "\nleft out (not selected, not in the cache): {}; a run without --only/--until makes {}\n",
            left_out.join(", "),
            if left_out.len() == 1 { "it" } else { "them" }
        ));
    }
    let other_format = summary.other_format();
    if let Some((_, format)) = other_format.first() {
        let stages: Vec<String> = other_format.iter().map(|(s, _)| format!("`{s}`")).collect();
        s.push_str(&format!(
            "\nnote: {} ran again: the store held results made by a pipe with another cache format ({format}), which pipe never reuses; `pipe gc` removes them\n",
            stages.join(", "),
        ));
    }
    if let Some(t) = &summary.transfers {
        s.push_str(&transfers_text(t));
    }
    if summary.interrupted {
        s.push_str("\ninterrupted: finished stages are in the cache; run the same command again to resume\n");
    }
    s
}

/// `path` relative to `base` when it is below it, else as it is.
fn relative_to(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

/// The remote cache's part of the summary: what moved each way, and how fast.
fn transfers_text(t: &Transfers) -> String {
    let mut s = String::new();
    let line = |verb: &str, x: &Traffic| {
        format!(
            "{verb} {} {} ({} objects, {}) in {:.1}s, {}/s",
            x.entries,
            if x.entries == 1 { "entry" } else { "entries" },
            x.objects,
            human_bytes(x.bytes),
            x.elapsed.as_secs_f64(),
            human_bytes(x.rate() as u64)
        )
    };
    let mut parts = Vec::new();
    if t.pulled.entries > 0 {
        parts.push(line("pulled", &t.pulled));
    }
    if t.pushed.entries > 0 {
        parts.push(line("pushed", &t.pushed));
    }
    if !parts.is_empty() {
        s.push_str(&format!("\nremote {}: {}\n", t.location, parts.join("; ")));
    }
    if let Some(why) = &t.unreachable {
        s.push_str(&format!(
            "\nremote {} could not be reached ({why}): this run used only the local store\n",
            t.location
        ));
    }
    s
}

/// `n` bytes in B, KiB, MiB, GiB or TiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
