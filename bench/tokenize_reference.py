#!/usr/bin/env python3
"""Python reference for the tokenize benchmark: Stanford Alpaca's `preprocess` with transformers.

Loads Alpaca records from a JSON file, replicates them (cycling) to 52,002 records (the size of
the original alpaca_data.json), builds the prompts with the Alpaca template, and times ONLY the
`preprocess(sources, targets, tokenizer)` step, which calls the tokenizer once per string exactly
like train.py's `_tokenize_fn` (examples first, then sources). Tokenizer loading, adding [PAD],
and prompt formatting are not timed. Prints examples/s, total seconds, machine info and versions.

Usage (from the repository root; packages: pip install -r scripts/requirements-fixtures.txt):

  python bench/tokenize_reference.py
  python bench/tokenize_reference.py --tokenizer tests/fixtures/tokenize/gpt-neox --limit 5000
  python bench/tokenize_reference.py --data ../shared/data/instructions/alpaca_en_demo.json --max-len 512

The tokenizer dir must hold tokenizer.json + tokenizer_config.json (see
tests/fixtures/tokenize/llama-bpe and .../gpt-neox, made by scripts/make_tokenize_fixtures.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # per-string calls, as in train.py
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers  # noqa: E402
import transformers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ALPACA_SIZE = 52_002

# Verbatim from tatsu-lab/stanford_alpaca, train.py at commit
# 761dc5bfbdeeffa89b8bff5d038781a4055f796a.
IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def _count_ne(ids: list[int], value: int) -> int:
    """`tensor.ne(value).sum().item()`; `value` (tokenizer.pad_token_id, a slow property) is read
    once per string, as in train.py, not once per token."""
    return len(ids) - ids.count(value)


def _tokenize_fn(strings, tokenizer) -> dict:
    """train.py _tokenize_fn, with plain lists instead of 1-row torch tensors."""
    tokenized_list = [
        tokenizer(
            text,
            return_tensors=None,
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        )
        for text in strings
    ]
    input_ids = labels = [tokenized["input_ids"] for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [
        _count_ne(tokenized["input_ids"], tokenizer.pad_token_id) for tokenized in tokenized_list
    ]
    return dict(input_ids=input_ids, labels=labels, input_ids_lens=input_ids_lens, labels_lens=labels_lens)


def preprocess(sources, targets, tokenizer, timings: dict | None = None) -> dict:
    """train.py preprocess (`label[:source_len] = IGNORE_INDEX` on a tensor never changes its length).
    `timings`, if given, receives the seconds spent in each phase."""
    t0 = time.perf_counter()
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized = _tokenize_fn(examples, tokenizer)
    t1 = time.perf_counter()
    sources_tokenized = _tokenize_fn(sources, tokenizer)
    t2 = time.perf_counter()
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        n = min(source_len, len(label))
        label[:n] = [IGNORE_INDEX] * n
    if timings is not None:
        timings.update(examples=t1 - t0, sources=t2 - t1, labels=time.perf_counter() - t2)
    return dict(input_ids=input_ids, labels=labels)


def main() -> int:
    ap = argparse.ArgumentParser(description="Alpaca preprocess reference benchmark (transformers).")
    ap.add_argument("--data", type=Path,
                    default=REPO_ROOT.parent / "shared" / "data" / "instructions" / "alpaca_en_demo.json",
                    help="Alpaca-format JSON list (default: ../shared/data/instructions/alpaca_en_demo.json)")
    ap.add_argument("--tokenizer", type=Path, default=REPO_ROOT / "tests" / "fixtures" / "tokenize" / "llama-bpe",
                    help="dir with tokenizer.json + tokenizer_config.json (default: the llama-bpe fixture; "
                         "also tests/fixtures/tokenize/gpt-neox)")
    ap.add_argument("--records", type=int, default=ALPACA_SIZE, help="replicate the data to this many records")
    ap.add_argument("--limit", type=int, default=None, help="time only the first N records")
    ap.add_argument("--max-len", type=int, default=512, help="model_max_length (Alpaca default 512)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    args = ap.parse_args()

    base = json.loads(args.data.read_text(encoding="utf-8"))
    n = args.records if args.limit is None else min(args.limit, args.records)
    records = [base[i % len(base)] for i in range(n)]

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(args.tokenizer), model_max_length=args.max_len, padding_side="right", use_fast=True
    )
    special_tokens_dict = dict()
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = DEFAULT_UNK_TOKEN
    tokenizer.add_special_tokens(special_tokens_dict)

    prompt_input, prompt_no_input = PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]
    sources = [
        prompt_input.format_map(example) if example.get("input", "") != "" else prompt_no_input.format_map(example)
        for example in records
    ]
    targets = [f"{example['output']}{tokenizer.eos_token}" for example in records]

    phases: dict = {}
    t0 = time.perf_counter()
    data = preprocess(sources, targets, tokenizer, phases)
    secs = time.perf_counter() - t0

    n_tokens = sum(len(x) for x in data["input_ids"])
    n_trunc = sum(1 for x in data["input_ids"] if len(x) == args.max_len)
    result = {
        "examples": n,
        "seconds": round(secs, 3),
        "examples_per_s": round(n / secs, 1),
        "tokens": n_tokens,
        "truncated": n_trunc,
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "tokenizer": str(args.tokenizer),
        "max_len": args.max_len,
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    print(f"tokenizer      {args.tokenizer} (max_len {args.max_len}, vocab {len(tokenizer)} incl. [PAD])")
    print(f"data           {args.data} x{n / len(base):.2f} -> {n} examples ({n_tokens} tokens, {n_trunc} truncated)")
    print(f"preprocess     {secs:.3f} s total, {n / secs:,.0f} examples/s ({2 * n / secs:,.0f} tokenizer calls/s)")
    print(f"  phases       tokenize examples {phases['examples']:.3f} s, tokenize prompts {phases['sources']:.3f} s, "
          f"labels (deepcopy + mask) {phases['labels']:.3f} s")
    print(f"machine        {result['machine']}, {result['cpu_count']} cores ({result['sched_affinity']} usable), "
          f"Python {result['python']}")
    print(f"versions       transformers {transformers.__version__}, tokenizers {tokenizers.__version__}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
