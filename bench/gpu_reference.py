#!/usr/bin/env python3
"""PyTorch's side of bench/gpu.sh, run on the machine with the GPU (or on the CPU, to check the
script): the references pipe is compared with, each printing or writing JSON.

  gpu_reference.py numerics OUT [--device cuda]
      A small random Llama (the shape and init of tests/fixtures/llama/gqa-untied, made by
      scripts/make_llama_fixtures.py's own functions) saved by transformers into OUT/model, and
      OUT/expected.json: its f32 logits and loss on DEVICE (TF32 off), the same under
      torch.autocast(bfloat16) (what mixed-precision training computes), and four AdamW steps
      (cosine schedule with one warm-up step, two micro-batches each, token-exact accumulation,
      clipping at 1.0) with the logits after them.
  gpu_reference.py throughput --method full|lora --config CONFIG_JSON --seq S --batch B
                              --steps N [--device cuda]
      Training steps on random tokens of a random Llama of that shape, the way users of
      transformers run them: `full` keeps f32 weights and AdamW (PyTorch's default foreach
      implementation) under autocast to bf16; `lora` is PEFT r 16, alpha 32 on all linear
      layers with the frozen base in bf16 (as PEFT's guides load it) under autocast. Two
      untimed steps, then N timed; prints tokens/s and torch's peak memory.
  gpu_reference.py scoring-model OUT --vocab V
      A random model of SmolLM2-135M's shape (for scoring speed: the weights do not matter).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import make_llama_fixtures as fx  # noqa: E402  (the CPU fixtures' own model, inputs and steps)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def versions() -> dict:
    info = dict(fx.VERSIONS)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
    return info


def to(batch, device):
    return [(ids.to(device), labels.to(device)) for ids, labels in batch]


def numerics(out: Path, device: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = fx.make_random_model(fx.BASE_A, seed=1000)
    model.config._attn_implementation = fx.ATTN
    model.save_pretrained(out / "model", safe_serialization=True)
    model = model.to(device)
    ids, labels = fx.make_inputs(model.config.vocab_size)
    ids, labels = ids.to(device), labels.to(device)
    with torch.no_grad():
        f32 = model(input_ids=ids, labels=labels)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            mixed = model(input_ids=ids, labels=labels)

    trained = copy.deepcopy(model).train()
    params = [p for p in trained.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    sched = fx.get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    steps = []
    for step_batches in fx.make_micro_batches(fx.BASE_A["vocab_size"]):
        lr_now = opt.param_groups[0]["lr"]
        total = sum(int((lb[:, 1:] != fx.IGNORE).sum()) for _, lb in step_batches)
        loss_total = 0.0
        for i, lb in to(step_batches, device):
            s, _ = fx.manual_causal_loss(trained(input_ids=i).logits, lb)
            (s / total).backward()
            loss_total += float((s / total).detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append({
            "lr": float(lr_now),
            "loss": loss_total,
            "grad_norm": float(grad_norm),
            "num_target_tokens": total,
            "micro_batches": [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in step_batches],
        })
    with torch.no_grad():
        final = trained.eval()(input_ids=ids).logits

    fx.write_json(out / "expected.json", {
        "device": device,
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "logits": fx.flat(f32.logits),
        "loss": float(f32.loss),
        "autocast_logits": fx.flat(mixed.logits.float()),
        "autocast_loss": float(mixed.loss),
        "autocast_vs_f32_max_abs": float((mixed.logits.float() - f32.logits).abs().max()),
        "train": {
            "lr_peak": 1e-3,
            "steps": steps,
            "final_input_ids": ids.tolist(),
            "final_logits": fx.flat(final),
        },
        **versions(),
    })
    print(json.dumps({"wrote": str(out), "device": device}))


def throughput(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = args.device
    cfg = LlamaConfig(**json.loads(Path(args.config).read_text()))
    torch.manual_seed(0)
    t_init = time.perf_counter()
    base_dtype = torch.bfloat16 if args.method == "lora" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(base_dtype)
    if args.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # adapters in f32 (PEFT's autocast_adapter_dtype)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sync(device)
    init_s = time.perf_counter() - t_init
    gen = torch.Generator().manual_seed(12345)
    warmup, loss = 2, float("nan")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + warmup):
        if step == warmup:
            sync(device)
            t0 = time.perf_counter()
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen).to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        s, n = fx.manual_causal_loss(logits, ids)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float((s / n).detach())  # a sync, as pipe reads its loss every step
    secs = time.perf_counter() - t0
    tokens = args.steps * args.batch * args.seq
    report = {
        "impl": f"PyTorch {torch.__version__} eager, autocast bf16"
        + (", PEFT, base in bf16" if args.method == "lora" else ", f32 weights and AdamW"),
        "attn_implementation": model.config._attn_implementation,
        "method": args.method,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps,
        "init_s": init_s,
        "seconds": secs,
        "tokens_per_s": tokens / secs,
        "last_loss": loss,
        **versions(),
    }
    if device.startswith("cuda"):
        report["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        report["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(report))


def scoring_model(out: Path, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    print(json.dumps({"wrote": str(out)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("numerics")
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("throughput")
    p.add_argument("--method", choices=["full", "lora"], required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("scoring-model")
    p.add_argument("out", type=Path)
    p.add_argument("--vocab", type=int, required=True)
    args = ap.parse_args()
    fx.transformers.logging.set_verbosity_error()
    torch.use_deterministic_algorithms(False)
    if args.cmd == "numerics":
        args.out.mkdir(parents=True, exist_ok=True)
        numerics(args.out, args.device)
    elif args.cmd == "throughput":
        throughput(args)
    else:
        scoring_model(args.out, args.vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
