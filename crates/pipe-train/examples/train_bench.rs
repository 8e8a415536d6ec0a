//! The Rust side of bench/train.sh: training steps on random tokens (AdamW, token-exact loss,
//! clipping at 1.0), printing tokens/s as one JSON line. The first 2 steps are not timed.
//!
//! Full fine-tuning of a random Llama of the given shape:
//!   train_bench DIM LAYERS HEADS VOCAB SEQ BATCH STEPS [BACKEND] [REPLICAS]
//! LoRA (all linear layers, rank R, alpha R, no dropout) on a Hugging Face checkpoint:
//!   train_bench --lora DIR R SEQ BATCH STEPS [BACKEND] [REPLICAS]
//!
//! BACKEND is `flex` (pipe's CPU backend), `flex-checkpointing` (with gradient checkpointing),
//! or `ndarray` / `candle` when built with the `bench-ndarray` / `bench-candle` features.
//! REPLICAS (default 1) splits each batch into that many micro-batches, each run by its own
//! data-parallel replica on the CPU (`devices: [cpu, cpu]` in a train stage).

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::AutodiffBackend;
use pipe_model::{init_model, load_model_with, CausalLm, LoraSpec, ModelConfig, Targets};
use pipe_train::step::{adamw, train_step_on_nodes, AdamWSettings, MicroBatch, StepSettings};

enum Model {
    Random {
        dim: usize,
        layers: usize,
        heads: usize,
        vocab: usize,
    },
    Lora {
        dir: PathBuf,
        r: usize,
    },
}

struct Bench {
    model: Model,
    seq: usize,
    batch: usize,
    steps: usize,
    replicas: usize,
}

fn usage() -> ! {
    eprintln!("usage: train_bench DIM LAYERS HEADS VOCAB SEQ BATCH STEPS [BACKEND] [REPLICAS]");
    eprintln!("       train_bench --lora DIR R SEQ BATCH STEPS [BACKEND] [REPLICAS]");
    std::process::exit(2);
}

fn main() {
    // As the pipe binary does; BENCH_MALLOC_DEFAULT=1 measures glibc's defaults instead.
    if std::env::var_os("BENCH_MALLOC_DEFAULT").is_none() {
        pipe_train::keep_freed_tensor_memory();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> usize {
        args.get(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| usage())
    };
    let (model, rest) = if args.first().map(String::as_str) == Some("--lora") {
        let dir = PathBuf::from(args.get(1).unwrap_or_else(|| usage()));
        (Model::Lora { dir, r: num(2) }, 3)
    } else {
        let model = Model::Random {
            dim: num(0),
            layers: num(1),
            heads: num(2),
            vocab: num(3),
        };
        (model, 4)
    };
    let bench = Bench {
        model,
        seq: num(rest),
        batch: num(rest + 1),
        steps: num(rest + 2),
        replicas: args.get(rest + 4).map_or(1, |_| num(rest + 4)),
    };
    match args.get(rest + 3).map(String::as_str).unwrap_or("flex") {
        "flex" => run::<Autodiff<pipe_model::CpuBackend>>(&bench, "flex", false),
        "flex-checkpointing" => {
            run::<Autodiff<pipe_model::CpuBackend>>(&bench, "flex, gradient checkpointing", true)
        }
        #[cfg(feature = "bench-ndarray")]
        "ndarray" => run::<Autodiff<burn::backend::NdArray<f32>>>(&bench, "ndarray", false),
        // Deprecated in burn 0.21, measured all the same.
        #[cfg(feature = "bench-candle")]
        #[allow(deprecated)]
        "candle" => run::<Autodiff<burn::backend::Candle<f32, i64>>>(&bench, "candle", false),
        other => {
            eprintln!("backend {other} is not compiled in (features bench-ndarray, bench-candle)");
            std::process::exit(2);
        }
    }
}

fn build<B: AutodiffBackend>(model: &Model) -> (CausalLm<B>, usize) {
    let device = Default::default();
    match model {
        Model::Random {
            dim,
            layers,
            heads,
            vocab,
        } => {
            let cfg = ModelConfig::from_json(&format!(
                r#"{{"vocab_size": {vocab}, "hidden_size": {dim}, "intermediate_size": {}, "num_hidden_layers": {layers},
                    "num_attention_heads": {heads}, "num_key_value_heads": {heads}, "max_position_embeddings": 4096}}"#,
                dim * 8 / 3 / 64 * 64 + 64
            ))
            .expect("config");
            (init_model::<B>(&cfg, 0, 0.02, &device, true), *vocab)
        }
        Model::Lora { dir, r } => {
            let base = load_model_with::<B>(dir, &device, false).expect("a model directory");
            let vocab = base.config.vocab_size;
            let spec = LoraSpec {
                r: *r,
                alpha: *r as f64,
                dropout: 0.0,
                targets: Targets::AllLinear,
                modules_to_save: Vec::new(),
            };
            (base.add_lora(&spec, 0).expect("adapters"), vocab)
        }
    }
}

fn run<B: AutodiffBackend>(bench: &Bench, backend: &str, recompute_layers: bool) {
    let Bench {
        seq,
        batch,
        steps,
        replicas,
        ..
    } = *bench;
    let (mut model, vocab) = build::<B>(&bench.model);
    let params = model.num_params();
    let mut optim = adamw::<B>(&AdamWSettings::default());
    let mut state = 12345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as i64
    };
    let warmup = 2;
    let mut t0 = Instant::now();
    let mut loss = f64::NAN;
    let devices = vec![Default::default(); replicas];
    for step in 0..steps + warmup {
        if step == warmup {
            t0 = Instant::now();
        }
        let ids: Vec<Vec<i64>> = (0..batch)
            .map(|_| (0..seq).map(|_| next() % vocab as i64).collect())
            .collect();
        let micro: Vec<MicroBatch> = ids
            .chunks(batch.div_ceil(replicas))
            .map(|rows| MicroBatch {
                labels: rows.to_vec(),
                input_ids: rows.to_vec(),
                attention_mask: None,
                packing: None,
            })
            .collect();
        let settings = StepSettings {
            recompute_layers,
            ..StepSettings::plain(1e-4, Some(1.0))
        };
        let (m, stats) = train_step_on_nodes(model, &mut optim, &micro, &devices, None, &settings)
            .expect("one node");
        model = m;
        loss = stats.loss;
    }
    let secs = t0.elapsed().as_secs_f64();
    let tokens = steps * batch * seq;
    println!(
        "{{\"impl\": \"pipe (burn 0.21 {backend}, f32)\", \"replicas\": {replicas}, \"params\": {params}, \"steps\": {steps}, \"tokens\": {tokens}, \"seconds\": {secs:.3}, \"tokens_per_s\": {:.1}, \"last_loss\": {loss:.6}}}",
        tokens as f64 / secs
    );
}
