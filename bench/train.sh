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
# Every figure is the median of REPEAT runs (default 3; 1 for --lora), this machine being noisy;
# PyTorch and pipe take turns (round-robin), so that drift in the machine's load does not
# favour whichever side ran first.
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

RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT
# Runs a command that prints one JSON line once, adds its peak RSS, and keeps the line under
# LABEL.
run_once() {
  local label=$1 out rss
  shift
  out=$( { /usr/bin/time -f 'maxrss_kb %M' "$@" ; } 2>&1 )
  rss=$(($(grep -o 'maxrss_kb [0-9]*' <<<"$out" | cut -d' ' -f2) / 1024))
  grep '^{' <<<"$out" | python3 -c "import json,sys; d=json.load(sys.stdin); d['peak_rss_mb']=$rss; print(json.dumps(d))" >>"$RUNS/$label"
}
# The run with the median tokens/s of those kept under LABEL.
median() {
  python3 - "$RUNS/$1" <<'PYEOF'
import json, sys
runs = sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda d: d['tokens_per_s'])
print(json.dumps(runs[len(runs) // 2]))
PYEOF
}
# PyTorch and each pipe configuration take turns, REPEAT rounds, so that the machine's drift
# (other load, clock) falls on both sides of every ratio alike; then the medians.
# Arguments: the PyTorch arguments, `--`, then one "backend replicas" string per pipe run,
# `--`, then pipe's shape arguments.
interleaved() {
  local ref_args=() configs=() pipe_args=() backend replicas ref run
  while [ "$1" != -- ]; do ref_args+=("$1"); shift; done
  shift
  while [ "$1" != -- ]; do configs+=("$1"); shift; done
  shift
  pipe_args=("$@")
  for round in $(seq "$REPEAT"); do
    echo "round $round of $REPEAT" >&2
    run_once pytorch "$PY" bench/train_reference.py "${ref_args[@]}"
    for c in "${configs[@]}"; do
      read -r backend replicas <<<"$c"
      run_once "$backend-$replicas" "$BIN" "${pipe_args[@]}" "$backend" "$replicas"
    done
  done
  ref=$(median pytorch)
  echo "pytorch: $ref"
  for c in "${configs[@]}"; do
    read -r backend replicas <<<"$c"
    run=$(median "$backend-$replicas")
    echo "pipe:    $run"
    ratio "$run" "$ref"
  done
}
ratio() {
  python3 - "$1" "$2" <<'PYEOF'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"  -> {r['impl']}, {r['replicas']} replica(s): {r['tokens_per_s']:.0f} tokens/s vs PyTorch {p['tokens_per_s']:.0f}: {r['tokens_per_s'] / p['tokens_per_s']:.2f}x; peak RSS {r['peak_rss_mb']} MB vs {p['peak_rss_mb']} MB")
PYEOF
}

# (a)'s shape: dim, layers, heads, vocab, seq, batch, timed steps.
SHAPE=(256 4 4 8000 128 8 10)
case "$MODE" in
  full)
    echo "(a) full fine-tuning, dim/layers/heads/vocab/seq/batch/steps = ${SHAPE[*]}"
    interleaved "${SHAPE[@]}" -- "flex 1" "flex 2" "flex-checkpointing 1" -- "${SHAPE[@]}"
    ;;
  --lora)
    DIR=${2:?usage: bench/train.sh --lora MODEL_DIR}
    ARGS=(--lora "$DIR" 16 128 8 5)
    echo "(b) LoRA r=16 all-linear on $DIR, seq 128, batch 8, 5 steps"
    interleaved "${ARGS[@]}" -- "flex 1" "flex 2" -- "${ARGS[@]}"
    ;;
  --backends)
    for backend in flex ndarray candle; do
      for replicas in 1 2; do
        for _ in $(seq "$REPEAT"); do
          run_once "$backend-$replicas" "$BIN" "${SHAPE[@]}" "$backend" "$replicas"
        done
        echo "pipe:    $(median "$backend-$replicas")"
      done
    done
    ;;
  *)
    echo "usage: bench/train.sh [--lora MODEL_DIR | --backends]" >&2
    exit 2
    ;;
esac
