//! The cache key of every stage kind, as the key recipe (pipe_core::key) promises it: the same
//! key whatever the stage and its upstream stages are called, wherever its input files lie
//! (same bytes), in whatever order its YAML fields are written, and whatever its run settings
//! are; a different key for a change of any key field. The keys of one stage of every kind are
//! pinned: a dependency bump that changed how a value (a float such as 2e-5) is written must
//! fail here, not invalidate users' caches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use pipe_core::digest::HashMemo;
use pipe_core::kind::Workspace;
use pipe_core::{InputSource, KeyRecipe, Pipeline};

/// One stage of a kind (`{s}`) in a pipeline, with the stages it reads (`{u}`, `{v}`) and its
/// files under `{d}`.
struct Example {
    name: &'static str,
    kind: &'static str,
    yaml: &'static str,
    /// Run settings of the kind, each as `field=value`: the key must not change.
    run_settings: &'static [&'static str],
    /// Changes of key fields, each as (`field=value`, the key field it changes).
    key_changes: &'static [(&'static str, &'static str)],
    /// The stage's key as it is today.
    pinned: &'static str,
}

const FILES: &[(&str, &str)] = &[
    (
        "data.json",
        r#"[{"instruction": "a", "input": "", "output": "b"}]"#,
    ),
    (
        "records/records.json",
        r#"[{"instruction": "Add 1 and 2.", "input": "", "output": "3"}, {"instruction": "x", "input": "y", "output": "z"}]"#,
    ),
    (
        "records/other.json",
        r#"[{"instruction": "q", "input": "", "output": "r"}]"#,
    ),
    ("tok/tokenizer.json", "{}"),
    ("arc.jsonl", "{}\n"),
];

const INIT: &str = "{init: {vocab_size: 64, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 64}, seed: 1}";

fn examples() -> Vec<Example> {
    vec![
        Example {
            name: "download of a local file",
            kind: "download",
            yaml: "
  {s}:
    kind: download
    source: {d}/data.json
    retries: 2",
            run_settings: &["retries=7"],
            key_changes: &[("file_name=renamed.json", "file_name")],
            pinned: "caf1ced64c00822fdebce6416f1816cba0c87898604fc037f7fe025382ad49fc",
        },
        Example {
            name: "download of a URL",
            kind: "download",
            yaml: "
  {s}:
    kind: download
    source: https://example.com/data/a.json
    sha256: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            run_settings: &["retries=0"],
            key_changes: &[
                ("source=https://example.com/data/b.json", "source"),
                (
                    "sha256=bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                    "checksums",
                ),
                ("file_name=x.json", "file_name"),
            ],
            pinned: "0b22e66d657736523761d0de1569a1e101c62106dc22e3ce164f69dc3a87b916",
        },
        Example {
            name: "download from the Hub",
            kind: "download",
            yaml: "
  {s}:
    kind: download
    source: hf://org/repo@0123456789abcdef0123456789abcdef01234567
    files: ['*.json']
    checksums: {config.json: 'sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc'}",
            run_settings: &["retries=1"],
            key_changes: &[
                ("files=['*.txt']", "files"),
                (
                    "checksums={config.json: 'blake3:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd'}",
                    "checksums",
                ),
            ],
            pinned: "158745840fe7aff84479d8e516b37b21dbc4981b4dccf461c0eca182b8d958fc",
        },
        Example {
            name: "format",
            kind: "format",
            yaml: "
  {s}:
    kind: format
    input: {d}/records
    file: records.json
    template: alpaca
    val_size: 0.5
    seed: 3",
            run_settings: &[],
            key_changes: &[
                ("file=other.json", "file"),
                ("template={prompt: 'Q {instruction}', response: '{output}'}", "template"),
                ("fields={instruction: output}", "fields"),
                ("val_size=1", "val_size"),
                ("seed=4", "seed"),
                ("on_error=skip", "on_error"),
            ],
            pinned: "4df5e22383242a592d39b66472dba01d44b5dc268148315fbe4937a48b411df5",
        },
        Example {
            name: "format of conversations from a split",
            kind: "format",
            yaml: "
  {s}:
    kind: format
    input: {d}/records
    split: train
    template: messages
    roles: {bot: assistant}",
            run_settings: &[],
            key_changes: &[
                ("split=test", "split"),
                ("template=sharegpt", "template"),
                ("roles={bot: user}", "roles"),
                ("fields={messages: dialog}", "fields"),
            ],
            pinned: "e269550fe0222bf18ac32f244f00aa9e72c7e2a32865967d1bff19380c70e504",
        },
        Example {
            name: "format of a mixture",
            kind: "format",
            yaml: "
  {s}:
    kind: format
    sources:
      - {input: {d}/records/records.json, weight: 0.7}
      - {input: {d}/data.json, name: more, weight: 0.3}
    size: 10
    template: messages",
            run_settings: &[],
            key_changes: &[
                (
                    "sources=[{input: {d}/records/records.json, weight: 0.5}, {input: {d}/data.json, name: more, weight: 0.5}]",
                    "sources",
                ),
                ("size=20", "size"),
            ],
            pinned: "8f9f23998d4cfeb4890011109c9685bccb28c57f8214946620244588c902415e",
        },
        Example {
            name: "tokenize of conversations",
            kind: "tokenize",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
    template: messages
  {s}:
    kind: tokenize
    input: {u}
    tokenizer: {d}/tok
    train_on: last_assistant
    chat_template: '{% for m in messages %}{{ m.content }}{% endfor %}'",
            run_settings: &[],
            key_changes: &[
                ("train_on=all", "train_on"),
                ("chat_template='{{ messages }}'", "chat_template"),
            ],
            pinned: "1156fee294f36cf8b20233523b6178449750942419740b574c1f85bf078de292",
        },
        Example {
            name: "tokenize",
            kind: "tokenize",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
  {s}:
    kind: tokenize
    input: {u}
    tokenizer: {d}/tok
    max_len: 64",
            run_settings: &[],
            key_changes: &[
                ("max_len=32", "max_len"),
                ("train_on_inputs=true", "train_on_inputs"),
                ("packing=true", "packing"),
                ("eos_token=</s>", "eos_token"),
                ("pad_token=<pad>", "pad_token"),
                ("add_pad_token=<extra>", "add_pad_token"),
            ],
            pinned: "60bbb4b3b4bc7a23c1a9c9d1786c9a07ede4a5e5d4d97a5c0f0d9510180eeab1",
        },
        Example {
            name: "train",
            kind: "train",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
    val_size: 0.5
  {v}:
    kind: tokenize
    input: {u}
    tokenizer: {d}/tok
    max_len: 32
  {s}:
    kind: train
    data: {v}
    model: INIT
    method: lora
    lr: 2.0e-5
    batch_size: 4
    micro_batch_size: 2
    eval_steps: 2",
            run_settings: &[
                "device=cpu",
                "devices=[cpu]",
                "save_steps=1",
                "gradient_checkpointing=true",
                "tracking={mlflow: 'http://127.0.0.1:9', experiment: x}",
            ],
            key_changes: &[
                ("model.seed=2", "init"),
                ("method=full", "method"),
                ("lora={r: 4}", "lora"),
                ("lr=2.1e-5", "lr"),
                ("schedule=linear", "schedule"),
                ("warmup_ratio=0.1", "warmup_ratio"),
                ("warmup_steps=2", "warmup_steps"),
                ("epochs=2", "epochs"),
                ("max_steps=3", "max_steps"),
                ("batch_size=8", "batch_size"),
                ("micro_batch_size=1", "micro_batch_size"),
                ("max_grad_norm=0.5", "max_grad_norm"),
                ("weight_decay=0.01", "weight_decay"),
                ("adam_beta1=0.8", "adam_beta1"),
                ("adam_beta2=0.99", "adam_beta2"),
                ("adam_epsilon=1e-6", "adam_epsilon"),
                ("seed=7", "seed"),
                ("dtype=bf16", "dtype"),
                ("save_dtype=bf16", "save_dtype"),
                ("devices=[cpu, cpu]", "replicas"),
                ("eval_steps=3", "eval_steps"),
                ("keep=best", "keep"),
                ("early_stopping_patience=2", "early_stopping_patience"),
            ],
            pinned: "8baa21a86afd54b0727ac6a06e2d8e5e3660dc78a598ffc1fb17be45f13c8eb0",
        },
        Example {
            name: "train in full with bf16 weights across nodes",
            kind: "train",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
  {v}:
    kind: tokenize
    input: {u}
    tokenizer: {d}/tok
    max_len: 32
  {s}:
    kind: train
    data: {v}
    model: INIT
    method: full
    lr: 2.0e-5
    batch_size: 4
    micro_batch_size: 2
    dtype: bf16
    weights: bf16
    nodes: 2",
            run_settings: &[],
            key_changes: &[("weights=f32", "weights"), ("nodes=1", "nodes")],
            pinned: "15858f08f6db5463baad1ee5488bc69d91220027bf7eec7e3e8960f93362c238",
        },
        Example {
            name: "train with stochastically rounded bf16 weights",
            kind: "train",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
  {v}:
    kind: tokenize
    input: {u}
    tokenizer: {d}/tok
    max_len: 32
  {s}:
    kind: train
    data: {v}
    model: INIT
    method: full
    lr: 2.0e-5
    batch_size: 4
    micro_batch_size: 2
    dtype: bf16
    weights: bf16
    bf16_rounding: stochastic",
            run_settings: &[],
            key_changes: &[("bf16_rounding=compensated", "bf16_rounding")],
            pinned: "696c05167536e9bb82b4c324e9e1f687b6913f8ba9ba3ea38517d3c91e626bd4",
        },
        Example {
            name: "evaluate",
            kind: "evaluate",
            yaml: "
  {u}:
    kind: format
    input: {d}/records/records.json
    val_size: 1
  {s}:
    kind: evaluate
    model: INIT
    base: INIT
    tokenizer: {d}/tok
    tasks: [{name: arc, format: arc, path: {d}/arc.jsonl, limit: 5}]
    generate: {prompts: {u}, limit: 2, max_new_tokens: 4}",
            run_settings: &["batch_size=3", "device=cpu"],
            key_changes: &[
                ("model.seed=2", "model"),
                ("base.seed=3", "base"),
                ("compare=false", "compare"),
                (
                    "tasks=[{name: arc, format: arc, path: {d}/arc.jsonl, limit: 6}]",
                    "tasks",
                ),
                (
                    "tasks=[{name: arc2, format: arc, path: {d}/arc.jsonl, limit: 5}]",
                    "tasks",
                ),
                ("generate={prompts: {u}, limit: 2, max_new_tokens: 5}", "generate"),
                (
                    "generate={prompts: {u}, limit: 2, max_new_tokens: 4, temperature: 0.5}",
                    "generate",
                ),
            ],
            pinned: "97d5ee6224025436d8e2d0d1ea682f019932e108284eaa18cf2d774d923593b2",
        },
        Example {
            name: "export",
            kind: "export",
            yaml: "
  {s}:
    kind: export
    model: {d}/tok
    format: peft
    to: delivered/{s}",
            run_settings: &[
                "to=elsewhere/out",
                "push=hf://org/model@dev",
                "push_private=false",
            ],
            key_changes: &[
                ("format=hf", "format"),
                ("dtype=f32", "dtype"),
                ("max_shard_size=1GB", "max_shard_bytes"),
                (
                    "base_model_name_or_path=meta-llama/Llama-2-7b-hf",
                    "base_model_name_or_path",
                ),
            ],
            pinned: "5db8df664867a387f1f4d31db656b1f265066d1ed90df15fdab32298e424c68d",
        },
        Example {
            name: "command",
            kind: "command",
            yaml: "
  {s}:
    kind: command
    cmd: wc -c < ${{d}/data.json} > ${out}/n
    deps: [{d}/data.json]
    outs: [n]
    env: {LC_ALL: C}",
            run_settings: &["resumable=true"],
            key_changes: &[
                ("cmd=wc -l < ${{d}/data.json} > ${out}/n", "cmd"),
                ("outs=[n, m]", "outs"),
                ("env={LC_ALL: C.UTF-8}", "env"),
                ("metrics=n", "metrics"),
            ],
            pinned: "e1a8fa0436ef70bebbd95228f8b8186877a59958f1112871329e39ec8f2b540d",
        },
    ]
}

/// The names a variant gives the stage (`{s}`), its upstream stages (`{u}`, `{v}`) and the
/// directory of its files (`{d}`).
#[derive(Clone, Copy)]
struct Names {
    s: &'static str,
    u: &'static str,
    v: &'static str,
    d: &'static str,
}

const NAMES: Names = Names {
    s: "stage",
    u: "up",
    v: "tokens",
    d: "files",
};

fn fill(text: &str, n: Names) -> String {
    text.replace("INIT", INIT)
        .replace("{s}", n.s)
        .replace("{u}", n.u)
        .replace("{v}", n.v)
        .replace("{d}", n.d)
}

/// A project directory with the example files under each of these directory names.
fn project(dirs: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for d in dirs {
        for (rel, text) in FILES {
            let p = root.path().join(d).join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }
    root
}

fn load(root: &Path, yaml: &str, sets: &[String]) -> Result<Pipeline, String> {
    let file = root.join("p.yaml");
    std::fs::write(&file, format!("name: keys\nstages:{yaml}\n")).unwrap();
    let registry = pipe_stages::registry().in_workspace(Workspace {
        root: root.to_path_buf(),
        store: root.join("cache"),
    });
    pipe_core::load(&file, sets, &registry).map_err(|e| e.to_string())
}

/// The recipe of stage `id`: path inputs by their content, a stage input by the key of the
/// stage it reads (so that a change upstream shows here too).
fn recipe(p: &Pipeline, id: &str, memo: &mut HashMemo) -> KeyRecipe {
    let s = p.stage(id).unwrap();
    let inputs = s
        .inputs
        .iter()
        .map(|i| {
            let digest = match &i.source {
                InputSource::Path(path) => memo.digest_path(path).unwrap().digest,
                InputSource::Stage { stage, output } => {
                    let up = recipe(p, stage, memo).key();
                    blake3::hash(format!("{up}/{}", output.as_deref().unwrap_or("")).as_bytes())
                        .to_hex()
                        .to_string()
                }
            };
            (i.name.clone(), digest)
        })
        .collect();
    KeyRecipe {
        kind: s.kind.to_string(),
        kind_version: s.kind_version,
        fields: s.fields.clone(),
        inputs,
    }
}

/// The example's stage's recipe in a project at `root`, with these names and `--set`s.
fn recipe_of(root: &Path, e: &Example, n: Names, sets: &[&str]) -> Result<KeyRecipe, String> {
    let sets: Vec<String> = sets
        .iter()
        .map(|s| format!("{}.{}", n.s, fill(s, n)))
        .collect();
    let p = load(root, &fill(e.yaml, n), &sets)?;
    Ok(recipe(&p, n.s, &mut HashMemo::in_memory()))
}

/// The YAML with every stage's fields in the reverse order.
fn reversed(yaml: &str) -> String {
    let mut doc: serde_yaml::Mapping = serde_yaml::from_str(yaml).unwrap();
    for (_, stage) in doc.iter_mut() {
        let fields = stage.as_mapping().unwrap().clone();
        let mut rev = serde_yaml::Mapping::new();
        for (k, v) in fields.into_iter().collect::<Vec<_>>().into_iter().rev() {
            rev.insert(k, v);
        }
        *stage = serde_yaml::Value::Mapping(rev);
    }
    let text = serde_yaml::to_string(&doc).unwrap();
    text.lines().map(|l| format!("\n  {l}")).collect()
}

#[test]
fn every_kind_has_examples_that_cover_its_key_fields_and_run_settings() {
    let registry = pipe_stages::registry();
    let examples = examples();
    let root = project(&[NAMES.d]);
    for kind in registry.kinds() {
        let mine: Vec<&Example> = examples.iter().filter(|e| e.kind == kind.name()).collect();
        assert!(
            !mine.is_empty(),
            "kind `{}` has no key example",
            kind.name()
        );
        let mut fields = BTreeSet::new();
        for e in &mine {
            let r = recipe_of(root.path(), e, NAMES, &[]).unwrap();
            fields.extend(r.fields.as_json().as_object().unwrap().keys().cloned());
        }
        let changed: BTreeSet<String> = mine
            .iter()
            .flat_map(|e| e.key_changes.iter().map(|(_, f)| f.to_string()))
            .collect();
        assert_eq!(
            fields,
            changed,
            "kind `{}`: every key field needs a change that shows it enters the key",
            kind.name()
        );
        let settings: BTreeSet<&str> = mine
            .iter()
            .flat_map(|e| e.run_settings.iter().map(|s| s.split('=').next().unwrap()))
            .collect();
        let declared: BTreeSet<&str> = kind.run_settings().iter().copied().collect();
        assert_eq!(
            settings,
            declared,
            "kind `{}`: every run setting needs a change that shows it stays out of the key",
            kind.name()
        );
    }
}

#[test]
fn names_locations_field_order_and_run_settings_leave_the_key_as_it_is() {
    let moved = Names {
        s: "renamed",
        u: "upstream2",
        v: "toks",
        d: "elsewhere/moved",
    };
    let root = project(&[NAMES.d, moved.d]);
    for e in examples() {
        let base = recipe_of(root.path(), &e, NAMES, &[]).unwrap();
        let key = base.key();
        // The command kind names its deps in its command line: where a dep is, is part of the
        // command, so only its stage may be renamed.
        let variant = if e.kind == "command" {
            Names {
                d: NAMES.d,
                ..moved
            }
        } else {
            moved
        };
        let other = recipe_of(root.path(), &e, variant, &[]).unwrap();
        assert_eq!(other, base, "{}: renamed stages and moved files", e.name);
        let p = load(root.path(), &reversed(&fill(e.yaml, NAMES)), &[]).unwrap();
        let reordered = recipe(&p, NAMES.s, &mut HashMemo::in_memory());
        assert_eq!(reordered.key(), key, "{}: fields in another order", e.name);
        for set in e.run_settings {
            let r = recipe_of(root.path(), &e, NAMES, &[set])
                .unwrap_or_else(|err| panic!("{}: --set {set}: {err}", e.name));
            assert_eq!(
                r.key(),
                key,
                "{}: the run setting `{set}` changed the key",
                e.name
            );
        }
    }
}

#[test]
fn every_key_field_changes_the_key() {
    let root = project(&[NAMES.d]);
    for e in examples() {
        let key = recipe_of(root.path(), &e, NAMES, &[]).unwrap().key();
        for (set, field) in e.key_changes {
            let r = recipe_of(root.path(), &e, NAMES, &[set])
                .unwrap_or_else(|err| panic!("{}: --set {set}: {err}", e.name));
            assert_ne!(r.key(), key, "{}: `{set}` left the key as it was", e.name);
            let before = recipe_of(root.path(), &e, NAMES, &[]).unwrap();
            assert_ne!(
                before.fields.as_json().get(*field),
                r.fields.as_json().get(*field),
                "{}: `{set}` should change the key field `{field}`",
                e.name
            );
        }
    }
}

#[test]
fn the_key_of_every_kind_is_pinned() {
    let root = project(&[NAMES.d]);
    let mut now = BTreeMap::new();
    for e in examples() {
        let r = recipe_of(root.path(), &e, NAMES, &[]).unwrap();
        now.insert(e.name, (r.key(), r.canonical()));
    }
    let wrong: Vec<String> = examples()
        .iter()
        .filter(|e| now[e.name].0 != e.pinned)
        .map(|e| {
            format!(
                "{}: key {} (pinned: {:?})\n  recipe: {}",
                e.name, now[e.name].0, e.pinned, now[e.name].1
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the key recipe changed; if that is meant, bump the kind's version (or pipe-key-v2 for all) and pin the new keys:\n{}",
        wrong.join("\n")
    );
}
