#!/usr/bin/env bash
# The memory plan against measured peaks: pipe_train::memory's estimate of a training run beside
# the peak RSS of that run on this CPU (gpu_bench throughput, 2 untimed + 2 timed steps of full
# fine-tuning or LoRA r16 on random tokens), then of evaluate stages (held-out loss, multiple
# choice, generation) beside the peak RSS of `pipe run` on a pipeline that ends in them. The
# plan must land within ±20% of each measurement.
#
#   bench/memory.sh [--eval-only]
#
# bench/gpu.sh sets the same plan beside nvidia-smi's peak on a GPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --locked --quiet -p pipe-train --example gpu_bench
cargo build --locked --quiet --bin pipe
BIN=target/debug/examples/gpu_bench
PIPE=$ROOT/target/debug/pipe
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
EVAL_ONLY=0
[ "${1:-}" = "--eval-only" ] && EVAL_ONLY=1
# Shapes: (a) the training benchmark's 7M Llama; (b) a 40M Llama with grouped-query attention.
# The last three runs have rows whose scores outgrow a block (pipe_model::attention).
echo '{"vocab_size": 8000, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096}' >"$WORK/a.json"
echo '{"vocab_size": 16000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096}' >"$WORK/b.json"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-40s %12s %12s %8s\n' "run (method shape seq batch dtype …)" "plan MiB" "peak MiB" "error"
worst=0
[ "$EVAL_ONLY" = 1 ] || while read -r method shape seq batch rest; do
  out=$( { /usr/bin/time -f 'peak_rss_kb %M' "$BIN" throughput cpu "$method" "$WORK/$shape.json" "$seq" "$batch" 2 $rest; } 2>&1 )
  rss=$(( $(grep -o 'peak_rss_kb [0-9]*' <<<"$out" | cut -d' ' -f2) / 1024 ))
  plan=$(grep '^{' <<<"$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["memory_plan"]["total"] // 2**20)')
  err=$(python3 -c "print(f'{($plan - $rss) / $rss:+.1%}')")
  worst=$(python3 -c "print(max($worst, abs(($plan - $rss) / $rss)))")
  printf '%-40s %12s %12s %8s\n' "$method $shape $seq $batch $rest" "$plan" "$rss" "$err"
done <<'RUNS'
full a 128 8 f32
full a 128 8 bf16
full a 128 8 f32 checkpointing
lora a 128 8 f32
full a 128 8 f32 2
full a 256 4 f32
full b 256 4 f32
lora b 256 4 bf16
full b 512 2 bf16 checkpointing
full a 128 8 bf16 bf16-weights
full b 256 4 bf16 bf16-weights
full b 256 4 bf16 bf16-weights stochastic
full b 512 2 bf16 checkpointing bf16-weights
full a 4096 1 f32
lora b 4096 1 bf16
full b 2048 2 f32 checkpointing
RUNS

# Evaluation: each run is a fresh store, so `pipe run` formats and tokenizes the held-out data
# first (a few MiB) and then evaluates; the plan is the one the evaluate stage logs before it
# loads its model.
echo '{"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 4096}' >"$WORK/c.json"
# (d) deep and narrow: a generation's key/value cache outgrows its weights.
echo '{"vocab_size": 2001, "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 24, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096}' >"$WORK/d.json"
mkdir -p "$WORK/eval"
cp -r examples/tokenizer "$WORK/eval/tokenizer"
python3 - "$WORK/eval" <<'PYEOF'
import json, random, sys
random.seed(0)
out = sys.argv[1]
words = "the a cat dog sun water tree stone runs falls grows is are of to in on light river".split()
say = lambda n: " ".join(random.choice(words) for _ in range(n))
# Held-out records from a few words to about 900 tokens.
records = [{"instruction": f"Describe it ({i}).", "input": "", "output": say(random.randint(5, 450))} for i in range(200)]
json.dump(records, open(f"{out}/long.json", "w"))
with open(f"{out}/arc.jsonl", "w") as f:
    for i in range(120):
        choices = [say(random.randint(1, 12)) for _ in range(4)]
        f.write(json.dumps({"id": str(i), "question": say(random.randint(8, 60)), "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}) + "\n")
PYEOF
# One evaluate stage: model shape, what it scores, batch size.
eval_pipeline() {
  local shape=$1 what=$2 batch=$3 max_len=$4
  local config
  config=$(cat "$WORK/$shape.json")
  cat <<YAML
name: eval-memory
stages:
  data: {kind: download, source: long.json}
  tokenizer: {kind: download, source: tokenizer}
  prompts: {kind: format, input: data, val_size: 0.5}
  tokens: {kind: tokenize, input: prompts, tokenizer: tokenizer, max_len: $max_len}
  eval:
    kind: evaluate
    model: {init: $config, seed: 1}
    tokenizer: tokenizer
    batch_size: $batch
YAML
  case $what in
    heldout) echo "    data: tokens" ;;
    tasks) echo "    tasks: [{name: arc, format: arc, path: arc.jsonl, limit: 60}, {name: arc5, format: arc, path: arc.jsonl, num_fewshot: 5, limit: 20}]" ;;
    generate) printf '    generate:\n      instructions: ["Name three colours.", "Write a long story about the river."]\n      max_new_tokens: 384\n' ;;
    generate-long) printf '    generate:\n      instructions: ["Write a long story about the river."]\n      max_new_tokens: 1500\n' ;;
    compare) printf '    base: {init: %s, seed: 2}\n    data: tokens\n    tasks: [{name: arc, format: arc, path: arc.jsonl, limit: 30}]\n    generate:\n      instructions: ["Name three colours."]\n      max_new_tokens: 64\n' "$config" ;;
  esac
}
while read -r shape what batch max_len; do
  rm -rf "$WORK/eval/cache"
  eval_pipeline "$shape" "$what" "$batch" "$max_len" >"$WORK/eval/p.yaml"
  out=$( { cd "$WORK/eval" && /usr/bin/time -f 'peak_rss_kb %M' "$PIPE" -q --cache cache run p.yaml; } 2>&1 ) || { echo "$out" >&2; exit 1; }
  rss=$(( $(grep -o 'peak_rss_kb [0-9]*' <<<"$out" | cut -d' ' -f2) / 1024 ))
  line=$(grep -rh "memory plan: about" "$WORK/eval/cache/logs" | tail -n 1)
  plan=$(python3 -c "
import re, sys
n, unit = re.search(r'about ([0-9.]+) (MiB|GiB)', sys.argv[1]).groups()
print(int(float(n) * (1024 if unit == 'GiB' else 1)))" "$line")
  err=$(python3 -c "print(f'{($plan - $rss) / $rss:+.1%}')")
  worst=$(python3 -c "print(max($worst, abs(($plan - $rss) / $rss)))")
  printf '%-40s %12s %12s %8s\n' "evaluate $shape $what batch $batch max_len $max_len" "$plan" "$rss" "$err"
  printf '%-40s %s\n' "" "${line#*memory plan: }"
done <<'RUNS'
b heldout 8 512
b heldout 32 1024
b tasks 16 512
b generate 8 512
c heldout 8 512
c tasks 32 512
a compare 8 512
d generate-long 1 512
RUNS
python3 -c "print(f'largest error: {$worst:.1%} (target: within 20%)')"
