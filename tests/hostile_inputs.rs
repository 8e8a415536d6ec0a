//! Hostile input, through the binary: malformed pipelines, input files and command lines. Each
//! case must fail (exit status ≠ 0) with a message that names the file or the field, without a
//! panic or "a bug in pipe", and leave a store that `pipe cache verify` accepts.
//!
//! One case is a pipeline (the `BASE` one when `pipeline` is `None`), the files beside it, the
//! arguments, and fragments the message must hold. Every case runs in a directory of its own
//! holding copies of the example instructions (`instructions.json`, 10 records) and tokenizer
//! (`tokenizer/`); nothing trains: failures are found at check time or early in a run.

mod common;
use common::Project;

/// format → tokenize → train, valid as it stands; most cases break one field of it.
const BASE: &str = "\
name: hostile
stages:
  prompts:
    kind: format
    input: instructions.json
    val_size: 2
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: tokenizer
    max_len: 64
  train:
    kind: train
    data: tokens
    model:
      init: {vocab_size: 2001, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 128}
    lr: 1.0e-3
    batch_size: 4
    micro_batch_size: 2
";

/// A pipeline whose only stage formats `records.json` (a file the case provides).
const FORMAT_ONLY: &str = "\
name: hostile
stages:
  prompts:
    kind: format
    input: records.json
";

/// An evaluate stage scoring a seeded model on the task file `task.jsonl`.
const EVAL_TASK: &str = "\
name: hostile
stages:
  eval:
    kind: evaluate
    model:
      init: {vocab_size: 2001, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
             num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}
    tokenizer: tokenizer
    tasks:
      - {name: t, format: generic, path: task.jsonl}
";

struct Case {
    name: &'static str,
    /// The text of p.yaml; `None` is [`BASE`].
    pipeline: Option<&'static str>,
    /// More files beside it: (relative path, bytes).
    files: Vec<(&'static str, &'static [u8])>,
    args: Vec<&'static str>,
    /// What the message must say (all of it).
    expect: &'static [&'static str],
    /// What it must not say.
    absent: &'static [&'static str],
}

fn check(name: &'static str, pipeline: &'static str, expect: &'static [&'static str]) -> Case {
    Case {
        name,
        pipeline: Some(pipeline),
        files: vec![],
        args: vec!["check", "p.yaml"],
        expect,
        absent: &[],
    }
}

/// `pipe check p.yaml --set SET` on the base pipeline.
fn set(name: &'static str, set: &'static str, expect: &'static [&'static str]) -> Case {
    Case {
        name,
        pipeline: None,
        files: vec![],
        args: vec!["check", "p.yaml", "--set", set],
        expect,
        absent: &[],
    }
}

/// `pipe run p.yaml` on the format-only pipeline, with `records.json` holding `records`.
fn records(name: &'static str, records: &'static [u8], expect: &'static [&'static str]) -> Case {
    Case {
        name,
        pipeline: Some(FORMAT_ONLY),
        files: vec![("records.json", records)],
        args: vec!["run", "p.yaml"],
        expect,
        absent: &[],
    }
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
    // The pipeline document itself.
    check("an empty file", "", &["p.yaml"]),
    check("a list instead of a mapping", "- a\n- b\n", &["p.yaml:1:1"]),
    check(
        "no name",
        "stages:\n  a: {kind: command, cmd: echo}\n",
        &["missing field `name`", "p.yaml"],
    ),
    check(
        "an empty name",
        "name: ' '\nstages:\n  a: {kind: command, cmd: echo}\n",
        &["the pipeline `name` is empty", "p.yaml:1:7", "field: name"],
    ),
    check(
        "no stages",
        "name: t\nstages: {}\n",
        &["the pipeline has no stages", "p.yaml:2:1", "field: stages"],
    ),
    check(
        "a stage that is not a mapping",
        "name: t\nstages:\n  a: 3\n",
        &["stage `a` must be a mapping", "p.yaml:3:6", "field: stages.a"],
    ),
    check(
        "a stage without a kind",
        "name: t\nstages:\n  a: {cmd: echo}\n",
        &["missing field `kind`", "p.yaml:3:3", "known kinds"],
    ),
    check(
        "an unknown kind",
        "name: t\nstages:\n  a: {kind: trian}\n",
        &["unknown stage kind `trian`", "field: stages.a.kind"],
    ),
    check(
        "an invalid stage id",
        "name: t\nstages:\n  a b: {kind: command, cmd: echo}\n",
        &["invalid stage id `a b`", "p.yaml:3:3"],
    ),
    check(
        "a duplicate stage",
        "name: t\nstages:\n  a: {kind: command, cmd: echo}\n  a: {kind: command, cmd: echo}\n",
        &["p.yaml:4:3", "defined twice"],
    ),
    check(
        "a second YAML document",
        "name: t\nstages:\n  a: {kind: command, cmd: echo}\n---\nname: u\n",
        &["p.yaml:4:1", "one YAML document"],
    ),
    check(
        "an unquoted colon",
        "name: t\nstages:\n  a:\n    kind: command\n    cmd: echo a: b\n",
        &["p.yaml:5", "must be quoted"],
    ),
    check(
        "an integer too large for 64 bits",
        "name: t\nstages:\n  a: {kind: command, cmd: echo, env: {N: 99999999999999999999999}}\n",
        &["the number 99999999999999999999999 is too large", "p.yaml:3"],
    ),
    check(
        "an unknown param",
        "name: t\nstages:\n  a: {kind: command, cmd: 'echo ${params.n}'}\n",
        &["unknown param `n`", "field: stages.a.cmd"],
    ),
    check(
        "a dependency cycle",
        "name: t\nstages:\n  a: {kind: command, cmd: echo, deps: [b]}\n  b: {kind: command, cmd: echo, deps: [a]}\n",
        &["dependency cycle", "p.yaml:3"],
    ),
    check(
        "a missing input file",
        "name: t\nstages:\n  a: {kind: format, input: nowhere.json}\n",
        &["input `input` does not exist", "field: stages.a.input"],
    ),
    check(
        "an unknown field",
        "name: t\nstages:\n  a: {kind: format, input: instructions.json, val_siz: 3}\n",
        &["unknown field `val_siz`", "field: stages.a.val_siz"],
    ),
    // Fields of the format, tokenize and train stages.
    set(
        "val_size above 1",
        "prompts.val_size=1.5",
        &["val_size 1.5 is neither a fraction from 0 to 1 nor a whole count", "field: stages.prompts.val_size"],
    ),
    set(
        "val_size written as a float count",
        "prompts.val_size=3.0",
        &["val_size 3.0", "write 3", "field: stages.prompts.val_size"],
    ),
    set(
        "a negative val_size",
        "prompts.val_size=-3",
        &["val_size -3 is negative", "field: stages.prompts.val_size"],
    ),
    set(
        "val_size as text",
        "prompts.val_size=many",
        &["a fraction of the records from 0 to 1", "field: stages.prompts.val_size"],
    ),
    set(
        "an unknown template",
        "prompts.template=vicuna",
        &["unknown template `vicuna`", "field: stages.prompts.template"],
    ),
    set(
        "max_len 1",
        "tokens.max_len=1",
        &["max_len must be at least 2", "field: stages.tokens.max_len"],
    ),
    set(
        "max_len beyond the model's context",
        "tokens.max_len=256",
        &["max_len 256 is longer than the model of stage `train` reads: 128 positions", "lower max_len to 128", "field: stages.tokens.max_len"],
    ),
    set(
        "an absurd max_len",
        "tokens.max_len=100000000000",
        &["max_len 100000000000", "field: stages.tokens.max_len"],
    ),
    set(
        "batch_size 0",
        "train.batch_size=0",
        &["batch_size must be at least 1", "field: stages.train.batch_size"],
    ),
    set(
        "micro_batch_size 0",
        "train.micro_batch_size=0",
        &["micro_batch_size must be at least 1", "field: stages.train.micro_batch_size"],
    ),
    set(
        "a batch that micro-batches do not divide",
        "train.batch_size=5",
        &["batch_size 5 is not a multiple of micro_batch_size 2", "field: stages.train.batch_size"],
    ),
    set(
        "a negative learning rate",
        "train.lr=-1",
        &["the learning rate must be a positive number", "field: stages.train.lr"],
    ),
    set(
        "a learning rate of zero",
        "train.lr=0",
        &["the learning rate must be a positive number", "field: stages.train.lr"],
    ),
    set(
        "an unknown device",
        "train.device=tpu",
        &["unknown device `tpu`", "field: stages.train.device"],
    ),
    set(
        "no devices",
        "train.devices=[]",
        &["`devices` is empty", "field: stages.train.devices"],
    ),
    set(
        "a LoRA section without method lora",
        "train.lora={r: 4}",
        &["`lora:` settings need `method: lora`", "field: stages.train.lora"],
    ),
    set(
        "a model with heads that do not group",
        "train.model={init: {vocab_size: 10, hidden_size: 16, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 3, num_key_value_heads: 2}}",
        &["3 attention heads cannot be grouped over 2", "field: stages.train.model.init"],
    ),
    set(
        "a seeded model too large to hold",
        "train.model={init: {vocab_size: 100000000, hidden_size: 100000, intermediate_size: 8, num_hidden_layers: 1, num_attention_heads: 1}}",
        &["parameters", "field: stages.train.model.init"],
    ),
    set(
        "training on a format stage",
        "train.data=prompts",
        &["`data` must be a tokenize stage; `prompts` is a `format` stage", "field: stages.train.data"],
    ),
    set(
        "training on an evaluation-only split",
        "prompts.val_size=1.0",
        &["`tokens` holds no training examples", "val_size: 1.0", "field: stages.train.data"],
    ),
    set(
        "a reference to an unknown stage",
        "tokens.input=promts",
        &["unknown stage `promts`", "field: stages.tokens.input"],
    ),
    // Paths a stage would write (the delivery and path checks).
    check(
        "a download file_name that leaves its directory",
        "name: t\nstages:\n  data:\n    kind: download\n    source: instructions.json\n    file_name: ../../x.json\n",
        &["has a `..` component", "p.yaml:6:16", "field: stages.data.file_name"],
    ),
    check(
        "a download file_name that is absolute",
        "name: t\nstages:\n  data:\n    kind: download\n    source: instructions.json\n    file_name: /tmp/x.json\n",
        &["field: stages.data.file_name"],
    ),
    check(
        "a command output that leaves its directory",
        "name: t\nstages:\n  c:\n    kind: command\n    cmd: 'true'\n    outs: [../escape.txt]\n",
        &["has a `..` component", "field: stages.c.outs[0]"],
    ),
    check(
        "an export to /",
        "name: t\nstages:\n  exp:\n    kind: export\n    model: ./tokenizer\n    format: hf\n    to: /\n",
        &["`to: /` holds the store", "p.yaml:7:9", "field: stages.exp.to"],
    ),
    check(
        "an export onto the store",
        "name: t\nstages:\n  exp:\n    kind: export\n    model: ./tokenizer\n    format: hf\n    to: cache\n",
        &["`to: cache` is the store", "field: stages.exp.to"],
    ),
    check(
        "an export onto the pipeline's own directory",
        "name: t\nstages:\n  exp:\n    kind: export\n    model: ./tokenizer\n    format: hf\n    to: .\n",
        &["`to: .`", "field: stages.exp.to"],
    ),
    // The command line.
    set(
        "--set on an unknown stage",
        "trian.lr=1",
        &["bad `--set trian.lr=1`", "no stage `trian`"],
    ),
    set(
        "--set on an unknown param",
        "params.lr=1",
        &["bad `--set params.lr=1`", "no param `lr`"],
    ),
    set(
        "--set without a value",
        "train.lr",
        &["bad `--set train.lr`", "stage.field=value"],
    ),
    set(
        "--set with an integer too large for 64 bits",
        "train.batch_size=99999999999999999999999",
        &["the number 99999999999999999999999 is too large", "--set train.batch_size"],
    ),
    set(
        "a negative batch size",
        "train.batch_size=-4",
        &["expected a whole number, 0 or more", "field: stages.train.batch_size"],
    ),
    Case {
        name: "max_len beyond the context of a local model read through a download stage",
        pipeline: Some(
            "name: hostile\nstages:\n  base:\n    kind: download\n    source: ./model\n  prompts:\n    kind: format\n    input: instructions.json\n  tokens:\n    kind: tokenize\n    input: prompts\n    tokenizer: tokenizer\n    max_len: 64\n  train:\n    kind: train\n    data: tokens\n    model: base\n    lr: 1.0e-3\n    batch_size: 2\n",
        ),
        files: vec![(
            "model/config.json",
            b"{\"vocab_size\": 2001, \"hidden_size\": 16, \"intermediate_size\": 32, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"max_position_embeddings\": 32}",
        )],
        args: vec!["check", "p.yaml"],
        expect: &["max_len 64 is longer than the model of stage `train` reads: 32 positions", "p.yaml:13:14", "lower max_len to 32"],
        absent: &[],
    },
    Case {
        name: "a broken tokenizer read through a download stage",
        pipeline: Some(
            "name: hostile\nstages:\n  tok:\n    kind: download\n    source: ./tok\n  prompts:\n    kind: format\n    input: instructions.json\n  tokens:\n    kind: tokenize\n    input: prompts\n    tokenizer: tok\n",
        ),
        files: vec![("tok/tokenizer.json", b"{\"version\": ")],
        args: vec!["run", "p.yaml"],
        // The user's file, not the store's copy of it.
        expect: &["cannot load ", "/tok/tokenizer.json"],
        absent: &["/out/tokenizer.json"],
    },
    Case {
        name: "a pipeline file that does not exist",
        pipeline: None,
        files: vec![],
        args: vec!["check", "nowhere.yaml"],
        expect: &["cannot read pipeline file `nowhere.yaml`"],
        absent: &[],
    },
    Case {
        name: "a pipeline file that is not UTF-8",
        pipeline: Some(""),
        files: vec![("bad.yaml", b"name: t\nstages:\n  a: {kind: command, cmd: 'echo \xff'}\n")],
        args: vec!["check", "bad.yaml"],
        expect: &["not valid UTF-8 (byte 48 of the file)", "bad.yaml:3:33"],
        absent: &[],
    },
    Case {
        name: "show of an unknown stage",
        pipeline: None,
        files: vec![],
        args: vec!["show", "p.yaml", "trian"],
        expect: &["no stage `trian`"],
        absent: &[],
    },
    Case {
        name: "gc --keep-last 0",
        pipeline: None,
        files: vec![],
        args: vec!["gc", "--keep-last", "0"],
        expect: &["--keep-last must be at least 1"],
        absent: &[],
    },
    // Input files, found when the stage reads them.
    records(
        "records that are not JSON",
        b"[{\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": }]\n",
        &["records.json:2:18: not valid JSON"],
    ),
    records(
        "records that are not UTF-8",
        b"[{\"instruction\": \"a\xff\", \"output\": \"b\"}]\n",
        &["records.json:1:20: not valid UTF-8 (byte 19 of the file)"],
    ),
    records(
        "a record that is not an object",
        b"[{\"instruction\": \"a\", \"output\": \"b\"}, 7]\n",
        &["records.json: record 1: expected a JSON object, found a number"],
    ),
    records(
        "a record without its instruction",
        b"[{\"instruction\": \"a\", \"output\": \"b\"}, {\"output\": \"c\"}]\n",
        &["records.json", "record 1: field `instruction` is missing"],
    ),
    records("no records at all", b"[]\n", &["records.json holds no records"]),
    Case {
        name: "a task file that is not UTF-8",
        pipeline: Some(EVAL_TASK),
        files: vec![(
            "task.jsonl",
            b"{\"context\": \"a \xff b\", \"choices\": [\"c\", \"d\"], \"answer\": 0}\n",
        )],
        args: vec!["run", "p.yaml"],
        expect: &["task `t`", "task.jsonl:1:16: not valid UTF-8 (byte 15 of the file)"],
        absent: &[],
    },
    Case {
        name: "more few-shot examples than a task has",
        pipeline: Some(EVAL_TASK),
        files: vec![(
            "task.jsonl",
            b"{\"context\": \"a\", \"choices\": [\"c\", \"d\"], \"answer\": 0}\n",
        )],
        args: vec!["run", "p.yaml", "--set", "eval.tasks=[{name: t, format: generic, path: task.jsonl, num_fewshot: 100000000000}]"],
        expect: &["task `t`", "num_fewshot 100000000000"],
        absent: &[],
    },
    Case {
        name: "bad records read through a download stage",
        pipeline: Some(
            "name: hostile\nstages:\n  data:\n    kind: download\n    source: records.json\n  prompts:\n    kind: format\n    input: data\n",
        ),
        files: vec![("records.json", b"[{\"instruction\": \"a\", \"output\": \"b\"},\n {\"instruction\": }]\n")],
        args: vec!["run", "p.yaml"],
        // The user's file, not the store's copy of it.
        expect: &["records.json:2:18: not valid JSON"],
        absent: &["/out/records.json"],
    },
    Case {
        name: "more held out than there are records",
        pipeline: Some(
            "name: hostile\nstages:\n  prompts:\n    kind: format\n    input: instructions.json\n    val_size: 11\n",
        ),
        files: vec![],
        args: vec!["run", "p.yaml"],
        expect: &["instructions.json: val_size 11 is more than the 10 records there are"],
        absent: &[],
    },
    ];
    if !cfg!(feature = "cuda") {
        cases.extend([
            set(
                "a GPU in a build without cuda",
                "train.device=cuda",
                &["--features cuda", "field: stages.train.device"],
            ),
            set(
                "GPU replicas in a build without cuda",
                "train.devices=[cuda:0, cuda:1]",
                &["--features cuda", "field: stages.train.devices"],
            ),
        ]);
    }
    cases
}

/// Runs one case; returns what went wrong, if anything.
fn run_case(case: &Case) -> Result<(), String> {
    let p = Project::with_examples(case.pipeline.unwrap_or(BASE));
    for (path, bytes) in &case.files {
        let full = p.path(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, bytes).unwrap();
    }
    let mut args = vec!["--cache", "cache"];
    args.extend_from_slice(&case.args);
    let r = p.pipe(&args);
    let out = r.all();
    let mut problems = Vec::new();
    if r.code == 0 {
        problems.push("it succeeded".to_string());
    }
    for bad in [
        "panicked",
        "a bug in pipe",
        "RUST_BACKTRACE",
        "memory allocation",
    ] {
        if out.contains(bad) {
            problems.push(format!("the output holds {bad:?}"));
        }
    }
    for unwanted in case.absent {
        if out.contains(unwanted) {
            problems.push(format!("the message holds {unwanted:?}"));
        }
    }
    for want in case.expect {
        if !out.contains(want) {
            problems.push(format!("no {want:?} in the message"));
        }
    }
    let verify = p.pipe(&["--cache", "cache", "cache", "verify"]);
    if verify.code != 0 {
        problems.push(format!(
            "`cache verify` failed afterwards:\n{}",
            verify.all()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}\n--- pipe {}:\n{out}",
            case.name,
            problems.join("; "),
            case.args.join(" ")
        ))
    }
}

#[test]
fn hostile_inputs_fail_cleanly_with_located_messages() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    // The cases are independent: run them on a few threads.
    let failures: Vec<String> = std::thread::scope(|s| {
        let chunks: Vec<_> = cases
            .chunks(cases.len().div_ceil(4))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|c| run_case(c).err())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        chunks.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}
