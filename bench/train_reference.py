#!/usr/bin/env python3
"""PyTorch reference for bench/train.sh: the same full fine-tuning steps as
crates/pipe-train/examples/train_bench.rs (random Llama, random tokens, AdamW, clipping at 1.0),
on the CPU, printing tokens/s as one JSON line. The first 2 steps are not timed.

Usage: python bench/train_reference.py DIM LAYERS HEADS VOCAB SEQ BATCH STEPS
(packages: pip install -r scripts/requirements-llama-fixtures.txt)
"""

import json
import sys
import time

import torch
import transformers


def main() -> int:
    dim, layers, heads, vocab, seq, batch, steps = map(int, sys.argv[1:8])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=dim * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(12345)
    warmup = 2
    t0 = time.perf_counter()
    for step in range(steps + warmup):
        if step == warmup:
            t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t0
    tokens = steps * batch * seq
    print(json.dumps({
        "impl": f"PyTorch {torch.__version__} (transformers {transformers.__version__}, {torch.get_num_threads()} threads, f32, eager)",
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps, "tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
