#!/usr/bin/env python3
"""Loads pipe's exports with transformers and peft, unchanged, and compares logits.

    python scripts/check_export.py STORE_DIR_OF_FULL_HF_EXPORT BASE_MODEL_DIR MERGED_HF_DIR PEFT_DIR

- the full export must load with AutoModelForCausalLM / AutoTokenizer and give the same logits
  as the trained model directory it came from (BASE_MODEL_DIR, also Hugging Face layout);
- PeftModel.from_pretrained(base, PEFT_DIR) must give the same logits as the merged export.
Prints the largest differences; exits non-zero above 1e-4.
(packages: pip install -r scripts/requirements-llama-fixtures.txt)
"""

import sys

import torch
import transformers
from peft import PeftModel


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def main() -> int:
    full, base, merged, peft_dir = sys.argv[1:5]
    tok = transformers.AutoTokenizer.from_pretrained(full)
    ids = tok("Below is an instruction that describes a task.\n\n### Instruction:\nAdd the two numbers.",
              return_tensors="pt").input_ids
    load = lambda d: transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    d_full = (logits(load(full), ids) - logits(load(base), ids)).abs().max().item()
    with_adapter = PeftModel.from_pretrained(load(base), peft_dir).eval()
    d_peft = (logits(load(merged), ids) - logits(with_adapter, ids)).abs().max().item()
    print(f"transformers {transformers.__version__}, {ids.shape[1]} tokens, tokenizer loaded from the export")
    print(f"full export vs trained model:        max |dlogit| = {d_full:.3e}")
    print(f"merged export vs PEFT(base, adapter): max |dlogit| = {d_peft:.3e}")
    return 0 if max(d_full, d_peft) <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
