//! Downloads against a real HTTP server on 127.0.0.1: resume, retries, errors, checksums, Hub.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use pipe_fetch::{fetch, Checksum, Client, FetchError, FetchOptions, Source, Transfer};
use pipe_testkit::server::{sha256_hex, TestServer};

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
    let port = pipe_testkit::free_loopback_port();
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
    let c = client()
        .with_token(&srv.base, Some("s3cret".into()))
        .unwrap();
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

/// Interrupts a download of `path` after `after` bytes, then publishes `new` there.
fn interrupt_then_change(srv: &TestServer, path: &str, dir: &Path, after: u64, new: &[u8]) {
    let url = srv.url(path);
    let src = Source::parse(&url, dir).unwrap();
    let stop = CancelAfter {
        after,
        seen: Cell::new(0),
    };
    let e = fetch(
        &src,
        &url,
        &opts(&srv.base),
        &client(),
        &dir.join("out"),
        &dir.join("work"),
        &stop,
    )
    .unwrap_err();
    assert!(matches!(e, FetchError::Interrupted), "{e}");
    srv.add(path, new);
}

#[test]
fn a_server_that_ignores_if_range_cannot_splice_two_versions() {
    for last_modified_only in [false, true] {
        let srv = TestServer::start();
        srv.ignore_if_range();
        if last_modified_only {
            srv.last_modified_only();
        }
        srv.add("/f.bin", &body(1_000_000));
        let dir = tempfile::tempdir().unwrap();
        let new: Vec<u8> = body(1_000_000).into_iter().map(|b| b ^ 0x5a).collect();
        interrupt_then_change(&srv, "/f.bin", dir.path(), 300_000, &new);
        let r = get(&srv.url("/f.bin"), &opts(&srv.base), dir.path()).unwrap();
        assert!(
            std::fs::read(dir.path().join("out/f.bin")).unwrap() == new,
            "the 206 of another version was spliced onto the partial (Last-Modified only: {last_modified_only})"
        );
        assert_eq!(r.files[0].resumed_from, 0, "{:?}", r.files);
        let seen = srv.seen();
        let last_two: Vec<Option<String>> = seen[seen.len() - 2..]
            .iter()
            .map(|s| s.range.clone())
            .collect();
        assert!(
            last_two[0].is_some() && last_two[1].is_none(),
            "a range request, refused by its validator, then the whole file: {seen:?}"
        );
    }
}

#[test]
fn an_unchanged_file_still_resumes_when_the_server_honours_its_validator() {
    let srv = TestServer::start();
    srv.last_modified_only();
    let data = body(1_000_000);
    srv.add("/same.bin", &data);
    let dir = tempfile::tempdir().unwrap();
    interrupt_then_change(&srv, "/same.bin", dir.path(), 300_000, &data);
    let r = get(&srv.url("/same.bin"), &opts(&srv.base), dir.path()).unwrap();
    assert!(std::fs::read(dir.path().join("out/same.bin")).unwrap() == data);
    assert!(r.files[0].resumed_from >= 300_000, "{:?}", r.files);
}

#[test]
fn the_hub_token_goes_only_to_the_hub_origin() {
    let hub = TestServer::start();
    let other = TestServer::start();
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    hub.add_hub_repo("org/gated", commit, &[("config.json", b"{}", false)]);
    hub.gate("/", "s3cret");
    // The same host on another port: another origin, which must not see the token.
    let weights = body(5000);
    other.add("/cdn/model.safetensors", &weights);
    hub.redirect(
        &format!("/org/gated/resolve/{commit}/model.safetensors"),
        &other.url("/cdn/model.safetensors"),
    );
    // A redirect within the Hub's origin keeps it (a relative Location, as the Hub sends).
    hub.redirect(
        &format!("/org/gated/resolve/{commit}/tokenizer.json"),
        &format!("/org/gated/resolve/{commit}/tokenizer-moved.json"),
    );
    hub.add(
        &format!("/org/gated/resolve/{commit}/tokenizer-moved.json"),
        b"{\"model\": {}}",
    );
    let listing = serde_json::json!({"sha": commit, "siblings": [
        {"rfilename": "config.json", "size": 2},
        {"rfilename": "tokenizer.json", "size": 13},
        {"rfilename": "model.safetensors", "size": 5000,
         "lfs": {"sha256": sha256_hex(&weights), "size": 5000}},
    ]});
    hub.add(
        "/api/models/org/gated/revision/main?blobs=true",
        &serde_json::to_vec(&listing).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let src = Source::parse("hf://org/gated", dir.path()).unwrap();
    let c = client()
        .with_token(&hub.base, Some("s3cret".into()))
        .unwrap();
    let r = fetch(
        &src,
        "hf://org/gated",
        &opts(&hub.base),
        &c,
        &dir.path().join("out"),
        &dir.path().join("work"),
        &Quiet,
    )
    .unwrap();
    assert_eq!(r.files.len(), 3, "{:?}", r.files);
    assert!(std::fs::read(dir.path().join("out/model.safetensors")).unwrap() == weights);
    let to_other = other.seen();
    assert_eq!(to_other.len(), 1, "{to_other:?}");
    assert_eq!(
        to_other[0].auth, None,
        "the token followed a redirect to another port of the same host"
    );
    assert!(hub
        .seen()
        .iter()
        .all(|s| s.auth.as_deref() == Some("Bearer s3cret")));
}

#[test]
fn a_hub_listing_with_names_that_leave_the_output_is_refused_before_writing() {
    for hostile in [
        "../../pipe-escaped.txt",
        "/tmp/pipe-escaped-absolute.txt",
        "a/../../pipe-escaped.txt",
        "a//b.json",
        "nul\0.json",
    ] {
        let srv = TestServer::start();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        srv.add_hub_repo(
            "org/evil",
            commit,
            &[
                ("config.json", b"{}", false),
                (hostile, b"pwned", false),
                ("model.safetensors", b"weights", false),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("deep/er/out");
        let src = Source::parse("hf://org/evil", dir.path()).unwrap();
        let e = fetch(
            &src,
            "hf://org/evil",
            &opts(&srv.base),
            &client(),
            &out,
            &dir.path().join("work"),
            &Quiet,
        )
        .unwrap_err()
        .to_string();
        let shown: String = hostile.chars().flat_map(char::escape_debug).collect();
        assert!(
            e.contains(&format!("`{shown}`"))
                && e.contains("org/evil")
                && e.contains("wrote nothing"),
            "{e}"
        );
        assert!(!out.exists(), "nothing is written: {hostile:?}");
        assert!(!dir.path().join("deep/pipe-escaped.txt").exists());
        assert!(!Path::new("/tmp/pipe-escaped-absolute.txt").exists());
        assert!(
            srv.seen().iter().all(|s| !s.path.contains("/resolve/")),
            "no file was requested"
        );
    }
}

#[test]
fn a_url_or_local_file_name_that_leaves_the_output_is_refused() {
    let srv = TestServer::start();
    srv.add("/d.json", b"{}");
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&srv.base);
    o.file_name = Some("../outside.json".into());
    let e = get(&srv.url("/d.json"), &o, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`../outside.json`") && e.contains("`..`"), "{e}");
    assert!(srv.seen().is_empty(), "refused before any request");
    std::fs::write(dir.path().join("local.json"), "{}").unwrap();
    o.file_name = Some(dir.path().join("abs.json").display().to_string());
    let e = get("local.json", &o, dir.path()).unwrap_err().to_string();
    assert!(e.contains("absolute path"), "{e}");
    assert!(!dir.path().join("abs.json").exists());
    assert!(!dir.path().join("outside.json").exists());
}
