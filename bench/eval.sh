#!/usr/bin/env bash
# Evaluation: pipe's `evaluate` stage against a transformers scoring loop in the style of
# lm-evaluation-harness (scripts/eval_reference.py), on ARC-Easy validation with a real
# pretrained model: both must give the same acc and acc_norm on the same items, and the figures
# compared are items scored per second.
#
# Usage: bench/eval.sh MODEL_DIR ARC_EASY_JSONL [LIMIT] [PYTHON]
#   MODEL_DIR       a Hugging Face Llama-architecture model directory, e.g. the SmolLM2-135M
#                   checkpoint that ../shared/tools/smollm2-hf.sh builds
#   ARC_EASY_JSONL  Hugging Face rows of allenai/ai2_arc ARC-Easy validation
#   LIMIT           items (default: all)
#   PYTHON          a python with torch + transformers; default: python3 if it has them, else a
#                   venv in target/bench-venv-eval (scripts/requirements-eval-fixtures.txt)
# Environment: PIPE, a built pipe binary to use (default: cargo build --release); DEVICE, where
# both sides score (default cpu; bench/gpu.sh sets cuda); EVAL_WORK, the work folder (default
# target/bench-eval). The last line printed is the figures as JSON, after `json: `.
set -euo pipefail
MODEL=$(realpath "$1")
DATA=$(realpath "$2")
LIMIT=${3:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${4:-python3}
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  VENV="$ROOT/target/bench-venv-eval"
  [ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q -r "$ROOT/scripts/requirements-eval-fixtures.txt"; }
  PY="$VENV/bin/python"
fi
DEVICE=${DEVICE:-cpu}
if [ -z "${PIPE:-}" ]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  PIPE="$ROOT/target/release/pipe"
fi
# Kept after the run (the store, the reference's JSON), to look at the per-item results.
WORK=${EVAL_WORK:-"$ROOT/target/bench-eval"}
rm -rf "$WORK" && mkdir -p "$WORK"

limit_yaml=""; limit_arg=()
if [ -n "$LIMIT" ]; then limit_yaml=", limit: $LIMIT"; limit_arg=(--limit "$LIMIT"); fi
cat > "$WORK/p.yaml" <<YAML
name: eval-bench
stages:
  eval:
    kind: evaluate
    model: $MODEL
    tasks:
      - {name: arc_easy, format: arc, path: $DATA$limit_yaml}
    batch_size: 16
    device: $DEVICE
YAML

t0=$(date +%s.%N)
"$PIPE" -q --cache "$WORK/cache" run "$WORK/p.yaml" >/dev/null
t1=$(date +%s.%N)
key=$("$PIPE" --cache "$WORK/cache" show "$WORK/p.yaml" eval --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["key"])')
OUT="$WORK/cache/stages/$key/out"

"$PY" "$ROOT/scripts/eval_reference.py" --model "$MODEL" --format arc --data "$DATA" \
  "${limit_arg[@]}" --batch-size 16 --device "$DEVICE" --out "$WORK/ref.json" >/dev/null

LOG=$(ls "$WORK/cache/logs/$key/"*.log | tail -n 1)
"$PY" - "$OUT" "$WORK/ref.json" "$t0" "$t1" "$MODEL" "$LOG" <<'PY'
import json, sys, platform, os, re
out, ref_path, t0, t1, model, log = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
log_text = open(log).read()
scoring = float(re.search(r"scored in ([0-9.]+) s", log_text).group(1))
plan = re.search(r"memory plan: (.*)", log_text)
plan = plan.group(1).strip() if plan else None
m = json.load(open(os.path.join(out, "metrics.json")))["model"]["tasks"]["arc_easy"]
items = [json.loads(l) for l in open(os.path.join(out, "items", "arc_easy.jsonl"))]
ref = json.load(open(ref_path))
n = ref["n"]
assert m["items"] == n == len(items), (m["items"], n, len(items))
d = max(abs(a - b) for it, r in zip(items, ref["items"]) for a, b in zip(it["loglikelihoods"], r["loglikelihoods"]))
same_pred = sum(it["pred"] == r["pred"] for it, r in zip(items, ref["items"]))
same_norm = sum(it["pred_norm"] == r["pred_norm"] for it, r in zip(items, ref["items"]))
pipe_s = t1 - t0  # the whole `pipe run`: load, tokenize, score, write
import torch, transformers
print(f"ARC-Easy validation, {n} items, 0-shot; model {model}")
print(f"machine: {os.cpu_count()} cores, {platform.machine()}; "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
print(f"{'':24}{'pipe':>10}{'reference':>12}")
print(f"{'acc':24}{m['acc']:>10.4f}{ref['acc']:>12.4f}")
print(f"{'acc_norm':24}{m['acc_norm']:>10.4f}{ref['acc_norm']:>12.4f}")
print(f"{'acc stderr':24}{m['acc_stderr']:>10.4f}{ref['acc_stderr']:>12.4f}")
print(f"same prediction (acc / acc_norm): {same_pred}/{n}, {same_norm}/{n}; max |Δ log-likelihood| {d:.2e}")
print(f"{'items/s (scoring)':24}{n / scoring:>10.2f}{ref['items_per_s']:>12.2f}   (pipe {scoring:.1f} s, reference {ref['seconds']:.1f} s)")
print(f"{'items/s (whole run)':24}{n / pipe_s:>10.2f}{'':>12}   (pipe run: load, tokenize, score, write: {pipe_s:.1f} s)")
print(f"ratio pipe/reference (scoring): {(n / scoring) / ref['items_per_s']:.2f}x")
print(f"pipe's memory plan: {plan}")
ok = m["acc"] == ref["acc"] and m["acc_norm"] == ref["acc_norm"]
print("acc and acc_norm equal: " + ("yes" if ok else "NO"))
print("json: " + json.dumps({"n": n, "pipe_items_per_s": n / scoring, "reference_items_per_s": ref["items_per_s"],
      "pipe_whole_run_s": pipe_s, "acc": m["acc"], "acc_norm": m["acc_norm"], "reference_acc": ref["acc"],
      "reference_acc_norm": ref["acc_norm"], "same_acc": ok, "same_predictions": same_pred,
      "max_abs_loglikelihood_diff": d, "memory_plan": plan}))
sys.exit(0 if ok else 1)
PY
