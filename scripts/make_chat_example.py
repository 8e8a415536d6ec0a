"""Makes examples/chat/: a small chat dataset laid out as a Hub dataset directory, and a
tokenizer with a ChatML chat template, for pipelines/chat.yaml.

- data/train-00000-of-00001.parquet: 600 conversations in the `messages` layout, made from the
  tasks of examples/tiny/instructions.json (add, sort, reverse, convert): a third with a system
  turn, a third with two tasks in two user turns, the rest one task; answers checkable exactly.
- data/greetings.jsonl: 20 short greetings (a second split, mixed in by the pipeline).
- tokenizer/: examples/tiny/tokenizer with <|im_start|> and <|im_end|> added (ids 312, 313), EOS
  <|im_end|>, and ChatML's chat template. The text keeps to that tokenizer's alphabet.

Run (pyarrow for the Parquet file):
    python3 -m venv /tmp/chatfx && /tmp/chatfx/bin/pip install -r scripts/requirements-chat-fixtures.txt
    /tmp/chatfx/bin/python scripts/make_chat_example.py
"""

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "examples", "tiny")
OUT = os.path.join(ROOT, "examples", "chat")

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SYSTEM = "Answer with the result only."


def task_text(r):
    return r["instruction"] + ("\n" + r["input"] if r["input"] else "")


def main():
    rng = random.Random(0)
    with open(os.path.join(TINY, "instructions.json")) as f:
        tasks = json.load(f)
    rng.shuffle(tasks)
    tasks = iter(tasks)
    convs = []
    for i in range(600):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": SYSTEM})
        for _ in range(2 if i % 3 == 1 else 1):
            t = next(tasks)
            msgs.append({"role": "user", "content": task_text(t)})
            msgs.append({"role": "assistant", "content": t["output"]})
        convs.append({"messages": msgs})
    os.makedirs(os.path.join(OUT, "data"), exist_ok=True)
    schema = pa.schema([("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))])
    pq.write_table(pa.Table.from_pylist(convs, schema=schema),
                   os.path.join(OUT, "data", "train-00000-of-00001.parquet"))
    greetings = ["hi", "hello", "hi there", "hello there", "good morning", "hey", "good day",
                 "hi again", "hello again", "hey there"]
    with open(os.path.join(OUT, "data", "greetings.jsonl"), "w") as f:
        for i in range(20):
            g = greetings[i % len(greetings)]
            msgs = [{"role": "user", "content": g}, {"role": "assistant", "content": "hello. ask me to add, sort, reverse or convert."}]
            if i >= 10:
                msgs.insert(0, {"role": "system", "content": SYSTEM})
            f.write(json.dumps({"messages": msgs}) + "\n")
    tok_dir = os.path.join(OUT, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(TINY, "tokenizer", "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = len(tok["model"]["vocab"])
    for i, content in enumerate(["<|im_start|>", "<|im_end|>"]):
        tok["added_tokens"].append({"id": vocab + i, "content": content, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    with open(os.path.join(tok_dir, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    config = {
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
