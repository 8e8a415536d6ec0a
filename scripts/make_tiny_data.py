#!/usr/bin/env python3
"""Generate the data of the tiny default pipeline (pipelines/tiny.yaml) under examples/tiny/.

What it writes (deterministic: fixed seed, re-running rewrites identical files):

  examples/tiny/instructions.json          3000 Alpaca records {"instruction", "input", "output"}
                                           in four task families whose answers can be checked
                                           exactly (see FAMILIES below), about 35% without input.
  examples/tiny/tokenizer/tokenizer.json   a 512-token byte-level BPE tokenizer trained here on
  examples/tiny/tokenizer/tokenizer_config.json   the formatted Alpaca prompt + output text.

Task families (750 records each; every underlying problem occurs at most once in the whole file,
so whatever the format stage holds out is a combination the model never saw):

  add      "Add the two numbers." / "17 and 25"  -> "42"   (or "What is 17 plus 25?", no input)
  sort     "Sort the words alphabetically." / "pear, cat, bus" -> "bus, cat, pear"
  convert  "Convert kilometres to metres." / "7 km" -> "7000 m"
  reverse  "Reverse the order of the words." / "pear, cat, bus" -> "bus, cat, pear"

Tokenizer: BPE (unk "<unk>"), pre-tokenizer Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)], decoder ByteLevel, no normalizer,
post-processor TemplateProcessing "<s> $A" (BOS is added, as Llama does), specials <unk>=0,
<s>=1, </s>=2, no pad token (the tokenize stage adds "[PAD]" as id 512).

The script checks, for every record, what the tokenize stage and an evaluator rely on: the
prompt's ids are a prefix of the ids of prompt + output + "</s>" (so the label mask falls
exactly on the output), the rest is the output's ids then the EOS id, decoding those output ids
gives the output exactly, decoding the prompt gives the prompt exactly, no <unk> anywhere, and
the longest example is under 128 tokens. It fails if any check fails.

Run from the repository root:

  pip install tokenizers==0.22.2
  python scripts/make_tiny_data.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
from pathlib import Path

SEED = 20240607
PER_FAMILY = 750
NO_INPUT_FRACTION = 0.35
VOCAB_SIZE = 512
MAX_EXAMPLE_TOKENS = 128  # every prompt + output + EOS (with BOS) must be shorter than this

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), verbatim; the same strings
# as crates/pipe-data/src/prompt.rs. Note: "### Response:" has no trailing newline, and Alpaca
# appends the output right after it.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# 25 short words with distinct first letters (no x): sorting compares first letters only.
WORDS = [
    "ant", "bus", "cat", "dog", "egg", "fox", "gum", "hat", "ink", "jar", "kite", "lamp", "map",
    "net", "owl", "pear", "quiz", "rat", "sun", "toy", "urn", "van", "wig", "yak", "zoo",
]

# (from name, to name, from symbol, to symbol, factor); every factor is a power of ten, so the
# answer is the number followed by zeros.
CONVERSIONS = [
    ("kilometres", "metres", "km", "m", 1000),
    ("metres", "centimetres", "m", "cm", 100),
    ("centimetres", "millimetres", "cm", "mm", 10),
    ("kilograms", "grams", "kg", "g", 1000),
    ("tonnes", "kilograms", "t", "kg", 1000),
    ("litres", "millilitres", "L", "mL", 1000),
    ("dollars", "cents", "dollars", "cents", 100),
    ("metres", "millimetres", "m", "mm", 1000),
]


def problems_add(rng: random.Random) -> list[tuple]:
    all_ = [(a, b) for a in range(50) for b in range(50)]
    return rng.sample(all_, PER_FAMILY)


def problems_triples(rng: random.Random) -> list[tuple]:
    seen: set[tuple] = set()
    out = []
    while len(out) < PER_FAMILY:
        t = tuple(rng.sample(WORDS, 3))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def problems_convert(rng: random.Random) -> list[tuple]:
    all_ = [(c, n) for c in range(len(CONVERSIONS)) for n in range(1, 100)]
    return rng.sample(all_, PER_FAMILY)


def record_add(p, with_input):
    a, b = p
    if with_input:
        return ("Add the two numbers.", f"{a} and {b}", str(a + b))
    return (f"What is {a} plus {b}?", "", str(a + b))


def record_sort(p, with_input):
    words = ", ".join(p)
    answer = ", ".join(sorted(p))
    if with_input:
        return ("Sort the words alphabetically.", words, answer)
    return (f"Sort these words alphabetically: {words}", "", answer)


def record_convert(p, with_input):
    c, n = p
    src, dst, s_sym, d_sym, factor = CONVERSIONS[c]
    answer = f"{n * factor} {d_sym}"
    if with_input:
        return (f"Convert {src} to {dst}.", f"{n} {s_sym}", answer)
    return (f"Convert {n} {s_sym} to {dst}.", "", answer)


def record_reverse(p, with_input):
    words = ", ".join(p)
    answer = ", ".join(reversed(p))
    if with_input:
        return ("Reverse the order of the words.", words, answer)
    return (f"Reverse the order of these words: {words}", "", answer)


FAMILIES = [
    ("add", problems_add, record_add),
    ("sort", problems_triples, record_sort),
    ("convert", problems_convert, record_convert),
    ("reverse", problems_triples, record_reverse),
]


def make_records() -> tuple[list[dict], list[str]]:
    rng = random.Random(SEED)
    records, families = [], []
    n_no_input = round(PER_FAMILY * NO_INPUT_FRACTION)
    for name, problems, make in FAMILIES:
        ps = problems(rng)
        no_input = set(rng.sample(range(PER_FAMILY), n_no_input))
        for i, p in enumerate(ps):
            instruction, inp, output = make(p, i not in no_input)
            records.append({"instruction": instruction, "input": inp, "output": output})
            families.append(name)
    order = list(range(len(records)))
    rng.shuffle(order)
    records = [records[i] for i in order]
    families = [families[i] for i in order]
    keys = [(r["instruction"], r["input"]) for r in records]
    if len(set(keys)) != len(keys):
        sys.exit("duplicate (instruction, input) pairs")
    return records, families


def prompt_of(r: dict) -> str:
    if r.get("input", "") != "":
        return PROMPT_INPUT.format_map(r)
    return PROMPT_NO_INPUT.format_map(r)


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s>:1 $B:1",
        special_tokens=[("<s>", bos)],
    )
    return tok


def check(tok, records: list[dict]) -> list[tuple[int, int]]:
    """Fails on any record the pipeline would mishandle; returns (prompt, output) token counts."""
    unk, eos = tok.token_to_id("<unk>"), tok.token_to_id("</s>")
    assert (unk, tok.token_to_id("<s>"), eos) == (0, 1, 2), "special token ids"
    lengths, errors = [], []
    for i, r in enumerate(records):
        prompt = prompt_of(r)
        p_ids = tok.encode(prompt).ids  # with BOS, as the tokenize stage encodes the source
        f_ids = tok.encode(prompt + r["output"] + "</s>").ids
        out_ids = f_ids[len(p_ids):-1]
        problems = []
        if f_ids[: len(p_ids)] != p_ids:
            problems.append("prompt ids are not a prefix of the example's ids")
        if f_ids[-1] != eos:
            problems.append("example does not end in EOS")
        if unk in f_ids:
            problems.append("<unk> in the example")
        if tok.decode(out_ids) != r["output"]:
            problems.append(f"output decodes to {tok.decode(out_ids)!r}")
        if tok.decode(p_ids) != prompt:
            problems.append("prompt does not decode to itself")
        if len(f_ids) >= MAX_EXAMPLE_TOKENS:
            problems.append(f"{len(f_ids)} tokens")
        if problems:
            errors.append(f"record {i} {r}: " + "; ".join(problems))
        lengths.append((len(p_ids), len(out_ids)))
    if errors:
        sys.exit("tokenizer check failed:\n" + "\n".join(errors[:20]))
    return lengths


def describe(xs: list[int]) -> str:
    return f"min {min(xs)}, mean {statistics.mean(xs):.1f}, max {max(xs)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="examples/tiny", help="output directory")
    args = ap.parse_args()
    out = Path(args.out)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)

    records, families = make_records()
    texts = [prompt_of(r) + r["output"] for r in records]
    tok = train_tokenizer(texts)

    (out / "instructions.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    tok.save(str(tok_dir / "tokenizer.json"), pretty=True)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Check the tokenizer as written (a reload proves the file is self-contained).
    from tokenizers import Tokenizer, __version__

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    lengths = check(tok, records)

    print(f"tokenizers {__version__}, seed {SEED}")
    print(f"records: {len(records)}")
    for name, *_ in FAMILIES:
        idx = [i for i, f in enumerate(families) if f == name]
        no_in = sum(1 for i in idx if records[i]["input"] == "")
        pl = [lengths[i][0] for i in idx]
        ol = [lengths[i][1] for i in idx]
        print(
            f"  {name:8s} {len(idx)} records ({len(idx) - no_in} with input, {no_in} without); "
            f"prompt tokens {describe(pl)}; output tokens {describe(ol)}"
        )
    no_in = sum(1 for r in records if r["input"] == "")
    print(
        f"with input: {len(records) - no_in}, without: {no_in} "
        f"({100 * no_in / len(records):.1f}% without)"
    )
    pl = [p for p, _ in lengths]
    ol = [o for _, o in lengths]
    full = [p + o + 1 for p, o in lengths]
    print(f"prompt tokens (incl. BOS): {describe(pl)}")
    print(f"output tokens (excl. EOS): {describe(ol)}")
    print(f"example tokens (BOS + prompt + output + EOS): {describe(full)}")
    print(f"label tokens per example (output + EOS): {describe([o + 1 for o in ol])}")
    print(f"vocab size: {tok.get_vocab_size(with_added_tokens=True)} (+1 [PAD] added by tokenize)")
    for name, *_ in FAMILIES:
        i = families.index(name)
        print(f"  e.g. {name}: {json.dumps(records[i])}")
        print(f"       tokens of output: {tok.encode(prompt_of(records[i]) + records[i]['output']).tokens[lengths[i][0]:]}")
    for p in [out / "instructions.json", tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"]:
        print(f"sha256 {hashlib.sha256(p.read_bytes()).hexdigest()[:16]}  {p}")


if __name__ == "__main__":
    main()
