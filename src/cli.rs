//! Arguments and output of each `pipe` subcommand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::progress::LiveView;
use crate::report::{self, human_bytes};
use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pipe_core::graph::{render, DagFormat, Selection};
use pipe_core::kind::{Registry, Workspace};
use pipe_core::lock::WorkspaceLock;
use pipe_core::remote::RemoteCache;
use pipe_core::resources::Machine;
use pipe_core::runner::{interrupt_flag, Decision, Direction, PlanState, Synced};
use pipe_core::store::WorkDirs;
use pipe_core::{Engine, Pipeline, RunOptions, Store};
use std::sync::Arc;

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
  pipe cache verify                                 re-hash the store, drop corrupt entries
  pipe remote set s3://team-bucket/pipe             share results through a remote cache
  pipe push p.yaml                                  send the current results to the remote
  pipe pull p.yaml train                            fetch a stage's current result from it
  pipe kinds                                        the stage kinds, with their versions";

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
    /// A remote cache shared with other stores: s3://BUCKET/PREFIX, gs://…, az://…, file:///PATH
    /// (instead of the store's remote.yaml; credentials come from the environment)
    #[arg(long, global = true, env = "PIPE_REMOTE", value_name = "URL")]
    remote: Option<String>,
    /// Pull from the remote cache, never push to it
    #[arg(long, global = true, env = "PIPE_REMOTE_READ_ONLY")]
    remote_read_only: bool,
    /// Ignore any remote cache: only the local store
    #[arg(long, global = true)]
    no_remote: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline: every stage whose key is not in the cache
    ///
    /// Each stage's `kind:` is one of those `pipe kinds` lists.
    Run(RunArgs),
    /// Check a pipeline file without running anything
    ///
    /// Each stage's fields are checked by its kind (`pipe kinds` lists the kinds).
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
    /// Show a stage's manifest: key, key fields, inputs, outputs, metrics, log
    Show {
        #[command(flatten)]
        file: FileArgs,
        stage: String,
        /// Print the manifest as JSON
        #[arg(long)]
        json: bool,
        /// Print the directory of the stage's TensorBoard events (train stages), for
        /// `tensorboard --logdir`; a running stage's too
        #[arg(long, conflicts_with = "json")]
        logdir: bool,
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
    /// Send the current results of a pipeline's stages to the remote cache (objects first,
    /// the manifest last)
    Push {
        #[command(flatten)]
        file: FileArgs,
        /// Only these stages (default: every stage with a current result in the local store)
        stages: Vec<String>,
    },
    /// Fetch the current results of a pipeline's stages from the remote cache (each object
    /// verified on arrival)
    Pull {
        #[command(flatten)]
        file: FileArgs,
        /// Only these stages (default: every stage the remote has a current result of)
        stages: Vec<String>,
    },
    /// The store's remote cache (kept in remote.yaml in the store)
    Remote {
        #[command(subcommand)]
        command: RemoteCommand,
    },
    /// List the stage kinds a pipeline can use, with their versions and what they do
    Kinds,
    /// Print the JSON Schema of pipeline files (for editors: completion, hover docs, checks)
    Schema,
    /// Run one stage here and commit its result: what a Slurm job of `pipe run` runs on its
    /// compute node, and how each node of a `nodes: N` train stage is started by hand
    RunStage {
        #[command(flatten)]
        file: FileArgs,
        #[arg(long)]
        stage: String,
        /// The key the stage was submitted with: it must still be its key here (default: its
        /// key now)
        #[arg(long)]
        key: Option<String>,
        /// The stage's log (appended; default: a new one in the store). Other nodes than
        /// node 0 write beside it, in `<log>.node-R`
        #[arg(long, requires = "key")]
        log: Option<PathBuf>,
        /// The stage runs on this many nodes (its `nodes:`), one `pipe run-stage` each
        #[arg(long, requires = "coordinator")]
        nodes: Option<usize>,
        /// This node's number, from 0 (default: Slurm's SLURM_PROCID)
        #[arg(long, requires = "nodes")]
        node: Option<usize>,
        /// HOST:PORT where node 0 listens and the other nodes connect
        #[arg(long, requires = "nodes")]
        coordinator: Option<String>,
        /// Seconds a node waits for another (to join, or during a step) before it stops
        #[arg(long, default_value_t = 600)]
        node_timeout: u64,
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

#[derive(Subcommand)]
enum RemoteCommand {
    /// Use this remote cache from now on: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX,
    /// az://CONTAINER/PREFIX or file:///PATH
    Set {
        url: String,
        /// Pull from it, never push
        #[arg(long)]
        read_only: bool,
    },
    /// Stop using a remote cache
    Unset,
    /// Which remote cache commands use, and where that comes from
    Show,
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
    /// CPUs this machine offers stages' `resources:` (default: its cores)
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
    /// GPUs this machine offers stages' `resources:`, as indices: `0,1` (default: those the
    /// NVIDIA driver lists; `none` for none)
    #[arg(long, value_name = "LIST")]
    gpus: Option<String>,
    /// Memory this machine offers stages' `resources:`: `64GiB` (default: its RAM)
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
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
        .with_writer(|| crate::progress::StderrWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    if quiet {
        crate::progress::hide();
    }
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cx = Context {
        // Read for the store this command uses, so `to:` fields are checked against it.
        registry: pipe_stages::registry().in_workspace(Workspace::here(&cli.cache)),
        cache: cli.cache,
        quiet: cli.quiet,
        remote: RemoteArgs {
            url: cli.remote,
            read_only: cli.remote_read_only,
            none: cli.no_remote,
        },
    };
    match cli.command {
        Command::Run(args) => run(&cx, args),
        Command::Check(file) => check(&cx, &file),
        Command::Status { file, explain } => status(&cx, &file, explain),
        Command::Dag { file, format } => dag(&cx, &file, format),
        Command::Show {
            file,
            stage,
            json,
            logdir,
        } => show(&cx, &file, &stage, json, logdir),
        Command::Gc {
            keep_last,
            work,
            work_all,
            dry_run,
        } => {
            let work = match (work, work_all) {
                (_, true) => WorkDirs::All,
                (true, false) => WorkDirs::Unused,
                (false, false) => WorkDirs::Keep,
            };
            gc(&cx, keep_last, work, dry_run)
        }
        Command::Cache {
            command: CacheCommand::Verify,
        } => cache_verify(&cx),
        Command::Push { file, stages } => sync(&cx, &file, &stages, Direction::Push),
        Command::Pull { file, stages } => sync(&cx, &file, &stages, Direction::Pull),
        Command::Remote { command } => remote(&cx, command),
        Command::Kinds => kinds(&cx),
        Command::RunStage {
            file,
            stage,
            key,
            log,
            nodes,
            node,
            coordinator,
            node_timeout,
        } => {
            let node = match (nodes, coordinator) {
                (Some(nodes), Some(coordinator)) => {
                    Some(stage_node(nodes, node, coordinator, node_timeout)?)
                }
                _ => None,
            };
            run_stage(&cx, &file, &stage, key.as_deref(), log, node)
        }
        Command::Schema => {
            let schema = pipe_core::schema::pipeline_schema(&cx.registry);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What the subcommands share: the stage kinds, the store directory, `--quiet` and the
/// remote cache options.
struct Context {
    registry: Registry,
    cache: PathBuf,
    quiet: bool,
    remote: RemoteArgs,
}

struct RemoteArgs {
    url: Option<String>,
    read_only: bool,
    none: bool,
}

impl Context {
    fn load(&self, f: &FileArgs) -> Result<Pipeline> {
        pipe_core::load(&f.file, &f.set, &self.registry).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Which remote cache this command uses and where that was set, if any (see
    /// `pipe_remote::Settings::resolve`).
    fn remote_settings(&self) -> Result<Option<(pipe_remote::Settings, pipe_remote::Origin)>> {
        Ok(pipe_remote::Settings::resolve(
            &self.cache,
            self.remote.url.as_deref(),
            self.remote.read_only,
            self.remote.none,
        )?)
    }

    /// The remote cache this command uses, if any. A mistake in its URL or remote.yaml is an
    /// error; a remote that cannot be reached shows only when it is used (and the command
    /// goes on without it).
    fn remote(&self) -> Result<Option<Arc<RemoteCache>>> {
        let Some((settings, _)) = self.remote_settings()? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(pipe_remote::connect(&settings)?)))
    }
}

/// `pipe run`: the plan with `--dry-run`, else the run and its summary table.
fn run(cx: &Context, args: RunArgs) -> Result<ExitCode> {
    let pipeline = cx.load(&args.file)?;
    let machine = machine(&args)?;
    let selection = Selection {
        only: args.only,
        until: args.until,
        force: args.force,
    };
    if args.dry_run {
        return dry_run(cx, &pipeline, &args.file, &selection);
    }
    let cancel = interrupt_flag();
    let store = Store::open(&cx.cache)?;
    let mut engine = Engine::new(&pipeline, store).with_remote(cx.remote()?);
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let live = LiveView::new(&pipeline);
    let summary = engine.run(
        &RunOptions {
            selection,
            jobs,
            machine: Some(machine),
            stage_command: Some(stage_command(&engine.store)?),
        },
        cancel,
        &live,
    )?;
    let table = report::summary_table(&summary);
    if summary.ok() {
        if !cx.quiet {
            print!("{table}");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprint!("{table}");
        Ok(ExitCode::from(if summary.interrupted { 130 } else { 1 }))
    }
}

/// How a Slurm job runs one stage on its compute node: this very program, on this store
/// (both must be on paths the nodes share), without a remote cache (the submitting run pushes
/// what the job commits).
fn stage_command(store: &Store) -> Result<pipe_core::slurm::StageCommand> {
    let program = std::env::current_exe()
        .map_err(|e| anyhow::anyhow!("cannot tell where this pipe program is: {e}"))?;
    let root = store
        .root
        .canonicalize()
        .unwrap_or_else(|_| store.root.clone());
    Ok(pipe_core::slurm::StageCommand {
        program,
        args: vec![
            "--cache".into(),
            root.display().to_string(),
            "--no-remote".into(),
            "run-stage".into(),
        ],
    })
}

/// This process's node of a stage that runs on `nodes` nodes: `rank`, or Slurm's task number.
fn stage_node(
    nodes: usize,
    rank: Option<usize>,
    coordinator: String,
    timeout_s: u64,
) -> Result<pipe_core::StageNode> {
    let rank = match rank {
        Some(r) => r,
        None => std::env::var("SLURM_PROCID")
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("--nodes without --node needs SLURM_PROCID (a task of srun)")
            })?,
    };
    if rank >= nodes {
        anyhow::bail!(
            "--node {rank}: the nodes of {nodes} are numbered 0 to {}",
            nodes - 1
        );
    }
    Ok(pipe_core::StageNode {
        rank,
        nodes,
        coordinator,
        timeout: std::time::Duration::from_secs(timeout_s.max(1)),
    })
}

/// `pipe run-stage`: one stage, run here for a Slurm job or as one node of a stage on several;
/// the exit status says how it ended (0 done, 1 failed, 130 interrupted), and its log says why.
fn run_stage(
    cx: &Context,
    file: &FileArgs,
    stage: &str,
    key: Option<&str>,
    log: Option<PathBuf>,
    node: Option<pipe_core::StageNode>,
) -> Result<ExitCode> {
    let store = Store::open(&cx.cache)?;
    let pipeline = cx.load(file)?;
    // Started by hand (a node of a stage on several): the terminal hears how it ended.
    let by_hand = log.is_none();
    let key = match key {
        Some(k) => k.to_string(),
        None => Engine::new(&pipeline, store.clone()).key_of(stage)?,
    };
    let log = match log {
        Some(log) => {
            pipe_core::slurm::check_job_paths(&store, &key, &log)
                .map_err(|e| anyhow::anyhow!(e))?;
            log
        }
        None => store.new_log(&key).0,
    };
    // The other nodes log beside node 0: `<log>.node-R`.
    let log = match node.as_ref().filter(|n| n.rank > 0) {
        Some(n) => {
            let mut name = log.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".node-{}", n.rank));
            log.with_file_name(name)
        }
        None => log,
    };
    let status = (|| -> Result<pipe_core::Status> {
        let work = store.work_dir(&key);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(store.log_dir(&key))?;
        let progress: Arc<dyn pipe_core::kind::Progress> =
            if node.as_ref().is_some_and(|n| n.rank > 0) {
                Arc::new(pipe_core::kind::NoProgress)
            } else {
                Arc::new(pipe_core::slurm::FileProgress::new(
                    pipe_core::slurm::progress_path(&work),
                ))
            };
        let mut engine = Engine::new(&pipeline, store);
        engine.run_stage(stage, &key, log.clone(), interrupt_flag(), progress, node)
    })()
    .unwrap_or_else(|e| {
        // Said in the log's own words, for the submitting run to report.
        let error = format!("{e:#}");
        pipe_core::slurm::append_to_log(&log, &format!("# pipe: failed: {error}"));
        pipe_core::Status::Failed(error)
    });
    if by_hand {
        match &status {
            pipe_core::Status::Failed(error) => {
                eprintln!(
                    "error: stage `{stage}` failed: {error}\n  log: {}",
                    log.display()
                )
            }
            pipe_core::Status::Done => eprintln!("stage `{stage}` done; log: {}", log.display()),
            _ => {}
        }
    }
    Ok(match status {
        pipe_core::Status::Done => ExitCode::SUCCESS,
        pipe_core::Status::Interrupted => ExitCode::from(130),
        // The log (this job's output) says why, in a `# pipe: failed:` line.
        pipe_core::Status::Failed(_) => ExitCode::FAILURE,
        other => {
            eprintln!("# pipe: stage `{stage}` did not run: {other:?}");
            ExitCode::FAILURE
        }
    })
}

/// What this machine offers stages' `resources:`: detected, with `--cpus/--gpus/--memory`.
fn machine(args: &RunArgs) -> Result<Machine> {
    let mut m = Machine::detect();
    if let Some(n) = args.cpus {
        if n == 0 {
            bail!("--cpus must be at least 1");
        }
        m.cpus = n;
    }
    if let Some(list) = &args.gpus {
        m.gpus = if list == "none" {
            Vec::new()
        } else {
            list.split(',')
                .map(|g| g.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!("--gpus takes GPU indices (`0,1`) or `none`, not `{list}`")
                })?
        };
    }
    if let Some(size) = &args.memory {
        m.memory = pipe_core::resources::parse_size(size)
            .ok_or_else(|| anyhow::anyhow!("--memory takes a size (`64GiB`), not `{size}`"))?;
    }
    Ok(m)
}

/// `pipe run --dry-run`: what would run and why, and the memory plans; runs nothing.
fn dry_run(
    cx: &Context,
    pipeline: &Pipeline,
    file: &FileArgs,
    selection: &Selection,
) -> Result<ExitCode> {
    crate::progress::hide();
    let mut engine = engine_for_reading(pipeline, &cx.cache)?.with_remote(cx.remote()?);
    let rows = engine.plan(selection).map_err(anyhow::Error::msg)?;
    println!("plan for `{}` ({}):", pipeline.name, file.file.display());
    for row in &rows {
        println!("  {}", report::plan_line(row));
    }
    print!("{}", memory_text(pipeline));
    Ok(ExitCode::SUCCESS)
}

/// `pipe check`: loads the pipeline (every check but running) and lists its stages.
fn check(cx: &Context, f: &FileArgs) -> Result<ExitCode> {
    let p = cx.load(f)?;
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

fn status(cx: &Context, file: &FileArgs, explain: bool) -> Result<ExitCode> {
    let p = cx.load(file)?;
    let mut engine = engine_for_reading(&p, &cx.cache)?.with_remote(cx.remote()?);
    let rows = engine
        .plan(&Selection::default())
        .map_err(anyhow::Error::msg)?;
    print!("{}", report::status_text(&p, &rows, explain));
    Ok(ExitCode::SUCCESS)
}

fn dag(cx: &Context, file: &FileArgs, format: Format) -> Result<ExitCode> {
    let p = cx.load(file)?;
    let format = match format {
        Format::Text => DagFormat::Text,
        Format::Mermaid => DagFormat::Mermaid,
        Format::Dot => DagFormat::Dot,
    };
    print!("{}", render(&p, format));
    Ok(ExitCode::SUCCESS)
}

/// `pipe show`: the manifest of the stage's current entry, else of its last run.
fn show(cx: &Context, file: &FileArgs, stage: &str, json: bool, logdir: bool) -> Result<ExitCode> {
    let p = cx.load(file)?;
    if p.stage(stage).is_none() {
        let ids: Vec<&str> = p.stages.iter().map(|s| s.id.as_str()).collect();
        bail!(
            "the pipeline has no stage `{stage}` (stages: {})",
            ids.join(", ")
        );
    }
    let mut engine = engine_for_reading(&p, &cx.cache)?;
    let rows = engine
        .plan(&Selection::default())
        .map_err(anyhow::Error::msg)?;
    let row = rows
        .iter()
        .find(|r| r.stage == stage)
        .expect("every stage has a row");
    let last = engine.store.read_ref(&p.name, stage).map(|r| r.key);
    if logdir {
        // The current key's (also while it runs), else the last completed one's.
        let events = [row.key.as_ref(), last.as_ref()]
            .into_iter()
            .flatten()
            .map(|k| engine.store.log_dir(k).join("tensorboard"))
            .find(|d| d.is_dir());
        let Some(events) = events else {
            bail!(
                "stage `{stage}` has no TensorBoard events in this store ({}): train stages write them from their first step",
                cx.cache.display()
            );
        };
        println!("{}", events.display());
        return Ok(ExitCode::SUCCESS);
    }
    let (manifest, current) = match (&row.state, &row.key) {
        (PlanState::Decided(Decision::Reuse(_)), Some(k)) => (engine.store.read_manifest(k), true),
        _ => (last.and_then(|k| engine.store.read_manifest(&k)), false),
    };
    let Some(m) = manifest else {
        bail!(
            "stage `{stage}` has never completed in this store ({})",
            cx.cache.display()
        );
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", show_text(&engine.store, &m, current));
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipe gc`: removes what no entry needs (and, as asked, old entries and work dirs).
fn gc(cx: &Context, keep_last: Option<usize>, work: WorkDirs, dry_run: bool) -> Result<ExitCode> {
    if keep_last == Some(0) {
        bail!(
            "--keep-last must be at least 1 (to empty the store, delete {})",
            cx.cache.display()
        );
    }
    let store = Store::open(&cx.cache)?;
    let _lock = WorkspaceLock::acquire(&store.root)?;
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
    if r.other_format_removed > 0 {
        println!(
            "({} of another cache format among them: made by another version of pipe, never reused)",
            count(r.other_format_removed, "entry", "entries")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipe cache verify`: re-hashes the store; exit status 1 if anything was corrupt.
fn cache_verify(cx: &Context) -> Result<ExitCode> {
    let store = Store::open(&cx.cache)?;
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
        if r.other_format > 0 {
            println!(
                "{} of another cache format (made by another version of pipe): never reused, not checked; `pipe gc` removes them",
                count(r.other_format, "entry", "entries")
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{}; {} removed from the cache ({} built from corrupt data), the next run re-makes {}",
            count(r.problems.len(), "problem", "problems"),
            count(r.invalidated.len(), "entry", "entries"),
            r.built_from_corrupt.len(),
            if r.invalidated.len() == 1 {
                "it"
            } else {
                "them"
            }
        );
        Ok(ExitCode::from(1))
    }
}

/// `pipe push` / `pipe pull`: a line per stage, then the traffic; exit status 1 if a stage
/// that was asked for could not be moved.
fn sync(
    cx: &Context,
    file: &FileArgs,
    stages: &[String],
    direction: Direction,
) -> Result<ExitCode> {
    let p = cx.load(file)?;
    let store = Store::open(&cx.cache)?;
    let mut engine = Engine::new(&p, store).with_remote(cx.remote()?);
    // One line for the transfers (bytes, rate, ETA) while they run, on a terminal.
    let line = crate::progress::StageLine::new(match direction {
        Direction::Pull => "pull",
        Direction::Push => "push",
    });
    line.running();
    let rows = engine.sync(direction, stages, &line.reporter());
    line.finish("done", "");
    let rows = rows?;
    let remote = engine.remote().expect("sync needs a remote");
    let mut failed = false;
    for (stage, synced) in &rows {
        let (word, detail) = match synced {
            Synced::Local if direction == Direction::Pull => {
                ("local", "already in the local store".to_string())
            }
            Synced::Local => ("local", "not asked for".to_string()),
            Synced::Pulled => ("pulled", String::new()),
            Synced::Pushed(p) if !p.manifest_written && p.objects == 0 => {
                ("up to date", "the remote has it".to_string())
            }
            Synced::Pushed(p) => (
                "pushed",
                format!(
                    "{}, {}",
                    count(p.objects, "object", "objects"),
                    human_bytes(p.bytes)
                ),
            ),
            Synced::Absent if direction == Direction::Pull => {
                ("absent", "not in the remote cache".to_string())
            }
            Synced::Absent => (
                "absent",
                "no current result in the local store (run it first)".to_string(),
            ),
            Synced::WaitsOn(ups) => (
                "unknown",
                format!(
                    "its key depends on {}, which neither store holds",
                    ups.iter()
                        .map(|u| format!("`{u}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Synced::Failed(e) => {
                failed = true;
                ("FAILED", e.clone())
            }
        };
        println!("  {word:10} {stage:16} {detail}");
    }
    let t = remote.transfers();
    let traffic = if direction == Direction::Pull {
        t.pulled
    } else {
        t.pushed
    };
    println!(
        "{} {}: {}, {} in {:.1}s ({}/s)",
        if direction == Direction::Pull {
            "pulled from"
        } else {
            "pushed to"
        },
        remote.location(),
        count(traffic.objects, "object", "objects"),
        human_bytes(traffic.bytes),
        traffic.elapsed.as_secs_f64(),
        human_bytes(traffic.rate() as u64)
    );
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `pipe remote set|unset|show`.
fn remote(cx: &Context, command: RemoteCommand) -> Result<ExitCode> {
    let path = cx.cache.join(pipe_remote::CONFIG_FILE);
    match command {
        RemoteCommand::Set { url, read_only } => {
            // Checked before it is saved: a URL that cannot name a remote is refused now.
            let settings = pipe_remote::Settings { url, read_only };
            pipe_remote::connect(&settings)?;
            let saved = settings.save(&cx.cache)?;
            println!(
                "remote cache: {}{} (saved in {})",
                settings.url,
                if read_only { ", read-only" } else { "" },
                saved.display()
            );
        }
        RemoteCommand::Unset => match std::fs::remove_file(&path) {
            Ok(()) => println!("no remote cache (removed {})", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!(
                    "no remote cache was set ({} does not exist)",
                    path.display()
                )
            }
            Err(e) => bail!("cannot remove {}: {e}", path.display()),
        },
        RemoteCommand::Show => match cx.remote_settings()? {
            None if cx.remote.none => println!("no remote cache (--no-remote)"),
            None => println!(
                "no remote cache (set one with `pipe remote set URL`, --remote or PIPE_REMOTE)"
            ),
            Some((s, origin)) => println!(
                "{}{} (from {})",
                s.url,
                if s.read_only { ", read-only" } else { "" },
                match origin {
                    pipe_remote::Origin::CommandLine => "--remote / PIPE_REMOTE".to_string(),
                    pipe_remote::Origin::File(p) => p.display().to_string(),
                }
            ),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// `pipe kinds`: every stage kind this binary offers.
fn kinds(cx: &Context) -> Result<ExitCode> {
    print!("{}", kinds_text(&cx.registry));
    Ok(ExitCode::SUCCESS)
}

/// A line per kind: its name, `v` and its version, and its summary, in columns.
fn kinds_text(registry: &Registry) -> String {
    let rows: Vec<(&str, String, &str)> = registry
        .kinds()
        .map(|k| (k.name(), format!("v{}", k.version()), k.summary()))
        .collect();
    let name_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let version_w = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let indent = name_w + 2 + version_w + 2;
    rows.iter()
        .zip(registry.kinds())
        .map(|((name, version, summary), kind)| {
            let mut line = format!("{name:name_w$}  {version:version_w$}  {summary}\n");
            if !kind.run_settings().is_empty() {
                line.push_str(&format!(
                    "{:indent$}run settings, never in the cache key: {}\n",
                    "",
                    kind.run_settings().join(", ")
                ));
            }
            line
        })
        .collect()
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
        "fields    {}\n",
        serde_json::to_string(&m.fields).unwrap_or_default()
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
