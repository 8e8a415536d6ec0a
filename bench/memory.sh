#!/usr/bin/env bash
# The memory plan against measured peaks: pipe_train::memory's estimate of a training run beside
# the peak RSS of that run on this CPU (gpu_bench throughput, 2 untimed + 2 timed steps of full
# fine-tuning or LoRA r16 on random tokens). The plan must land within ±20% of each measurement.
#
#   bench/memory.sh
#
# bench/gpu.sh sets the same plan beside nvidia-smi's peak on a GPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
cargo build --locked --quiet -p pipe-train --example gpu_bench
BIN=target/debug/examples/gpu_bench
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Shapes: (a) the training benchmark's 7M Llama; (b) a 40M Llama with grouped-query attention.
echo '{"vocab_size": 8000, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096}' >"$WORK/a.json"
echo '{"vocab_size": 16000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 4096}' >"$WORK/b.json"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf '%-40s %12s %12s %8s\n' "run (method shape seq batch dtype …)" "plan MiB" "peak MiB" "error"
worst=0
while read -r method shape seq batch rest; do
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
RUNS
python3 -c "print(f'largest error: {$worst:.1%} (target: within 20%)')"
