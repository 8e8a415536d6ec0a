//! Arguments and output of each `pipe` subcommand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pipe_core::graph::{render, DagFormat, Selection};
use pipe_core::lock::WorkspaceLock;
use pipe_core::runner::{interrupt_flag, PlanRow, Verdict};
use pipe_core::store::WorkDirs;
use pipe_core::{Engine, Pipeline, RunOptions, Store};

const EXAMPLES: &str = "\
Examples:
  pipe run pipelines/tiny.yaml                      run a pipeline (cached stages are skipped)
  pipe run pipelines/alpaca.yaml --dry-run          show what would run, and why
  pipe run p.yaml --set train.lr=1e-4               override a stage field
  pipe run p.yaml --set params.epochs=1 --until train
  pipe run p.yaml --force tokenize                  re-run a stage and everything after it
  pipe status p.yaml --explain                      which stages are stale, and what changed
  pipe dag p.yaml --format mermaid                  draw the stage graph
  pipe show p.yaml train                            a stage's manifest, outputs and metrics
  pipe gc --keep-last 3                             drop what the last 3 runs did not use
  pipe cache verify                                 re-hash the store, drop corrupt entries";

#[derive(Parser)]
#[command(
    name = "pipe",
    version,
    about = "Declarative, cached, resumable LLM fine-tuning pipelines",
    after_help = EXAMPLES
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The store directory
    #[arg(long, global = true, env = "PIPE_CACHE", default_value = "cache")]
    cache: PathBuf,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: every stage whose key is not in the cache
    Run(RunArgs),
    /// Check a pipeline file without running anything
    Check(FileArgs),
    /// Per stage: cached, stale (and with --explain, what changed) or never run
    Status {
        #[command(flatten)]
        file: FileArgs,
        /// Say which part of each stale stage's key changed
        #[arg(long)]
        explain: bool,
    },
    /// Draw the stage graph
    Dag {
        #[command(flatten)]
        file: FileArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Show a stage's manifest: key, params, inputs, outputs, metrics, log
    Show {
        #[command(flatten)]
        file: FileArgs,
        stage: String,
        /// Print the manifest as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove what no cache entry needs (unused objects, leftovers of killed commits)
    #[command(long_about = GC_ABOUT)]
    Gc {
        /// Also remove the entries that the last N runs did not use (a killed run counts; the
        /// last result of each stage of each pipeline is always kept)
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Also remove the resume state (work dirs) of unfinished stages, except what the
        /// latest run of each pipeline left: the next `pipe run` resumes from that
        #[arg(long)]
        work: bool,
        /// Remove the resume state of every unfinished stage, the latest runs' too: an
        /// interrupted stage (a half-done training, say) then starts over from scratch
        #[arg(long)]
        work_all: bool,
        /// Say what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Store maintenance
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

const GC_ABOUT: &str = "\
Remove what no cache entry needs.

Always removed: objects that no entry's manifest references, entry directories that a killed \
commit left without a manifest, and the work directories of stages that have completed since.

--keep-last N also removes entries, except those used by the last N runs (a run that was \
killed counts, with the stages it started) and those that refs point at (the last result of \
each stage of each pipeline, which `status` and `show` read).

Never removed unless asked: the work directories of unfinished stages, which hold their \
resume state (checkpoints). --work removes those that the latest run of each pipeline did not \
use; --work-all removes every one, so that interrupted stages start over.

Nothing outside the store is touched.";

#[derive(Subcommand)]
enum CacheCommand {
    /// Re-hash every stored file; corrupt entries, and the entries built from their outputs,
    /// are removed so the next run re-makes them
    Verify,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Mermaid,
    Dot,
}

#[derive(Args)]
struct FileArgs {
    /// The pipeline file
    file: PathBuf,
    /// Override a field: `stage.field=value` or `params.name=value` (repeatable)
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    file: FileArgs,
    /// Run only this stage (its inputs must be in the cache); repeatable
    #[arg(long, value_name = "STAGE")]
    only: Vec<String>,
    /// Run this stage and what it depends on, nothing after it; repeatable
    #[arg(long, value_name = "STAGE")]
    until: Vec<String>,
    /// Re-run this stage and everything that depends on it, even if cached; repeatable
    #[arg(long, value_name = "STAGE")]
    force: Vec<String>,
    /// Print what would run and why, and run nothing
    #[arg(long)]
    dry_run: bool,
    /// Stages to run at once (default: the number of cores)
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
}

pub fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| pipe_core::progress::StderrWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    if quiet {
        pipe_core::progress::hide();
    }
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    // Read for the store this command uses, so `to:` fields are checked against it.
    let registry =
        pipe_stages::registry().in_workspace(pipe_core::kind::Workspace::here(&cli.cache));
    let load = |f: &FileArgs| -> Result<Pipeline> {
        pipe_core::load(&f.file, &f.set, &registry).map_err(|e| anyhow::anyhow!("{e}"))
    };
    match cli.command {
        Command::Run(args) => {
            let pipeline = load(&args.file)?;
            let selection = Selection {
                only: args.only,
                until: args.until,
                force: args.force,
            };
            if args.dry_run {
                pipe_core::progress::hide();
                let mut engine = engine_for_reading(&pipeline, &cli.cache)?;
                let rows = engine.plan(&selection).map_err(anyhow::Error::msg)?;
                println!(
                    "plan for `{}` ({}):",
                    pipeline.name,
                    args.file.file.display()
                );
                for row in &rows {
                    println!("  {row}");
                }
                print!("{}", memory_text(&pipeline));
                return Ok(ExitCode::SUCCESS);
            }
            let cancel = interrupt_flag();
            let store = Store::open(&cli.cache)?;
            let mut engine = Engine::new(&pipeline, store);
            let jobs = args.jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let summary = engine.run(&RunOptions { selection, jobs }, cancel)?;
            let table = summary.table();
            if summary.ok() {
                if !cli.quiet {
                    print!("{table}");
                }
                Ok(ExitCode::SUCCESS)
            } else {
                eprint!("{table}");
                Ok(ExitCode::from(if summary.interrupted { 130 } else { 1 }))
            }
        }
        Command::Check(f) => {
            let p = load(&f)?;
            let kinds: Vec<String> = p
                .stages
                .iter()
                .map(|s| format!("{} ({})", s.id, s.kind))
                .collect();
            println!(
                "{}: ok — pipeline `{}`, {}: {}",
                f.file.display(),
                p.name,
                count(p.stages.len(), "stage", "stages"),
                kinds.join(", ")
            );
            print!("{}", memory_text(&p));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { file, explain } => {
            let p = load(&file)?;
            let mut engine = engine_for_reading(&p, &cli.cache)?;
            let rows = engine
                .plan(&Selection::default())
                .map_err(anyhow::Error::msg)?;
            print!("{}", status_text(&p, &rows, explain));
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { file, format } => {
            let p = load(&file)?;
            let format = match format {
                Format::Text => DagFormat::Text,
                Format::Mermaid => DagFormat::Mermaid,
                Format::Dot => DagFormat::Dot,
            };
            print!("{}", render(&p, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { file, stage, json } => {
            let p = load(&file)?;
            if p.stage(&stage).is_none() {
                let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
                bail!(
                    "the pipeline has no stage `{stage}` (stages: {})",
                    ids.join(", ")
                );
            }
            let mut engine = engine_for_reading(&p, &cli.cache)?;
            let rows = engine
                .plan(&Selection::default())
                .map_err(anyhow::Error::msg)?;
            let row = rows
                .iter()
                .find(|r| r.stage == stage)
                .expect("every stage has a row");
            let (manifest, current) = match (&row.verdict, &row.key) {
                (Verdict::Cached, Some(k)) => (engine.store.read_manifest(k), true),
                _ => (
                    engine
                        .store
                        .read_ref(&p.name, &stage)
                        .and_then(|r| engine.store.read_manifest(&r.key)),
                    false,
                ),
            };
            let Some(m) = manifest else {
                bail!(
                    "stage `{stage}` has never completed in this store ({})",
                    cli.cache.display()
                );
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                print!("{}", show_text(&engine.store, &m, current));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc {
            keep_last,
            work,
            work_all,
            dry_run,
        } => {
            if keep_last == Some(0) {
                bail!(
                    "--keep-last must be at least 1 (to empty the store, delete {})",
                    cli.cache.display()
                );
            }
            let store = Store::open(&cli.cache)?;
            let _lock = WorkspaceLock::acquire(&store.root)?;
            let work = match (work, work_all) {
                (_, true) => WorkDirs::All,
                (true, false) => WorkDirs::Unused,
                (false, false) => WorkDirs::Keep,
            };
            let r = store.gc(keep_last, work, dry_run)?;
            let verb = if dry_run { "would remove" } else { "removed" };
            let kept = match work {
                _ if r.work_dirs_kept == 0 => String::new(),
                WorkDirs::Keep => format!(
                    "; kept {} of unfinished stages (their resume state; --work removes it)",
                    count(r.work_dirs_kept, "work dir", "work dirs")
                ),
                _ => format!(
                    "; kept {} that the latest run of a pipeline resumes from (--work-all removes {})",
                    count(r.work_dirs_kept, "work dir", "work dirs"),
                    if r.work_dirs_kept == 1 { "it" } else { "them" }
                ),
            };
            println!(
                "{verb} {} ({}), {}, {}{kept}",
                count(r.objects_removed, "object", "objects"),
                human_bytes(r.bytes_freed),
                count(r.entries_removed, "entry", "entries"),
                count(r.work_dirs_removed, "work dir", "work dirs"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache {
            command: CacheCommand::Verify,
        } => {
            let store = Store::open(&cli.cache)?;
            let _lock = WorkspaceLock::acquire(&store.root)?;
            let r = store.verify()?;
            for p in &r.problems {
                eprintln!("corrupt: {p}");
            }
            for p in &r.built_from_corrupt {
                eprintln!("built from corrupt data: {p}");
            }
            if r.problems.is_empty() {
                println!(
                    "ok: {}, {} verified",
                    count(r.entries, "entry", "entries"),
                    count(r.objects, "object", "objects")
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "{}; {} removed from the cache ({} built from corrupt data), the next run re-makes {}",
                    count(r.problems.len(), "problem", "problems"),
                    count(r.invalidated.len(), "entry", "entries"),
                    r.built_from_corrupt.len(),
                    if r.invalidated.len() == 1 { "it" } else { "them" }
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// An engine for commands that only read: a store that does not exist yet reads as empty.
fn engine_for_reading<'p>(p: &'p Pipeline, cache: &Path) -> Result<Engine<'p>> {
    let store = match Store::existing(cache) {
        Some(s) => s,
        None => Store {
            root: cache.to_path_buf(),
        },
    };
    Ok(Engine::new(p, store))
}

/// The memory plans of the stages that have one, a line each, for `check` and `--dry-run`.
fn memory_text(p: &Pipeline) -> String {
    let plans = p.memory_plans();
    if plans.is_empty() {
        return String::new();
    }
    let mut text = String::from("memory (estimated peak, checked again before the stage runs):\n");
    for (id, plan) in plans {
        text.push_str(&format!("  {id}: {plan}\n"));
    }
    text
}

fn status_text(p: &Pipeline, rows: &[PlanRow], explain: bool) -> String {
    let mut s = format!("pipeline `{}` ({})\n", p.name, p.file.display());
    for row in rows {
        let key = row.key.as_deref().map(|k| &k[..12]).unwrap_or("-");
        let (word, detail): (&str, Vec<String>) = match &row.verdict {
            Verdict::Cached => ("cached", vec![]),
            Verdict::NeverRun => ("never run", vec![]),
            Verdict::Missing => (
                "stale",
                vec!["its last result is no longer in the store".into()],
            ),
            Verdict::Stale(changes) => ("stale", changes.iter().map(|c| c.to_string()).collect()),
            Verdict::Damaged(d) => (
                "stale",
                vec![format!(
                    "its stored outputs are damaged ({d}); the next run re-makes them"
                )],
            ),
            Verdict::Forced | Verdict::NotSelected => ("stale", vec![]),
            Verdict::WaitsOn(ups) => (
                "stale",
                vec![format!(
                    "reads {}, which must run first; it re-runs only if their outputs change",
                    ups.iter()
                        .map(|u| format!("`{u}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )],
            ),
            Verdict::Error(e) => ("error", vec![e.clone()]),
        };
        s.push_str(&format!("  {word:10} {:16} {key}\n", row.stage));
        for note in &row.notes {
            s.push_str(&format!("             note: {note}\n"));
        }
        if explain || matches!(row.verdict, Verdict::Error(_) | Verdict::Damaged(_)) {
            for d in detail {
                s.push_str(&format!("             - {d}\n"));
            }
        }
    }
    s
}

fn show_text(store: &Store, m: &pipe_core::store::Manifest, current: bool) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "stage     {} ({} v{})\n",
        m.stage, m.kind, m.kind_version
    ));
    s.push_str(&format!(
        "key       {}{}\n",
        m.key,
        if current {
            ""
        } else {
            "  (last run; the current key differs: stale)"
        }
    ));
    s.push_str(&format!(
        "ran       {} → {} ({:.1}s)\n",
        m.started, m.finished, m.wall_s
    ));
    s.push_str(&format!(
        "params    {}\n",
        serde_json::to_string(&m.params).unwrap_or_default()
    ));
    s.push_str("inputs\n");
    for (name, r) in &m.inputs {
        s.push_str(&format!("  {name}  {}  ({})\n", &r.digest[..12], r.source));
    }
    let total: u64 = m.outputs.iter().map(|f| f.size).sum();
    s.push_str(&format!(
        "outputs   {}, {} in {}\n",
        count(m.outputs.len(), "file", "files"),
        human_bytes(total),
        store.out_dir(&m.key).display()
    ));
    for f in m.outputs.iter().take(50) {
        s.push_str(&format!(
            "  {}  {:>10}  {}\n",
            &f.digest[..12],
            human_bytes(f.size),
            f.path
        ));
    }
    if m.outputs.len() > 50 {
        s.push_str(&format!("  … and {} more\n", m.outputs.len() - 50));
    }
    if let Some(metrics) = &m.metrics {
        s.push_str(&format!(
            "metrics   {}\n",
            serde_json::to_string(metrics).unwrap_or_default()
        ));
    }
    s.push_str(&format!(
        "log       {}\n",
        store.root.join(&m.log).display()
    ));
    s
}

/// `n` and the noun for it: "1 stage", "2 stages".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn human_bytes(n: u64) -> String {
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
