#!/usr/bin/env python3
"""Reference logits of a real pretrained Llama-architecture model for pipe's parity check.

Builds SmolLM2-135M-Instruct in Hugging Face layout with ../shared/tools/smollm2-hf.sh (f32),
runs transformers' LlamaForCausalLM on a fixed prompt, and writes DIR/expected.json with the
input ids, the logits (all positions) and the loss. Then:

    PIPE_SMOLLM2_DIR=DIR cargo test -p pipe-model --release -- --ignored smollm2

compares pipe's logits with them and prints the largest difference.

Usage (from the repository root; packages: pip install -r scripts/requirements-llama-fixtures.txt):
    python scripts/check_smollm2.py DIR
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:"
)


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    root = Path(__file__).resolve().parent.parent
    if not (out / "model.safetensors").exists():
        subprocess.run(["bash", str(root.parent / "shared" / "tools" / "smollm2-hf.sh"), str(out), "f32"], check=True)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :10] = -100
    with torch.no_grad():
        res = model(ids, labels=labels)
    logits = res.logits[0]
    (out / "expected.json").write_text(json.dumps({
        "input_ids": ids[0].tolist(),
        "labels": labels[0].tolist(),
        "logits_shape": list(logits.shape),
        "logits": [float(x) for x in logits.flatten().tolist()],
        "loss": float(res.loss),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }))
    print(f"wrote {out / 'expected.json'}: {ids.shape[1]} tokens, loss {float(res.loss):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
