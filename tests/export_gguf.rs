//! `format: gguf` through the real binary, checked against llama.cpp itself:
//! - the files equal what llama.cpp's convert_hf_to_gguf.py writes for the same model
//!   (tests/fixtures/gguf/*/expected.json, from scripts/make_gguf_fixtures.py), for byte-level
//!   BPE and SentencePiece vocabularies: every `llama.*` and `tokenizer.*` key with its type and
//!   value, every tensor's name, type, shape and bytes — read back with llama.cpp's own `gguf`
//!   Python package;
//! - llama.cpp (node-llama-cpp's prebuilt build) loads them, encodes prompts to the ids pipe's
//!   tokenizer gives, and generates greedily what pipe generates;
//! - what GGUF export cannot write is refused with the reason.

mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Project;

type B = pipe_model::CpuBackend;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

/// Runs a pipeline of one GGUF export stage `stage` with these more fields (YAML, one a line).
fn run_export(p: &Project, stage: &str, fields: &[&str]) -> common::Run {
    let mut yaml = format!("name: gguf\nstages:\n  {stage}:\n    kind: export\n    format: gguf\n");
    for f in fields {
        yaml.push_str(&format!("    {f}\n"));
    }
    p.write("p.yaml", &yaml);
    p.pipe(&["run", "p.yaml"])
}

/// Exports fixture `model` as GGUF `dtype` and returns the file.
fn export(p: &Project, stage: &str, model: &Path, dtype: &str) -> PathBuf {
    let model = format!("model: {}", model.display());
    run_export(p, stage, &[&model, &format!("dtype: {dtype}")]).ok();
    let file = p.stage_out(stage).join(format!("model-{dtype}.gguf"));
    assert!(file.is_file(), "{} was not written", file.display());
    file
}

/// Runs tests/tools/gguf_describe.py (its path the first argument) on the files after it.
const DESCRIBE: &str = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')";

/// Asserts that each `(file, model, dtype)` holds what llama.cpp's converter wrote for fixture
/// `model` as `dtype`.
fn assert_as_converter(files: &[(PathBuf, &str, &str)]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/gguf_describe.py");
    let args: Vec<&std::ffi::OsStr> = std::iter::once(script.as_os_str())
        .chain(files.iter().map(|(f, _, _)| f.as_os_str()))
        .collect();
    let described = common::tool_python(DESCRIBE, &args);
    let lines: Vec<&str> = described.lines().collect();
    assert_eq!(lines.len(), files.len());
    for ((_, model, dtype), line) in files.iter().zip(lines) {
        let expected: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(model).join("expected.json")).unwrap(),
        )
        .unwrap();
        let mut got: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(got["general.type"], "model");
        got.as_object_mut().unwrap().remove("general.type");
        let want = &expected[dtype];
        for (key, value) in want["metadata"].as_object().unwrap() {
            assert_eq!(
                &got["metadata"][key], value,
                "{model} {dtype}: metadata {key} differs from llama.cpp's converter"
            );
        }
        assert_eq!(
            got["metadata"], want["metadata"],
            "{model} {dtype}: pipe writes keys the converter does not"
        );
        let (got_t, want_t) = (
            got["tensors"].as_array().unwrap(),
            want["tensors"].as_array().unwrap(),
        );
        assert_eq!(got_t.len(), want_t.len(), "{model} {dtype}: tensor count");
        for (g, w) in got_t.iter().zip(want_t) {
            assert_eq!(g, w, "{model} {dtype}: tensor {}", w["name"]);
        }
        assert_eq!(got["alignment"], want["alignment"]);
    }
}

#[test]
fn gguf_files_equal_llama_cpps_converter() {
    let models = [
        "llama-untied",
        "llama-tied",
        "llama-rope-llama3",
        "llama-rope-linear",
        "llama-spm",
    ];
    let dtypes = ["f16", "q8_0", "bf16", "f32"];
    // One pipeline exports every model in every encoding.
    let mut yaml = String::from("name: gguf\nstages:\n");
    let mut cases = Vec::new();
    for model in models {
        for dtype in dtypes {
            let stage = format!("s{}", cases.len());
            yaml.push_str(&format!(
                "  {stage}: {{kind: export, model: {}, format: gguf, dtype: {dtype}}}\n",
                fixture(model).display()
            ));
            cases.push((stage, model, dtype));
        }
    }
    let p = Project::new();
    p.write("p.yaml", &yaml);
    p.pipe(&["run", "p.yaml"]).ok();
    let files: Vec<(PathBuf, &str, &str)> = cases
        .iter()
        .map(|(stage, model, dtype)| {
            (
                p.stage_out(stage).join(format!("model-{dtype}.gguf")),
                *model,
                *dtype,
            )
        })
        .collect();
    assert_as_converter(&files);
    // q8_0 is what the test above compares bit for bit; a row that is not whole blocks
    // (llama-tied's ffn_down, 176 wide) falls back to F16 as llama.cpp's does.
    let tied_q8 = &serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(fixture("llama-tied").join("expected.json")).unwrap(),
    )
    .unwrap()["q8_0"]["tensors"];
    let types: Vec<(&str, &str)> = tied_q8
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["type"].as_str().unwrap()))
        .collect();
    assert!(types.contains(&("blk.0.ffn_down.weight", "F16")));
    assert!(types.contains(&("blk.0.ffn_up.weight", "Q8_0")));
}

struct LlamaCpp {
    prompt: Vec<u32>,
    generated: Vec<u32>,
}

/// llama.cpp's encoding of each prompt and its `n` greedy tokens (tests/tools/llama_cpp_generate.mjs).
fn llama_cpp(file: &Path, prompts: &[&str], n: usize) -> Vec<LlamaCpp> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = root.join("target/test-tools/node");
    assert!(
        tools.join("node_modules/node-llama-cpp").is_dir(),
        "{} is missing: run `bash tests/setup.sh` first",
        tools.display()
    );
    let out = Command::new("node")
        .arg(root.join("tests/tools/llama_cpp_generate.mjs"))
        .arg(file)
        .arg(serde_json::to_string(prompts).unwrap())
        .arg(n.to_string())
        .arg(&tools)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "llama.cpp failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect()
    };
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            LlamaCpp {
                prompt: ids(&v["prompt"]),
                generated: ids(&v["generated"]),
            }
        })
        .collect()
}

#[test]
fn llama_cpp_generates_what_pipe_generates() {
    for model in [
        "llama-untied",
        "llama-rope-llama3",
        "llama-rope-linear",
        "llama-spm",
    ] {
        generates_what_pipe_generates(model);
    }
}

/// For fixture `model_name`: llama.cpp's encodings and greedy continuations of a few prompts
/// from pipe's f16 file equal pipe's own; its q8_0 file loads and generates.
fn generates_what_pipe_generates(model_name: &str) {
    let prompts = [
        "Below is an instruction that describes a task.\n\n### Instruction:\nAdd 12 and 30.\n\n### Response:\n",
        "Sort these words: pear, apple, fig",
        "  two  spaces and 2024 digits",
    ];
    let n = 16;
    let p = Project::new();
    let model_dir = fixture(model_name);
    let f16 = export(&p, "f16", &model_dir, "f16");
    let from_llama_cpp = llama_cpp(&f16, &prompts, n);
    assert_eq!(from_llama_cpp.len(), prompts.len());

    let device = Default::default();
    let model: pipe_model::CausalLm<B> = pipe_model::load_model(&model_dir, &device).unwrap();
    let tokenizer = pipe_data::tokenize::load_tokenizer(&model_dir).unwrap();
    let mut distinct = std::collections::BTreeSet::new();
    for (prompt, theirs) in prompts.iter().zip(&from_llama_cpp) {
        let ids = tokenizer
            .tokenizer
            .encode(*prompt, true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(
            theirs.prompt, ids,
            "{model_name}: llama.cpp encodes {prompt:?} differently"
        );
        let ours = pipe_eval::generate::generate(
            &model,
            &ids,
            n,
            &[],
            &pipe_eval::generate::Sampling::Greedy,
            0,
            &device,
            &|| false,
        )
        .unwrap();
        assert_eq!(
            theirs.generated, ours,
            "{model_name}: llama.cpp's greedy continuation of {prompt:?} differs from pipe's"
        );
        distinct.extend(ours);
    }
    // Not a degenerate model: the continuations vary.
    assert!(
        distinct.len() > 6,
        "{model_name}: the continuations hold only {distinct:?}"
    );

    // The Q8_0 file loads and generates too, from the same encoding.
    let q8 = export(&p, "q8", &model_dir, "q8_0");
    let from_q8 = llama_cpp(&q8, &prompts[..1], n);
    assert_eq!(from_q8[0].prompt, from_llama_cpp[0].prompt);
    assert_eq!(from_q8[0].generated.len(), n);
}

#[test]
fn what_gguf_cannot_write_is_refused_with_the_reason() {
    let p = Project::with_examples("");
    // A byte-fallback (SentencePiece-converted) tokenizer.json without its tokenizer.model:
    // examples/tokenizer.
    let model = p.path("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama-untied").join(f), model.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(p.path("tokenizer").join(f), model.join(f)).unwrap();
    }
    let run = run_export(&p, "gguf", &["model: model"]);
    assert_ne!(run.code, 0);
    assert!(
        run.all().contains("byte-fallback BPE") && run.all().contains("no tokenizer.model"),
        "{}",
        run.all()
    );
    assert!(
        !p.path("cache/stages").exists()
            || common::files_under(&p.path("cache/stages"))
                .keys()
                .all(|k| !k.ends_with(".gguf"))
    );

    // A model directory without its SentencePiece model: `tokenizer:` names where it is, and
    // the file is the converter's.
    let spm = p.path("spm");
    let sp_model = p.path("sp/tokenizer.model");
    std::fs::create_dir_all(&spm).unwrap();
    std::fs::create_dir_all(sp_model.parent().unwrap()).unwrap();
    for e in std::fs::read_dir(fixture("llama-spm")).unwrap() {
        let e = e.unwrap().path();
        let name = e.file_name().unwrap().to_str().unwrap().to_string();
        let to = if name == "tokenizer.model" {
            sp_model.clone()
        } else {
            spm.join(&name)
        };
        std::fs::copy(&e, to).unwrap();
    }
    let run = run_export(&p, "gguf", &["model: spm"]);
    assert_ne!(run.code, 0);
    assert!(
        run.all().contains("set the export's `tokenizer:`"),
        "{}",
        run.all()
    );
    run_export(&p, "gguf", &["model: spm", "tokenizer: sp"]).ok();
    assert_as_converter(&[(
        p.stage_out("gguf").join("model-f16.gguf"),
        "llama-spm",
        "f16",
    )]);

    // A family llama.cpp's converter writes under another architecture.
    let qwen = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families/qwen2");
    let run = run_export(&p, "gguf", &[&format!("model: {}", qwen.display())]);
    assert_ne!(run.code, 0);
    assert!(run.all().contains("Qwen2 model"), "{}", run.all());

    // A GGUF encoding asked of the transformers layout: located.
    p.write(
        "p.yaml",
        "name: gguf\nstages:\n  hf:\n    kind: export\n    model: model\n    dtype: q8_0\n",
    );
    let run = p.pipe(&["check", "p.yaml"]);
    assert_ne!(run.code, 0);
    assert!(
        run.all().contains("p.yaml:6") && run.all().contains("`q8_0` is a GGUF encoding"),
        "{}",
        run.all()
    );
}
