//! Every pipeline-file mistake is reported with file:line:column, the field, and a hint.

mod common;
use common::Project;

fn check(yaml: &str, extra: &[&str]) -> String {
    let p = Project::new();
    p.write("p.yaml", yaml).write("data.txt", "x\n");
    let mut args = vec!["check", "p.yaml"];
    args.extend_from_slice(extra);
    let r = p.pipe(&args);
    assert_eq!(r.code, 1, "expected a failure, got:\n{}", r.all());
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    r.stderr
}

fn assert_has(out: &str, parts: &[&str]) {
    for part in parts {
        assert!(out.contains(part), "expected {part:?} in:\n{out}");
    }
}

#[test]
fn unknown_field_names_its_location_and_the_expected_fields() {
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    dpes: [x]\n",
        &[],
    );
    assert_has(
        &e,
        &[
            "unknown field `dpes`",
            "p.yaml:6:5",
            "field: stages.a.dpes",
            "expected one of",
            "`deps`",
        ],
    );
}

#[test]
fn unknown_kind_lists_the_known_ones() {
    let e = check("name: t\nstages:\n  a:\n    kind: comand\n", &[]);
    let known = format!(
        "known kinds: {}",
        pipe_stages::registry().names().join(", ")
    );
    assert!(
        known.contains("command") && known.contains("train"),
        "{known}"
    );
    assert_has(
        &e,
        &[
            "unknown stage kind `comand`",
            "p.yaml:4:11",
            "field: stages.a.kind",
            &known,
        ],
    );
}

#[test]
fn missing_field_points_at_the_stage() {
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    deps: [data.txt]\n",
        &[],
    );
    assert_has(
        &e,
        &["missing field `cmd`", "p.yaml:3:3", "field: stages.a"],
    );
}

#[test]
fn missing_kind() {
    let e = check("name: t\nstages:\n  a:\n    cmd: echo\n", &[]);
    assert_has(
        &e,
        &["missing field `kind`", "p.yaml:3:3", "field: stages.a.kind"],
    );
}

#[test]
fn type_error_points_at_the_value() {
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    resumable: maybe\n",
        &[],
    );
    assert_has(
        &e,
        &["invalid type", "p.yaml:6:16", "field: stages.a.resumable"],
    );
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    deps: [data.txt, [1]]\n",
        &[],
    );
    assert_has(&e, &["p.yaml:6:22", "field: stages.a.deps[1]"]);
}

#[test]
fn unknown_top_level_field() {
    let e = check("name: t\nstage:\n  a: {}\n", &[]);
    assert_has(&e, &["unknown field `stage`", "p.yaml:2:1"]);
}

#[test]
fn duplicate_stage_ids() {
    let e = check("name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n  a:\n    kind: command\n    cmd: echo\n", &[]);
    assert_has(&e, &["duplicate entry", "p.yaml:6:3"]);
}

#[test]
fn reference_to_an_unknown_stage_or_output() {
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    deps: [prep.data]\n",
        &[],
    );
    assert_has(
        &e,
        &[
            "input `prep.data` does not exist",
            "p.yaml:6:12",
            "field: stages.a.deps[0]",
            "needs one of these stages: a",
        ],
    );
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    outs: [x]\n  b:\n    kind: command\n    cmd: echo\n    deps: [a.y]\n",
        &[],
    );
    assert_has(
        &e,
        &[
            "stage `a` has no output `y`",
            "p.yaml:10:12",
            "`a` produces: x",
        ],
    );
}

#[test]
fn cycles_are_printed() {
    let yaml = "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    deps: [c]\n  b:\n    kind: command\n    cmd: echo\n    deps: [a]\n  c:\n    kind: command\n    cmd: echo\n    deps: [b]\n";
    let e = check(yaml, &[]);
    assert_has(
        &e,
        &[
            "dependency cycle: a → c → b → a",
            "p.yaml:6:12",
            "field: stages.a.deps[0]",
        ],
    );
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo\n    deps: [a]\n",
        &[],
    );
    assert_has(&e, &["cannot read its own outputs", "p.yaml:6:12"]);
}

#[test]
fn unknown_param_and_placeholders() {
    let e = check(
        "name: t\nparams:\n  n: 1\nstages:\n  a:\n    kind: command\n    cmd: echo ${params.m}\n",
        &[],
    );
    assert_has(
        &e,
        &["unknown param `m`", "p.yaml:7:10", "declared params: n"],
    );
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: cat ${data.txt}\n",
        &[],
    );
    assert_has(
        &e,
        &[
            "`${data.txt}` in `cmd` is neither",
            "p.yaml:5:10",
            "add `data.txt` to `deps`",
        ],
    );
}

#[test]
fn bad_overrides_are_named() {
    let yaml = "name: t\nparams:\n  n: 1\nstages:\n  a:\n    kind: command\n    cmd: echo\n";
    let e = check(yaml, &["--set", "b.cmd=x"]);
    assert_has(&e, &["bad `--set b.cmd=x`", "no stage `b`", "stages: a"]);
    let e = check(yaml, &["--set", "params.m=2"]);
    assert_has(&e, &["no param `m`", "params: n"]);
    let e = check(yaml, &["--set", "a.resumable=[1]"]);
    assert_has(
        &e,
        &[
            "invalid type",
            "field: stages.a.resumable",
            "comes from `--set a.resumable=[1]`",
        ],
    );
    let e = check(yaml, &["--set", "nonsense"]);
    assert_has(&e, &["expected `stage.field=value`"]);
}

#[test]
fn yaml_syntax_errors_are_located() {
    let e = check(
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo '{\"n\": 1}' x: y\n",
        &[],
    );
    assert_has(&e, &["p.yaml:5:"]);
}

#[test]
fn a_valid_pipeline_checks_and_overrides_apply() {
    let p = Project::new();
    p.write("data.txt", "x").write(
        "p.yaml",
        "name: t\nparams:\n  word: hi\nstages:\n  a:\n    kind: command\n    cmd: echo ${params.word} > ${out}/o\n    deps: [data.txt]\n    outs: [o]\n",
    );
    let r = p.pipe(&["check", "p.yaml"]).ok();
    assert!(
        r.stdout.contains("ok — pipeline `t`, 1 stage: a (command)"),
        "{}",
        r.stdout
    );
    p.pipe(&["run", "p.yaml", "--set", "params.word=bye"]).ok();
    let r = p
        .pipe(&["show", "p.yaml", "a", "--set", "params.word=bye"])
        .ok();
    assert!(r.stdout.contains("echo bye"), "{}", r.stdout);
}

#[test]
fn train_devices_are_checked() {
    let pipeline = |devices: &str, lora: &str| {
        format!(
            "name: t\nstages:\n  tokens:\n    kind: command\n    cmd: echo\n  train:\n    kind: train\n    data: tokens\n    model: {{init: {{vocab_size: 10, hidden_size: 8, intermediate_size: 16, num_hidden_layers: 1, num_attention_heads: 2}}, seed: 0}}\n    lr: 1.0e-3\n    batch_size: 8\n    micro_batch_size: 2\n{lora}    {devices}\n"
        )
    };
    let mixed = check(&pipeline("devices: [cpu, cuda:0]", ""), &[]);
    let twice = check(&pipeline("devices: [cuda:1, cuda:1]", ""), &[]);
    if cfg!(feature = "cuda") {
        assert_has(
            &mixed,
            &["field: stages.train.devices", "mixes the CPU and GPUs"],
        );
        assert_has(&twice, &["GPU 1 is listed twice"]);
    } else {
        // A build without the cuda feature refuses any GPU at check time.
        for e in [mixed, twice] {
            assert_has(
                &e,
                &[
                    "field: stages.train.devices",
                    "`cargo build --release --features cuda`",
                ],
            );
        }
    }
    let e = check(&pipeline("devices: [cpu, cpu, cpu]", ""), &[]);
    assert_has(
        &e,
        &[
            "3 replicas share each step's micro-batches, but there are 4",
            "e.g. batch_size: 12",
        ],
    );
    let e = check(
        &pipeline("devices: [cpu, cpu, cpu, cpu, cpu, cpu, cpu, cpu]", ""),
        &[],
    );
    assert_has(&e, &["e.g. micro_batch_size: 1 (8 micro-batches per step)"]);
    let e = check(&pipeline("devices: []", ""), &[]);
    assert_has(&e, &["`devices` is empty"]);
    let e = check(&pipeline("devices: [gpu]", ""), &[]);
    assert_has(&e, &["unknown device `gpu`", "field: stages.train.devices"]);
    let both = pipeline("devices: [cpu, cpu]\n    device: cpu", "");
    assert_has(&check(&both, &[]), &["`device` and `devices` are both set"]);
    let dropout = pipeline(
        "devices: [cpu, cpu]",
        "    method: lora\n    lora: {dropout: 0.1}\n",
    );
    assert_has(
        &check(&dropout, &[]),
        &["LoRA dropout with several replicas", "dropout: 0"],
    );
    // And the valid form checks.
    let p = Project::new();
    p.write("p.yaml", &pipeline("devices: [cpu, cpu]", ""));
    let r = p.pipe(&["check", "p.yaml"]);
    assert_eq!(r.code, 0, "{}", r.all());
}
