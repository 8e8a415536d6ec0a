#!/usr/bin/env python3
"""Generate the GGUF reference fixtures under tests/fixtures/gguf/ with llama.cpp's own converter.

pipe's `export` with `format: gguf` must write what llama.cpp's convert_hf_to_gguf.py writes for
the same Hugging Face model directory: the same tensors (names, GGML types, shapes, bytes — Q/K
rows permuted for GGML's rope, Q8_0 blocks bit for bit) and the same `llama.*` and `tokenizer.*`
metadata (vocabulary, token types, merges, special ids, add-BOS/EOS flags, chat template). The
Rust test (tests/export_gguf.rs) exports these models and compares its files with expected.json;
no Python at test time.

What it writes (under tests/fixtures/gguf/):

  llama-untied/   config.json, model.safetensors (f32), tokenizer.json + tokenizer_config.json:
                  LlamaForCausalLM, vocab 312 (the tokenizer of examples/tiny/tokenizer, a
                  byte-level BPE with SmolLM2's pre-tokenizer: single digits, then GPT-2's
                  byte-level split), hidden 64, intermediate 128, 2 layers, 4 heads, 2 kv heads,
                  rope_theta 1e4, untied lm_head; tokenizer_config.json adds a ChatML chat template.
  llama-tied/     vocab 320 (8 ids past the tokenizer's: llama.cpp names them [PAD312]..), hidden
                  96, intermediate 176 (not a multiple of 32: llama.cpp keeps ffn_down in f16
                  under q8_0), 2 layers, 3 heads, 1 kv head, rope_theta 1e5, tie_word_embeddings
                  (no lm_head in the file), add_bos_token false.
  llama-rope-llama3/  like llama-untied with Llama 3.2's rotary scaling (rope_type llama3, factor 32,
                  low 1, high 4, original context 64 — so that some frequencies fall in the
                  smoothed band), rope_theta 5e5 and tied embeddings: the converter adds a
                  rope_freqs tensor.
  llama-rope-linear/  like llama-untied with linear rope scaling (factor 2) and 1 kv head (MQA).
  llama-spm/      a Llama 2-style vocabulary: a SentencePiece BPE model (tokenizer.model, 400
                  pieces, byte fallback, split digits) trained here on examples/tiny's texts,
                  its transformers conversion (tokenizer.json: byte-fallback BPE) with a [PAD]
                  added as Stanford Alpaca adds one (id 400; added_tokens.json), vocab 401,
                  hidden 64, intermediate 128, 2 layers, 4 heads, 4 kv heads (MHA, as Llama 2
                  7B), untied. llama.cpp's converter reads tokenizer.model for the pieces,
                  their scores and types (tokenizer.ggml.model "llama").
  <each>/expected.json
      {"converter": version, "f16": {...}, "q8_0": {...}, "bf16": {...}, "f32": {...}}, each
      what tests/tools/gguf_describe.py reads of the converter's file: "metadata" (every
      key/value but general.* naming: general.name, basename, size_label, ...), "tensors"
      ([{name, type, shape (GGML order), sha256 of the bytes}] in file order), "alignment".

llama.cpp recognises a byte-level BPE pre-tokenizer by hashing the ids a known text encodes to,
which depends on the vocabulary; these tiny vocabularies are not in its table, so this script
tells the converter the name it would pick for SmolLM2, whose pre-tokenizer they share ("smollm").

Usage (the converter and its gguf-py from a llama.cpp source tree, e.g. the one vendored in
PyPI's llama-cpp-python sdist — pip download --no-binary :all: --no-deps llama-cpp-python):
    python scripts/make_gguf_fixtures.py /path/to/llama.cpp
with scripts/requirements-llama-fixtures.txt installed (torch, transformers, safetensors).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "tools"))
from gguf_describe import describe  # noqa: E402  (shared with the test and bench/gguf.sh)
OUT = ROOT / "tests" / "fixtures" / "gguf"
TOKENIZER = ROOT / "examples" / "tiny" / "tokenizer"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERT = r"""
import sys
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
sys.path.insert(0, LLAMA_CPP)
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"
convert_hf_to_gguf.main()
"""


def spm_tokenizer(out):
    """Trains a small SentencePiece BPE model as Llama 2's was configured and saves it with
    transformers' conversion, a [PAD] added (Stanford Alpaca's smart_tokenizer_and_embedding_resize)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    records = json.loads((ROOT / "examples" / "tiny" / "instructions.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in records))
        # Relative names: the model file records its training input's path.
        cwd = os.getcwd()
        os.chdir(tmp)
        spm.SentencePieceTrainer.train(
            input="corpus.txt", model_prefix="sp", vocab_size=400, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, add_dummy_prefix=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        )
        os.chdir(cwd)
        tok = LlamaTokenizerFast(vocab_file=f"{tmp}/sp.model", legacy=True, from_slow=True, add_prefix_space=True)
        tok.add_special_tokens({"pad_token": "[PAD]"})
        tok.save_pretrained(out)
    # As Llama 2's tokenizer_config.json: no add_prefix_space (the conversion needed it).
    tc = json.loads((out / "tokenizer_config.json").read_text())
    tc.pop("add_prefix_space", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    (out / "special_tokens_map.json").unlink()


def make_model(name, cfg, seed, tokenizer_config):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(d)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_config is None:
        spm_tokenizer(d)
        return d
    shutil.copy(TOKENIZER / "tokenizer.json", d / "tokenizer.json")
    tc = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    tc.update(tokenizer_config)
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    return d


def convert(llama_cpp, model_dir, outtype):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"model-{outtype}.gguf"
        code = CONVERT.replace("LLAMA_CPP", repr(str(llama_cpp)))
        subprocess.run(
            [sys.executable, "-c", code, str(model_dir), "--outtype", outtype, "--outfile", str(out)],
            check=True,
            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        return describe(out)


def main():
    llama_cpp = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    import gguf

    version = gguf.__version__ if hasattr(gguf, "__version__") else None
    info = (llama_cpp.parent.parent / "PKG-INFO")
    if info.exists():
        version = next(
            (l.split(":", 1)[1].strip() for l in info.read_text().splitlines() if l.startswith("Version:")),
            version,
        )
    common = dict(bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
    models = [
        (
            "llama-untied",
            dict(common, vocab_size=312, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=10000.0, tie_word_embeddings=False),
            1,
            {"chat_template": CHATML},
        ),
        (
            "llama-tied",
            dict(common, vocab_size=320, hidden_size=96, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
                 rope_theta=100000.0, tie_word_embeddings=True),
            2,
            {"add_bos_token": False},
        ),
        (
            "llama-rope-llama3",
            dict(common, vocab_size=312, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=500000.0, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            4,
            {},
        ),
        (
            "llama-rope-linear",
            dict(common, vocab_size=312, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                 rope_theta=10000.0, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
            5,
            {},
        ),
        (
            "llama-spm",
            dict(common, vocab_size=401, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                 rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=400),
            3,
            None,
        ),
    ]
    for name, cfg, seed, tc in models:
        d = make_model(name, cfg, seed, tc)
        expected = {"converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {version})"}
        for outtype in ["f16", "q8_0", "bf16", "f32"]:
            expected[outtype] = convert(llama_cpp, d, outtype)
        (d / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {d}")


if __name__ == "__main__":
    main()
