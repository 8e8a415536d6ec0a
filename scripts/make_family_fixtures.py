#!/usr/bin/env python3
"""Generate the multi-family reference fixtures under tests/fixtures/families/.

Companion of scripts/make_llama_fixtures.py (whose helpers it imports): tiny random checkpoints of the model
families pipe-model reimplements, with Hugging Face transformers' outputs for them, so that the Rust tests can
check the burn implementation (forward, loss, greedy generation with and without a KV cache, PEFT LoRA,
training steps) without Python at test time.

Every model is run with attn_implementation="eager" (plain matmul/softmax attention, the reference path that
applies sliding windows and soft-capping through the mask and in the attention function), float32, CPU, one
thread, torch.use_deterministic_algorithms(True), fixed seeds. Weights are drawn with a large std so that
mistakes show: Linear/Embedding weights and biases ~ N(0, 0.1^2); RMSNorm weights ~ 1 + 0.1 N(0, 1) for the
standard RMSNorm, and ~ 0.5 N(0, 1) for Gemma's RMSNorm (which multiplies by 1 + weight), q_norm/k_norm included.

Cases (tests/fixtures/families/<case>/), all vocab 101, inputs of length 12 (make_inputs):

  qwen2          Qwen2ForCausalLM: hidden 64, 4 heads / 2 kv heads (GQA, head_dim 16), q/k/v biases (random),
                 untied, 3 layers, use_sliding_window true, sliding_window 5, max_window_layers 1
                 => layer_types [full, sliding, sliding].
  qwen2-tied     Qwen2ForCausalLM (Qwen2.5-0.5B style): tie_word_embeddings, no sliding window, hidden 48,
                 4 heads / 2 kv (head_dim 12), rope_theta 1e6.
  qwen3          Qwen3ForCausalLM: q_norm/k_norm, hidden 48 with 4 heads of head_dim 16 (q_proj 48 -> 64),
                 2 kv heads, no biases, untied.
  mistral        MistralForCausalLM: sliding_window 5 on every layer, 4 heads / 2 kv, untied.
  gemma2         Gemma2ForCausalLM: hidden 48, head_dim 16, 4 heads / 2 kv, query_pre_attn_scalar 24,
                 attn_logit_softcapping 2.0 and final_logit_softcapping 3.0, small enough to bite (expected.json
                 softcap_stats: scores/logits before capping reach 2.2 / 3.6), sliding_window 5,
                 4 layers (sliding, full, sliding, full), tied, gelu_pytorch_tanh, sqrt(hidden) normalizer.
  gemma3         Gemma3ForCausalLM (gemma3_text): hidden 48, head_dim 16, 4 heads / 2 kv, q/k norms,
                 query_pre_attn_scalar 24, 4 layers with sliding_window_pattern 3 (sliding, sliding, full,
                 sliding), sliding_window 5, rope_theta 1e6 with linear scaling factor 2 on the full layers,
                 rope_local_base_freq 1e4 (unscaled) on the sliding ones, tied.
  phi3           Phi3ForCausalLM: fused qkv_proj and gate_up_proj, 4 heads / 2 kv (head_dim 16),
                 partial_rotary_factor 0.5 (rotary dim 8), longrope with short/long factors,
                 original_max_position_embeddings 8 < 12 (the long factors apply to the length-12 inputs),
                 max_position_embeddings 32.
  llama-yarn     LlamaForCausalLM, rope_scaling yarn (factor 4, original_max_position_embeddings 256,
                 beta_fast 4, beta_slow 0.25, mscale 1.2, mscale_all_dim 0.6, truncate false); expected.json
                 also lists HF's inv_freq / attention factor for other yarn parameter sets.
  llama-dynamic  LlamaForCausalLM, rope_scaling dynamic (factor 2) with max_position_embeddings 8 (< 12).

Per case:
  config.json, generation_config.json, model.safetensors   as save_pretrained writes them (f32)
  expected.json        forward_expected() of make_llama_fixtures (input_ids, labels, logits, loss, padded_*),
                       model_type, architectures, layer types, rope details, versions, and "generation":
                       20 prompts (lengths 3..10) with the 32 greedy tokens of model.generate(use_cache=True)
                       ("new_tokens"), of a full-recompute loop without cache ("new_tokens_uncached") and of a
                       hand-driven DynamicCache loop ("new_tokens_cached_loop"). They differ for llama-dynamic
                       (cached decoding rescales the rope base for new tokens only: generate == cached loop) and
                       phi3 (4.57.6's generate re-runs the sequence NON-causally when it switches to the long
                       rope factors: cached loop, which re-runs it causally, == uncached).
                       Dynamic rope is stateful in transformers (see rope_reset); every generate / forward here
                       starts from the freshly loaded state.
  lora/                PEFT LoRA (r 4, alpha 8, dropout 0, all-linear, sorted), A from PEFT's default init,
                       B ~ N(0, 0.05^2); expected.json with logits/loss with the adapter and merged_logits.
  train/expected.json  4 AdamW steps of full fine-tuning exactly as make_llama_fixtures' build_train (same
                       train(), micro-batches, schedule, clipping), final_logits, final_param_sums (no
                       final_model.safetensors, to keep the fixtures small).
  train-lora/          as build_train_lora: initial_adapter/ (PEFT default init, B = 0), final_adapter/,
                       expected.json.

Run from anywhere; re-running with the versions pinned in scripts/requirements-llama-fixtures.txt rewrites
byte-identical files:

  python3 -m venv /tmp/llamafx
  /tmp/llamafx/bin/pip install -r scripts/requirements-llama-fixtures.txt
  /tmp/llamafx/bin/python scripts/make_family_fixtures.py [case ...]
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_llama_fixtures as L  # noqa: E402
from make_llama_fixtures import (  # noqa: E402
    LORA_KW,
    TRAIN_DOC,
    VERSIONS,
    flat,
    forward_expected,
    fresh_dir,
    make_inputs,
    param_summary,
    save_adapter,
    setup_determinism,
    train,
    write_json,
)

import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

ROOT = L.ROOT
OUT_REL = Path("tests/fixtures/families")
OUT = ROOT / OUT_REL
ATTN = L.ATTN  # "eager"

N_PROMPTS = 20
NEW_TOKENS = 32

COMMON = dict(vocab_size=101, rms_norm_eps=1e-6)

CASES: dict[str, dict] = {
    "qwen2": dict(
        config=Qwen2Config,
        seed=11000,
        exercises="GQA 4/2, q/k/v biases, untied, sliding window 5 on layers >= max_window_layers 1 "
        "(layer 0 full, layers 1-2 sliding)",
        kw=dict(
            COMMON,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=1,
        ),
    ),
    "qwen2-tied": dict(
        config=Qwen2Config,
        seed=12000,
        exercises="Qwen2.5-0.5B style: tied embeddings, q/k/v biases, no sliding window, head_dim 12, theta 1e6",
        kw=dict(
            COMMON,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=32768,
            max_window_layers=21,
        ),
    ),
    "qwen3": dict(
        config=Qwen3Config,
        seed=13000,
        exercises="q_norm/k_norm (RMSNorm over head_dim before rope), head_dim 16 != hidden 48 / 4 heads, "
        "GQA 4/2, no biases, untied",
        kw=dict(
            COMMON,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            attention_bias=False,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": dict(
        config=MistralConfig,
        seed=14000,
        exercises="sliding_window 5 < 12 on every layer, GQA 4/2, untied",
        kw=dict(
            COMMON,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=10000.0,
            sliding_window=5,
            tie_word_embeddings=False,
        ),
    ),
    "gemma2": dict(
        config=Gemma2Config,
        seed=15000,
        exercises="Gemma RMSNorm (1 + w) x4 per layer, sqrt(hidden) normalizer, gelu_pytorch_tanh, "
        "query_pre_attn_scalar 24 != head_dim 16, attention and final logit soft-capping, alternating "
        "sliding (even layers) / full, tied, head_dim*heads 64 != hidden 48",
        kw=dict(
            COMMON,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rope_theta=10000.0,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            sliding_window=5,
        ),
    ),
    "gemma3": dict(
        config=Gemma3TextConfig,
        seed=16000,
        exercises="Gemma3 text: q/k Gemma norms, local rope (rope_local_base_freq 1e4, unscaled) on sliding "
        "layers vs global rope (theta 1e6, linear factor 2) on full layers, sliding_window_pattern 3, "
        "query_pre_attn_scalar 24, scaled embedding, 4 norms per layer, tied",
        kw=dict(
            COMMON,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rope_theta=1000000.0,
            rope_local_base_freq=10000.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            query_pre_attn_scalar=24,
            sliding_window=5,
            sliding_window_pattern=3,
        ),
    ),
    "phi3": dict(
        config=Phi3Config,
        seed=17000,
        exercises="fused qkv_proj (q|k|v rows) and gate_up_proj (gate first), GQA 4/2, partial_rotary_factor "
        "0.5, longrope (long factors for seq > original_max_position_embeddings 8, attention factor "
        "sqrt(1 + ln(32/8)/ln 8)), generate's cache reset at the short->long switch",
        kw=dict(
            COMMON,
            rms_norm_eps=1e-5,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            original_max_position_embeddings=8,
            partial_rotary_factor=0.5,
            rope_theta=10000.0,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.15, 1.6, 2.3],
                "long_factor": [1.05, 2.5, 7.0, 19.0],
            },
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
        ),
    ),
    "llama-yarn": dict(
        config=LlamaConfig,
        seed=18000,
        exercises="yarn rope with non-default beta_fast/beta_slow, mscale/mscale_all_dim attention factor, "
        "truncate false (fractional ramp)",
        kw=dict(
            COMMON,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 256,
                "beta_fast": 4.0,
                "beta_slow": 0.25,
                "mscale": 1.2,
                "mscale_all_dim": 0.6,
                "truncate": False,
            },
        ),
    ),
    "llama-dynamic": dict(
        config=LlamaConfig,
        seed=19000,
        exercises="dynamic NTK rope with max_position_embeddings 8 < 12 (base rescaled from the sequence "
        "length); cached generation differs from a full recompute",
        kw=dict(
            COMMON,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        ),
    ),
}

GEMMA_TYPES = ("gemma2", "gemma3_text")


# ----------------------------------------------------------------------------------------------
# models


def make_random_model(case: str):
    spec = CASES[case]
    torch.manual_seed(spec["seed"])
    config = spec["config"](**spec["kw"])
    config._attn_implementation = ATTN
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN)
    gemma = config.model_type in GEMMA_TYPES
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        # named_parameters() de-duplicates tied weights, so a tied lm_head is not drawn twice.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                if gemma:  # Gemma's RMSNorm scales by (1 + weight); weight init is 0
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def load_model(case: str):
    model = AutoModelForCausalLM.from_pretrained(OUT_REL / case, dtype=torch.float32, attn_implementation=ATTN)
    assert model.dtype == torch.float32 and model.config._attn_implementation == ATTN
    return model.eval()


def rotary_modules(model):
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "original_inv_freq") and hasattr(m, "rope_type")]


def rope_reset(model) -> None:
    """Put every rotary module back in its freshly-loaded state. transformers' `dynamic_rope_update` is
    stateful: a dynamic-NTK rotary keeps the frequencies of the longest sequence seen (until a sequence
    shorter than max_position_embeddings resets it), so without this the results of a call would depend
    on the calls before it."""
    for _, m in rotary_modules(model):
        m.register_buffer("inv_freq", m.original_inv_freq, persistent=False)
        m.max_seq_len_cached = m.original_max_seq_len


def base_model_of(model):
    return model.get_base_model() if isinstance(model, PeftModel) else model


def layer_info(model) -> dict:
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is None:  # Mistral/Phi3/Llama: one kind for all layers
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) is not None else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    return {"layer_types": list(types), "sliding_window": getattr(cfg, "sliding_window", None)}


def rope_details(model, seq_len: int) -> dict:
    """inv_freq / attention scaling of every rotary module as loaded, and (dynamic, longrope) the
    frequencies that a forward of `seq_len` positions uses."""
    res = {}
    attn = model.model.layers[0].self_attn
    res["head_dim"] = attn.head_dim
    res["attention_scaling"] = float(attn.scaling)
    for name, m in rotary_modules(model):
        rope_reset(model)
        d = {
            "rope_type": m.rope_type,
            "inv_freq": flat(m.inv_freq),
            "attention_scaling": float(m.attention_scaling),
        }
        if m.rope_type in ("dynamic", "longrope"):
            x = torch.zeros(1, seq_len, 1)
            m(x, torch.arange(seq_len)[None])
            d[f"inv_freq_at_seq_len_{seq_len}"] = flat(m.inv_freq)
            d[f"attention_scaling_at_seq_len_{seq_len}"] = float(m.attention_scaling)
        res[name.split(".")[-1]] = d
    rope_reset(model)
    return res


# ----------------------------------------------------------------------------------------------
# generation


def make_prompts(vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(N_PROMPTS):
        n = int(torch.randint(3, 11, (1,), generator=gen))
        prompts.append(torch.randint(1, vocab, (n,), generator=gen))
    return prompts


@torch.no_grad()
def generate_cached(model, prompt: torch.Tensor) -> list[int]:
    rope_reset(model)
    ids = prompt[None]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    new = out[0, prompt.numel() :].tolist()
    assert len(new) == NEW_TOKENS, (len(new), NEW_TOKENS)
    return new


@torch.no_grad()
def generate_uncached(model, prompt: torch.Tensor) -> list[int]:
    seq = prompt.clone()
    for _ in range(NEW_TOKENS):
        rope_reset(model)
        logits = model(input_ids=seq[None], use_cache=False).logits[0, -1]
        seq = torch.cat([seq, logits.argmax().view(1)])
    return seq[prompt.numel() :].tolist()


@torch.no_grad()
def generate_cached_loop(model, prompt: torch.Tensor) -> list[int]:
    """Greedy decoding with a DynamicCache driven by hand: prefill the prompt, then feed one token at a
    time (model computes cache_position / position_ids / masks itself). For longrope (Phi3) it applies the
    rule of Phi3ForCausalLM.prepare_inputs_for_generation - drop the cache and re-run the whole sequence once
    the length exceeds original_max_position_embeddings while the cache holds <= that many tokens - but with
    a correct causal mask (generate() loses it at that step, see the memo / README)."""
    rope_reset(model)
    cfg = model.config
    rs = getattr(cfg, "rope_scaling", None) or {}
    longrope = rs.get("rope_type", rs.get("type")) == "longrope"
    seq, cache, fed = prompt.clone(), None, 0
    for _ in range(NEW_TOKENS):
        if longrope and cache is not None and seq.numel() >= cfg.original_max_position_embeddings + 1:
            if fed <= cfg.original_max_position_embeddings:
                cache, fed = None, 0
        out = model(input_ids=seq[None, fed:], past_key_values=cache, use_cache=True)
        cache, fed = out.past_key_values, seq.numel()
        seq = torch.cat([seq, out.logits[0, -1].argmax().view(1)])
    return seq[prompt.numel() :].tolist()


def generation_expected(model, seed: int) -> dict:
    # No EOS: the fixture's sequences always have NEW_TOKENS tokens. (generate() falls back to the model's
    # generation_config for every value left at its default, so it is replaced rather than overridden.)
    model.generation_config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    prompts = make_prompts(model.config.vocab_size, seed)
    cached = [generate_cached(model, p) for p in prompts]
    uncached = [generate_uncached(model, p) for p in prompts]
    loop = [generate_cached_loop(model, p) for p in prompts]

    def first_diff(xs, ys):
        return [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(xs, ys)]

    rope_reset(model)
    return {
        "how": "new_tokens: model.generate(input_ids=prompt[None], attention_mask=ones, do_sample=False, "
        f"num_beams=1, max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, eos_token_id=None, "
        "use_cache=True) one prompt at a time (DynamicCache; Phi3's prepare_inputs_for_generation included); "
        "new_tokens_uncached: greedy loop, each step a full forward of prompt + tokens so far with "
        "use_cache=False, argmax of the last position; new_tokens_cached_loop: prefill + one token per step "
        "with a DynamicCache, calling model() directly (for longrope: cache dropped and the whole sequence "
        "re-run, causally, when the length first exceeds original_max_position_embeddings). Rotary state "
        "reset before each call (fresh model).",
        "prompts": [p.tolist() for p in prompts],
        "new_tokens": cached,
        "new_tokens_uncached": uncached,
        "new_tokens_cached_loop": loop,
        "cached_equals_uncached": cached == uncached,
        "cached_loop_equals_generate": loop == cached,
        "cached_loop_equals_uncached": loop == uncached,
        "first_difference_generate_vs_uncached": first_diff(cached, uncached),
        "first_difference_cached_loop_vs_uncached": first_diff(loop, uncached),
    }


# ----------------------------------------------------------------------------------------------
# soft-capping statistics (Gemma2): how hard the caps bite on the fixture's inputs


@torch.no_grad()
def softcap_stats(model, ids) -> dict:
    from transformers.models.gemma2 import modeling_gemma2 as mg

    cfg = model.config
    orig = mg.eager_attention_forward
    seen = []

    def wrapped(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        k = mg.repeat_kv(key, module.num_key_value_groups)
        seen.append(float((torch.matmul(query, k.transpose(2, 3)) * scaling).abs().max()))
        return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)

    hidden = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: hidden.append(o))
    mg.eager_attention_forward = wrapped
    try:
        model(input_ids=ids)
    finally:
        mg.eager_attention_forward = orig
        h.remove()
    raw = hidden[0]
    cap = cfg.final_logit_softcapping
    return {
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "attn_scores_max_abs_before_cap_per_layer": seen,
        "final_logit_softcapping": cap,
        "final_logits_max_abs_before_cap": float(raw.abs().max()),
        "final_logits_fraction_above_cap": float((raw.abs() > cap).float().mean()),
        "final_logits_max_abs_after_cap": float((torch.tanh(raw / cap) * cap).abs().max()),
    }


# ----------------------------------------------------------------------------------------------
# extra rope reference values (llama-yarn, llama-dynamic)


def yarn_variants() -> list[dict]:
    base = dict(CASES["llama-yarn"]["kw"])
    variants = [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 4.0,
         "beta_slow": 0.25},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
         "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        {"rope_type": "yarn", "factor": 2.5, "attention_factor": 0.9},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 4.0,
         "beta_slow": 0.25, "mscale": 1.2, "mscale_all_dim": 0.6, "truncate": False},
    ]
    res = []
    for rs in variants:
        cfg = LlamaConfig(**dict(base, rope_scaling=dict(rs)))
        inv, att = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
        res.append({"rope_scaling": rs, "max_position_embeddings": cfg.max_position_embeddings,
                    "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "inv_freq": flat(inv),
                    "attention_factor": float(att)})
    return res


def dynamic_variants() -> list[dict]:
    cfg = LlamaConfig(**CASES["llama-dynamic"]["kw"])
    res = []
    for n in [1, 8, 9, 12, 20, 42]:
        inv, att = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=n)
        res.append({"seq_len": n, "inv_freq": flat(inv), "attention_factor": float(att)})
    return res


# ----------------------------------------------------------------------------------------------
# builders


def build_base(case: str) -> None:
    d = fresh_dir(OUT / case)
    make_random_model(case).save_pretrained(d, safe_serialization=True)
    model = load_model(case)
    cfg = model.config
    ids, labels = make_inputs(cfg.vocab_size)
    rope_reset(model)
    exp = {
        "case": case,
        "exercises": CASES[case]["exercises"],
        "model_type": cfg.model_type,
        "architectures": cfg.architectures,
    }
    exp.update(forward_expected(model, ids, labels, extra_info=False))
    exp.update(layer_info(model))
    exp["rope"] = rope_details(model, ids.shape[1])
    if cfg.model_type == "gemma2":
        exp["softcap_stats"] = softcap_stats(model, ids)
    if cfg.model_type in GEMMA_TYPES:
        exp["embed_normalizer"] = float(torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32))
    if case == "llama-yarn":
        exp["yarn_variants"] = yarn_variants()
    if case == "llama-dynamic":
        exp["dynamic_inv_freq_by_seq_len"] = dynamic_variants()
    exp["generation"] = generation_expected(model, seed=CASES[case]["seed"] + 1)
    write_json(OUT / case / "expected.json", exp)


def peft_model(case: str, seed: int):
    base = load_model(case)
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(**LORA_KW))
    cfg = pm.peft_config["default"]
    cfg.target_modules = sorted(cfg.target_modules)
    return pm


@torch.no_grad()
def build_lora(case: str) -> None:
    seed = CASES[case]["seed"] + 100
    d = fresh_dir(OUT / case / "lora")
    pm = peft_model(case, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    pm.eval()
    save_adapter(pm, d, base_rel=OUT_REL / case)
    targets = json.loads((d / "adapter_config.json").read_text())["target_modules"]

    ids, labels = make_inputs(pm.config.vocab_size)
    rope_reset(pm)
    exp = forward_expected(pm, ids, labels, extra_info=False)

    re = PeftModel.from_pretrained(load_model(case), d).eval()
    assert torch.equal(re(input_ids=ids).logits, pm(input_ids=ids).logits)

    lora_logits = pm(input_ids=ids).logits
    merged = pm.merge_and_unload().eval()
    m_out = merged(input_ids=ids, labels=labels)
    exp["scaling"] = LORA_KW["lora_alpha"] / LORA_KW["r"]
    exp["target_modules"] = targets
    exp["merged_logits"] = flat(m_out.logits)
    exp["merged_loss"] = float(m_out.loss)
    exp["merged_max_abs_diff"] = float((m_out.logits - lora_logits).abs().max())
    write_json(d / "expected.json", exp)


def build_train(case: str) -> None:
    d = fresh_dir(OUT / case / "train")
    model = load_model(case)
    rope_reset(model)
    vocab = model.config.vocab_size
    params = list(model.named_parameters())
    res = {"lr_peak": 1e-3, **TRAIN_DOC}
    res.update(train(model, params, lr=1e-3, vocab=vocab))
    ids, _ = make_inputs(vocab)
    with torch.no_grad():
        rope_reset(model)
        res["final_input_ids"] = ids.tolist()
        res["final_logits"] = flat(model(input_ids=ids).logits)
    sd = dict(params)
    picks = [n for n, _ in params if ".layers.0." in n][:3] + [
        n for n in ("model.norm.weight", "lm_head.weight", "model.embed_tokens.weight") if n in sd
    ]
    res["final_params"] = {f"{n}[:8]": flat(sd[n].reshape(-1)[:8]) for n in picks}
    res["final_param_sums"] = param_summary(params)
    res.update(VERSIONS)
    write_json(d / "expected.json", res)


def build_train_lora(case: str) -> None:
    d = fresh_dir(OUT / case / "train-lora")
    pm = peft_model(case, seed=CASES[case]["seed"] + 200)
    save_adapter(pm, d / "initial_adapter", base_rel=OUT_REL / case)
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, _ in params)
    vocab = pm.config.vocab_size
    rope_reset(pm)
    res = {"lr_peak": 2e-4, **TRAIN_DOC, "lora": "config and initial A/B (B = 0) in initial_adapter/"}
    res.update(train(pm, params, lr=2e-4, vocab=vocab))
    ids, _ = make_inputs(vocab)
    with torch.no_grad():
        rope_reset(pm)
        res["final_input_ids"] = ids.tolist()
        res["final_logits"] = flat(pm(input_ids=ids).logits)
    save_adapter(pm, d / "final_adapter", base_rel=OUT_REL / case)
    res["final_param_sums"] = param_summary(params)
    res.update(VERSIONS)
    write_json(d / "expected.json", res)


def build_case(case: str) -> None:
    build_base(case)
    build_lora(case)
    build_train(case)
    build_train_lora(case)


def main() -> int:
    setup_determinism()
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    # `make_family_fixtures.py qwen2 phi3` rebuilds only those cases; no argument rebuilds all.
    for case in sys.argv[1:] or list(CASES):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}; cases: {', '.join(CASES)}")
        build_case(case)
        exp = json.loads((OUT / case / "expected.json").read_text())
        g = exp["generation"]
        print(
            f"{case}: loss {exp['loss']:.6f}  generate==uncached {g['cached_equals_uncached']}  "
            f"loop==generate {g['cached_loop_equals_generate']}  loop==uncached {g['cached_loop_equals_uncached']}",
            flush=True,
        )
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT_REL} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
