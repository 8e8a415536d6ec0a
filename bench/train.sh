#!/usr/bin/env bash
# Training throughput: pipe (burn, CPU) against PyTorch on this machine, same model shape, same
# steps (full fine-tuning, AdamW, clipping). Default: the ~7M-parameter Llama of the issue
# (dim 256, 4 layers, 4 heads, vocab 8000, seq 128, batch 8), 10 timed steps.
#
# Usage: bench/train.sh [DIM LAYERS HEADS VOCAB SEQ BATCH STEPS]
# Needs a Rust toolchain and Python 3; PyTorch/transformers are installed into
# target/bench-venv-train on first use (scripts/requirements-llama-fixtures.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARGS=("$@")
[ $# -eq 0 ] && ARGS=(256 4 4 8000 128 8 10)
cd "$ROOT"
cargo build --release --quiet -p pipe-train --example train_bench
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers" 2>/dev/null; then
  [ -x target/bench-venv-train/bin/python ] || { python3 -m venv target/bench-venv-train && target/bench-venv-train/bin/pip install -q -r scripts/requirements-llama-fixtures.txt; }
  PY=target/bench-venv-train/bin/python
fi
echo "machine: $(uname -m), $(nproc) cores; shape: dim/layers/heads/vocab/seq/batch/steps = ${ARGS[*]}"
RUST=$(target/release/examples/train_bench "${ARGS[@]}")
echo "pipe:    $RUST"
REF=$("$PY" bench/train_reference.py "${ARGS[@]}")
echo "pytorch: $REF"
python3 - "$RUST" "$REF" <<'PYEOF'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"pipe {r['tokens_per_s']:.0f} tokens/s vs PyTorch {p['tokens_per_s']:.0f} tokens/s: {r['tokens_per_s'] / p['tokens_per_s']:.2f}x")
PYEOF
