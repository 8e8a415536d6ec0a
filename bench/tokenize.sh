#!/usr/bin/env bash
# Tokenize benchmark: Alpaca preprocessing of 52,002 records (the 999-record demo set cycled),
# pipe (Rust) against the reference Python (transformers + Stanford Alpaca's preprocess), on
# this machine, same tokenizer, same max_len. Prints both rates and their ratio.
#
# Usage: bench/tokenize.sh [DATA.json] [TOKENIZER_DIR] [MAX_LEN]
# Needs a Rust toolchain and Python 3; the reference's packages (scripts/requirements-fixtures.txt)
# are installed into target/bench-venv on first use.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:-$ROOT/../shared/data/instructions/alpaca_en_demo.json}
TOK=${2:-$ROOT/tests/fixtures/tokenize/llama-bpe}
MAXLEN=${3:-512}
cd "$ROOT"
cargo build --release --quiet -p pipe-data --example tokenize_bench
PY=${PYTHON:-python3}
if ! "$PY" -c "import transformers, tokenizers" 2>/dev/null; then
  [ -x target/bench-venv/bin/python ] || { python3 -m venv target/bench-venv && target/bench-venv/bin/pip install -q -r scripts/requirements-fixtures.txt; }
  PY=target/bench-venv/bin/python
fi
echo "machine: $(uname -m), $(nproc) cores; data: $DATA; tokenizer: $TOK; max_len $MAXLEN"
RUST=$(target/release/examples/tokenize_bench "$DATA" "$TOK" "$MAXLEN")
echo "rust:   $RUST"
REF=$("$PY" bench/tokenize_reference.py --data "$DATA" --tokenizer "$TOK" --max-len "$MAXLEN" --json)
echo "$REF" | sed '$d' | sed 's/^/python: /'
python3 - "$RUST" "$(echo "$REF" | tail -1)" <<'PYEOF'
import json, sys
r, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
pr = p.get("examples_per_s") or p.get("examples_per_sec")
print(f"pipe {r['examples_per_s']:.0f} examples/s vs reference {pr:.0f} examples/s: {r['examples_per_s'] / pr:.1f}x")
PYEOF
