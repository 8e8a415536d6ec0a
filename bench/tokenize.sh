#!/usr/bin/env bash
# Tokenize benchmark: Alpaca preprocessing of 52,002 records (the 999-record demo set cycled),
# pipe (Rust) against the reference Python (transformers + Stanford Alpaca's preprocess), on
# this machine, same tokenizer, same max_len. Prints both rates and their ratio per tokenizer.
#
# Usage: bench/tokenize.sh [DATA.json] [TOKENIZER_DIR | all] [MAX_LEN]
#
# `all` (the default) runs three tokenizers, one line each in the summary:
#   llama-bpe     tests/fixtures/tokenize/llama-bpe: SentencePiece-style BPE (FastBpe)
#   gpt-neox      tests/fixtures/tokenize/gpt-neox: GPT-NeoX-20B's real byte-level BPE (ByteLevelBpe)
#   llama3-style  a Llama-3-style byte-level BPE (Llama-3's split regex, ignore_merges, BOS
#                 template; 32,000 tokens trained on DATA), built on first use into
#                 target/bench-tokenizers/ by crates/pipe-data/tests/fixtures/make_llama3_bytelevel.py
# Needs a Rust toolchain and Python 3; the reference's packages (scripts/requirements-fixtures.txt)
# are installed into target/bench-venv on first use (or set PYTHON to one that has them).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${1:-$ROOT/../shared/data/instructions/alpaca_en_demo.json}
WHICH=${2:-all}
MAXLEN=${3:-512}
cd "$ROOT"
cargo build --release --quiet -p pipe-data --example tokenize_bench
PY=${PYTHON:-python3}
if ! "$PY" -c "import transformers, tokenizers" 2>/dev/null; then
  [ -x target/bench-venv/bin/python ] || { python3 -m venv target/bench-venv && target/bench-venv/bin/pip install -q -r scripts/requirements-fixtures.txt; }
  PY=target/bench-venv/bin/python
fi

if [ "$WHICH" = all ]; then
  LLAMA3=target/bench-tokenizers/llama3-style
  [ -f "$LLAMA3/tokenizer.json" ] || "$PY" crates/pipe-data/tests/fixtures/make_llama3_bytelevel.py \
    --data "$DATA" --vocab-size 32000 --out "$LLAMA3"
  TOKS=("llama-bpe=tests/fixtures/tokenize/llama-bpe" "gpt-neox=tests/fixtures/tokenize/gpt-neox" "llama3-style=$LLAMA3")
else
  TOKS=("$(basename "$WHICH")=$WHICH")
fi

echo "machine: $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); data: $DATA; max_len $MAXLEN"
SUMMARY=()
for entry in "${TOKS[@]}"; do
  NAME=${entry%%=*}
  TOK=${entry#*=}
  echo "== $NAME ($TOK)"
  RUST=$(target/release/examples/tokenize_bench "$DATA" "$TOK" "$MAXLEN")
  echo "rust:   $RUST"
  REF=$("$PY" bench/tokenize_reference.py --data "$DATA" --tokenizer "$TOK" --max-len "$MAXLEN" --json)
  echo "$REF" | sed '$d' | sed 's/^/python: /'
  LINE=$(python3 - "$NAME" "$RUST" "$(echo "$REF" | tail -1)" <<'PYEOF'
import json, sys
name, r, p = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
pr = p.get("examples_per_s") or p.get("examples_per_sec")
path = r["impl"].split(", ")[1]
print(f"{name:13s} {path:18s} pipe {r['examples_per_s']:>7,.0f} examples/s vs reference {pr:>6,.0f} examples/s: "
      f"{r['examples_per_s'] / pr:5.1f}x (tokens {r['tokens']:,} vs {p['tokens']:,})")
PYEOF
  )
  echo "$LINE"
  SUMMARY+=("$LINE")
done
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
