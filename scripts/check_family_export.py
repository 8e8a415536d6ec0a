#!/usr/bin/env python3
"""Check a checkpoint exported by pipe against the tests/fixtures/families/ case it came from, with
Hugging Face transformers as the judge.

  check_family_export.py EXPORT_DIR FIXTURE_DIR [--adapter ADAPTER_DIR] [--tol 1e-4]

EXPORT_DIR   config.json + *.safetensors written by pipe (a full model; merged when --adapter is given).
FIXTURE_DIR  e.g. tests/fixtures/families/qwen2 (config.json, model.safetensors, expected.json).
--adapter    a PEFT LoRA adapter directory (e.g. FIXTURE_DIR/lora, or one written by pipe): the reference is
             then PeftModel.from_pretrained(FIXTURE_DIR model, ADAPTER_DIR) and EXPORT_DIR should be the merge.

Both are loaded with AutoModelForCausalLM.from_pretrained(dtype=float32, attn_implementation="eager") and run
on the fixture's input_ids (expected.json), unpadded and padded (with its attention mask). Prints the
config fields that differ (informational: transformers reads them, so a difference there is usually the
cause of a logit difference), max |Δlogit| and Δloss, and exits 1 if max |Δlogit| > tol (2 when a model
fails to load).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import transformers
from transformers import AutoConfig, AutoModelForCausalLM

IGNORED_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "_attn_implementation_autoset"}


def load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert model.dtype == torch.float32
    return model.eval()


def config_diff(a: Path, b: Path) -> list[str]:
    ca = AutoConfig.from_pretrained(a).to_dict()
    cb = AutoConfig.from_pretrained(b).to_dict()
    out = []
    for k in sorted(set(ca) | set(cb)):
        if k in IGNORED_CONFIG_KEYS:
            continue
        va, vb = ca.get(k, "<absent>"), cb.get(k, "<absent>")
        if va != vb:
            out.append(f"  {k}: export={json.dumps(va)} fixture={json.dumps(vb)}")
    return out


@torch.no_grad()
def run(model, exp: dict) -> dict:
    ids = torch.tensor(exp["input_ids"])
    labels = torch.tensor(exp["labels"])
    out = model(input_ids=ids, labels=labels)
    res = {"logits": out.logits, "loss": float(out.loss)}
    if "padded_input_ids" in exp:
        p_ids = torch.tensor(exp["padded_input_ids"])
        mask = torch.tensor(exp["padded_attention_mask"])
        p_labels = torch.tensor(exp["padded_labels"])
        p = model(input_ids=p_ids, attention_mask=mask, labels=p_labels)
        res["padded_logits"] = p.logits[mask.bool()]
        res["padded_loss"] = float(p.loss)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("fixture_dir", type=Path)
    ap.add_argument("--adapter", type=Path, default=None)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    exp = json.loads((args.fixture_dir / "expected.json").read_text())

    diff = config_diff(args.export_dir, args.fixture_dir)
    print(f"config.json fields that differ ({len(diff)}):" if diff else "config.json: same fields and values")
    for line in diff:
        print(line)

    try:
        exported = load(args.export_dir)
        reference = load(args.fixture_dir)
        if args.adapter is not None:
            from peft import PeftModel

            reference = PeftModel.from_pretrained(reference, args.adapter).eval()
    except Exception as e:  # noqa: BLE001 - report any loading failure
        print(f"FAIL: could not load: {type(e).__name__}: {e}")
        return 2

    print(f"export:    {type(exported).__name__} ({exported.config.model_type}), {args.export_dir}")
    ref_desc = f"{args.fixture_dir}" + (f" + adapter {args.adapter}" if args.adapter else "")
    print(f"reference: {type(reference).__name__}, {ref_desc}")

    a, b = run(exported, exp), run(reference, exp)
    worst = 0.0
    for key in ("logits", "padded_logits"):
        if key in a:
            d = float((a[key] - b[key]).abs().max())
            worst = max(worst, d)
            print(f"{key:14s} max |Δ| = {d:.3e}")
    for key in ("loss", "padded_loss"):
        if key in a:
            print(f"{key:14s} export {a[key]:.7f}  reference {b[key]:.7f}  Δ {a[key] - b[key]:+.3e}")
    if args.adapter is None and "logits" in exp:
        # the fixture's own recorded logits, as a sanity check of the reference load
        rec = torch.tensor(exp["logits"]).reshape(exp["logits_shape"])
        print(f"reference vs expected.json logits max |Δ| = {float((b['logits'] - rec).abs().max()):.3e}")

    ok = worst <= args.tol
    print(("OK" if ok else "FAIL") + f": max |Δlogit| {worst:.3e} (tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
