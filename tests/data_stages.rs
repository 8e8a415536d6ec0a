//! download → format → tokenize through the real binary, against a real HTTP server on
//! 127.0.0.1 (a plain URL and a Hub-style API), with the tokenizer fixtures.

mod common;

use common::Project;
use pipe_testkit::server::{sha256_hex, TestServer};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn records(n: usize) -> String {
    let recs: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Add {i} and {}.", i + 1),
                "input": if i % 3 == 0 { String::new() } else { format!("{i} {}", i + 1) },
                "output": format!("{}", 2 * i + 1),
            })
        })
        .collect();
    serde_json::to_string_pretty(&recs).unwrap()
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/tokenize/{rel}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn serve() -> (TestServer, Vec<u8>) {
    let srv = TestServer::start();
    let data = records(40).into_bytes();
    srv.add("/alpaca_data.json", &data);
    srv.add_hub_repo(
        "org/tiny-llama",
        COMMIT,
        &[
            ("config.json", b"{\"model_type\": \"llama\"}", false),
            (
                "tokenizer.json",
                &fixture("llama-bpe/tokenizer.json"),
                false,
            ),
            (
                "tokenizer_config.json",
                &fixture("llama-bpe/tokenizer_config.json"),
                false,
            ),
            ("model.safetensors", b"weights", true),
        ],
    );
    (srv, data)
}

fn pipeline(srv: &TestServer, data: &[u8], revision: &str) -> String {
    format!(
        r#"name: data
stages:
  data:
    kind: download
    source: {url}
    sha256: {sha}
  model:
    kind: download
    source: hf://org/tiny-llama{revision}
    files: ["*.json"]
  prompts:
    kind: format
    input: data
    val_size: 0.1
    seed: 7
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: model
    max_len: 96
"#,
        url = srv.url("/alpaca_data.json"),
        sha = sha256_hex(data),
    )
}

fn pipe_with_hub(p: &Project, srv: &TestServer, args: &[&str]) -> common::Run {
    common::Run::from(
        p.cmd(args)
            .env("HF_ENDPOINT", &srv.base)
            .env_remove("HF_TOKEN")
            .output()
            .unwrap(),
    )
}

#[test]
fn download_format_tokenize_end_to_end_and_cached() {
    let (srv, data) = serve();
    let p = Project::new();
    p.write("p.yaml", &pipeline(&srv, &data, &format!("@{COMMIT}")));
    let r = pipe_with_hub(&p, &srv, &["run", "p.yaml"]).ok();
    assert_eq!(r.stdout.matches(" done ").count(), 4, "{}", r.stdout);
    let outs = p.outputs("cache");
    let names: Vec<&str> = outs
        .iter()
        .map(|(n, _)| n.rsplit('/').next().unwrap())
        .collect();
    for f in [
        "alpaca_data.json",
        "config.json",
        "tokenizer.json",
        "train.jsonl",
        "val.jsonl",
        "train.safetensors",
        "val.safetensors",
        "meta.json",
    ] {
        assert!(names.contains(&f), "{f} missing from {names:?}");
    }
    assert!(
        !names.contains(&"model.safetensors"),
        "files: [\"*.json\"] selects"
    );
    let meta = &outs
        .iter()
        .find(|(n, _)| n.ends_with("/meta.json"))
        .unwrap()
        .1;
    let meta: serde_json::Value = serde_json::from_str(meta).unwrap();
    assert_eq!(meta["added_tokens"], serde_json::json!(["[PAD]"]));
    assert_eq!(meta["vocab_size_after"], 2001);
    let stats = p.pipe(&["show", "p.yaml", "prompts", "--json"]).ok().stdout;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        (
            stats["metrics"]["train"].as_u64(),
            stats["metrics"]["val"].as_u64()
        ),
        (Some(36), Some(4))
    );

    // Everything cached: no request reaches the server.
    let before = srv.seen().len();
    let r = pipe_with_hub(&p, &srv, &["run", "p.yaml"]).ok();
    assert_eq!(r.stdout.matches("cached").count(), 4, "{}", r.stdout);
    assert_eq!(srv.seen().len(), before);
    let st = pipe_with_hub(&p, &srv, &["status", "p.yaml"]).ok().stdout;
    assert!(!st.contains("unpinned"), "{st}");
}

#[test]
fn unpinned_sources_are_reported() {
    let (srv, data) = serve();
    let p = Project::new();
    let yaml =
        pipeline(&srv, &data, "").replace(&format!("    sha256: {}\n", sha256_hex(&data)), "");
    p.write("p.yaml", &yaml);
    let st = pipe_with_hub(&p, &srv, &["status", "p.yaml"]).ok().stdout;
    assert!(
        st.contains("note: unpinned source: `org/tiny-llama` follows the revision `main`"),
        "{st}"
    );
    assert!(
        st.contains("note: unpinned source: a URL without `sha256:`"),
        "{st}"
    );
    pipe_with_hub(&p, &srv, &["run", "p.yaml"]).ok();
    let show = p.pipe(&["show", "p.yaml", "model", "--json"]).ok().stdout;
    let m: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(
        m["metrics"]["revision"], COMMIT,
        "the resolved commit is recorded"
    );
    let show = p.pipe(&["show", "p.yaml", "data", "--json"]).ok().stdout;
    let m: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert!(
        m["metrics"]["etag"].is_string(),
        "the ETag of an unpinned URL is recorded"
    );
}

#[test]
fn a_failed_download_resumes_with_range_on_the_next_run() {
    let (srv, data) = serve();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    srv.add("/big.bin", &big);
    srv.drop_next("/big.bin", 1);
    let p = Project::new();
    p.write(
        "p.yaml",
        &format!(
            "name: big\nstages:\n  big:\n    kind: download\n    source: {}\n    retries: 0\n",
            srv.url("/big.bin")
        ),
    );
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("stage `big` failed") && r.stderr.contains("connection"),
        "{}",
        r.stderr
    );
    p.pipe(&["run", "p.yaml"]).ok();
    let last = srv.seen().last().cloned().unwrap();
    let from: usize = last
        .range
        .expect("resumed with Range")
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(from > 0, "continued from byte {from}");
    let out = p.outputs("cache");
    assert_eq!(out.len(), 1);
    let stored = std::fs::read(
        p.path("cache")
            .join("stages")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path()
            .join("out/big.bin"),
    )
    .unwrap();
    assert!(stored == big);
    let _ = data;
}

#[test]
fn bad_records_and_checksums_are_named() {
    let (srv, data) = serve();
    let p = Project::new();
    let mut recs: Vec<serde_json::Value> = serde_json::from_slice(&data).unwrap();
    recs[3].as_object_mut().unwrap().remove("output");
    p.write("local.json", &serde_json::to_string(&recs).unwrap());
    p.write(
        "p.yaml",
        "name: bad\nstages:\n  prompts:\n    kind: format\n    input: local.json\n",
    );
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("local.json: record 3: field `output` is missing"),
        "{}",
        r.stderr
    );
    p.write("p.yaml", "name: bad\nstages:\n  prompts:\n    kind: format\n    input: local.json\n    on_error: skip\n");
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(
        r.stderr.contains("skipped 1 records missing a field"),
        "{}",
        r.stderr
    );

    let wrong = "ab".repeat(32);
    p.write(
        "p.yaml",
        &format!("name: sum\nstages:\n  data:\n    kind: download\n    source: {}\n    sha256: {wrong}\n", srv.url("/alpaca_data.json")),
    );
    let r = p.pipe(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&wrong) && r.stderr.contains(&sha256_hex(&data)),
        "{}",
        r.stderr
    );
    let st = p.pipe(&["status", "p.yaml"]).ok().stdout;
    assert!(st.contains("never run"), "nothing entered the store: {st}");
}

#[test]
fn the_hub_token_is_sent_but_never_stored_or_logged() {
    let (srv, data) = serve();
    srv.gate("/", "hf_s3cr3t_t0ken");
    let p = Project::new();
    p.write("p.yaml", &pipeline(&srv, &data, &format!("@{COMMIT}")));
    let r = common::Run::from(
        p.cmd(&["-vv", "run", "p.yaml", "--until", "model"])
            .env("HF_ENDPOINT", &srv.base)
            .env("HF_TOKEN", "hf_s3cr3t_t0ken")
            .output()
            .unwrap(),
    );
    // The plain URL is on the same test host, so it is gated too; the Hub stage got through.
    assert!(r.all().contains("model") && !r.all().contains("hf_s3cr3t_t0ken"));
    let show = p.pipe(&["show", "p.yaml", "model", "--json"]).ok().stdout;
    assert!(show.contains(COMMIT));
    let mut leaked = Vec::new();
    for entry in walk(&p.path("cache")) {
        if std::fs::read(&entry)
            .map(|b| String::from_utf8_lossy(&b).contains("hf_s3cr3t_t0ken"))
            .unwrap_or(false)
        {
            leaked.push(entry);
        }
    }
    assert!(leaked.is_empty(), "the token leaked into {leaked:?}");
    assert!(srv
        .seen()
        .iter()
        .any(|s| s.auth.as_deref() == Some("Bearer hf_s3cr3t_t0ken")));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
