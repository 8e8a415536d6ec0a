"""Makes tests/fixtures/chat/: tokenizers carrying real models' chat templates, transformers'
token ids and assistant masks for conversations rendered with them, and a Parquet file with
its JSON Lines twin.

The models' own tokenizer files cannot be downloaded here, so each family's files are built:
a tokenizer.json (the byte-level BPE families — Qwen2.5, SmolLM2, Llama-3 — trained small with
the `tokenizers` package, with the family's pre-tokenizer split; the SentencePiece-style ones —
Mistral, Gemma, Phi-3 — derived from tests/fixtures/tokenize/llama-bpe) with the family's
special tokens, and a tokenizer_config.json carrying the family's real `chat_template` text and
special-token names. transformers then renders and tokenizes every conversation:

- `input_ids`: `tokenizer.apply_chat_template(messages, tokenize=True)`;
- `assistant_masks` (train on every assistant turn) and `last_masks` (the last one only):
  - templates with `{% generation %}` markers: transformers' own
    `return_assistant_tokens_mask=True` (the last span alone for `last_masks`);
  - templates without: the tokens the model must write once the conversation before the
    turn is rendered with `add_generation_prompt=True` — the tokens of the whole conversation
    after the longest common prefix with `apply_chat_template(messages[:k],
    add_generation_prompt=True)` up to the longest common prefix with
    `apply_chat_template(messages[:k+1])`. That is TRL's prompt/completion split (prompt =
    the conversation so far with the generation prompt, completion = the rest) applied to
    every assistant turn, as axolotl's per-turn masking does (its `train_on_eos: turn` keeps
    the end-of-turn token, as this does);
- `generation_prompt_ids`: `apply_chat_template(messages[:-1], add_generation_prompt=True)`
  for conversations that end with an assistant turn (what `evaluate` prompts with);
- `error`: the template's own exception, where it refuses the conversation (Gemma's
  "System role not supported").

Run (Python 3.11+, no torch needed):
    python3 -m venv /tmp/chatfx
    /tmp/chatfx/bin/pip install -r scripts/requirements-chat-fixtures.txt
    /tmp/chatfx/bin/python scripts/make_chat_fixtures.py
"""

import json
import os
import shutil
import sys

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "chat")
LLAMA_BPE = os.path.join(ROOT, "tests", "fixtures", "tokenize", "llama-bpe", "tokenizer.json")

# Qwen2.5-7B-Instruct's chat template (tokenizer_config.json), verbatim.
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# SmolLM2-Instruct's ChatML template with `{% generation %}` markers around what the assistant
# writes (its text and <|im_end|>), as TRL's assistant-only training templates add them.
SMOLLM2_GENERATION = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.2's chat template, verbatim: [INST] … [/INST], the system prompt
# folded into the first user turn.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# gemma-2-2b-it's chat template, verbatim: <start_of_turn>user / model, no system role.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Phi-3-mini-4k-instruct's chat template, verbatim: <|user|> … <|end|>, EOS after the last turn.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen2's pre-tokenizer split (Llama-3's differs only in \p{N}{1,3}).
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

FAMILIES = [
    # name, template, base, special tokens (added in this order), config tokens
    ("qwen2.5", QWEN25, ("bytelevel", QWEN_SPLIT),
     ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
     {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    ("smollm2-generation", SMOLLM2_GENERATION, ("bytelevel", QWEN_SPLIT),
     ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
     {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>"}),
    ("llama3", LLAMA3, ("bytelevel", LLAMA3_SPLIT),
     ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ("mistral", MISTRAL, ("llama-bpe", None), [],
     {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    ("gemma", GEMMA, ("llama-bpe", None), ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
     {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}),
    ("phi3", PHI3, ("llama-bpe", None), ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
     {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}),
]

S, U, A = "system", "user", "assistant"


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [m(S, "You are a concise assistant."), m(U, "What is 2 + 3?"), m(A, "5")],
    [
        m(S, "Answer in the user's language. Keep it short."),
        m(U, "Bonjour ! Comment dit-on « chat » en anglais ?"),
        m(A, "On dit « cat ». 🐱"),
        m(U, "  And in Chinese?  "),
        m(A, "猫 (māo)\n\nIt is written with one character."),
        m(U, "Thanks — and Rust's mascot?"),
        m(A, "Ferris the crab 🦀."),
    ],
    [m(U, ""), m(A, "You sent an empty message. How can I help?"), m(U, "Say nothing."), m(A, "")],
    [
        m(U, "List three colours,\none per line."),
        m(A, "red\ngreen\nblue\n"),
        m(U, "Now reverse them."),
        m(A, " blue\ngreen\nred"),
    ],
    [m(S, "You are a calculator."), m(U, "12 * 12"), m(A, "144"), m(U, "and / 4?")],
    [m(U, "Write <b>bold</b> & \"quoted\" text, tab\tand backslash \\."), m(A, "<b>bold</b> & \"quoted\"\t\\")],
]


def corpus():
    text = []
    for conv in CONVERSATIONS:
        for msg in conv:
            text.append(msg["content"])
    text += [
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        "system user assistant model",
    ]
    with open(os.path.join(ROOT, "examples", "tiny", "instructions.json")) as f:
        for r in json.load(f)[:400]:
            text.append(r["instruction"] + " " + r["input"] + " " + r["output"])
    return text


def bytelevel_tokenizer(split, specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def build(name, template, base, specials, config_tokens):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    kind, split = base
    if kind == "bytelevel":
        tok = bytelevel_tokenizer(split, specials)
    else:
        tok = Tokenizer.from_file(LLAMA_BPE)
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(os.path.join(d, "tokenizer.json"))
    config = {k: v for k, v in config_tokens.items()}
    config.update({
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return d


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_masks(t, conv, ids, turns):
    """The no-marker reference masks (see the module docstring)."""
    mask = [0] * len(ids)
    full_text = t.apply_chat_template(conv, tokenize=False)
    for k in turns:
        prompt_text = t.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=True)
        assert full_text.startswith(prompt_text), (k, prompt_text, full_text)
        prompt = t.apply_chat_template(conv[:k], tokenize=True, add_generation_prompt=True)
        upto = t.apply_chat_template(conv[: k + 1], tokenize=True)
        for i in range(common_prefix(prompt, ids), common_prefix(upto, ids)):
            mask[i] = 1
    return mask


def expected(d, template):
    t = PreTrainedTokenizerFast.from_pretrained(d)
    markers = "{% generation %}" in template
    cases = []
    for i, conv in enumerate(CONVERSATIONS):
        case = {"conversation": i}
        try:
            ids = t.apply_chat_template(conv, tokenize=True)
        except jinja2.exceptions.TemplateError as e:
            case["error"] = str(e)
            cases.append(case)
            continue
        assistant = [k for k, msg in enumerate(conv) if msg["role"] == "assistant"]
        if markers:
            out = t.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            assert out["input_ids"] == ids
            masks = out["assistant_masks"]
            # The last span alone: rendered with the last assistant turn's markers only.
            last = [0] * len(ids)
            rendered, spans = transformers.utils.chat_template_utils.render_jinja_template(
                conversations=[conv], chat_template=template, return_assistant_tokens_mask=True,
                **t.special_tokens_map)
            enc = t(rendered[0], add_special_tokens=False)
            if spans[0]:
                s, e = spans[0][-1]
                a, b = enc.char_to_token(0, s), enc.char_to_token(0, e - 1)
                for j in range(a, b + 1 if b else len(ids)):
                    last[j] = 1
        else:
            masks = prefix_masks(t, conv, ids, assistant)
            last = prefix_masks(t, conv, ids, assistant[-1:])
        case.update({
            "text": t.apply_chat_template(conv, tokenize=False),
            "input_ids": ids,
            "assistant_masks": masks,
            "last_masks": last,
        })
        if conv[-1]["role"] == "assistant":
            case["generation_prompt_ids"] = t.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True)
        cases.append(case)
    return {"family": os.path.basename(d), "has_generation_markers": markers, "cases": cases}


def parquet_twins():
    """data/records.jsonl and data/records.parquet (snappy), nested columns and nulls included;
    hub/: a Hub dataset directory with two train shards (zstd) and a test shard."""
    d = os.path.join(OUT, "data")
    os.makedirs(d, exist_ok=True)
    rows = []
    for i, conv in enumerate(CONVERSATIONS):
        rows.append({
            "id": i,
            "messages": conv,
            "score": 0.5 * i,
            "ok": i % 2 == 0,
            "tags": ["a", "b"][: i % 3],
            "note": None if i % 2 else f"row {i}",
        })
    with open(os.path.join(d, "records.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    schema = pa.schema([
        ("id", pa.int64()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("score", pa.float64()),
        ("ok", pa.bool_()),
        ("tags", pa.list_(pa.string())),
        ("note", pa.string()),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), os.path.join(d, "records.parquet"))
    hub = os.path.join(OUT, "hub")
    if os.path.exists(hub):
        shutil.rmtree(hub)
    os.makedirs(os.path.join(hub, "data"))
    with open(os.path.join(hub, "README.md"), "w") as f:
        f.write("A Hub dataset directory as `hf://datasets/ORG/NAME` downloads it.\n")
    convs = [{"messages": c} for c in CONVERSATIONS]
    mschema = pa.schema([("messages", schema.field("messages").type)])
    for name, part in [("train-00000-of-00002", convs[:3]), ("train-00001-of-00002", convs[3:5]),
                       ("test-00000-of-00001", convs[5:])]:
        pq.write_table(pa.Table.from_pylist(part, schema=mschema),
                       os.path.join(hub, "data", name + ".parquet"), compression="zstd")


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, template, base, specials, config_tokens in FAMILIES:
        d = build(name, template, base, specials, config_tokens)
        with open(os.path.join(d, "expected.json"), "w") as f:
            json.dump(expected(d, template), f, ensure_ascii=False)
            f.write("\n")
    with open(os.path.join(OUT, "conversations.json"), "w") as f:
        json.dump(CONVERSATIONS, f, indent=1, ensure_ascii=False)
        f.write("\n")
    parquet_twins()
    with open(os.path.join(OUT, "VERSIONS"), "w") as f:
        f.write(f"transformers {transformers.__version__}\ntokenizers {tokenizers.__version__}\n"
                f"jinja2 {jinja2.__version__}\npyarrow {pa.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
