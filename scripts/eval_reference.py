#!/usr/bin/env python3
"""Reference multiple-choice log-likelihood scorer in the style of EleutherAI's
lm-evaluation-harness (hf model, causal backend, `output_type: multiple_choice`).

It is the Python side that pipe's eval stage is checked against: same prompts, same requests,
same tokenisation rule, same scoring and the same acc / acc_norm / stderr aggregation. Written
from a reading of the harness at commit 4e7e0d47f33bc71070c1d38394bafbb52b117163 (v0.4.12-48):
lm_eval/tasks/{arc,hellaswag,piqa,mmlu/default,winogrande,openbookqa,super_glue/boolq}/,
lm_eval/api/task.py (fewshot_context, build_qa_turn, construct_requests, process_results),
lm_eval/api/model.py (loglikelihood, _encode_pair), lm_eval/models/huggingface.py
(prefix_token_id, tok_encode, _loglikelihood_tokens), lm_eval/api/metrics.py (mean_stderr).
No harness code is copied or imported.

Usage:

  python scripts/eval_reference.py --model DIR --format arc --data FILE.jsonl [--limit N] \
      [--num-fewshot K --fewshot-file SHOTS.jsonl] [--add-bos] [--batch-size B] --out OUT.json

Rules (per format, `doc -> (query, choices, gold)`; see FORMATS below for the exact text):

  * Requests. Single-input tasks: one request per choice, (context, " " + choice). Multiple-input
    tasks (winogrande): one request per choice, (context_i, " " + target), i.e. several contexts
    and a single continuation. target_delimiter is " ", fewshot_delimiter is "\\n\\n".
  * Context = description + shots + query. A shot is  query + " " + gold_answer + "\\n\\n"  (for
    winogrande: contexts[gold] + " " + target + "\\n\\n"). Shots are the first K rows of
    --fewshot-file in file order (the harness's `first_n` sampler; ARC etc. draw randomly in the
    harness). The eval doc is never removed from the shot pool (the pool is a separate file).
    MMLU's description line precedes the shots.
  * Tokenisation (harness `_encode_pair`, causal): trailing whitespace of the context moves to the
    front of the continuation; context_tokens = encode(context); continuation_tokens =
    encode(context + continuation)[len(context_tokens):]. Empty context: continuation_tokens =
    encode(continuation); context_tokens = [prefix] with prefix = bos id if the tokenizer has one,
    else eos id - unless continuation_tokens[0] already equals prefix, in which case that first
    token becomes the context. encode() adds no special tokens by default (the harness's causal
    behaviour before v0.4.9.2; later versions defer to the tokenizer's own default); --add-bos
    prepends the BOS id to every encode() of a string that does not already start with the BOS
    text (harness add_bos_token=True).
  * Score: input = (context_tokens + continuation_tokens)[-(max_len+1):][:-1] (max_len =
    config.max_position_embeddings); log-likelihood = sum over continuation tokens of
    log_softmax(logits) (float32) at the positions that predict them; is_greedy = every
    continuation token is the argmax. Batches are right-padded and run without an attention mask
    (causal: padding after a sequence cannot affect its positions).
  * Metrics: pred = argmax(lls) (first index on ties); acc = pred == gold; acc_norm uses
    argmax(ll_i / len(choice_i)) with len = number of Python characters (code points) of the
    choice text from doc_to_choice, WITHOUT the leading delimiter. Winogrande: acc_norm is null
    (the harness does not report it). stderr = sample std (ddof=1) / sqrt(n) (null if n < 2).
    The harness reports only acc for mmlu and boolq; acc_norm is still computed here.

Output JSON: summary keys (format, n, acc, acc_stderr, acc_norm, acc_norm_stderr, items_per_s,
seconds = wall time of the scoring loop only, ...) and per item: index, context / continuation
(one per choice: the request strings as the task builds them, i.e. BEFORE the trailing-whitespace
move), choices, gold, loglikelihoods, is_greedy, pred, pred_norm, context_tokens /
continuation_tokens (AFTER the move: exactly what is scored).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HARNESS_COMMIT = "4e7e0d47f33bc71070c1d38394bafbb52b117163"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


# ---------------------------------------------------------------------------------------------
# documents


@dataclass
class Doc:
    """One evaluation document after the task's formatting.

    query:    the doc_to_text string (single-input tasks), or None.
    contexts: one context per choice (multiple-input tasks: winogrande), or None.
    choices:  the doc_to_choice strings (acc_norm divides by their character lengths).
    gold:     index of the right choice.
    target:   the shared continuation text of multiple-input tasks, else None.
    description: text put before the shots and the query (MMLU), "" otherwise.
    """

    choices: list[str]
    gold: int
    query: str | None = None
    contexts: list[str] | None = None
    target: str | None = None
    description: str = ""

    @property
    def multiple_input(self) -> bool:
        return self.contexts is not None

    def shot_text(self) -> str:
        """This doc as a solved few-shot example: question, target delimiter, answer, fewshot
        delimiter."""
        if self.multiple_input:
            return self.contexts[self.gold] + TARGET_DELIMITER + self.target + FEWSHOT_DELIMITER
        return self.query + TARGET_DELIMITER + self.choices[self.gold] + FEWSHOT_DELIMITER


def _index_of(labels: list[str], key: str, what: str) -> int:
    try:
        return labels.index(key)
    except ValueError:
        raise ValueError(f"{what}: answer key {key!r} is not one of the labels {labels!r}") from None


def arc_doc(row: dict) -> Doc:
    # doc_to_text "Question: {{question}}\nAnswer:", doc_to_choice "{{choices.text}}",
    # doc_to_target "{{choices.label.index(answerKey)}}" (labels may be A-E or 1-5).
    return Doc(
        query=f"Question: {row['question']}\nAnswer:",
        choices=list(row["choices"]["text"]),
        gold=_index_of(list(row["choices"]["label"]), row["answerKey"], "arc"),
    )


def hellaswag_clean(text: str) -> str:
    """HellaSwag's text clean-up (WikiHow bracket artefacts): strip surrounding whitespace; every
    " [title]" becomes ". "; every [...] group without a newline or ']' inside is removed (shortest
    match, left to right); then ONE left-to-right pass turning each "  " into " " (so 3 spaces
    become 2, 4 become 2)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[[^\]\n]*\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> Doc:
    # process_docs: query = clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
    # choices = [clean(e) for e in endings], gold = int(label). Python's str.capitalize(): first
    # character to title case, ALL others to lower case ("the USA" -> "The usa").
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Doc(
        query=hellaswag_clean(row["activity_label"] + ": " + ctx),
        choices=[hellaswag_clean(e) for e in row["endings"]],
        gold=int(row["label"]),
    )


def piqa_doc(row: dict) -> Doc:
    # doc_to_text "Question: {{goal}}\nAnswer:", doc_to_choice "{{[sol1, sol2]}}", target label.
    return Doc(
        query=f"Question: {row['goal']}\nAnswer:",
        choices=[row["sol1"], row["sol2"]],
        gold=int(row["label"]),
    )


def mmlu_doc(row: dict) -> Doc:
    # description "The following are multiple choice questions (with answers) about
    # {subject with '_' -> ' '}.\n\n"; doc_to_text "{{question.strip()}}\nA. {{choices[0]}}\nB.
    # {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"; doc_to_choice
    # ["A", "B", "C", "D"]; doc_to_target answer (int).
    ch = row["choices"]
    if len(ch) < 4:
        raise ValueError(f"mmlu: need 4 choices, got {len(ch)}")
    subject = " ".join(row["subject"].split("_"))
    return Doc(
        description=f"The following are multiple choice questions (with answers) about {subject}.\n\n",
        query=(
            f"{row['question'].strip()}\nA. {ch[0]}\nB. {ch[1]}\nC. {ch[2]}\nD. {ch[3]}\nAnswer:"
        ),
        choices=["A", "B", "C", "D"],
        gold=int(row["answer"]),
    )


def winogrande_doc(row: dict) -> Doc:
    # Partial scoring. i = sentence.index("_"); contexts = [sentence[:i] + option1,
    # sentence[:i] + option2]; target = sentence[i+1:].strip(); gold = {"1": 0, "2": 1}[answer].
    sentence = row["sentence"]
    i = sentence.index("_")
    contexts = [sentence[:i] + row["option1"], sentence[:i] + row["option2"]]
    return Doc(
        contexts=contexts,
        choices=contexts,
        target=sentence[i + 1 :].strip(),
        gold={"1": 0, "2": 1}[str(row["answer"])],
    )


def openbookqa_doc(row: dict) -> Doc:
    # doc_to_text question_stem (the raw field), doc_to_choice "{{choices.text}}",
    # doc_to_target "{{choices.label.index(answerKey.lstrip())}}" (leading whitespace only).
    return Doc(
        query=row["question_stem"],
        choices=list(row["choices"]["text"]),
        gold=_index_of(list(row["choices"]["label"]), row["answerKey"].lstrip(), "openbookqa"),
    )


def boolq_doc(row: dict) -> Doc:
    # super_glue/boolq: doc_to_text "{{passage}}\nQuestion: {{question}}?\nAnswer:",
    # doc_to_choice ["no", "yes"], doc_to_target label. google/boolq rows have answer (bool).
    if "label" in row:
        gold = int(row["label"])
    elif isinstance(row.get("answer"), bool):
        gold = int(row["answer"])
    else:
        raise ValueError("boolq: row needs label (0/1) or answer (true/false)")
    return Doc(
        query=f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        choices=["no", "yes"],
        gold=gold,
    )


def generic_doc(row: dict) -> Doc:
    # {"context": str, "choices": [str], "answer": int | one of the choice strings}.
    choices = list(row["choices"])
    ans = row["answer"]
    if isinstance(ans, bool):
        raise ValueError("generic: answer must be an index or a choice string")
    gold = ans if isinstance(ans, int) else _index_of(choices, ans, "generic")
    if not 0 <= gold < len(choices):
        raise ValueError(f"generic: answer index {gold} out of range")
    return Doc(query=row["context"], choices=choices, gold=gold)


FORMATS: dict[str, Callable[[dict], Doc]] = {
    "arc": arc_doc,
    "hellaswag": hellaswag_doc,
    "piqa": piqa_doc,
    "mmlu": mmlu_doc,
    "winogrande": winogrande_doc,
    "openbookqa": openbookqa_doc,
    "boolq": boolq_doc,
    "generic": generic_doc,
}

# What the harness's task yaml reports (metric_list).
HARNESS_METRICS = {
    "arc": ["acc", "acc_norm"],
    "hellaswag": ["acc", "acc_norm"],
    "piqa": ["acc", "acc_norm"],
    "mmlu": ["acc"],
    "winogrande": ["acc"],
    "openbookqa": ["acc", "acc_norm"],
    "boolq": ["acc"],
    "generic": ["acc", "acc_norm"],
}


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def build_requests(doc: Doc, shots: list[Doc]) -> list[tuple[str, str]]:
    """(context, continuation) per choice, as the harness's construct_requests builds them."""
    prefix = doc.description + "".join(s.shot_text() for s in shots)
    if doc.multiple_input:
        return [(prefix + c, TARGET_DELIMITER + doc.target) for c in doc.contexts]
    return [(prefix + doc.query, TARGET_DELIMITER + c) for c in doc.choices]


# ---------------------------------------------------------------------------------------------
# tokenisation


class Encoder:
    """The harness's request tokenisation for a causal model."""

    def __init__(self, model_dir: str | Path, add_bos: bool = False):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
        self.add_bos = add_bos
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.prefix_id = self.bos_id if self.bos_id is not None else self.eos_id
        if add_bos and self.bos_id is None:
            raise ValueError("--add-bos: the tokenizer has no BOS token")
        self.bos_text = self.tok.decode([self.prefix_id]) if self.prefix_id is not None else None
        # Cross-check against the plain `tokenizers` library on the same tokenizer.json (what
        # pipe's Rust side uses); any disagreement is counted and reported.
        self.raw = None
        tj = Path(model_dir) / "tokenizer.json"
        if tj.exists():
            from tokenizers import Tokenizer

            self.raw = Tokenizer.from_file(str(tj))
        self.mismatches = 0

    def _plain(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        if self.raw is not None and self.raw.encode(text, add_special_tokens=False).ids != ids:
            self.mismatches += 1
        return ids

    def encode(self, text: str) -> list[int]:
        ids = self._plain(text)
        if self.add_bos and not (self.bos_text and text.startswith(self.bos_text)):
            ids = [self.bos_id] + ids
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self._plain(continuation)
            if not cont:
                raise ValueError("empty continuation")
            if cont[0] != self.prefix_id:
                return [self.prefix_id], cont
            return cont[:1], cont[1:]
        stripped = context.rstrip()
        n_ws = len(context) - len(stripped)
        if n_ws:
            continuation = context[len(stripped) :] + continuation
            context = stripped
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]


# ---------------------------------------------------------------------------------------------
# scoring


def load_model(model_dir: str | Path, device: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to(device).eval()


def max_length_of(model) -> int:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(model.config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def score_requests(
    model, reqs: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) for each (context_tokens, continuation_tokens). Longest first,
    right-padded batches, no attention mask (causal model: padding after a row's last token
    cannot change that row's earlier logits)."""
    import torch
    import torch.nn.functional as F

    max_len = max_length_of(model)
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(reqs)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            inps = []
            for i in idx:
                ctx, cont = reqs[i]
                if not ctx or not cont:
                    raise ValueError("empty context or continuation tokens")
                if len(cont) > max_len:
                    raise ValueError("continuation longer than the model's max length")
                inps.append((ctx + cont)[-(max_len + 1) :][:-1])
            width = max(len(x) for x in inps)
            batch = torch.zeros((len(inps), width), dtype=torch.long)
            for r, x in enumerate(inps):
                batch[r, : len(x)] = torch.tensor(x, dtype=torch.long)
            logp = F.log_softmax(model(input_ids=batch.to(model.device)).logits.float(), dim=-1)
            for r, i in enumerate(idx):
                cont = reqs[i][1]
                n = len(inps[r])
                rows = logp[r, n - len(cont) : n]  # position t predicts token t+1
                target = torch.tensor(cont, dtype=torch.long, device=logp.device)
                ll = rows.gather(1, target[:, None]).sum()
                greedy = bool((rows.argmax(dim=-1) == target).all())
                out[i] = (float(ll), greedy)
    return out  # type: ignore[return-value]


def argmax_first(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mean_and_stderr(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, None
    var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
    return mu, math.sqrt(var) / math.sqrt(len(xs))


@dataclass
class EvalResult:
    summary: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.summary, "items": self.items}


def evaluate(
    model,
    enc: Encoder,
    fmt: str,
    rows: list[dict],
    shot_rows: list[dict] | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
) -> EvalResult:
    make = FORMATS[fmt]
    docs = [make(r) for r in rows]
    shots: list[Doc] = []
    if num_fewshot > 0:
        if shot_rows is None or len(shot_rows) < num_fewshot:
            raise ValueError(f"--num-fewshot {num_fewshot} needs that many rows in --fewshot-file")
        shots = [make(r) for r in shot_rows[:num_fewshot]]

    per_doc = [build_requests(d, shots) for d in docs]
    toks = [[enc.encode_pair(c, x) for c, x in reqs] for reqs in per_doc]
    flat = [t for doc_toks in toks for t in doc_toks]

    t0 = time.perf_counter()
    scored = score_requests(model, flat, batch_size=batch_size)
    seconds = time.perf_counter() - t0

    items, accs, norms = [], [], []
    k = 0
    for i, (doc, reqs, doc_toks) in enumerate(zip(docs, per_doc, toks)):
        res = scored[k : k + len(reqs)]
        k += len(reqs)
        lls = [ll for ll, _ in res]
        pred = argmax_first(lls)
        accs.append(1.0 if pred == doc.gold else 0.0)
        item = {
            "index": i,
            "context": [c for c, _ in reqs],
            "continuation": [x for _, x in reqs],
            "choices": doc.choices,
            "gold": doc.gold,
            "loglikelihoods": lls,
            "is_greedy": [g for _, g in res],
            "pred": pred,
            "context_tokens": [c for c, _ in doc_toks],
            "continuation_tokens": [x for _, x in doc_toks],
        }
        if fmt != "winogrande":
            pred_norm = argmax_first([ll / len(c) for ll, c in zip(lls, doc.choices)])
            norms.append(1.0 if pred_norm == doc.gold else 0.0)
            item["pred_norm"] = pred_norm
        else:
            item["pred_norm"] = None
        items.append(item)

    import tokenizers
    import torch
    import transformers

    acc, acc_se = mean_and_stderr(accs)
    acc_norm, acc_norm_se = mean_and_stderr(norms) if fmt != "winogrande" else (None, None)
    summary = {
        "format": fmt,
        "n": len(docs),
        "acc": acc,
        "acc_stderr": acc_se,
        "acc_norm": acc_norm,
        "acc_norm_stderr": acc_norm_se,
        "items_per_s": len(docs) / seconds if seconds > 0 else None,
        "seconds": seconds,
        "requests": len(flat),
        "num_fewshot": num_fewshot,
        "add_bos": enc.add_bos,
        "prefix_token_id": enc.prefix_id,
        "max_length": max_length_of(model),
        "harness_metrics": HARNESS_METRICS[fmt],
        "tokenizer_mismatches": enc.mismatches,
        "harness_commit": HARNESS_COMMIT,
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    return EvalResult(summary=summary, items=items)


def write_result(path: str | Path, result: EvalResult) -> None:
    """Summary keys one per line, then one item per line: small, diffable, exact floats."""
    obj = result.to_json()
    lines = []
    for key, value in obj.items():
        if key == "items":
            body = ",\n".join("    " + json.dumps(it, ensure_ascii=False, separators=(",", ":")) for it in value)
            lines.append(f'  "items": [\n{body}\n  ]' if value else '  "items": []')
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--format", required=True, choices=sorted(FORMATS))
    ap.add_argument("--data", required=True, help="JSONL file of rows in the HF dataset schema")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--fewshot-file", default=None, help="JSONL; its first K rows are the shots")
    ap.add_argument("--add-bos", action="store_true", help="prepend BOS to every encoding")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="torch device, e.g. cuda (bench/gpu.sh)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_jsonl(args.data)
    if args.limit is not None:
        rows = rows[: args.limit]
    shot_rows = read_jsonl(args.fewshot_file) if args.fewshot_file else None
    if args.num_fewshot > 0 and shot_rows is None:
        ap.error("--num-fewshot needs --fewshot-file")

    model = load_model(args.model, args.device)
    enc = Encoder(args.model, add_bos=args.add_bos)
    result = evaluate(
        model, enc, args.format, rows, shot_rows, args.num_fewshot, batch_size=args.batch_size
    )
    write_result(args.out, result)
    s = result.summary
    fmt = lambda v: "null" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"{s['format']}: n={s['n']} acc={fmt(s['acc'])} (+-{fmt(s['acc_stderr'])}) "
        f"acc_norm={fmt(s['acc_norm'])} (+-{fmt(s['acc_norm_stderr'])}) "
        f"{s['items_per_s']:.2f} items/s ({s['seconds']:.1f} s scoring)"
        + (f" TOKENIZER MISMATCHES: {s['tokenizer_mismatches']}" if s["tokenizer_mismatches"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
