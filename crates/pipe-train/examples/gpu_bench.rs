//! The Rust side of bench/gpu.sh: pipe's model and training step on a device, compared with
//! what bench/gpu_reference.py measured with PyTorch on the same device. Prints one JSON line.
//!
//!   gpu_bench numerics DIR DEVICE
//!       DIR is written by `gpu_reference.py numerics`: a small random Llama (`DIR/model`, saved
//!       by transformers) and `DIR/expected.json` (torch's f32 logits, its logits under autocast
//!       to bf16, and four AdamW steps). Prints pipe's distance to each.
//!   gpu_bench throughput DEVICE METHOD CONFIG_JSON SEQ BATCH STEPS [DTYPE] [checkpointing] [bf16-weights [stochastic]] [REPLICAS]
//!       Training steps on random tokens of a randomly initialised Llama of the shape in
//!       CONFIG_JSON (a Hugging Face config.json), AdamW, clipping at 1.0; METHOD is `full` or
//!       `lora` (r 16, alpha 32, all linear layers, the base frozen); DTYPE `bf16` (mixed
//!       precision, the default) or `f32`; `checkpointing` turns gradient checkpointing on;
//!       `bf16-weights` keeps full fine-tuning's projections in bf16 (`weights: bf16`), with
//!       compensated updates or, with `stochastic`, stochastically rounded ones;
//!       REPLICAS (CPU) splits each batch over that many data-parallel replicas. Two untimed
//!       steps first (kernel compilation and autotuning), then STEPS timed. The output carries
//!       pipe's memory plan for the run (pipe_train::memory), to set beside the measured peak.
//!
//! DEVICE is `cpu` (flex, to check this program and the script on any machine) or `cuda`
//! (`cuda:0`; a build with the `cuda` feature).

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};
use pipe_model::{init_model, load_model_with, CausalLm, LoraSpec, MatmulPrecision, ModelConfig};
use pipe_model::{shifted_cross_entropy, Targets};
use pipe_train::memory::{plan_training, LoraShape, TrainShape};
use pipe_train::step::for_inference;
use pipe_train::Bf16Rounding;
use pipe_train::{
    adamw, train_step, train_step_on_nodes, AdamWSettings, Decay, MicroBatch, Schedule,
    StepSettings,
};
use serde_json::{json, Value};

fn usage() -> ! {
    eprintln!("usage: gpu_bench numerics DIR DEVICE");
    eprintln!("       gpu_bench throughput DEVICE full|lora CONFIG_JSON SEQ BATCH STEPS [bf16|f32] [checkpointing] [bf16-weights [stochastic]] [REPLICAS]");
    std::process::exit(2);
}

fn fail(message: String) -> ! {
    eprintln!("gpu_bench: {message}");
    std::process::exit(1);
}

fn main() {
    pipe_train::keep_freed_tensor_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    let device = match args.first().map(String::as_str) {
        Some("numerics") => arg(2),
        Some("throughput") => arg(1),
        _ => usage(),
    };
    match device {
        "cpu" => dispatch::<Autodiff<pipe_model::CpuBackend>>(&args, Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" | "cuda:0" => dispatch::<Autodiff<burn::backend::Cuda<f32, i32>>>(
            &args,
            burn::backend::cuda::CudaDevice::new(0),
        ),
        other => fail(format!(
            "device `{other}` is not available in this build (cpu; cuda with --features cuda)"
        )),
    }
}

fn dispatch<B: AutodiffBackend>(args: &[String], device: B::Device) {
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let report = match args[0].as_str() {
        "numerics" => numerics::<B>(Path::new(&args[1]), &device),
        _ => {
            let run = Run {
                method: args[2].clone(),
                seq: num(4),
                batch: num(5),
                steps: num(6),
                bf16: args.get(7).map(String::as_str) != Some("f32"),
                checkpointing: args.iter().any(|a| a == "checkpointing"),
                bf16_weights: args.iter().any(|a| a == "bf16-weights"),
                bf16_rounding: if args.iter().any(|a| a == "stochastic") {
                    Bf16Rounding::Stochastic
                } else {
                    Bf16Rounding::Compensated
                },
                replicas: args[7..].iter().find_map(|a| a.parse().ok()).unwrap_or(1),
                on_gpu: args[1] != "cpu",
            };
            throughput::<B>(&device, Path::new(&args[3]), &run)
        }
    };
    println!("{report}");
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", path.display())));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| fail(format!("{} is not JSON: {e}", path.display())))
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| fail(format!("token rows: {e}")))
}

fn floats(v: &Value) -> Vec<f32> {
    let values: Vec<f64> =
        serde_json::from_value(v.clone()).unwrap_or_else(|e| fail(format!("float list: {e}")));
    values.into_iter().map(|x| x as f32).collect()
}

fn ids_tensor<B: burn::tensor::backend::Backend>(
    rows: &[Vec<i64>],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [b, s]), device)
}

/// Max and mean |a - b| over two equally long lists.
fn distance(ours: &[f32], theirs: &[f32]) -> Value {
    if ours.len() != theirs.len() {
        fail(format!("{} values against {}", ours.len(), theirs.len()));
    }
    let diffs = ours.iter().zip(theirs).map(|(a, b)| (a - b).abs() as f64);
    let (max, sum) = diffs.fold((0f64, 0f64), |(m, s), d| (m.max(d), s + d));
    json!({"max_abs": max, "mean_abs": sum / ours.len().max(1) as f64})
}

/// Logits and mean loss of `model` at `precision` for the rows of `e`.
fn forward<B: AutodiffBackend>(
    model: &CausalLm<B>,
    precision: MatmulPrecision,
    e: &Value,
    device: &B::Device,
) -> (Vec<f32>, f64) {
    let inference = for_inference(model).with_matmul_precision(precision);
    let labels = rows(&e["labels"]);
    let logits = inference.forward(ids_tensor(&rows(&e["input_ids"]), device), None);
    let (sum, count) = shifted_cross_entropy(logits.clone(), &labels);
    let loss = sum.into_scalar().elem::<f64>() / count.max(1) as f64;
    let values: Vec<f32> = logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_else(|e| fail(format!("logits: {e:?}")));
    (values, loss)
}

fn numerics<B: AutodiffBackend>(dir: &Path, device: &B::Device) -> Value {
    let e = read_json(&dir.join("expected.json"));
    let model: CausalLm<B> = load_model_with(&dir.join("model"), device, true)
        .unwrap_or_else(|err| fail(format!("{}: {err}", dir.join("model").display())));

    let (f32_logits, f32_loss) = forward(&model, MatmulPrecision::F32, &e, device);
    let (bf16_logits, bf16_loss) = forward(&model, MatmulPrecision::Bf16, &e, device);

    // Four optimizer steps as the reference took them (fixture format of make_llama_fixtures.py).
    let steps = e["train"]["steps"]
        .as_array()
        .unwrap_or_else(|| fail("expected.json has no train.steps".into()));
    let schedule = Schedule {
        peak: e["train"]["lr_peak"].as_f64().unwrap_or(1e-3),
        decay: Decay::Cosine,
        warmup_steps: 1,
        total_steps: steps.len() as u64,
    };
    let mut optim = adamw::<B>(&AdamWSettings::default());
    let mut trained = model;
    let mut curve = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let batches: Vec<MicroBatch> = step["micro_batches"]
            .as_array()
            .unwrap_or_else(|| fail(format!("train step {i} has no micro_batches")))
            .iter()
            .map(|m| MicroBatch {
                input_ids: rows(&m["input_ids"]),
                labels: rows(&m["labels"]),
                attention_mask: None,
                packing: None,
            })
            .collect();
        let (next, stats) = train_step(
            trained,
            &mut optim,
            &batches,
            schedule.lr(i as u64),
            Some(1.0),
        );
        trained = next;
        let (loss, norm) = (step["loss"].as_f64(), step["grad_norm"].as_f64());
        curve.push(json!({
            "step": i + 1,
            "pipe_loss": stats.loss,
            "torch_loss": loss,
            "pipe_grad_norm": stats.grad_norm,
            "torch_grad_norm": norm,
            "loss_rel_diff": loss.map(|l| (stats.loss - l).abs() / l.abs().max(1e-3)),
        }));
    }
    let final_rows = json!({"input_ids": e["train"]["final_input_ids"], "labels": e["train"]["final_input_ids"]});
    let (final_logits, _) = forward(&trained, MatmulPrecision::F32, &final_rows, device);

    json!({
        "f32_logits": distance(&f32_logits, &floats(&e["logits"])),
        "f32_loss": {"pipe": f32_loss, "torch": e["loss"]},
        "bf16_logits_vs_autocast": distance(&bf16_logits, &floats(&e["autocast_logits"])),
        "bf16_loss": {"pipe": bf16_loss, "torch_autocast": e["autocast_loss"]},
        "torch_autocast_vs_f32_max_abs": e["autocast_vs_f32_max_abs"],
        "train_curve": curve,
        "final_logits_after_training": distance(&final_logits, &floats(&e["train"]["final_logits"])),
    })
}

struct Run {
    method: String,
    seq: usize,
    batch: usize,
    steps: usize,
    bf16: bool,
    checkpointing: bool,
    /// Full fine-tuning's projections in bf16 (`weights: bf16`).
    bf16_weights: bool,
    bf16_rounding: Bf16Rounding,
    replicas: usize,
    on_gpu: bool,
}

fn throughput<B: AutodiffBackend>(device: &B::Device, config: &Path, run: &Run) -> Value {
    let Run {
        seq, batch, steps, ..
    } = *run;
    let method = run.method.as_str();
    let cfg = ModelConfig::from_file(config).unwrap_or_else(|e| fail(e.to_string()));
    let plan = plan_training(
        &cfg,
        &TrainShape {
            lora: (method == "lora").then_some(LoraShape {
                rank: 16,
                targets_per_layer: 7,
            }),
            micro_batch_size: batch.div_ceil(run.replicas),
            seq_len: seq,
            bf16_products: run.bf16,
            bf16_weights: run.bf16_weights && method == "full",
            bf16_rounding: run.bf16_rounding,
            gradient_checkpointing: run.checkpointing,
            replicas: run.replicas,
            on_gpu: run.on_gpu,
        },
    );
    let t_init = Instant::now();
    let model: CausalLm<B> = match method {
        "full" => init_model(&cfg, 0, 0.02, device, true),
        "lora" => {
            let spec = LoraSpec {
                r: 16,
                alpha: 32.0,
                dropout: 0.0,
                targets: Targets::AllLinear,
                modules_to_save: Vec::new(),
            };
            init_model::<B>(&cfg, 0, 0.02, device, false)
                .add_lora(&spec, 0)
                .unwrap_or_else(|e| fail(e.to_string()))
        }
        other => fail(format!("method `{other}`: full or lora")),
    };
    let precision = if run.bf16 {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    };
    // As the train stage does: a LoRA base at bf16 is held in bf16.
    let mut model = model
        .with_matmul_precision(precision)
        .keep_frozen_projections_in_bf16();
    if run.bf16_weights && method == "full" {
        model = model.keep_trainable_projections_in_bf16();
    }
    let init_s = t_init.elapsed().as_secs_f64();
    let params = model.num_params();
    let trainable = trainable_params(&model);
    let mut optim = adamw::<B>(&AdamWSettings {
        bf16_rounding: run.bf16_rounding,
        ..AdamWSettings::default()
    });
    let mut state = 12345u64;
    let mut next_token = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as i64 % cfg.vocab_size as i64
    };
    let replicas = vec![device.clone(); run.replicas];
    let warmup = 2;
    let (mut t0, mut first_step_s, mut loss) = (Instant::now(), 0.0, f64::NAN);
    for step in 0..steps + warmup {
        if step == 1 {
            first_step_s = t0.elapsed().as_secs_f64();
        }
        if step == warmup {
            t0 = Instant::now();
        }
        let rows: Vec<Vec<i64>> = (0..batch)
            .map(|_| (0..seq).map(|_| next_token()).collect())
            .collect();
        let micro: Vec<MicroBatch> = rows
            .chunks(batch.div_ceil(run.replicas))
            .map(|rows| MicroBatch {
                labels: rows.to_vec(),
                input_ids: rows.to_vec(),
                attention_mask: None,
                packing: None,
            })
            .collect();
        // The loss is read back every step (a device sync), so the clock measures finished work.
        let settings = StepSettings {
            recompute_layers: run.checkpointing,
            ..StepSettings::plain(1e-5, Some(1.0))
        };
        let (next, stats) =
            train_step_on_nodes(model, &mut optim, &micro, &replicas, None, &settings)
                .expect("one node");
        model = next;
        loss = stats.loss;
        if !loss.is_finite() {
            fail(format!("step {step}: loss {loss}"));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = steps * batch * seq;
    json!({
        "impl": match (run.bf16_weights && method == "full", run.bf16_rounding) {
            (true, Bf16Rounding::Compensated) => {
                "pipe (burn 0.21, bf16 projections with compensated AdamW)"
            }
            (true, Bf16Rounding::Stochastic) => {
                "pipe (burn 0.21, bf16 projections with stochastically rounded AdamW)"
            }
            (false, _) => "pipe (burn 0.21, f32 weights and AdamW)",
        },
        "dtype": if run.bf16 { "bf16 (bf16 products)" } else { "f32" },
        "gradient_checkpointing": run.checkpointing,
        "replicas": run.replicas,
        "memory_plan": plan,
        "method": method,
        "params": params,
        "trainable_params": trainable,
        "seq": seq,
        "batch": batch,
        "steps": steps,
        "init_s": init_s,
        "first_step_s": first_step_s,
        "seconds": secs,
        "tokens_per_s": tokens as f64 / secs,
        "last_loss": loss,
    })
}

/// Parameters that take gradients (LoRA: the adapters only).
fn trainable_params<B: AutodiffBackend>(model: &CausalLm<B>) -> usize {
    struct Count(usize);
    impl<B: burn::tensor::backend::Backend> burn::module::ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            if param.val().is_require_grad() {
                self.0 += param.val().shape().num_elements();
            }
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}
