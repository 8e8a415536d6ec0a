//! `pipe schema` is the JSON Schema of pipeline files, made from the kinds' field types: the
//! copy shipped beside the pipelines (which they name for editors) is current, every shipped
//! pipeline is valid under it, and mistakes are not — checked by a real JSON-Schema validator
//! (Python's `jsonschema`, Draft 2020-12, installed by tests/setup.sh).

mod common;
use std::path::{Path, PathBuf};

use common::Project;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Validates each YAML file against the schema: one line per file, `ok` or its errors.
const VALIDATE: &str = r#"
import json, sys, yaml, jsonschema
validator = jsonschema.Draft202012Validator(json.load(open(sys.argv[1])))
for f in sys.argv[2:]:
    errors = sorted(validator.iter_errors(yaml.safe_load(open(f))), key=lambda e: list(e.absolute_path))
    print(f + ": " + ("ok" if not errors else "; ".join(
        "/".join(map(str, e.absolute_path)) + ": " + e.message for e in errors)))
"#;

fn validate(schema: &Path, files: &[PathBuf]) -> Vec<String> {
    let mut args = vec![schema.as_os_str()];
    args.extend(files.iter().map(|f| f.as_os_str()));
    common::tool_python(VALIDATE, &args)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn the_shipped_schema_is_current_and_every_shipped_pipeline_is_valid_under_it() {
    let schema = root().join("pipelines/pipeline.schema.json");
    let printed = Project::new().pipe(&["schema"]).ok().stdout;
    assert_eq!(
        std::fs::read_to_string(&schema).unwrap(),
        printed,
        "pipelines/pipeline.schema.json is stale: `pipe schema > pipelines/pipeline.schema.json`"
    );
    let mut pipelines: Vec<PathBuf> = std::fs::read_dir(root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    pipelines.sort();
    assert!(pipelines.len() >= 3);
    for p in &pipelines {
        let first = std::fs::read_to_string(p).unwrap();
        assert!(
            first.starts_with("# yaml-language-server: $schema=pipeline.schema.json\n"),
            "{} does not name the schema for editors",
            p.display()
        );
    }
    for line in validate(&schema, &pipelines) {
        assert!(line.ends_with(": ok"), "{line}");
    }
}

#[test]
fn mistakes_are_invalid_and_param_references_are_not() {
    let p = Project::new();
    p.write(
        "good.yaml",
        "name: g\nparams: {lr: 0.001}\nstages:\n  t:\n    kind: train\n    data: tokens\n    model: {init: {vocab_size: 10}, seed: 1}\n    lr: ${params.lr}\n    batch_size: 4\n",
    );
    p.write(
        "bad.yaml",
        "name: b\nstages:\n  t:\n    kind: train\n    data: tokens\n    model: {init: {vocab_size: 10}, seed: 1}\n    lr: fast\n    batch_size: 4\n    schedul: cosine\n  e:\n    kind: export\n    model: t\n    dtype: f8\n  x:\n    kind: nope\n",
    );
    let schema = p.path("schema.json");
    std::fs::write(&schema, p.pipe(&["schema"]).ok().stdout).unwrap();
    let lines = validate(&schema, &[p.path("good.yaml"), p.path("bad.yaml")]);
    assert!(lines[0].ends_with(": ok"), "{}", lines[0]);
    for mistake in [
        "stages/t/lr:",
        "'schedul' was unexpected",
        "stages/e/dtype:",
        "stages/x/kind: 'nope' is not one of",
    ] {
        assert!(lines[1].contains(mistake), "{mistake} in {}", lines[1]);
    }
}
