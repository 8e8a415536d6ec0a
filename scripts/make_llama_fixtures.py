#!/usr/bin/env python3
"""Generate the Llama / LoRA / training-step reference fixtures under tests/fixtures/llama/.

The Rust tests use these files (no Python at test time) to check pipe's burn implementation of
Hugging Face's `LlamaForCausalLM`, PEFT LoRA and pipe's training step against the reference, to
f32 precision. Every model is tiny and randomly initialised with a large std (Linear/Embedding
weights ~ N(0, 0.1^2), RMSNorm weights ~ 1 + 0.1 N(0, 1)) so that the logits are far from uniform
and any mistake shows.

What it writes (under tests/fixtures/llama/):

  gqa-untied/                 config.json, generation_config.json, model.safetensors (f32):
                              vocab 101, hidden 64, intermediate 160, 2 layers, 4 heads, 2 kv heads
                              (GQA, head_dim 16), rope_theta 1e4, no rope_scaling, untied lm_head.
  tied-llama3-rope/           vocab 89, hidden 48, intermediate 96, 2 layers, 6 heads, 2 kv heads
                              (head_dim 8), tie_word_embeddings (no lm_head.weight in the file),
                              rope_theta 1e5, rope_scaling llama3 (factor 8, low 1, high 4, orig 128).
  linear-rope/                like gqa-untied but 1 kv head (MQA), rope_scaling linear factor 2.
  gqa-untied-bf16/            gqa-untied's weights saved in bfloat16 ("dtype": "bfloat16"); its
                              expected outputs come from loading that checkpoint back in float32.
  gqa-untied-sharded/         gqa-untied's weights in >= 3 shards model-0000X-of-0000N.safetensors
                              + model.safetensors.index.json.
  <each model dir>/expected.json
      input_ids [2][12], labels [2][12] (-100 on the first 4 positions of row 0, first 6 of row 1),
      logits_shape [2, 12, V], logits (flat, row-major) = model(input_ids).logits,
      loss = model(input_ids, labels=labels).loss (HF: shift by one, mean over all non -100 targets
      of the whole batch);
      padded_input_ids / padded_attention_mask / padded_labels: row 0 as above, row 1 = row 1's
      first 9 ids + 3 pad ids (0) on the right, mask 0 and label -100 at the pads;
      padded_logits = logits at the attention_mask == 1 positions only, concatenated row by row
      (21 x V values), padded_loss; plus rope_inv_freq, attention scaling and versions.
  resize-pad/expected.json    gqa-untied after Stanford Alpaca's smart_tokenizer_and_embedding_resize
                              for one new token (id 101, vocab 101 -> 102): logits/loss for inputs that
                              contain id 101, and the new input/output embedding rows.
  lora/                       adapter_config.json + adapter_model.safetensors: PEFT LoRA (r 4, alpha 8,
                              dropout 0, all-linear = q,k,v,o,gate,up,down; lm_head excluded) on
                              gqa-untied, A from PEFT's default init, B ~ N(0, 0.05^2) (PEFT inits B to 0).
                              expected.json: logits/loss with the adapter, logits after
                              merge_and_unload(), and a check of PEFT's default lora_A init.
  train/expected.json         4 AdamW steps (lr 1e-3, cosine schedule with 1 warm-up step of 4) on
                              gqa-untied, 2 micro-batches per step, token-exact gradient accumulation,
                              clip_grad_norm_ 1.0: per-step lr/loss/grad_norm/micro-batches, final
                              logits and parameter values/sums. train/final_model.safetensors: all
                              parameters after the 4 steps (HF names, f32).
  autocast-bf16/expected.json gqa-untied's logits and loss under torch.autocast("cpu", bfloat16)
                              (what mixed-precision training computes), and their distance from f32.
  train-lora/                 the same with the LoRA config of lora/ (PEFT default init, B = 0) at
                              lr 2e-4: initial_adapter/ (start point), final_adapter/ (after 4 steps),
                              expected.json.

Run from anywhere (paths are relative to the repository root); deterministic: CPU, float32, one
thread, fixed seeds, torch.use_deterministic_algorithms(True). Re-running with the versions pinned
in scripts/requirements-llama-fixtures.txt rewrites byte-identical files:

  python3 -m venv /tmp/llamafx
  /tmp/llamafx/bin/pip install -r scripts/requirements-llama-fixtures.txt
  /tmp/llamafx/bin/python scripts/make_llama_fixtures.py
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parent.parent
OUT_REL = Path("tests/fixtures/llama")
OUT = ROOT / OUT_REL

SEQ = 12
IGNORE = -100
PAD_ID = 0
ATTN = "eager"  # plain matmul/softmax attention; sdpa agrees to ~1e-7

VERSIONS = {
    "transformers_version": transformers.__version__,
    "torch_version": torch.__version__.split("+")[0],
    "peft_version": peft.__version__,
    "safetensors_version": safetensors.__version__,
}

BASE_A = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    rope_scaling=None,
)
CFG_TIED = dict(
    BASE_A,
    vocab_size=89,
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=6,
    num_key_value_heads=2,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # 128 (not 32) so that head_dim 8's four frequencies hit all three llama3 branches:
        # wavelen 6.3 < 128/4 kept, 111.7 in [32, 128] smoothed, 1987 and 35333 > 128 divided by 8.
        "original_max_position_embeddings": 128,
    },
)
CFG_LINEAR = dict(BASE_A, num_key_value_heads=1, rope_scaling={"rope_type": "linear", "factor": 2.0})

LORA_KW = dict(
    r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules="all-linear",
    bias="none",
    task_type="CAUSAL_LM",
)


def setup_determinism() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# helpers


def flat(t: torch.Tensor) -> list[float]:
    """Row-major flat list of exact f32 values (float(x) is the f32 value as an f64, so repr
    round-trips and parsing as f64 then casting to f32 is exact)."""
    return [float(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def write_json(path: Path, obj: dict) -> None:
    """One top-level key per line, values compact: readable diffs, small files."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in obj.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_random_model(cfg_kw: dict, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg_kw)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() de-duplicates tied weights, so a tied lm_head is not drawn twice.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def load_model(path: Path) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN)
    assert model.dtype == torch.float32
    return model.eval()


def make_inputs(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, SEQ), generator=gen)  # 1.. so that pad id 0 never occurs
    labels = ids.clone()
    labels[0, :4] = IGNORE
    labels[1, :6] = IGNORE
    return ids, labels


def padded_inputs(ids: torch.Tensor, labels: torch.Tensor):
    p_ids, p_labels = ids.clone(), labels.clone()
    mask = torch.ones_like(ids)
    p_ids[1, SEQ - 3 :] = PAD_ID
    p_labels[1, SEQ - 3 :] = IGNORE
    mask[1, SEQ - 3 :] = 0
    return p_ids, mask, p_labels


def manual_causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies of logits[:, :-1] vs labels[:, 1:], ignoring -100, and the
    number of counted targets."""
    v = logits.shape[-1]
    lg = logits[:, :-1, :].reshape(-1, v).float()
    tg = labels[:, 1:].reshape(-1)
    s = F.cross_entropy(lg, tg, ignore_index=IGNORE, reduction="sum")
    return s, int((tg != IGNORE).sum())


def rope_info(model) -> dict:
    rot = model.model.rotary_emb
    attn = model.model.layers[0].self_attn
    return {
        "rope_type": rot.rope_type,
        "rope_inv_freq": flat(rot.inv_freq),
        "rope_attention_scaling": float(rot.attention_scaling),
        "head_dim": attn.head_dim,
        "attention_scaling": float(attn.scaling),
    }


@torch.no_grad()
def forward_expected(model, ids, labels, extra_info: bool = True) -> dict:
    vocab = model.config.vocab_size
    out = model(input_ids=ids, labels=labels)
    s, n = manual_causal_loss(out.logits, labels)
    assert torch.allclose(out.loss, s / n, rtol=1e-6, atol=0), (out.loss, s / n)

    p_ids, p_mask, p_labels = padded_inputs(ids, labels)
    p_out = model(input_ids=p_ids, attention_mask=p_mask, labels=p_labels)
    keep = p_mask.bool()
    p_logits = p_out.logits[keep]
    # Causality + right padding: the non-pad positions must match the unpadded forward.
    assert torch.allclose(p_logits, out.logits[keep], atol=1e-5), "padded logits differ"

    exp = {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "logits_shape": [ids.shape[0], ids.shape[1], vocab],
        "logits": flat(out.logits),
        "loss": float(out.loss),
        "padded_input_ids": p_ids.tolist(),
        "padded_attention_mask": p_mask.tolist(),
        "padded_labels": p_labels.tolist(),
        "padded_logits_shape": [int(keep.sum()), vocab],
        "padded_logits": flat(p_logits),
        "padded_loss": float(p_out.loss),
    }
    if extra_info:
        exp.update(rope_info(model))
    exp["attn_implementation"] = ATTN
    exp.update(VERSIONS)
    return exp


def save_model_dir(model, name: str, **save_kw) -> Path:
    d = fresh_dir(OUT / name)
    model.save_pretrained(d, safe_serialization=True, **save_kw)
    return d


# ----------------------------------------------------------------------------------------------
# (a)-(f): base models


def build_models() -> None:
    model_a = make_random_model(BASE_A, seed=1000)
    save_model_dir(model_a, "gqa-untied")
    save_model_dir(make_random_model(CFG_TIED, seed=2000), "tied-llama3-rope")
    save_model_dir(make_random_model(CFG_LINEAR, seed=3000), "linear-rope")

    bf16 = copy.deepcopy(model_a).to(torch.bfloat16)
    save_model_dir(bf16, "gqa-untied-bf16")

    d = save_model_dir(model_a, "gqa-untied-sharded", max_shard_size="120KB")
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (d / "model.safetensors.index.json").exists(), shards

    for name in ["gqa-untied", "tied-llama3-rope", "linear-rope", "gqa-untied-bf16", "gqa-untied-sharded"]:
        model = load_model(OUT_REL / name)
        ids, labels = make_inputs(model.config.vocab_size)
        exp = forward_expected(model, ids, labels)
        if name == "gqa-untied-bf16":
            # the loaded weights are exactly the bf16-rounded f32 weights
            ref = dict(model_a.named_parameters())
            for n, p in model.named_parameters():
                assert torch.equal(p, ref[n].to(torch.bfloat16).float()), n
            exp["note"] = "expected outputs of the bf16 checkpoint upcast to float32 on load"
        if name == "gqa-untied-sharded":
            base = json.loads((OUT / "gqa-untied" / "expected.json").read_text())
            assert base["logits"] == exp["logits"], "sharded load differs from single file"
            exp["shards"] = shards
        write_json(OUT / name / "expected.json", exp)


# ----------------------------------------------------------------------------------------------
# (g): Alpaca's smart_tokenizer_and_embedding_resize for one new token


@torch.no_grad()
def build_resize() -> None:
    model = load_model(OUT_REL / "gqa-untied")
    old_vocab = model.config.vocab_size
    num_new_tokens = 1
    torch.manual_seed(4000)  # resize_token_embeddings' mean_resizing draws random rows (overwritten)
    model.resize_token_embeddings(old_vocab + num_new_tokens)
    # Stanford Alpaca train.py, verbatim logic:
    input_embeddings = model.get_input_embeddings().weight.data
    output_embeddings = model.get_output_embeddings().weight.data
    input_embeddings_avg = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    output_embeddings_avg = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
    input_embeddings[-num_new_tokens:] = input_embeddings_avg
    output_embeddings[-num_new_tokens:] = output_embeddings_avg
    new_vocab = model.config.vocab_size
    assert new_vocab == old_vocab + 1 and model.lm_head.weight.shape[0] == new_vocab

    ids, labels = make_inputs(old_vocab)
    new_id = old_vocab
    for r, c in [(0, 2), (0, 7), (0, 8), (1, 0), (1, 9), (1, 11)]:
        ids[r, c] = new_id
        if labels[r, c] != IGNORE:
            labels[r, c] = new_id
    exp = {"old_vocab_size": old_vocab, "new_vocab_size": new_vocab, "new_token_id": new_id}
    exp.update(forward_expected(model, ids, labels, extra_info=False))
    exp["new_input_embedding_row"] = flat(input_embeddings[-1])
    exp["new_output_embedding_row"] = flat(output_embeddings[-1])
    write_json(fresh_dir(OUT / "resize-pad") / "expected.json", exp)


# ----------------------------------------------------------------------------------------------
# (h): PEFT LoRA


def peft_model_on_a(seed: int):
    base = load_model(OUT_REL / "gqa-untied")
    torch.manual_seed(seed)
    pm = get_peft_model(base, LoraConfig(**LORA_KW))
    # all-linear resolves to a Python set of full module names: sort it so that
    # adapter_config.json does not depend on the hash seed.
    cfg = pm.peft_config["default"]
    cfg.target_modules = sorted(cfg.target_modules)
    return pm


def save_adapter(pm, d: Path, base_rel: Path = OUT_REL / "gqa-untied") -> None:
    pm.save_pretrained(d, safe_serialization=True)
    (d / "README.md").unlink()  # PEFT's model-card template; nothing a loader reads
    cfg_path = d / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["target_modules"] == sorted(cfg["target_modules"])
    assert cfg["base_model_name_or_path"] == str(base_rel), cfg["base_model_name_or_path"]


def lora_init_check() -> dict:
    pm = peft_model_on_a(seed=5100)
    res = {
        "formula": "nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5)); nn.init.zeros_(lora_B.weight) "
        "(peft/tuners/lora/layer.py reset_lora_parameters, init_lora_weights=True). "
        "gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), "
        "fan_in = in_features (lora_A.weight is [r, in_features]); A ~ U(-bound, bound), std = bound / sqrt(3)",
    }
    for key in ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]:
        mod = pm.base_model.model.get_submodule(key)
        a = mod.lora_A["default"].weight.detach()
        b = mod.lora_B["default"].weight.detach()
        fan_in = a.shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        assert float(a.abs().max()) <= bound and bool((b == 0).all())
        res[key] = {
            "lora_A_shape": list(a.shape),
            "lora_B_shape": list(b.shape),
            "fan_in": fan_in,
            "bound": bound,
            "expected_std": bound / math.sqrt(3.0),
            "observed_max_abs": float(a.abs().max()),
            "observed_mean": float(a.mean()),
            "observed_std": float(a.std()),
            "lora_B_all_zero": bool((b == 0).all()),
        }
    return res


@torch.no_grad()
def build_lora() -> None:
    d = fresh_dir(OUT / "lora")
    pm = peft_model_on_a(seed=5000)
    gen = torch.Generator().manual_seed(5001)
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    pm.eval()
    save_adapter(pm, d)
    targets = json.loads((d / "adapter_config.json").read_text())["target_modules"]

    ids, labels = make_inputs(BASE_A["vocab_size"])
    exp = forward_expected(pm, ids, labels, extra_info=False)

    # the saved adapter reproduces the in-memory one exactly
    re = PeftModel.from_pretrained(load_model(OUT_REL / "gqa-untied"), d).eval()
    assert torch.equal(re(input_ids=ids).logits, pm(input_ids=ids).logits)

    lora_logits = pm(input_ids=ids).logits
    merged = pm.merge_and_unload().eval()
    m_out = merged(input_ids=ids, labels=labels)
    exp["scaling"] = LORA_KW["lora_alpha"] / LORA_KW["r"]
    exp["target_modules"] = targets
    exp["merged_logits"] = flat(m_out.logits)
    exp["merged_loss"] = float(m_out.loss)
    exp["merged_max_abs_diff"] = float((m_out.logits - lora_logits).abs().max())
    exp["lora_init_check"] = lora_init_check()
    write_json(d / "expected.json", exp)


@torch.no_grad()
def build_lora_modules_to_save() -> None:
    """A LoRA adapter that also carries full copies of embed_tokens and lm_head (PEFT's
    `modules_to_save`), both changed from the base, so a loader that ignored them would fail."""
    d = fresh_dir(OUT / "lora-modules-to-save")
    base = load_model(OUT_REL / "gqa-untied")
    torch.manual_seed(5200)
    pm = get_peft_model(base, LoraConfig(**LORA_KW, modules_to_save=["embed_tokens", "lm_head"]))
    cfg = pm.peft_config["default"]
    cfg.target_modules = sorted(cfg.target_modules)
    gen = torch.Generator().manual_seed(5201)
    for name, p in pm.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pm.eval()
    save_adapter(pm, d)
    ids, labels = make_inputs(BASE_A["vocab_size"])
    exp = forward_expected(pm, ids, labels, extra_info=False)
    re = PeftModel.from_pretrained(load_model(OUT_REL / "gqa-untied"), d).eval()
    assert torch.equal(re(input_ids=ids).logits, pm(input_ids=ids).logits)
    merged = pm.merge_and_unload().eval()
    exp["merged_logits"] = flat(merged(input_ids=ids).logits)
    exp["modules_to_save"] = ["embed_tokens", "lm_head"]
    write_json(d / "expected.json", exp)


# ----------------------------------------------------------------------------------------------
# (i), (j): training steps


def make_micro_batches(vocab: int, steps: int = 4, micro: int = 2, seed: int = 6000):
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        step = []
        for _ in range(micro):
            ids = torch.randint(1, vocab, (2, SEQ), generator=gen)
            labels = ids.clone()
            for r in range(2):
                k = int(torch.randint(1, 8, (1,), generator=gen))
                labels[r, :k] = IGNORE
            step.append((ids, labels))
        batches.append(step)
    return batches


def train(model, params: list[tuple[str, torch.nn.Parameter]], lr: float, vocab: int | None = None) -> dict:
    """4 AdamW steps on make_micro_batches(vocab) (vocab defaults to gqa-untied's; see TRAIN_DOC).
    Also used by scripts/make_family_fixtures.py."""
    vocab = BASE_A["vocab_size"] if vocab is None else vocab
    plist = [p for _, p in params]
    opt = torch.optim.AdamW(plist, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    batches = make_micro_batches(vocab)
    model.train()
    steps = []
    for step_batches in batches:
        lr_now = opt.param_groups[0]["lr"]
        total = sum(int((lb[:, 1:] != IGNORE).sum()) for _, lb in step_batches)
        loss_total = 0.0
        for ids, lb in step_batches:
            logits = model(input_ids=ids).logits
            s, _ = manual_causal_loss(logits, lb)
            loss = s / total
            # HF's own path (what the Trainer uses with num_items_in_batch) gives the same value
            hf = model(input_ids=ids, labels=lb, num_items_in_batch=torch.tensor(total)).loss
            assert torch.allclose(hf, loss, rtol=1e-6, atol=0), (hf, loss)
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(plist, max_norm=1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps.append(
            {
                "lr": float(lr_now),
                "loss": loss_total,
                "num_target_tokens": total,
                "grad_norm": float(grad_norm),
                "micro_batches": [{"input_ids": i.tolist(), "labels": l.tolist()} for i, l in step_batches],
            }
        )
    model.eval()
    return {"steps": steps}


def param_summary(params: list[tuple[str, torch.Tensor]]) -> dict:
    return {
        n: {"sum": float(p.detach().double().sum()), "sum_abs": float(p.detach().double().abs().sum())}
        for n, p in params
    }


TRAIN_DOC = {
    "optimizer": "torch.optim.AdamW(lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)",
    "schedule": "transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4); "
    "step 1 runs at lr 0 (warm-up), scheduler.step() after every optimizer.step()",
    "accumulation": "per optimizer step: N = number of labels[:, 1:] != -100 over both micro-batches; "
    "backward of sum_token_CE(logits[:, :-1], labels[:, 1:]) / N per micro-batch; "
    "'loss' = sum of the two micro losses",
    "clip": "torch.nn.utils.clip_grad_norm_(params, 1.0): grad_norm = global L2 norm before clipping; "
    "grads *= min(1, 1.0 / (grad_norm + 1e-6))",
}


def build_train() -> None:
    d = fresh_dir(OUT / "train")
    model = load_model(OUT_REL / "gqa-untied")
    params = list(model.named_parameters())
    res = {"lr_peak": 1e-3, **TRAIN_DOC}
    res.update(train(model, params, lr=1e-3))
    ids, _ = make_inputs(BASE_A["vocab_size"])
    with torch.no_grad():
        res["final_input_ids"] = ids.tolist()
        res["final_logits"] = flat(model(input_ids=ids).logits)
    sd = dict(params)
    res["final_params"] = {
        "model.layers.0.self_attn.q_proj.weight[0,:8]": flat(sd["model.layers.0.self_attn.q_proj.weight"][0, :8]),
        "model.norm.weight[:8]": flat(sd["model.norm.weight"][:8]),
        "lm_head.weight[0,:8]": flat(sd["lm_head.weight"][0, :8]),
        "model.embed_tokens.weight[1,:8]": flat(sd["model.embed_tokens.weight"][1, :8]),
    }
    res["final_param_sums"] = param_summary(params)
    res.update(VERSIONS)
    write_json(d / "expected.json", res)
    save_file({n: p.detach().contiguous() for n, p in params}, d / "final_model.safetensors", metadata={"format": "pt"})


def build_train_lora() -> None:
    d = fresh_dir(OUT / "train-lora")
    pm = peft_model_on_a(seed=7000)
    save_adapter(pm, d / "initial_adapter")
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, _ in params)
    res = {"lr_peak": 2e-4, **TRAIN_DOC, "lora": "config and initial A/B (B = 0) in initial_adapter/"}
    res.update(train(pm, params, lr=2e-4))
    ids, _ = make_inputs(BASE_A["vocab_size"])
    with torch.no_grad():
        res["final_input_ids"] = ids.tolist()
        res["final_logits"] = flat(pm(input_ids=ids).logits)
    save_adapter(pm, d / "final_adapter")
    res["final_param_sums"] = param_summary(params)
    res.update(VERSIONS)
    write_json(d / "expected.json", res)


@torch.no_grad()
def build_autocast_bf16() -> None:
    """gqa-untied under torch.autocast("cpu", bfloat16) — mixed-precision training's forward:
    matrix products in bf16, the parameters f32 — with the f32 logits beside it for scale."""
    model = load_model(OUT / "gqa-untied")
    ids, labels = make_inputs(model.config.vocab_size)
    f32 = model(input_ids=ids, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(input_ids=ids, labels=labels)
    d = fresh_dir(OUT / "autocast-bf16")
    write_json(d / "expected.json", {
        "model": "gqa-untied",
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "logits_shape": list(mixed.logits.shape),
        "logits": flat(mixed.logits.float()),
        "loss": float(mixed.loss),
        "f32_max_abs_diff": float((mixed.logits.float() - f32.logits).abs().max()),
        "f32_loss": float(f32.loss),
        "attn_implementation": ATTN,
        **VERSIONS,
    })


def main() -> int:
    setup_determinism()
    os.chdir(ROOT)
    OUT.mkdir(parents=True, exist_ok=True)
    builders = {
        "models": build_models,
        "resize": build_resize,
        "lora": build_lora,
        "lora-modules-to-save": build_lora_modules_to_save,
        "train": build_train,
        "train-lora": build_train_lora,
        "autocast-bf16": build_autocast_bf16,
    }
    # `make_llama_fixtures.py lora train` rebuilds only those; no argument rebuilds all.
    for name in sys.argv[1:] or list(builders):
        builders[name]()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT_REL} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
