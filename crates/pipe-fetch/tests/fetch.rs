//! Downloads against a real HTTP server on 127.0.0.1: resume, retries, errors, checksums, Hub.

mod server;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pipe_fetch::{fetch, Checksum, Client, FetchError, FetchOptions, Source, Transfer};
use server::{sha256_hex, TestServer};

struct Quiet;
impl Transfer for Quiet {
    fn progress(&self, _: u64, _: Option<u64>) {}
    fn cancelled(&self) -> bool {
        false
    }
}

/// Cancels once `after` bytes have arrived (a Ctrl-C in the middle of a download).
struct CancelAfter {
    after: u64,
    seen: Cell<u64>,
}
impl Transfer for CancelAfter {
    fn progress(&self, done: u64, _: Option<u64>) {
        self.seen.set(done);
    }
    fn cancelled(&self) -> bool {
        self.seen.get() >= self.after
    }
}

fn client() -> Client {
    let mut c = Client::new();
    c.backoff = Duration::from_millis(10);
    c
}

fn body(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn opts(endpoint: &str) -> FetchOptions {
    FetchOptions {
        endpoint: endpoint.to_string(),
        ..Default::default()
    }
}

fn get(url: &str, o: &FetchOptions, dir: &Path) -> Result<pipe_fetch::FetchReport, FetchError> {
    let src = Source::parse(url, dir).unwrap();
    fetch(
        &src,
        url,
        o,
        &client(),
        &dir.join("out"),
        &dir.join("work"),
        &Quiet,
    )
}

#[test]
fn plain_download_with_a_checksum() {
    let srv = TestServer::start();
    let data = body(300_000);
    srv.add("/data/alpaca.json", &data);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&srv.base);
    o.checksums.insert(
        "alpaca.json".into(),
        Checksum::parse(&format!("sha256:{}", sha256_hex(&data))).unwrap(),
    );
    let r = get(&srv.url("/data/alpaca.json"), &o, dir.path()).unwrap();
    assert!(std::fs::read(dir.path().join("out/alpaca.json")).unwrap() == data);
    assert_eq!(r.files[0].bytes, 300_000);
    assert!(r.etag.is_some());
}

#[test]
fn a_dropped_connection_is_resumed_with_range() {
    let srv = TestServer::start();
    let data = body(1_000_000);
    srv.add("/big.bin", &data);
    srv.drop_next("/big.bin", 1);
    let dir = tempfile::tempdir().unwrap();
    let r = get(&srv.url("/big.bin"), &opts(&srv.base), dir.path()).unwrap();
    assert!(std::fs::read(dir.path().join("out/big.bin")).unwrap() == data);
    let seen = srv.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].range, None);
    let range = seen[1].range.clone().expect("the retry asks for the rest");
    let from: u64 = range
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0 && from < 1_000_000, "{range}");
    assert_eq!(r.files[0].bytes, 1_000_000);
}

#[test]
fn an_interrupted_download_continues_in_a_later_run() {
    let srv = TestServer::start();
    let data = body(2_000_000);
    srv.add("/m.safetensors", &data);
    let dir = tempfile::tempdir().unwrap();
    let url = srv.url("/m.safetensors");
    let src = Source::parse(&url, dir.path()).unwrap();
    let stop = CancelAfter {
        after: 500_000,
        seen: Cell::new(0),
    };
    let e = fetch(
        &src,
        &url,
        &opts(&srv.base),
        &client(),
        &dir.path().join("out"),
        &dir.path().join("work"),
        &stop,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::Interrupted));
    assert!(
        !dir.path().join("out/m.safetensors").exists(),
        "no partial file in the output"
    );
    let r = get(&url, &opts(&srv.base), dir.path()).unwrap();
    assert!(r.files[0].resumed_from >= 500_000, "{:?}", r.files);
    assert!(std::fs::read(dir.path().join("out/m.safetensors")).unwrap() == data);
    assert!(srv.seen().last().unwrap().range.is_some());
}

#[test]
fn a_changed_remote_file_restarts_the_download() {
    let srv = TestServer::start();
    srv.add("/f.bin", &body(1_000_000));
    let dir = tempfile::tempdir().unwrap();
    let url = srv.url("/f.bin");
    let src = Source::parse(&url, dir.path()).unwrap();
    let stop = CancelAfter {
        after: 300_000,
        seen: Cell::new(0),
    };
    assert!(fetch(
        &src,
        &url,
        &opts(&srv.base),
        &client(),
        &dir.path().join("out"),
        &dir.path().join("work"),
        &stop
    )
    .is_err());
    let new: Vec<u8> = body(1_000_000).into_iter().map(|b| b ^ 0xff).collect();
    srv.add("/f.bin", &new);
    let r = get(&url, &opts(&srv.base), dir.path()).unwrap();
    assert!(
        std::fs::read(dir.path().join("out/f.bin")).unwrap() == new,
        "If-Range must prevent splicing two versions"
    );
    assert_eq!(r.files[0].bytes, 1_000_000);
}

#[test]
fn not_found_and_unreachable_say_what_to_do() {
    let srv = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let e = get(&srv.url("/missing.json"), &opts(&srv.base), dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 404") && e.contains("/missing.json"), "{e}");
    // A port nothing listens on, on the loopback address.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = get(
        &format!("http://127.0.0.1:{port}/x.json"),
        &opts(&srv.base),
        dir.path(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(&format!("cannot reach 127.0.0.1:{port}")) && e.contains("help:"),
        "{e}"
    );
}

#[test]
fn a_wrong_checksum_names_both_digests_and_keeps_the_file_out() {
    let srv = TestServer::start();
    let data = body(1000);
    srv.add("/d.json", &data);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&srv.base);
    let wrong = "0".repeat(64);
    o.checksums.insert(
        "d.json".into(),
        Checksum::parse(&format!("sha256:{wrong}")).unwrap(),
    );
    let e = get(&srv.url("/d.json"), &o, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&wrong) && e.contains(&sha256_hex(&data)), "{e}");
    assert!(!dir.path().join("out/d.json").exists());
}

#[test]
fn hub_repositories_resolve_list_verify_and_authenticate() {
    let srv = TestServer::start();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let weights = body(400_000);
    srv.add_hub_repo(
        "org/tiny",
        commit,
        &[
            ("config.json", b"{\"hidden_size\": 8}", false),
            ("model.safetensors", &weights, true),
            ("README.md", b"# tiny", false),
            ("pytorch_model.bin", b"pickle", true),
        ],
    );
    srv.gate("/", "s3cret");
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&srv.base);
    let src = Source::parse("hf://org/tiny", dir.path()).unwrap();
    let e = fetch(
        &src,
        "hf://org/tiny",
        &o,
        &client(),
        &dir.path().join("out"),
        &dir.path().join("work"),
        &Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("HTTP 401") && e.contains("HF_TOKEN"), "{e}");
    let c = client().with_token(
        srv.base.trim_start_matches("http://"),
        Some("s3cret".into()),
    );
    let r = fetch(
        &src,
        "hf://org/tiny",
        &o,
        &c,
        &dir.path().join("out"),
        &dir.path().join("work"),
        &Quiet,
    )
    .unwrap();
    assert_eq!(r.revision.as_deref(), Some(commit));
    let names: Vec<&str> = r.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        vec!["config.json", "model.safetensors"],
        "defaults: config, tokenizer, safetensors; never pickle"
    );
    assert!(std::fs::read(dir.path().join("out/model.safetensors")).unwrap() == weights);
    assert!(srv
        .seen()
        .iter()
        .any(|s| s.path.contains(&format!("/resolve/{commit}/"))));

    // The Hub's LFS sha256 is checked: a tampered file is refused.
    let mut tampered = weights.clone();
    tampered[1234] ^= 1;
    srv.add(
        &format!("/org/tiny/resolve/{commit}/model.safetensors"),
        &tampered,
    );
    let dir2 = tempfile::tempdir().unwrap();
    let e = fetch(
        &src,
        "hf://org/tiny",
        &o,
        &c,
        &dir2.path().join("out"),
        &dir2.path().join("work"),
        &Quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("checksum mismatch for model.safetensors") && e.contains(&sha256_hex(&weights)),
        "{e}"
    );
}

#[test]
fn local_sources_copy_files_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("model/sub")).unwrap();
    std::fs::write(dir.path().join("model/config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("model/sub/x.bin"), "x").unwrap();
    let mut o = opts("");
    let r = get("model", &o, dir.path()).unwrap();
    assert_eq!(
        r.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        vec!["config.json", "sub/x.bin"]
    );
    o.files = vec!["*.json".into()];
    let dir2 = dir.path().join("second");
    std::fs::create_dir_all(&dir2).unwrap();
    let src = Source::parse(&dir.path().join("model").display().to_string(), &dir2).unwrap();
    let r = fetch(
        &src,
        "model",
        &o,
        &client(),
        &dir2.join("out"),
        &dir2.join("work"),
        &Quiet,
    )
    .unwrap();
    assert_eq!(r.files.len(), 1);
    let mut checks = BTreeMap::new();
    checks.insert(
        "nope.json".to_string(),
        Checksum::parse(&format!("blake3:{}", "1".repeat(64))).unwrap(),
    );
    o.checksums = checks;
    assert!(fetch(
        &src,
        "model",
        &o,
        &client(),
        &dir2.join("out2"),
        &dir2.join("work"),
        &Quiet
    )
    .unwrap_err()
    .to_string()
    .contains("nope.json"));
}
