#!/usr/bin/env bash
# GGUF export on a real model: pipe's `format: gguf` against llama.cpp's own converter
# (convert_hf_to_gguf.py) on the same Hugging Face directory — every metadata key and every
# tensor compared (SHA-256 of the bytes), and the time each takes — then llama.cpp
# (node-llama-cpp, from tests/setup.sh) generating greedily from pipe's f16 file against
# transformers on the original weights.
#
# Usage: bench/gguf.sh MODEL_DIR LLAMA_CPP_DIR [PYTHON]
#   MODEL_DIR      a Llama-architecture model with a byte-level BPE tokenizer.json, e.g. the
#                  SmolLM2-135M-Instruct checkpoint ../shared/tools/smollm2-hf.sh builds
#   LLAMA_CPP_DIR  a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/), e.g. vendor/llama.cpp
#                  of PyPI's llama-cpp-python sdist
#   PYTHON         a python with torch, transformers and sentencepiece
#                  (scripts/requirements-llama-fixtures.txt + sentencepiece); default python3
# Environment: PIPE, a built pipe binary (default: cargo build --release); GGUF_WORK, the work
# folder (default target/bench-gguf). The last line printed is the figures as JSON, after `json: `.
set -euo pipefail
MODEL=$(realpath "$1")
LLAMA_CPP=$(realpath "$2")
PY=${3:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NODE_TOOLS="$ROOT/target/test-tools/node"
[ -d "$NODE_TOOLS/node_modules/node-llama-cpp" ] || { echo "run bash tests/setup.sh first (node-llama-cpp)" >&2; exit 1; }
if [ -z "${PIPE:-}" ]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  PIPE="$ROOT/target/release/pipe"
fi
WORK=${GGUF_WORK:-"$ROOT/target/bench-gguf"}
rm -rf "$WORK" && mkdir -p "$WORK"

declare -A pipe_s ref_s
for t in f16 q8_0; do
  printf 'name: gguf-bench\nstages:\n  %s: {kind: export, model: %s, format: gguf, dtype: %s}\n' "$t" "$MODEL" "$t" > "$WORK/$t.yaml"
  t0=$(date +%s.%N)
  "$PIPE" -q --cache "$WORK/cache" run "$WORK/$t.yaml" >/dev/null
  t1=$(date +%s.%N)
  pipe_s[$t]=$(echo "$t1 - $t0" | bc)
  key=$("$PIPE" --cache "$WORK/cache" show "$WORK/$t.yaml" "$t" --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key"])')
  ln -sf "$WORK/cache/stages/$key/out/model-$t.gguf" "$WORK/pipe-$t.gguf"
  t0=$(date +%s.%N)
  (cd "$LLAMA_CPP" && HF_HUB_OFFLINE=1 "$PY" convert_hf_to_gguf.py "$MODEL" --outtype "$t" --outfile "$WORK/llama-cpp-$t.gguf" >"$WORK/convert-$t.log" 2>&1)
  t1=$(date +%s.%N)
  ref_s[$t]=$(echo "$t1 - $t0" | bc)
done

PYTHONPATH="$LLAMA_CPP/gguf-py:$ROOT/tests/tools" "$PY" - "$WORK" "${pipe_s[f16]}" "${ref_s[f16]}" "${pipe_s[q8_0]}" "${ref_s[q8_0]}" <<'PY' | tee "$WORK/compare.txt"
import json, sys
from gguf_describe import describe
work = sys.argv[1]
secs = {"f16": (float(sys.argv[2]), float(sys.argv[3])), "q8_0": (float(sys.argv[4]), float(sys.argv[5]))}
figures = {}
for t in ["f16", "q8_0"]:
    ours, theirs = describe(f"{work}/pipe-{t}.gguf"), describe(f"{work}/llama-cpp-{t}.gguf")
    keys = sorted(set(ours["metadata"]) | set(theirs["metadata"]))
    differ = [k for k in keys if ours["metadata"].get(k) != theirs["metadata"].get(k)]
    tensors_equal = sum(a == b for a, b in zip(ours["tensors"], theirs["tensors"]))
    for k in differ:
        print(f"{t}: metadata {k}: pipe {str(ours['metadata'].get(k))[:120]} | llama.cpp {str(theirs['metadata'].get(k))[:120]}")
    print(f"{t}: {len(keys) - len(differ)}/{len(keys)} metadata keys equal, {tensors_equal}/{len(theirs['tensors'])} tensors equal "
          f"(pipe {len(ours['tensors'])}); export {secs[t][0]:.1f} s (pipe run, store included) vs {secs[t][1]:.1f} s (convert_hf_to_gguf.py)")
    figures[t] = {"keys": len(keys), "keys_differing": differ, "tensors": len(theirs["tensors"]),
                  "tensors_equal": tensors_equal, "pipe_s": round(secs[t][0], 2), "converter_s": round(secs[t][1], 2)}
json.dump(figures, open(f"{work}/figures.json", "w"))
PY

PROMPTS='["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "Once upon a time", "def fibonacci(n):"]'
node "$ROOT/tests/tools/llama_cpp_generate.mjs" "$WORK/pipe-f16.gguf" "$PROMPTS" 24 "$NODE_TOOLS" > "$WORK/llama-cpp.jsonl"
"$PY" - "$MODEL" "$WORK" "$PROMPTS" <<'PY'
import json, sys
import torch, transformers
model_dir, work, prompts = sys.argv[1:]
prompts = json.loads(prompts)
tok = transformers.AutoTokenizer.from_pretrained(model_dir)
model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
figures = json.load(open(f"{work}/figures.json"))
same_prompt = same_gen = 0
rows = [json.loads(l) for l in open(f"{work}/llama-cpp.jsonl")]
for prompt, row in zip(prompts, rows):
    ids = tok(prompt)["input_ids"]
    same_prompt += ids == row["prompt"]
    out = model.generate(torch.tensor([row["prompt"]]), max_new_tokens=24, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id or 0)[0, len(row["prompt"]):].tolist()
    n = next((i for i, (a, b) in enumerate(zip(out, row["generated"])) if a != b), len(out))
    same_gen += n == len(out)
    print(f"{prompt!r}: encodings {'equal' if ids == row['prompt'] else 'DIFFER'}; greedy tokens equal for {n}/{len(out)}: "
          f"{tok.decode(row['generated'])!r}")
figures["generation"] = {"prompts": len(prompts), "encodings_equal": same_prompt, "continuations_equal": same_gen, "tokens": 24}
print("json: " + json.dumps(figures))
PY
