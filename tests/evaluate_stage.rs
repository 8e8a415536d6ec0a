//! The evaluate stage through the real binary: base and tuned (a LoRA adapter applied to its
//! base) side by side — held-out loss equal to training's loss formula, a multiple-choice
//! task, generated samples — and its errors.

mod common;
use std::path::PathBuf;

use burn::tensor::{Int, Tensor, TensorData};
use common::Project;
use pipe_data::dataset::Dataset;
use pipe_model::{load_model, shifted_cross_entropy, CausalLm};
use serde_json::Value;

type B = pipe_model::CpuBackend;

const PIPELINE: &str = r#"name: evaluate
stages:
  data:
    kind: download
    source: instructions.json
  tokenizer:
    kind: download
    source: tokenizer
  prompts:
    kind: format
    input: data
    val_size: 3
  tokens:
    kind: tokenize
    input: prompts
    tokenizer: tokenizer
    max_len: 64
  base:
    kind: train
    data: tokens
    model:
      init: {vocab_size: 2001, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}
      seed: 1
    lr: 3.0e-3
    epochs: 2
    batch_size: 4
  lora:
    kind: train
    data: tokens
    model: base
    method: lora
    lora: {r: 4, alpha: 8}
    lr: 1.0e-2
    epochs: 3
    batch_size: 4
    eval_steps: 2
  eval:
    kind: evaluate
    model: lora
    base: base
    data: tokens
    tasks:
      - {name: quiz, format: generic, path: quiz.jsonl}
      - {name: quiz_2shot, format: generic, path: quiz.jsonl, num_fewshot: 2}
    generate:
      prompts: prompts
      instructions: ["Name a colour.", {instruction: "Add the numbers.", input: "2 and 3"}]
      max_new_tokens: 6
    batch_size: 2
  sampled:
    kind: evaluate
    model: base
    generate:
      instructions: ["Name a colour.", "Name a fruit."]
      max_new_tokens: 8
      temperature: 1.5
      top_p: 0.9
      seed: 3
"#;

const QUIZ: &str = r#"{"context": "The sky is", "choices": ["blue", "a very long answer"], "answer": 0}
{"context": "Two plus two is ", "choices": ["four", "five"], "answer": "four"}
{"context": "Water is", "choices": ["wet", "dry", "loud"], "answer": 0}
{"context": "Fire is", "choices": ["cold", "hot"], "answer": 1}
"#;

fn project() -> Project {
    let p = Project::with_examples(PIPELINE);
    p.write("quiz.jsonl", QUIZ);
    p
}

fn jsonl(path: PathBuf) -> Vec<Value> {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The held-out loss computed directly with the training loss function, one example at a
/// time.
fn direct_heldout_loss(model_dir: &std::path::Path, val: &std::path::Path) -> f64 {
    let model: CausalLm<B> = load_model(model_dir, &Default::default()).unwrap();
    let data = Dataset::open(val).unwrap();
    let (mut sum, mut count) = (0.0, 0);
    for i in 0..data.len() {
        let (ids, labels) = data.example(i);
        let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let n = ids.len();
        let t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &Default::default());
        let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let (s, c) = shifted_cross_entropy(model.forward(t, None), &[labels]);
        sum += s.into_scalar() as f64;
        count += c;
    }
    sum / count as f64
}

#[test]
fn base_and_tuned_side_by_side() {
    let p = project();
    let run = p.pipe(&["run", "p.yaml"]).ok();
    let eval = p.stage_out("eval");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(eval.join("metrics.json")).unwrap()).unwrap();

    // Held-out loss: the base's equals the training loss formula on the val split.
    let base_loss = m["base"]["heldout"]["loss"].as_f64().unwrap();
    let direct = direct_heldout_loss(
        &p.stage_out("base").join("model"),
        &p.stage_out("tokens").join("val.safetensors"),
    );
    assert!(
        (base_loss - direct).abs() < 1e-4 * direct.abs().max(1.0),
        "evaluate {base_loss} vs direct {direct}"
    );
    let tuned_loss = m["tuned"]["heldout"]["loss"].as_f64().unwrap();
    assert!(tuned_loss.is_finite() && tuned_loss != base_loss);
    let ppl = m["tuned"]["heldout"]["perplexity"].as_f64().unwrap();
    assert!((ppl - tuned_loss.exp()).abs() < 1e-9 * ppl);

    // The multiple-choice task: 4 items, every choice scored, for both models.
    for label in ["base", "tuned"] {
        let t = &m[label]["tasks"]["quiz"];
        assert_eq!(t["items"], 4);
        let acc = t["acc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(t["acc_stderr"].as_f64().is_some());
    }
    let items = jsonl(eval.join("items/quiz.jsonl"));
    assert_eq!(items.len(), 8);
    for it in &items {
        let lls = it["loglikelihoods"].as_array().unwrap();
        let expected = if it["index"] == 2 { 3 } else { 2 };
        assert_eq!(lls.len(), expected, "{it}");
        assert!(lls.iter().all(|l| l.as_f64().unwrap() < 0.0));
        // The prediction is the argmax of the log-likelihoods.
        let pred = it["pred"].as_u64().unwrap() as usize;
        let best = lls
            .iter()
            .map(|l| l.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(lls[pred].as_f64().unwrap(), best);
    }
    // Answers given as the choice's text resolve to its index.
    assert!(items.iter().any(|it| it["index"] == 1 && it["gold"] == 0));
    // Few-shot contexts are longer, so the two tasks score differently.
    let shots = jsonl(eval.join("items/quiz_2shot.jsonl"));
    assert_ne!(shots[0]["loglikelihoods"], items[0]["loglikelihoods"]);

    // Samples: 3 held-out prompts (exact match against their responses) + 2 instructions,
    // for each model.
    let samples = jsonl(eval.join("samples.jsonl"));
    assert_eq!(samples.len(), 10);
    let held_out: Vec<&Value> = samples
        .iter()
        .filter(|s| s["reference"].is_string())
        .collect();
    assert_eq!(held_out.len(), 6);
    assert!(held_out.iter().all(|s| s["exact_match"].is_boolean()));
    assert!(samples
        .iter()
        .filter(|s| s["id"] == "instruction:1")
        .all(|s| s["prompt"]
            .as_str()
            .unwrap()
            .contains("### Input:\n2 and 3")));
    assert!(samples.iter().all(|s| s["tokens"].as_u64().unwrap() <= 6));

    // The report: one row per metric with base, tuned and their difference.
    let report = std::fs::read_to_string(eval.join("report.md")).unwrap();
    assert!(
        report.contains("| metric | base | tuned | delta |"),
        "{report}"
    );
    let row = report
        .lines()
        .find(|l| l.starts_with("| heldout.loss |"))
        .unwrap();
    assert!(row.contains(&format!("{base_loss:.4}")), "{row}");
    assert!(report.contains("| quiz.acc |") && report.contains("| quiz.acc_norm |"));
    assert!(report.contains("| generation.exact_match |"));

    // `pipe show` gives the headline numbers.
    let show = p.pipe(&["show", "p.yaml", "eval"]).ok().stdout;
    assert!(show.contains("tuned.heldout.loss"), "{show}\n{}", run.all());

    check_report_html(&p, &eval.join("report.html"));
}

/// The colours report.html draws its series in (base / training loss, tuned / held-out loss).
const BLUE: [u8; 3] = [0x1f, 0x77, 0xb4];
const ORANGE: [u8; 3] = [0xff, 0x7f, 0x0e];

/// report.html: self-contained, every chart there, and drawn by a real browser (Debian's
/// chromium, installed by tests/setup.sh): its screenshot shows both series' colours.
fn check_report_html(p: &Project, html_path: &std::path::Path) {
    let html = std::fs::read_to_string(html_path).unwrap();
    // Nothing fetched: the only URL is SVG's namespace name.
    assert_eq!(
        html.matches("http").count(),
        html.matches("http://www.w3.org/2000/svg").count(),
        "{html}"
    );
    assert!(!html.contains("<script") && !html.contains("<img"));
    // The training curves (loss and held-out loss of the lora stage), a chart per metric, the
    // samples.
    assert!(html.contains("training loss") && html.contains("held-out loss"));
    let metrics = html.matches("aria-label=\"").count() - 1;
    assert!(metrics >= 4, "{metrics} metric charts");
    assert!(html.contains("heldout.loss") && html.contains("quiz.acc"));
    assert!(html.contains("Name a colour."), "the samples table");

    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a headless chromium is missing: run `bash tests/setup.sh` (it installs Debian's chromium)");
    let shot = p.path("report.png");
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2400",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", html_path.display()))
        .output()
        .unwrap();
    assert!(
        shot.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()].chunks(channels);
    let near = |px: &[u8], c: [u8; 3]| (0..3).all(|i| px[i].abs_diff(c[i]) <= 12);
    let (mut blue, mut orange, mut ink) = (0, 0, 0);
    for px in pixels {
        blue += near(px, BLUE) as usize;
        orange += near(px, ORANGE) as usize;
        ink += (px[..3].iter().all(|&v| v < 100)) as usize;
    }
    assert!(
        blue > 500 && orange > 500 && ink > 500,
        "the screenshot shows {blue} blue, {orange} orange and {ink} dark pixels"
    );
}

#[test]
fn sampled_generation_is_reproducible_and_changes_with_the_seed() {
    let p = project();
    p.pipe(&["run", "p.yaml"]).ok();
    let first = std::fs::read(p.stage_out("sampled").join("samples.jsonl")).unwrap();
    p.pipe(&["run", "p.yaml", "--force", "sampled"]).ok();
    let again = std::fs::read(p.stage_out("sampled").join("samples.jsonl")).unwrap();
    assert_eq!(first, again);
    let yaml = PIPELINE.replace("seed: 3", "seed: 4");
    p.write("p.yaml", &yaml);
    p.pipe(&["run", "p.yaml", "--only", "sampled"]).ok();
    let other = std::fs::read(p.stage_out("sampled").join("samples.jsonl")).unwrap();
    assert_ne!(first, other);
}

#[test]
fn an_adapter_without_its_base_is_refused_with_help() {
    let p = project();
    let yaml = PIPELINE.replace("    model: lora\n    base: base\n", "    model: lora\n");
    p.write("p.yaml", &yaml);
    let run = p.pipe(&["run", "p.yaml", "--until", "eval"]);
    assert_ne!(run.code, 0);
    assert!(
        run.all().contains("is a LoRA adapter: set `base:`"),
        "{}",
        run.all()
    );
}

#[test]
fn a_bad_task_row_names_its_file_line_and_fields() {
    let p = project();
    p.write("quiz.jsonl", "{\"context\": \"c\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{\"context\": \"c\", \"answer\": 0}\n");
    let run = p.pipe(&["run", "p.yaml", "--until", "eval"]);
    assert_ne!(run.code, 0);
    let all = run.all();
    assert!(
        all.contains("quiz.jsonl:2: record 1: missing field `choices`"),
        "{all}"
    );
    assert!(
        all.contains("a `generic` row has: context, choices, answer"),
        "{all}"
    );
}
