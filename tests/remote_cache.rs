//! The remote cache: stores that share one remote (a real S3-compatible server, moto's, on
//! 127.0.0.1; and a shared directory through file://), kills during push and pull, a corrupt
//! remote object, concurrent pushes, an unreachable remote, read-only remotes, and the
//! push/pull/status/remote commands.

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{sigkill, Project, Run};

/// `make` writes 20 MB of random bytes (so two runs never make the same bytes, and the upload
/// is in parts) and a small file; `use` reads the big one.
const SHARED: &str = r#"name: share
stages:
  make:
    kind: command
    cmd: echo make >> runs.log; head -c 20000000 /dev/urandom > ${out}/big.bin; echo small > ${out}/small.txt
    outs: [big.bin, small.txt]
  use:
    kind: command
    cmd: echo use >> runs.log; wc -c < ${make.big.bin} > ${out}/count.txt
    deps: [make.big.bin]
    outs: [count.txt]
"#;

/// What the secret key is in the tests: it must never show up in a store, a log or a remote.
const SECRET: &str = "pipe-test-secret-5f3a9c71d2";

/// Every complete entry's outputs: `key/out/path` → blake3 of the bytes.
fn entries(cache: &Path) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(cache.join("stages")) else {
        return map;
    };
    for e in rd {
        let dir = e.unwrap().path();
        if !dir.join("manifest.json").exists() {
            continue;
        }
        let key = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut stack = vec![dir.join("out")];
        while let Some(d) = stack.pop() {
            for f in std::fs::read_dir(&d).unwrap() {
                let p = f.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir.join("out")).unwrap().display();
                    let digest = blake3::hash(&std::fs::read(&p).unwrap()).to_hex();
                    map.insert(format!("{key}/{rel}"), digest.to_string());
                }
            }
        }
    }
    map
}

/// A shared directory as the remote, and a project that uses it.
fn project_with(pipeline: &str, remote: &Path) -> Project {
    let p = Project::new();
    p.write("p.yaml", pipeline);
    p.write("data.txt", "hello\n");
    let _ = remote;
    p
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn pipe_with_remote(p: &Project, url: &str, args: &[&str]) -> Run {
    Run::from(
        p.cmd(args)
            .env("PIPE_REMOTE", url)
            .output()
            .expect("run pipe"),
    )
}

/// The status word the summary table gives `stage`.
fn status_of(run: &Run, stage: &str) -> String {
    run.all()
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some(stage)).then(|| words.next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("no row for {stage} in\n{}", run.all()))
}

/// Manifests the remote directory holds.
fn remote_manifests(remote: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(remote.join("stages"))
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[test]
fn a_second_store_pulls_everything_from_a_shared_directory_and_runs_nothing() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = project_with(SHARED, remote.path());
    pipe_with_remote(&a, &url, &["run", "p.yaml"]).ok();
    assert_eq!(remote_manifests(remote.path()).len(), 2);

    let b = project_with(SHARED, remote.path());
    let status = pipe_with_remote(&b, &url, &["status", "p.yaml"]).ok();
    assert!(
        status.stdout.contains("remote") && status.stdout.contains("make"),
        "{}",
        status.stdout
    );
    let run = pipe_with_remote(&b, &url, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "make"), "pulled");
    assert_eq!(status_of(&run, "use"), "pulled");
    assert!(run.all().contains("pulled 2 entries"), "{}", run.all());
    assert_eq!(b.runs_of("make") + b.runs_of("use"), 0, "nothing ran in b");
    assert_eq!(entries(&a.path("cache")), entries(&b.path("cache")));
    // The pulled store is sound and a no-op run is a local hit.
    b.pipe(&["cache", "verify"]).ok();
    let again = pipe_with_remote(&b, &url, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&again, "use"), "cached");
}

#[test]
fn a_corrupt_remote_object_is_refused_and_the_stage_runs_here_and_mends_the_remote() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = project_with(SHARED, remote.path());
    pipe_with_remote(&a, &url, &["run", "p.yaml"]).ok();
    // Flip bytes of the big object, keeping its size.
    let big = a
        .path("cache/stages")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("out/big.bin").exists())
        .unwrap();
    let digest = blake3::hash(&std::fs::read(big.join("out/big.bin")).unwrap())
        .to_hex()
        .to_string();
    let object = remote
        .path()
        .join("objects")
        .join(&digest[..2])
        .join(&digest[2..]);
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&object, &bytes).unwrap();
    let found = blake3::hash(&bytes).to_hex().to_string();

    let b = project_with(SHARED, remote.path());
    let run = pipe_with_remote(&b, &url, &["run", "p.yaml"]).ok();
    let all = run.all();
    assert!(
        all.contains(&format!("should hash to {digest}")) && all.contains(&found),
        "both digests named: {all}"
    );
    assert!(all.contains("running it here instead"), "{all}");
    assert_eq!(status_of(&run, "make"), "done");
    assert_eq!(b.runs_of("make"), 1);
    b.pipe(&["cache", "verify"]).ok();
    // b pushed its own result over the corrupt copy: the remote is whole again for a third.
    let c = project_with(SHARED, remote.path());
    let run = pipe_with_remote(&c, &url, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "make"), "pulled", "{}", run.all());
    assert_eq!(status_of(&run, "use"), "pulled", "{}", run.all());
    assert_eq!(entries(&b.path("cache")), entries(&c.path("cache")));
}

#[test]
fn sigkill_during_push_leaves_no_manifest_and_the_next_run_finishes_the_push() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = project_with(SHARED, remote.path());
    let out = a
        .cmd(&["run", "p.yaml", "--only", "make"])
        .env("PIPE_REMOTE", &url)
        .env("PIPE_FAULT", "push-objects-sent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed by the fault");
    // Objects were sent, the manifest was not: the remote holds no entry.
    assert!(remote.path().join("objects").is_dir());
    assert!(remote_manifests(remote.path()).is_empty());
    let b = project_with(SHARED, remote.path());
    let status = pipe_with_remote(&b, &url, &["status", "p.yaml"]).ok();
    assert!(!status.stdout.contains("remote"), "{}", status.stdout);

    // The entry was committed before the push: the next run reuses it and pushes it.
    let run = pipe_with_remote(&a, &url, &["run", "p.yaml", "--only", "make"]).ok();
    assert_eq!(status_of(&run, "make"), "cached");
    assert_eq!(a.runs_of("make"), 1);
    assert_eq!(remote_manifests(remote.path()).len(), 1);
    let run = pipe_with_remote(&b, &url, &["run", "p.yaml", "--only", "make"]).ok();
    assert_eq!(status_of(&run, "make"), "pulled");
    assert_eq!(
        entries(&a.path("cache")),
        entries(&b.path("cache")),
        "b holds what a made"
    );
}

#[test]
fn sigkill_during_pull_leaves_no_complete_entry_and_the_next_run_pulls() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = project_with(SHARED, remote.path());
    pipe_with_remote(&a, &url, &["run", "p.yaml"]).ok();
    let b = project_with(SHARED, remote.path());
    let out = b
        .cmd(&["run", "p.yaml"])
        .env("PIPE_REMOTE", &url)
        .env("PIPE_FAULT", "pull-objects-fetched")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), None, "killed by the fault");
    assert!(
        entries(&b.path("cache")).is_empty(),
        "no entry looks complete"
    );
    b.pipe(&["cache", "verify"]).ok();
    let run = pipe_with_remote(&b, &url, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "make"), "pulled");
    assert_eq!(b.runs_of("make") + b.runs_of("use"), 0);
    assert_eq!(entries(&a.path("cache")), entries(&b.path("cache")));
}

#[test]
fn read_only_remotes_are_pulled_from_and_never_pushed_to() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let a = project_with(SHARED, remote.path());
    a.pipe(&["run", "p.yaml", "--no-remote"]).ok();
    assert!(remote_manifests(remote.path()).is_empty(), "--no-remote");
    // Explicit push of one stage, then of the rest.
    let push = pipe_with_remote(&a, &url, &["push", "p.yaml", "make"]).ok();
    assert!(push.stdout.contains("pushed"), "{}", push.stdout);
    assert_eq!(remote_manifests(remote.path()).len(), 1);
    pipe_with_remote(&a, &url, &["push", "p.yaml"]).ok();
    assert_eq!(remote_manifests(remote.path()).len(), 2);
    let again = pipe_with_remote(&a, &url, &["push", "p.yaml"]).ok();
    assert!(again.stdout.contains("up to date"), "{}", again.stdout);

    // A consumer: `pipe remote set --read-only`, an explicit pull of one stage, then a run of
    // a pipeline with one more stage, which runs here and is not pushed.
    let more = format!(
        "{SHARED}  extra:\n    kind: command\n    cmd: echo extra >> runs.log; cat ${{use.count.txt}} > ${{out}}/x.txt\n    deps: [use.count.txt]\n    outs: [x.txt]\n"
    );
    let b = project_with(&more, remote.path());
    b.pipe(&["remote", "set", &url, "--read-only"]).ok();
    let show = b.pipe(&["remote", "show"]).ok();
    assert!(show.stdout.contains("read-only"), "{}", show.stdout);
    let pull = b.pipe(&["pull", "p.yaml", "use"]).ok();
    assert!(pull.stdout.contains("pulled"), "{}", pull.stdout);
    let status = b.pipe(&["status", "p.yaml"]).ok();
    let line = |stage: &str| {
        status
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(stage))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("use").contains("cached"), "{}", status.stdout);
    assert!(
        line("make").contains("remote"),
        "only `use` was pulled: {}",
        status.stdout
    );
    let run = b.pipe(&["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "extra"), "done");
    assert_eq!(b.runs_of("make"), 0);
    assert_eq!(remote_manifests(remote.path()).len(), 2, "nothing pushed");
    let refused = b.pipe(&["push", "p.yaml"]);
    assert_ne!(refused.code, 0);
    assert!(refused.stderr.contains("read-only"), "{}", refused.stderr);
}

#[test]
fn bad_remote_settings_are_clear_errors() {
    let p = project_with(SHARED, Path::new("/"));
    let run = p.pipe(&["run", "p.yaml", "--remote", "s3://KEY:hunter2@bucket/x"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("credentials do not belong"),
        "{}",
        run.stderr
    );
    assert!(!run.all().contains("hunter2"), "{}", run.all());
    p.write("cache/remote.yaml", "url: file:///tmp/x\nread_onyl: true\n");
    let run = p.pipe(&["status", "p.yaml"]);
    assert_ne!(run.code, 0);
    assert!(
        run.stderr.contains("remote.yaml:2:1") && run.stderr.contains("read_onyl"),
        "{}",
        run.stderr
    );
    let push = p.pipe(&["push", "p.yaml", "--no-remote"]);
    assert_ne!(push.code, 0);
    assert!(push.stderr.contains("no remote cache"), "{}", push.stderr);
}

// ---- A real S3-compatible server: moto's standalone server on 127.0.0.1 ----

struct S3Server {
    child: Option<Child>,
    endpoint: String,
}

const BUCKET: &str = "pipe-cache";

impl S3Server {
    fn start() -> Self {
        let moto = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/bin/moto_server");
        assert!(
            moto.exists(),
            "{} is missing: run `bash tests/setup.sh` first",
            moto.display()
        );
        let port = pipe_testkit::free_loopback_port();
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t.elapsed() < Duration::from_secs(60), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let server = S3Server {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        server.python(&format!("s3.create_bucket(Bucket='{BUCKET}')"));
        server
    }

    /// Runs `code` with `s3`, a boto3 client of this server, in scope; returns its output.
    fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='{SECRET}', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        common::tool_python(&script, &[])
    }

    /// The remote's keys below `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.python(&format!(
            "keys = []\nfor page in s3.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}', Prefix='{prefix}'):\n    keys += [o['Key'] for o in page.get('Contents', [])]\nprint(json.dumps(keys))"
        ));
        serde_json::from_str(out.trim()).unwrap()
    }

    fn cmd(&self, p: &Project, args: &[&str]) -> Command {
        let mut c = p.cmd(args);
        c.env("PIPE_REMOTE", format!("s3://{BUCKET}/team"))
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("HOME", p.path(""));
        c
    }

    fn pipe(&self, p: &Project, args: &[&str]) -> Run {
        Run::from(self.cmd(p, args).output().expect("run pipe"))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sigkill(&mut c);
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every file below `dir`, as bytes.
fn all_bytes(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_bytes(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The issue's scenario on the shipped tiny pipeline: a second store runs no stage and ends
/// with byte-identical outputs; the secret key is nowhere.
#[test]
fn two_stores_share_an_s3_remote_on_the_tiny_pipeline() {
    let server = S3Server::start();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let a = Project::new();
    let b = Project::new();
    let run = |p: &Project| {
        let cache = p.path("cache");
        let to = p.path("delivered");
        let mut c = server.cmd(p, &["run"]);
        c.current_dir(repo)
            .args(["pipelines/tiny.yaml", "--set", "params.epochs=1", "--set"])
            .arg(format!("export.to={}", to.display()))
            .arg("--cache")
            .arg(&cache);
        Run::from(c.output().unwrap()).ok()
    };
    let first = run(&a);
    assert!(!first.all().contains("pulled"), "{}", first.all());
    assert!(
        first.all().contains("remote s3://pipe-cache/team: pushed"),
        "{}",
        first.all()
    );
    let second = run(&b);
    let rows: Vec<&str> = second
        .stdout
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect();
    assert!(!rows.is_empty());
    for row in &rows {
        let status = row.split_whitespace().nth(1).unwrap();
        assert_eq!(status, "pulled", "no stage runs in the second store: {row}");
    }
    assert_eq!(entries(&a.path("cache")), entries(&b.path("cache")));
    assert!(!server.keys("team/stages/").is_empty());

    let mut files = Vec::new();
    all_bytes(&a.path(""), &mut files);
    all_bytes(&b.path(""), &mut files);
    for (path, bytes) in &files {
        assert!(
            !contains(bytes, SECRET),
            "the secret is in {}",
            path.display()
        );
    }
    for text in [&first.stdout, &first.stderr, &second.stdout, &second.stderr] {
        assert!(!text.contains(SECRET));
    }
    let leaked = server.python(&format!(
        "found = []\nfor page in s3.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}'):\n    for o in page.get('Contents', []):\n        if b'{SECRET}' in s3.get_object(Bucket='{BUCKET}', Key=o['Key'])['Body'].read(): found.append(o['Key'])\nprint(len(found))"
    ));
    assert_eq!(leaked.trim(), "0", "the secret is in the remote");
}

#[test]
fn concurrent_pushes_of_one_key_to_s3_both_succeed_and_leave_one_consistent_entry() {
    let server = S3Server::start();
    let a = project_with(SHARED, Path::new("/"));
    let b = project_with(SHARED, Path::new("/"));
    // Same keys, different bytes (random): two versions of one entry race.
    a.pipe(&["run", "p.yaml"]).ok();
    b.pipe(&["run", "p.yaml"]).ok();
    assert_ne!(entries(&a.path("cache")), entries(&b.path("cache")));
    let spawn = |p: &Project| {
        server
            .cmd(p, &["push", "p.yaml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a), spawn(&b));
    for child in [ca, cb] {
        let out = Run::from(child.wait_with_output().unwrap());
        out.ok();
    }
    // One manifest for `make`'s key; `use` reads make's bytes, so each store's `use` has a key
    // of its own.
    let mut expected: Vec<String> = [&a, &b]
        .iter()
        .flat_map(|p| std::fs::read_dir(p.path("cache/stages")).unwrap())
        .map(|e| {
            format!(
                "team/stages/{}.json",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    expected.sort();
    expected.dedup();
    assert_eq!(expected.len(), 3);
    let mut keys = server.keys("team/stages/");
    keys.sort();
    assert_eq!(keys, expected);
    // A third store pulls whichever version won, whole and verified.
    let c = project_with(SHARED, Path::new("/"));
    let run = server.pipe(&c, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "make"), "pulled", "{}", run.all());
    c.pipe(&["cache", "verify"]).ok();
    let got = entries(&c.path("cache"));
    assert!(
        got == entries(&a.path("cache")) || got == entries(&b.path("cache")),
        "the pulled entries are one store's, not a mix"
    );
}

#[test]
fn an_s3_remote_that_stops_degrades_to_local_work_with_one_warning() {
    let mut server = S3Server::start();
    let a = project_with(SHARED, Path::new("/"));
    server.pipe(&a, &["run", "p.yaml", "--only", "make"]).ok();
    server.stop();
    let run = server.pipe(&a, &["run", "p.yaml"]).ok();
    assert_eq!(status_of(&run, "make"), "cached");
    assert_eq!(status_of(&run, "use"), "done");
    let warnings = run.stderr.matches("cannot be reached").count();
    assert_eq!(warnings, 1, "one warning: {}", run.stderr);
    assert!(
        run.all().contains("this run used only the local store"),
        "{}",
        run.all()
    );
}
