#!/usr/bin/env python3
"""Generate the multiple-choice eval fixtures under tests/fixtures/eval/.

Regenerate (from anywhere; deterministic, CPU, float32, one thread; with the versions pinned in
scripts/requirements-eval-fixtures.txt it rewrites byte-identical files):

  python3 -m venv /tmp/llamafx && /tmp/llamafx/bin/pip install -r scripts/requirements-eval-fixtures.txt
  /tmp/llamafx/bin/python scripts/make_eval_fixtures.py

The Rust tests read these files only (never ../shared, never Python) to check pipe's
lm-evaluation-harness-style scoring: prompts, requests, token split, per-choice log-likelihoods
and acc / acc_norm / stderr. Expected values come from scripts/eval_reference.py (its module
docstring states the rules), run on the committed model below.

Inputs (committed, not written by this script):

  <format>.jsonl           4-7 rows per format in the Hugging Face dataset schema:
    arc.jsonl              rows 1-5 of ../shared/data/eval/arc_easy.validation.jsonl, plus row 64
                           (NYSEDREGENTS_2014_8_8: labels "1".."4", answerKey "2" -> gold 1).
    arc_fewshot.jsonl      rows 6-8 of the same file (shots).
    hellaswag.jsonl        rows 1-5 of ../shared/data/eval/hellaswag.validation.jsonl, row 3244
                           (WikiHow: [header]/[title]/[step] markers, ctx_b ""), and one
                           hand-written row (ctx_b "the man from SCOTLAND" -> str.capitalize()
                           gives "The man from scotland"; an ending with 3 spaces and a [step]).
    piqa, mmlu, winogrande, openbookqa, boolq, generic .jsonl: hand-written, realistic rows.
                           mmlu: subjects with underscores, a question with surrounding
                           whitespace (strip()); openbookqa: answerKey " B" (lstrip()); boolq: one
                           google/boolq row (answer: true, no label); winogrande: a blank followed
                           by a comma; generic: answer given as a string, an empty context (prefix
                           token path), contexts ending in " " and "\\n" (whitespace moves to the
                           continuation), non-ASCII choices (acc_norm counts characters).
    mmlu_fewshot.jsonl, winogrande_fewshot.jsonl   2 shot rows each.

Outputs:

  model/                   config.json, generation_config.json, model.safetensors (f32, ~0.6 MB):
                           random LlamaForCausalLM, vocab 2000 (= examples/tokenizer/tokenizer.json,
                           added tokens <unk>/<s>/</s> are ids 0-2 inside it), hidden 32,
                           intermediate 64, 2 layers, 4 heads / 2 kv heads, max_position_embeddings
                           512, untied lm_head; Linear/Embedding weights ~ N(0, 0.2^2), RMSNorm
                           weights ~ 1 + 0.1 N(0, 1), seed 1234. Plus copies of
                           examples/tokenizer/{tokenizer.json,tokenizer_config.json}.
  expected/<format>.json   eval_reference output, num_fewshot 0, no BOS, every row of <format>.jsonl.
  expected/arc_fewshot2.json         arc.jsonl with 2 shots from arc_fewshot.jsonl.
  expected/mmlu_fewshot2.json        mmlu.jsonl with 2 shots from mmlu_fewshot.jsonl.
  expected/winogrande_fewshot2.json  winogrande.jsonl with 2 shots from winogrande_fewshot.jsonl.
  expected/arc_bos.json    arc.jsonl with --add-bos (every encoding starts with <s> = 1).

  In expected files "seconds" and "items_per_s" are null (timings are not reproducible); all
  requests are scored one at a time (no padding), so the log-likelihoods are the exact f32 sums.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_reference as er  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FX = ROOT / "tests/fixtures/eval"
MODEL = FX / "model"
EXPECTED = FX / "expected"
TOKENIZER = ROOT / "examples/tokenizer"
SEED = 1234

CONFIG = dict(
    vocab_size=2000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)

# (expected file stem, format, data file, shots file, num_fewshot, add_bos)
RUNS = [(f, f, f"{f}.jsonl", None, 0, False) for f in er.FORMATS] + [
    ("arc_fewshot2", "arc", "arc.jsonl", "arc_fewshot.jsonl", 2, False),
    ("mmlu_fewshot2", "mmlu", "mmlu.jsonl", "mmlu_fewshot.jsonl", 2, False),
    ("winogrande_fewshot2", "winogrande", "winogrande.jsonl", "winogrande_fewshot.jsonl", 2, False),
    ("arc_bos", "arc", "arc.jsonl", None, 0, True),
]


def vocab_size_of_tokenizer() -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def make_model() -> None:
    assert vocab_size_of_tokenizer() == CONFIG["vocab_size"]
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    if MODEL.exists():
        shutil.rmtree(MODEL)
    MODEL.mkdir(parents=True)
    model.eval().save_pretrained(MODEL, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, MODEL / name)


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    make_model()
    model = er.load_model(MODEL)
    EXPECTED.mkdir(parents=True, exist_ok=True)
    for stem, fmt, data, shots, k, add_bos in RUNS:
        enc = er.Encoder(MODEL, add_bos=add_bos)
        rows = er.read_jsonl(FX / data)
        shot_rows = er.read_jsonl(FX / shots) if shots else None
        res = er.evaluate(model, enc, fmt, rows, shot_rows, k, batch_size=1)
        # Batched (right-padded) scoring must agree with one-at-a-time scoring.
        batched = er.evaluate(model, er.Encoder(MODEL, add_bos=add_bos), fmt, rows, shot_rows, k, batch_size=8)
        diff = max(
            abs(a - b)
            for x, y in zip(res.items, batched.items)
            for a, b in zip(x["loglikelihoods"], y["loglikelihoods"])
        )
        assert diff < 1e-4, (stem, diff)
        assert res.summary["tokenizer_mismatches"] == 0, stem
        res.summary["seconds"] = None
        res.summary["items_per_s"] = None
        res.summary["model"] = "tests/fixtures/eval/model"
        res.summary["data"] = f"tests/fixtures/eval/{data}"
        res.summary["fewshot_file"] = f"tests/fixtures/eval/{shots}" if shots else None
        er.write_result(EXPECTED / f"{stem}.json", res)
        s = res.summary
        spread = min(
            max(it["loglikelihoods"]) - min(it["loglikelihoods"]) for it in res.items
        )
        ctx_max = max(len(c) + len(x) for it in res.items for c, x in zip(it["context_tokens"], it["continuation_tokens"]))
        print(
            f"{stem:22s} n={s['n']} acc={s['acc']:.3f} acc_norm={s['acc_norm'] if s['acc_norm'] is None else round(s['acc_norm'], 3)} "
            f"min ll spread={spread:.2f} max tokens={ctx_max} batch diff={diff:.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
