//! Where pipe may write, through the real binary: an export's `to:` never replaces a directory
//! pipe did not deliver, never the store, the workspace, the pipeline's directory, home or
//! their ancestors (refused by `pipe check`, located); names from a pipeline (`file_name:`,
//! `outs`) never leave the stage's outputs; and a failed delivery leaves nothing behind.

mod common;
use std::path::Path;

use common::Project;

/// An export of the small fixture model to `to` (written as given).
fn export_pipeline(to: &str) -> String {
    format!("name: deliver\nstages:\n  export:\n    kind: export\n    model: model\n    dtype: f32\n    to: {to}\n")
}

fn project(to: &str) -> Project {
    let p = Project::new();
    p.write("p.yaml", &export_pipeline(to));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/eval/model");
    std::fs::create_dir_all(p.path("model")).unwrap();
    for e in std::fs::read_dir(fixture).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), p.path("model").join(e.file_name())).unwrap();
    }
    p
}

fn assert_has(out: &str, parts: &[&str]) {
    for part in parts {
        assert!(out.contains(part), "expected {part:?} in:\n{out}");
    }
}

/// Names in `dir` that a delivery's temporary copies would have.
fn debris(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-") || n.contains(".old-"))
        .collect()
}

#[test]
fn export_never_replaces_a_directory_it_did_not_deliver() {
    let p = project("delivered");
    p.write("delivered/notes.txt", "the user's own file\n");
    let r = p.pipe(&["run", "p.yaml"]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert_has(
        &r.all(),
        &[
            "already holds files that pipe did not deliver (notes.txt)",
            "left untouched",
            "help:",
        ],
    );
    assert_eq!(p.read("delivered/notes.txt"), "the user's own file\n");
    assert_eq!(debris(p.dir.path()), Vec::<String>::new());

    // A file where the directory would go is refused the same way.
    p.write("p.yaml", &export_pipeline("afile"));
    p.write("afile", "keep\n");
    let r = p.pipe(&["run", "p.yaml"]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert_has(&r.all(), &["exists and is not a directory"]);
    assert_eq!(p.read("afile"), "keep\n");

    // An empty directory is taken; the delivery is marked, and the next one replaces it.
    p.write("p.yaml", &export_pipeline("delivered"));
    std::fs::remove_file(p.path("delivered/notes.txt")).unwrap();
    p.pipe(&["run", "p.yaml"]).ok();
    assert!(p.path("delivered/config.json").is_file());
    let marker: serde_json::Value =
        serde_json::from_str(&p.read("delivered/.pipe-delivery.json")).unwrap();
    assert_eq!(marker["stage"], "export");
    assert_eq!(marker["key"].as_str().map(str::len), Some(64), "{marker}");
    std::fs::write(p.path("delivered/config.json"), "stale").unwrap();
    let r = p.pipe(&["run", "p.yaml"]).ok();
    assert!(r.stdout.contains(" cached "), "{}", r.stdout);
    assert_ne!(p.read("delivered/config.json"), "stale");
    assert_eq!(debris(p.dir.path()), Vec::<String>::new());

    // A killed delivery's temporary copy (it holds the marker) is cleared by the next one;
    // a look-alike without the marker is not pipe's, and stays.
    p.write(".delivered.partial-999/.pipe-delivery.json", "{}");
    p.write(".delivered.old-998/notes.txt", "not pipe's\n");
    p.pipe(&["run", "p.yaml"]).ok();
    assert!(!p.path(".delivered.partial-999").exists());
    assert_eq!(p.read(".delivered.old-998/notes.txt"), "not pipe's\n");
}

#[test]
fn a_failed_delivery_leaves_no_debris() {
    // The parent of `to` cannot be made: a file is in the way.
    let p = project("blocked/deeper/out");
    p.write("blocked", "a file\n");
    let r = p.pipe(&["run", "p.yaml"]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert_has(&r.all(), &["blocked/deeper/out"]);
    assert_eq!(p.read("blocked"), "a file\n");
    assert_eq!(debris(p.dir.path()), Vec::<String>::new());

    // Parents that do not exist yet are made.
    let p = project("new/parents/out");
    p.pipe(&["run", "p.yaml"]).ok();
    assert!(p.path("new/parents/out/config.json").is_file());
    assert_eq!(debris(&p.path("new/parents")), Vec::<String>::new());
}

#[test]
fn check_refuses_targets_that_hold_the_store_the_workspace_or_home() {
    for (to, what) in [
        (".", "is the pipeline file's directory"),
        ("cache", "is the store"),
        ("./cache/", "is the store"),
        ("cache/stages", "is inside the store"),
        ("..", "holds the store"),
        ("/", "holds the store"),
        ("model/..", "is the pipeline file's directory"),
    ] {
        let p = project(to);
        // A home of its own, so that the machine's HOME cannot be what a case meets first.
        std::fs::create_dir_all(p.path("home")).unwrap();
        let out = p
            .cmd(&["check", "p.yaml"])
            .env("HOME", p.path("home"))
            .output()
            .unwrap();
        let r = common::Run::from(out);
        assert_eq!(r.code, 1, "to: {to}\n{}", r.all());
        assert_has(
            &r.stderr,
            &[
                &format!("`to: {to}`"),
                what,
                "p.yaml:7:9",
                "field: stages.export.to",
                "pipe replaces only a directory it delivered itself",
            ],
        );
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    }

    // From the command line, and for a store named with --cache.
    let p = project("out");
    let r = p.pipe(&["check", "p.yaml", "--set", "export.to=cache"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_has(
        &r.stderr,
        &[
            "`to: cache` is the store",
            "field: stages.export.to",
            "--set export.to=cache",
        ],
    );
    let r = p.pipe(&["check", "p.yaml", "--cache", "out"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_has(&r.stderr, &["`to: out` is the store"]);
    let r = p.pipe(&[
        "run",
        "p.yaml",
        "--cache",
        "elsewhere/store",
        "--set",
        "export.to=elsewhere",
    ]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_has(&r.stderr, &["`to: elsewhere`", "holds the store"]);

    // The home directory, wherever it is.
    std::fs::create_dir_all(p.path("home")).unwrap();
    let home = p.path("home").display().to_string();
    let out = p
        .cmd(&["check", "p.yaml", "--set", &format!("export.to={home}")])
        .env("HOME", &home)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_has(&stderr, &["is the home directory"]);

    // Nothing was created or replaced by any of these.
    assert!(!p.path("cache").exists() && !p.path("elsewhere").exists());
    assert!(p.path("model/config.json").is_file());
}

#[test]
fn names_from_the_pipeline_stay_inside_the_stage_outputs() {
    let p = Project::new();
    p.write("data.txt", "x\n");
    let absolute = p.path("escaped-absolute.txt").display().to_string();
    for (stage, field, located) in [
        (
            "    kind: download\n    source: data.txt\n    file_name: ../../escaped.txt\n"
                .to_string(),
            "stages.a.file_name",
            "p.yaml:6:16",
        ),
        (
            format!("    kind: download\n    source: data.txt\n    file_name: {absolute}\n"),
            "stages.a.file_name",
            "p.yaml:6:16",
        ),
        (
            "    kind: command\n    cmd: echo\n    outs: [ok.txt, ../escaped.txt]\n".to_string(),
            "stages.a.outs[1]",
            "p.yaml:6:20",
        ),
    ] {
        p.write("p.yaml", &format!("name: t\nstages:\n  a:\n{stage}"));
        let r = p.pipe(&["check", "p.yaml"]);
        assert_eq!(r.code, 1, "{stage}\n{}", r.all());
        assert_has(&r.stderr, &[located, &format!("field: {field}"), "escaped"]);
        let r = p.pipe(&["run", "p.yaml"]);
        assert_ne!(r.code, 0, "{}", r.all());
        assert!(!Path::new(&absolute).exists());
        assert!(
            !p.path("cache/escaped.txt").exists() && !p.path("cache/stages/escaped.txt").exists()
        );
    }
}
