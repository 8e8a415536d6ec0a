#!/usr/bin/env python3
"""PyTorch reference for bench/train.sh: the same training steps as
crates/pipe-train/examples/train_bench.rs on random tokens (AdamW, clipping at 1.0), on the CPU,
printing tokens/s as one JSON line. The first 2 steps are not timed.

Full fine-tuning of a random Llama:
    python bench/train_reference.py DIM LAYERS HEADS VOCAB SEQ BATCH STEPS
LoRA with PEFT (all linear layers, rank R, alpha R, no dropout) on a Hugging Face checkpoint:
    python bench/train_reference.py --lora DIR R SEQ BATCH STEPS
(packages: pip install -r scripts/requirements-llama-fixtures.txt)
"""

import json
import sys
import time

import torch
import transformers


def build():
    if sys.argv[1] == "--lora":
        import peft

        model_dir, r = sys.argv[2], int(sys.argv[3])
        seq, batch, steps = map(int, sys.argv[4:7])
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear")
        model = peft.get_peft_model(model, lora)
        label = f"peft {peft.__version__}, LoRA r={r}"
        return model, model.config.vocab_size, seq, batch, steps, label
    dim, layers, heads, vocab, seq, batch, steps = map(int, sys.argv[1:8])
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=dim * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float(), vocab, seq, batch, steps, "full"


def main() -> int:
    torch.manual_seed(0)
    model, vocab, seq, batch, steps, label = build()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(12345)
    warmup = 2
    t0 = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t0
    tokens = steps * batch * seq
    print(json.dumps({
        "impl": f"PyTorch {torch.__version__} (transformers {transformers.__version__}, {label}, {torch.get_num_threads()} threads, f32, eager)",
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps, "tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
