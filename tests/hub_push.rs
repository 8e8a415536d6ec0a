//! `export` with `push: hf://ORG/REPO[@BRANCH]` against a loopback emulation of the Hugging
//! Face Hub's write API (pipe-testkit's `hub`: repository and branch creation, preupload, the
//! LFS batch API with its storage on another origin, NDJSON commits): one commit with every
//! file, no commit when the bytes are there already, the token only to the Hub's origin, an
//! interrupted push resumed without sending its objects again, and what was pushed downloads
//! back byte for byte through pipe's own Hub download.

mod common;

use common::Project;
use pipe_testkit::hub::HubEmulator;

const TOKEN: &str = "hf_pushsecret_4d7a1c";

fn pipeline(push: &str) -> String {
    let stages = format!(
        "{}  export:\n    kind: export\n    model: train\n    push: {push}\n",
        common::tiny_train_stage(2, &[])
    );
    common::example_pipeline("push", 64, &stages)
}

fn run(p: &Project, hub: &HubEmulator, token: Option<&str>) -> common::Run {
    let mut c = p.cmd(&["run", "p.yaml"]);
    c.env("HF_ENDPOINT", &hub.endpoint);
    match token {
        Some(t) => c.env("HF_TOKEN", t),
        None => c.env_remove("HF_TOKEN"),
    };
    common::Run::from(c.output().expect("run pipe"))
}

#[test]
fn one_commit_with_every_file_then_none_while_the_bytes_are_there() {
    let hub = HubEmulator::start(TOKEN);
    let p = Project::with_examples(&pipeline("hf://org/tuned"));
    let r = run(&p, &hub, Some(TOKEN));
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.all()
            .contains("pushed to hf://org/tuned@main (created the repository): commit"),
        "{}",
        r.all()
    );
    let commits = hub.commits("org/tuned", "main");
    assert_eq!(commits.len(), 2, "the initial commit and pipe's");
    let head = &commits[1];
    assert!(head.summary.starts_with("pipe: export stage `export`"));
    let files = common::files_under(&p.stage_out("export"));
    assert!(files.contains_key("model.safetensors") && files.contains_key("config.json"));
    for (path, bytes) in &files {
        assert!(
            head.files.get(path) == Some(bytes),
            "{path} differs on the Hub"
        );
    }
    assert!(head.lfs.contains("model.safetensors"));
    assert!(!head.lfs.contains("config.json"));

    // The token went to the Hub's origin, never to the LFS storage, and is nowhere else.
    let requests = hub.requests();
    assert!(requests
        .iter()
        .any(|q| q.origin == "storage" && q.method == "PUT"));
    for q in &requests {
        match q.origin {
            "storage" => assert_eq!(q.auth, None, "{q:?}"),
            _ if q.method != "GET" => {
                assert_eq!(q.auth.as_deref(), Some(&*format!("Bearer {TOKEN}")))
            }
            _ => {}
        }
    }
    assert!(!r.all().contains(TOKEN));
    assert_eq!(common::file_holding(&p.path("cache"), TOKEN), None);

    // A cache hit delivers again: the Hub has every byte, so there is no commit.
    let again = run(&p, &hub, Some(TOKEN));
    assert_eq!(again.code, 0, "{}", again.all());
    assert!(
        again.all().contains("has these files already; no commit"),
        "{}",
        again.all()
    );
    assert_eq!(hub.commits("org/tuned", "main").len(), 2);

    // What was pushed downloads back through pipe's Hub download, byte for byte.
    let q = Project::new();
    q.write(
        "p.yaml",
        "name: back\nstages:\n  model:\n    kind: download\n    source: hf://org/tuned\n",
    );
    let mut c = q.cmd(&["run", "p.yaml"]);
    c.env("HF_ENDPOINT", &hub.endpoint).env_remove("HF_TOKEN");
    common::Run::from(c.output().unwrap()).ok();
    let back = q.stage_out("model");
    for name in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(
            std::fs::read(back.join(name)).unwrap() == files[name],
            "{name} came back different"
        );
    }
}

#[test]
fn a_push_cut_short_resumes_without_resending_its_objects() {
    let hub = HubEmulator::start(TOKEN);
    // Parts of 64 KiB: the model goes through the multipart transfer.
    hub.multipart_from(64 << 10);
    hub.fail_next("/api/models/org/tuned/commit/", 1);
    let p = Project::with_examples(&pipeline("hf://org/tuned@exp/v1"));

    let r = run(&p, &hub, None);
    assert_eq!(r.code, 1);
    assert!(r.all().contains("needs HF_TOKEN"), "{}", r.all());

    let r = run(&p, &hub, Some(TOKEN));
    assert_eq!(r.code, 1, "the commit fails: {}", r.all());
    assert!(
        r.all().contains("cannot push to hf://org/tuned@exp/v1"),
        "{}",
        r.all()
    );
    assert!(r.all().contains("HTTP 500"), "{}", r.all());
    let parts = |hub: &HubEmulator| {
        hub.requests()
            .iter()
            .filter(|q| q.origin == "storage" && q.path.starts_with("/part/"))
            .count()
    };
    let sent = parts(&hub);
    assert!(sent >= 2, "the model went up in parts ({sent})");
    assert!(
        hub.commits("org/tuned", "exp/v1").len() == 1,
        "no commit yet"
    );

    let r = run(&p, &hub, Some(TOKEN));
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("0 LFS objects sent"), "{}", r.all());
    assert_eq!(parts(&hub), sent, "no object is sent twice");
    let branch = hub.commits("org/tuned", "exp/v1");
    assert_eq!(branch.len(), 2);
    assert!(
        branch[1].files["model.safetensors"]
            == common::files_under(&p.stage_out("export"))["model.safetensors"]
    );
    assert_eq!(
        hub.commits("org/tuned", "main").len(),
        1,
        "main is untouched"
    );
}

#[test]
fn push_targets_are_checked_where_they_are_written() {
    let p = Project::with_examples(&pipeline("hf://org"));
    let r = p.pipe(&["check", "p.yaml"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("a Hub repository is ORG/REPO"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("field: stages.export.push"),
        "{}",
        r.stderr
    );
}
