#!/usr/bin/env python3
"""Generate the Alpaca tokenization fixtures under tests/fixtures/tokenize/.

The Rust tests use these files to check pipe's Alpaca preprocessing token for token against the
reference: Hugging Face `transformers` (fast tokenizers) driven exactly the way Stanford Alpaca's
train.py drives it (`smart_tokenizer_and_embedding_resize`, `_tokenize_fn`, `preprocess`).

What it writes (everything the tests need; the tests never read ../shared):

  records.json                 ~50 Alpaca records ({instruction, input, output}): every 33rd record
                               of alpaca_en_demo.json plus hand-written edge cases (see EDGE_CASES).
  cases.json                   one short label per record (same order), for test failure messages.
  prompts.json                 per record {"prompt", "response"}: the Alpaca template applied with
                               str.format_map (prompt_input iff record.get("input", "") != ""), and
                               the raw output (no eos appended).
  llama-bpe/tokenizer.json     a small (2000-token) Llama-2-style BPE tokenizer, trained here on the
  llama-bpe/tokenizer_config.json   alpaca_en_demo.json text: byte_fallback with the 256 <0xNN>
                               tokens, Prepend("▁")+Replace(" ", "▁") normalizer, no pre-tokenizer,
                               <unk>=0 <s>=1 </s>=2, post-processor "<s> $A". No pad token.
  gpt-neox/tokenizer.json      copy of ../shared/tokenizers/gpt-neox-20b.tokenizer.json.
  gpt-neox/tokenizer_config.json    eos = bos = unk = <|endoftext|>. No pad token.
  expected-<tok>-<max_len>.json     for tok in {llama-bpe, gpt-neox}, max_len in {512, 48}: Alpaca's
                               preprocess output per record ({"input_ids", "labels"}), plus the
                               tokenization of the prompt alone ("prompt_only_ids"), the pad/eos
                               tokens and ids, vocab sizes before/after adding [PAD], and versions.

Run from the repository root (deterministic; re-running rewrites identical files as long as the
pinned versions in scripts/requirements-fixtures.txt are installed):

  pip install -r scripts/requirements-fixtures.txt     # no torch needed
  python scripts/make_tokenize_fixtures.py

Inputs (relative to the repository root): ../shared/data/instructions/alpaca_en_demo.json and
../shared/tokenizers/gpt-neox-20b.tokenizer.json (override with --shared DIR).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "tests" / "fixtures" / "tokenize"

# ---------------------------------------------------------------------------------------------
# Verbatim from tatsu-lab/stanford_alpaca, train.py at commit
# 761dc5bfbdeeffa89b8bff5d038781a4055f796a (https://github.com/tatsu-lab/stanford_alpaca).
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
# ---------------------------------------------------------------------------------------------

MAX_LENS = (512, 48)
DEMO_STRIDE = 33  # records 0, 33, 66, ... of alpaca_en_demo.json (31 records, 14 with input)

LLAMA_VOCAB_SIZE = 2000
LLAMA_LIMIT_ALPHABET = 100  # rarer characters (é, emoji, CJK, ...) go through byte fallback
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

LLAMA_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "model_max_length": 512,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "<unk>",
}
NEOX_TOKENIZER_CONFIG = {
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "model_max_length": 512,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "<|endoftext|>",
}


def _long_text(n_items: int, topic: str) -> str:
    """A deterministic, varied, several-thousand-character text (numbered paragraphs)."""
    clauses = [
        "measure the ingredients carefully before you start",
        "keep a written log of every change, including the ones that did not work",
        "ask a colleague to review the plan; a second pair of eyes catches 90% of mistakes",
        "set aside 15-20 minutes each day, rather than one long session per week",
        "compare the results against the baseline (and against last year's numbers)",
        "don't over-optimize early: correctness first, speed second",
        "write down the assumptions, e.g. \"the data fits in memory\" or \"inputs are UTF-8\"",
        "celebrate small wins -- motivation matters more than most people think",
    ]
    paras = []
    for i in range(1, n_items + 1):
        a = clauses[i % len(clauses)]
        b = clauses[(i * 3 + 1) % len(clauses)]
        paras.append(f"{i}. For {topic} step {i}, {a}. Then {b}; repeat until step {i + 1} is clear.")
    return "\n\n".join(paras)


# Hand-written edge cases: (label, record). Order is part of the fixture.
EDGE_CASES: list[tuple[str, dict]] = [
    ("empty input string -> prompt_no_input",
     {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."}),
    ("whitespace-only input (a space) -> prompt_input, since ' ' != ''",
     {"instruction": "Summarize the input.", "input": " ", "output": "There is nothing to summarize."}),
    ("newline-only input -> prompt_input",
     {"instruction": "Count the words in the input.", "input": "\n", "output": "0"}),
    ("CJK (Chinese) in all fields",
     {"instruction": "将以下句子翻译成英文。", "input": "我喜欢在公园里散步。", "output": "I like to walk in the park. 我喜欢散步。"}),
    ("Japanese and Korean",
     {"instruction": "Translate to Japanese and Korean: Good morning.", "input": "",
      "output": "日本語: おはようございます。\n한국어: 좋은 아침입니다."}),
    ("emoji incl. skin tone and ZWJ family sequence",
     {"instruction": "Reply with celebratory emoji.", "input": "",
      "output": "🎉🎉 Congrats! 👍🏽 👨‍👩‍👧‍👦 🚀✨"}),
    ("accented Latin, precomposed (NFC)",
     {"instruction": "Correct the spelling: cafe creme brulee, naive resume.", "input": "",
      "output": "Café crème brûlée, naïve résumé. ¿Qué tal? Ça va, Zoë."}),
    ("accented Latin, decomposed (NFD combining marks; gpt-neox normalizes to NFC)",
     {"instruction": "Cafe\u0301 or cafe?", "input": "", "output": "Cafe\u0301 cre\u0300me bru\u0302le\u0301e."}),
    ("RTL: Arabic and Hebrew",
     {"instruction": "Translate 'hello world' into Arabic and Hebrew.", "input": "",
      "output": "مرحبا بالعالم\nשלום עולם"}),
    ("very long output (truncation inside the response at max_len 512)",
     {"instruction": "Write a detailed, numbered guide to learning a new skill.", "input": "",
      "output": _long_text(60, "learning")}),
    ("very long input (the prompt alone exceeds 512 tokens; every label is -100)",
     {"instruction": "Summarize the following notes in one sentence.", "input": _long_text(45, "project"),
      "output": "Work steadily, log changes, and get reviews."}),
    ("empty output (target is just eos)",
     {"instruction": "Say nothing.", "input": "", "output": ""}),
    ("whitespace-only output",
     {"instruction": "Reply with three spaces.", "input": "", "output": "   "}),
    ("braces in the values (format_map does not re-format values)",
     {"instruction": "Fill in the template: {name} is {age} years old.", "input": "{input} {{double}} {0} {",
      "output": "{name} = \"Ada\"; {age} = 36 -> Ada is 36 years old. }"}),
    ("newlines, tabs and CRLF inside fields",
     {"instruction": "Format as a table:\nname\tage\r\nAda\t36", "input": "col1\tcol2\n\tindented\n\n\nthree blank",
      "output": "| name | age |\n|------|-----|\n| Ada\t| 36 |\r\n"}),
    ("leading and trailing spaces in every field",
     {"instruction": "  Trim me, please.  ", "input": "  padded input  ", "output": "  padded output  "}),
    ("output starting with punctuation (merges with the prompt's trailing ':' in gpt-neox)",
     {"instruction": "Give an emoticon.", "input": "", "output": ":-) and ... done"}),
    ("output starting with a newline",
     {"instruction": "Write a two-line poem.", "input": "", "output": "\nRoses are red,\nviolets are blue."}),
    ("output starting with a space",
     {"instruction": "Answer briefly: capital of France?", "input": "", "output": " Paris."}),
    ("code with deep indentation and runs of spaces (gpt-neox has space-run tokens)",
     {"instruction": "Write a Python function that sums a list.", "input": "",
      "output": "def total(xs):\n    s = 0\n    for x in xs:\n        if x:\n                s += x  # deep\n    return s\n\nx  =  1   +   2"}),
    ("numbers, dates, symbols, math",
     {"instruction": "List some constants.", "input": "",
      "output": "π ≈ 3.14159, e ≈ 2.71828; 1,000,000 > 999_999; 2024-01-31T12:00:00Z; x² + y₂ ≤ √2 ± 0.5%"}),
    ("invisible and unusual characters (NBSP, ZWSP, NUL, soft hyphen, astral math letters)",
     {"instruction": "Clean\u00a0this\u200btext.", "input": "a\u0000b\u00adc",
      "output": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0001F600 text\u00a0with\u200bspecials."}),
    ("literal special-token text in the output (HF splits it out as the special token)",
     {"instruction": "Show the end-of-text markers.", "input": "",
      "output": "Llama uses </s> and <s>; GPT-NeoX uses <|endoftext|>. <unk> too."}),
    ("literal [PAD] in the instruction: it becomes the pad id after add_special_tokens, so Alpaca's "
     "input_ids_lens (count of ids != pad_token_id) under-counts the prompt by one",
     {"instruction": "Explain what the [PAD] token is for.", "input": "",
      "output": "It pads batches to equal length."}),
]


# ---------------------------------------------------------------------------------------------
# Alpaca reference (train.py), without torch.

def format_prompt(example: dict) -> str:
    """SupervisedDataset.__init__: sources."""
    prompt_input, prompt_no_input = PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]
    return prompt_input.format_map(example) if example.get("input", "") != "" else prompt_no_input.format_map(example)


def load_alpaca_tokenizer(tok_dir: Path, max_len: int):
    """train(): AutoTokenizer.from_pretrained(...) then smart_tokenizer_and_embedding_resize's
    tokenizer.add_special_tokens(special_tokens_dict). Returns (tokenizer, len before adding)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tok_dir),
        model_max_length=max_len,
        padding_side="right",
        use_fast=True,  # Alpaca says use_fast=False; there is no slow (sentencepiece) model here.
    )
    vocab_before = len(tokenizer)
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
    return tokenizer, vocab_before


def _count_ne(ids: list[int], value: int) -> int:
    """`tensor.ne(value).sum().item()`; `value` (tokenizer.pad_token_id, a slow property) is read
    once per string, as in train.py, not once per token."""
    return len(ids) - ids.count(value)


def _tokenize_fn(strings, tokenizer) -> dict:
    """train.py _tokenize_fn with return_tensors=None: `tokenized.input_ids[0]` of the 1-row tensor
    is the plain list, and `.ne(pad_token_id).sum()` is a count."""
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
    input_ids = labels = [list(tokenized["input_ids"]) for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [
        _count_ne(tokenized["input_ids"], tokenizer.pad_token_id) for tokenized in tokenized_list
    ]
    return dict(input_ids=input_ids, labels=labels, input_ids_lens=input_ids_lens, labels_lens=labels_lens)


def preprocess(sources, targets, tokenizer) -> dict:
    """train.py preprocess. `label[:source_len] = IGNORE_INDEX` on a tensor sets
    min(source_len, len(label)) elements and never changes the length; same here."""
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        n = min(source_len, len(label))
        label[:n] = [IGNORE_INDEX] * n
    return dict(input_ids=input_ids, labels=labels, source_ids=sources_tokenized["input_ids"])


# ---------------------------------------------------------------------------------------------
# Fixture construction.

def demo_records(demo: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for i in range(0, len(demo), DEMO_STRIDE):
        r = demo[i]
        rec = {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
        out.append((f"alpaca_en_demo.json[{i}]" + (" (with input)" if rec["input"] != "" else ""), rec))
    return out


def build_llama_bpe(demo: list[dict]) -> Tokenizer:
    """Train a 2000-token BPE on the demo text and wrap it in Llama-2's tokenizer.json pipeline."""
    # Training: SentencePiece-like word pieces ("▁" only at the start of a piece), so merges never
    # span a word boundary. The final tokenizer has no pre-tokenizer, like Llama-2's.
    texts = [r[k] for r in demo for k in ("instruction", "input", "output") if r.get(k)]
    # The trainer's own `limit_alphabet` cut breaks count ties in hash-map order (not reproducible
    # across runs), so choose the alphabet here: most frequent characters, ties by code point.
    # Merge ties are broken by token ids in the trainer, so with a fixed alphabet training is
    # deterministic.
    char_counts = Counter(ch for t in texts for ch in "▁" + t.replace(" ", "▁"))
    alphabet = sorted(char_counts, key=lambda ch: (-char_counts[ch], ord(ch)))[:LLAMA_LIMIT_ALPHABET]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=["<unk>", "<s>", "</s>"] + BYTE_TOKENS,  # ids 0, 1, 2, then <0x00>=3 .. <0xFF>=258
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),  # exactly the initial alphabet
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = trained["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    assert [vocab[t] for t in ["<unk>", "<s>", "</s>"] + BYTE_TOKENS] == list(range(3 + 256)), "special ids"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok


def write_json(path: Path, obj, *, ascii_only: bool = True, indent: int | None = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, ensure_ascii=ascii_only, indent=indent) + "\n")


def write_expected(path: Path, header: dict, examples: list[dict], prompt_only_ids: list[list[int]]) -> None:
    """Readable but compact: header keys pretty-printed, one example / id list per line."""
    lines = ["{"]
    for k, v in header.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v)},")
    lines.append('  "examples": [')
    lines.append(",\n".join("    " + json.dumps(e, separators=(",", ":")) for e in examples))
    lines.append("  ],")
    lines.append('  "prompt_only_ids": [')
    lines.append(",\n".join("    " + json.dumps(p, separators=(",", ":")) for p in prompt_only_ids))
    lines.append("  ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def check_against_raw_tokenizers(tok_file: Path, max_len: int, strings: list[str], hf_ids: list[list[int]]) -> None:
    """The Rust side uses the `tokenizers` crate directly: the same tokenizer.json with [PAD] added
    as a special token and truncation at max_len must give the same ids as transformers."""
    raw = Tokenizer.from_file(str(tok_file))
    raw.add_special_tokens([AddedToken(DEFAULT_PAD_TOKEN, special=True, normalized=False)])
    raw.enable_truncation(max_length=max_len)
    for s, ids in zip(strings, hf_ids):
        got = raw.encode(s).ids
        assert got == ids, f"raw tokenizers disagrees with transformers on {s[:60]!r}: {got[:20]} vs {ids[:20]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO_ROOT.parent / "shared", help="the shared data dir")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args()

    if not tokenizers.__version__.startswith("0.22."):
        print(f"warning: tokenizers {tokenizers.__version__} (the Rust crate is 0.22.2)", file=sys.stderr)

    demo_path = args.shared / "data" / "instructions" / "alpaca_en_demo.json"
    neox_path = args.shared / "tokenizers" / "gpt-neox-20b.tokenizer.json"
    demo = json.loads(demo_path.read_text(encoding="utf-8"))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    # Records, case labels, prompts.
    cases = demo_records(demo) + EDGE_CASES
    records = [r for _, r in cases]
    write_json(out / "records.json", records)
    write_json(out / "cases.json", [label for label, _ in cases])
    sources = [format_prompt(r) for r in records]
    write_json(out / "prompts.json", [{"prompt": s, "response": r["output"]} for s, r in zip(sources, records)])

    # Tokenizers.
    llama = build_llama_bpe(demo)
    (out / "llama-bpe").mkdir(parents=True, exist_ok=True)
    llama.save(str(out / "llama-bpe" / "tokenizer.json"), pretty=True)
    write_json(out / "llama-bpe" / "tokenizer_config.json", LLAMA_TOKENIZER_CONFIG)
    (out / "gpt-neox").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(neox_path, out / "gpt-neox" / "tokenizer.json")
    write_json(out / "gpt-neox" / "tokenizer_config.json", NEOX_TOKENIZER_CONFIG)

    # Expected Alpaca preprocess output.
    for name in ("llama-bpe", "gpt-neox"):
        for max_len in MAX_LENS:
            tokenizer, vocab_before = load_alpaca_tokenizer(out / name, max_len)
            assert tokenizer.model_max_length == max_len and tokenizer.padding_side == "right"
            targets = [f"{r['output']}{tokenizer.eos_token}" for r in records]
            data = preprocess(sources, targets, tokenizer)
            examples = [s + t for s, t in zip(sources, targets)]
            check_against_raw_tokenizers(out / name / "tokenizer.json", max_len, examples, data["input_ids"])
            check_against_raw_tokenizers(out / name / "tokenizer.json", max_len, sources, data["source_ids"])
            header = {
                "tokenizer": name,
                "max_len": max_len,
                "eos_token": tokenizer.eos_token,
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token": tokenizer.bos_token,
                "pad_token": tokenizer.pad_token,
                "pad_token_id": tokenizer.pad_token_id,
                "ignore_index": IGNORE_INDEX,
                "vocab_size_before": vocab_before,
                "vocab_size_after": len(tokenizer),
                "transformers_version": transformers.__version__,
                "tokenizers_version": tokenizers.__version__,
                "alpaca_reference": "tatsu-lab/stanford_alpaca train.py @ 761dc5bfbdeeffa89b8bff5d038781a4055f796a",
            }
            ex = [{"input_ids": i, "labels": l} for i, l in zip(data["input_ids"], data["labels"])]
            write_expected(out / f"expected-{name}-{max_len}.json", header, ex, data["source_ids"])
            n_trunc = sum(1 for i in data["input_ids"] if len(i) == max_len)
            n_masked = sum(1 for l in data["labels"] if all(x == IGNORE_INDEX for x in l))
            print(f"{name} max_len={max_len}: {len(ex)} examples, {n_trunc} truncated, {n_masked} fully masked, "
                  f"pad={tokenizer.pad_token_id} vocab {vocab_before}->{len(tokenizer)}")
    print(f"wrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
