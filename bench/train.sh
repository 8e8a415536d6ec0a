#!/usr/bin/env bash
# Training throughput: pipe (burn, CPU) against PyTorch on this machine, on the same steps
# (random tokens, AdamW, clipping at 1.0).
#
#   bench/train.sh                 (a) full fine-tuning of the ~7M-parameter Llama of the issue
#                                  (dim 256, 4 layers, 4 heads, vocab 8000, seq 128, batch 8),
#                                  10 timed steps: one replica, then two (`devices: [cpu, cpu]`),
#                                  and with gradient checkpointing (peak memory too)
#   bench/train.sh --lora DIR      (b) LoRA r=16 on all linear layers of the checkpoint in DIR
#                                  (e.g. SmolLM2-135M from ../shared/tools/smollm2-hf.sh),
#                                  seq 128, batch 8, 5 timed steps, against PEFT
#   bench/train.sh --backends      burn 0.21's CPU backends side by side on (a): flex (pipe's),
#                                  ndarray, candle (built with the bench-* features)
#
# Every figure is the median of REPEAT runs (default 3; 1 for --lora), this machine being noisy.
# Needs a Rust toolchain and Python 3; PyTorch/transformers/peft are installed into
# target/bench-venv-train on first use (scripts/requirements-llama-fixtures.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=${1:-full}
REPEAT=${REPEAT:-3}
[ "$MODE" = --lora ] && REPEAT=${REPEAT_LORA:-1}
FEATURES=()
[ "$MODE" = --backends ] && FEATURES=(--features bench-ndarray,bench-candle)
cargo build --release --quiet -p pipe-train --example train_bench "${FEATURES[@]}"
BIN=target/release/examples/train_bench
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
  [ -x target/bench-venv-train/bin/python ] || { python3 -m venv target/bench-venv-train && target/bench-venv-train/bin/pip install -q -r scripts/requirements-llama-fixtures.txt; }
  PY=target/bench-venv-train/bin/python
fi
echo "machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# The run with the median tokens/s of REPEAT runs of a command that prints one JSON line.
median_of() {
  local runs=() out rss
  for _ in $(seq "$REPEAT"); do
    out=$( { /usr/bin/time -f 'maxrss_kb %M' "$@" ; } 2>&1 )
    rss=$(($(grep -o 'maxrss_kb [0-9]*' <<<"$out" | cut -d' ' -f2) / 1024))
    runs+=("$(grep '^{' <<<"$out" | python3 -c "import json,sys; d=json.load(sys.stdin); d['peak_rss_mb']=$rss; print(json.dumps(d))")")
  done
  printf '%s\n' "${runs[@]}" | python3 -c "
import json, sys
runs = sorted((json.loads(l) for l in sys.stdin), key=lambda d: d['tokens_per_s'])
print(json.dumps(runs[len(runs) // 2]))"
}
# Runs pipe with the given arguments, prints its line, and keeps the JSON.
pipe_run() {
  local out
  out=$(median_of "$BIN" "$@")
  echo "pipe:    $out" >&2
  echo "$out"
}
ratio() {
  python3 - "$1" "$2" <<'PYEOF'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"  -> {r['impl']}, {r['replicas']} replica(s): {r['tokens_per_s']:.0f} tokens/s vs PyTorch {p['tokens_per_s']:.0f}: {r['tokens_per_s'] / p['tokens_per_s']:.2f}x")
PYEOF
}

# (a)'s shape: dim, layers, heads, vocab, seq, batch, timed steps.
SHAPE=(256 4 4 8000 128 8 10)
case "$MODE" in
  full)
    echo "(a) full fine-tuning, dim/layers/heads/vocab/seq/batch/steps = ${SHAPE[*]}"
    REF=$(median_of "$PY" bench/train_reference.py "${SHAPE[@]}")
    echo "pytorch: $REF"
    for args in "flex 1" "flex 2" "flex-checkpointing 1"; do
      read -r backend replicas <<<"$args"
      ratio "$(pipe_run "${SHAPE[@]}" "$backend" "$replicas")" "$REF"
    done
    ;;
  --lora)
    DIR=${2:?usage: bench/train.sh --lora MODEL_DIR}
    ARGS=(--lora "$DIR" 16 128 8 5)
    echo "(b) LoRA r=16 all-linear on $DIR, seq 128, batch 8, 5 steps"
    REF=$(median_of "$PY" bench/train_reference.py "${ARGS[@]}")
    echo "pytorch: $REF"
    for replicas in 1 2; do
      ratio "$(pipe_run "${ARGS[@]}" flex "$replicas")" "$REF"
    done
    ;;
  --backends)
    for backend in flex ndarray candle; do
      for replicas in 1 2; do
        pipe_run "${SHAPE[@]}" "$backend" "$replicas" >/dev/null
      done
    done
    ;;
  *)
    echo "usage: bench/train.sh [--lora MODEL_DIR | --backends]" >&2
    exit 2
    ;;
esac
