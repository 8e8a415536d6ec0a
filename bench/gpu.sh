#!/usr/bin/env bash
# The prepared GPU check: pipe on an NVIDIA GPU beside PyTorch, in one run, figures out.
#
#   bench/gpu.sh stage          here, with a Rust toolchain: builds `pipe` and the benchmark
#                               program `gpu_bench` with `--release --features cuda`, strips them
#                               and stages them (with the CCCL headers wheel, a tokenizer and
#                               ARC-Easy rows) in bench/gpu-stage/ (ignored by git, < 64 MiB)
#   bench/gpu.sh run OUT        on the GPU machine (no Rust, no network; Python with torch,
#                               transformers and peft): writes OUT/gpu.json and OUT/gpu.md
#   bench/gpu.sh run OUT --cpu  the same on the CPU at small shapes, after `stage --cpu` (the
#                               test profile's binaries, without CUDA): checks the script itself
#
# What `run` measures (each part under its own time limit; a failed part is recorded with its
# error and the rest go on; the whole run stays under 9 minutes):
#   (a) numerics: a small random Llama saved by torch; pipe's logits against torch's on the
#       device in f32 and in bf16 mixed precision against torch.autocast, and a 4-step training
#       curve (bench/gpu_reference.py numerics, gpu_bench numerics)
#   (b) speed and memory, pipe and PyTorch on the same shapes and batches: Llama-2-7B-shaped
#       LoRA r16 on all linear layers and full fine-tuning of a ~1.1B Llama (TinyLlama's shape),
#       seq 512, bf16: tokens/s, peak GPU memory (nvidia-smi, over the device's baseline), MFU
#   (c) the tiny pipeline end to end on `cuda` (wall time, held-out loss, exact match)
#   (d) multiple-choice scoring (ARC-Easy rows, a random model of SmolLM2-135M's shape):
#       items/s of pipe's evaluate stage and of the transformers reference, same answers
#   (e) the memory targets on Llama-2-7B's shape at 512 tokens, when time is left: LoRA r16
#       at micro-batch 4 with gradient checkpointing (<= 20 GB), full fine-tuning with
#       `weights: bf16`, stochastic rounding and gradient checkpointing at micro-batch 1
#       (<= 72 GB): peak GPU memory beside pipe's plan, one timed step each
#
# Invocation through the device tool:  run(command="bash bench/gpu.sh run \"$OUT\"",
#                                          carry=["bench/gpu-stage"], timeout_s=600)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
STAGE="$ROOT/bench/gpu-stage"
# The CUDA API the binaries are built against (cudarc reads it at build time; without nvcc it
# would pick its newest, 13.x, whose driver entry points older drivers lack). 12.8 matches the
# NVRTC of PyTorch's CUDA 12.8 wheels; a newer driver runs it too.
CUDA_API=${CUDA_API:-12080}
CCCL_WHEEL="nvidia-cuda-cccl-cu12==12.8.90"

stage() {
  set -e
  local cpu=${1:-}
  rm -rf "$STAGE" && mkdir -p "$STAGE"
  local profile=release
  if [ "$cpu" = --cpu ]; then
    # The test build's profile (dependencies optimised), which a developer has built already.
    profile=debug
    cargo build --locked --quiet --bin pipe
    cargo build --locked --quiet -p pipe-train --example gpu_bench
  else
    CUDARC_CUDA_VERSION=$CUDA_API cargo build --release --locked --quiet --features cuda --bin pipe
    CUDARC_CUDA_VERSION=$CUDA_API cargo build --release --locked --quiet -p pipe-train --features cuda --example gpu_bench
  fi
  # Stripped, the CUDA builds are ~40 MB each; xz brings each to ~6 MB (Python's lzma unpacks
  # them on the GPU machine, which need not have xz).
  for bin in "target/$profile/pipe" "target/$profile/examples/gpu_bench"; do
    strip -o "$STAGE/tmp" "$bin"
    python3 -c 'import lzma, shutil, sys
with open(sys.argv[1], "rb") as f, lzma.open(sys.argv[2], "wb", preset=6) as out:
    shutil.copyfileobj(f, out)' "$STAGE/tmp" "$STAGE/$(basename "$bin").xz"
    rm "$STAGE/tmp"
  done
  # NVRTC needs CUDA's C++ headers; PyTorch's wheels ship all but CCCL's (cuda/barrier, …).
  pip download --no-deps -q -d "$STAGE" "$CCCL_WHEEL"
  local shared="$ROOT/../shared"
  if [ -f "$shared/tokenizers/gpt-neox-20b.tokenizer.json" ] && [ -f "$shared/data/eval/arc_easy.validation.jsonl" ]; then
    cp "$shared/tokenizers/gpt-neox-20b.tokenizer.json" "$STAGE/tokenizer.json"
    head -n 300 "$shared/data/eval/arc_easy.validation.jsonl" >"$STAGE/arc_easy.jsonl"
  else
    echo "no ../shared: (d) will score with examples/tokenizer on generated rows" >&2
  fi
  cat >"$STAGE/manifest.json" <<EOF
{"commit": "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo '+changes')", "built": "$(date -u +%FT%TZ)", "rustc": "$(rustc --version)", "cuda_api": "${cpu:-$CUDA_API}", "mode": "${cpu:-cuda}"}
EOF
  du -sh "$STAGE"
  local bytes
  bytes=$(du -sb "$STAGE" | cut -f1)
  [ "$bytes" -lt $((56 << 20)) ] || { echo "bench/gpu-stage is $bytes bytes: over the 56 MiB left beside the repository" >&2; exit 1; }
}

# ---------------------------------------------------------------------------------------------
# run

log() { echo "[gpu.sh $(date -u +%T) +$((SECONDS))s] $*" >&2; }

# Runs part NAME under a time limit (never past the run's deadline), its stdout into
# $PARTS/NAME.out, stderr into NAME.err, and the exit status into NAME.rc.
part() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    log "$name: skipped (the run's time is spent)"
    echo skipped >"$PARTS/$name.rc"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "$name (at most ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" >"$PARTS/$name.out" 2>"$PARTS/$name.err"
  local rc=$?
  echo "$rc" >"$PARTS/$name.rc"
  [ "$rc" -eq 0 ] || log "$name failed (exit $rc): $(tail -n 3 "$PARTS/$name.err" | tr '\n' ' ')"
  return "$rc"
}

# Peak device memory of a command: nvidia-smi samples memory.used every 100 ms while it runs;
# the figure is the peak minus the device's use just before (one process on the device at a time).
with_memory() {
  local name=$1
  shift
  if [ "$GPU" = 1 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >"$PARTS/$name.mem0"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 >"$PARTS/$name.mem" &
    local poller=$!
    "$@"
    local rc=$?
    kill "$poller" 2>/dev/null
    wait "$poller" 2>/dev/null
    return "$rc"
  fi
  "$@"
}

# Sets LD_LIBRARY_PATH and CUDA_PATH so that burn-cuda finds the driver, NVRTC and CUDA's
# headers: a CUDA toolkit where there is one, else the libraries and headers of the NVIDIA wheels
# PyTorch was installed with (and the staged CCCL wheel). Fails naming what is missing.
find_cuda() {
  local nv
  nv=$("$PY" -c 'import nvidia, os; print(os.path.dirname(next(iter(nvidia.__path__))) + "/nvidia")' 2>/dev/null || true)
  local libs=()
  if [ -n "$nv" ]; then
    for d in "$nv"/*/lib; do [ -d "$d" ] && libs+=("$d"); done
  fi
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do [ -d "$d" ] && libs+=("$d"); done
  export LD_LIBRARY_PATH="$(IFS=:; echo "${libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  "$PY" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null \
    || { echo "no NVIDIA driver: libcuda.so.1 cannot be loaded" >&2; return 1; }
  local nvrtc=""
  for d in "${libs[@]}"; do compgen -G "$d/libnvrtc.so*" >/dev/null && nvrtc=$d; done
  [ -n "$nvrtc" ] \
    || { echo "NVRTC (libnvrtc.so.12) not found in the CUDA toolkit nor in the Python nvidia-* wheels (${libs[*]:-none})" >&2; return 1; }
  if [ -z "${CUDA_PATH:-}" ] && [ -f /usr/local/cuda/include/cuda_runtime.h ] && [ -d /usr/local/cuda/include/cuda ]; then
    export CUDA_PATH=/usr/local/cuda
  elif [ -z "${CUDA_PATH:-}" ]; then
    # One include directory made of links to every wheel's headers.
    local inc="$WORK/cuda/include"
    mkdir -p "$inc"
    for d in /usr/local/cuda/include "$nv"/*/include; do
      [ -d "$d" ] && cp -rsn "$d"/. "$inc"/ 2>/dev/null
    done
    if [ ! -d "$inc/cuda" ] && ls "$STAGE"/nvidia_cuda_cccl*.whl >/dev/null 2>&1; then
      "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$STAGE"/nvidia_cuda_cccl*.whl "$WORK/cccl"
      cp -rsn "$WORK"/cccl/nvidia/cuda_cccl/include/. "$inc"/
    fi
    export CUDA_PATH="$WORK/cuda"
  fi
  [ -f "$CUDA_PATH/include/cuda_runtime.h" ] \
    || { echo "CUDA's headers (cuda_runtime.h) not found: no /usr/local/cuda and no nvidia-cuda-runtime wheel" >&2; return 1; }
  log "CUDA_PATH=$CUDA_PATH; libraries from ${libs[*]}"
}

run() {
  OUT=$(mkdir -p "$1" && cd "$1" && pwd)
  local mode=${2:-}
  GPU=1 DEVICE=cuda
  [ "$mode" = --cpu ] && GPU=0 DEVICE=cpu
  DEADLINE=$((SECONDS + ${GPU_BENCH_SECONDS:-530}))
  PARTS="$OUT/parts"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/pipe-gpu.XXXXXX")
  mkdir -p "$PARTS"
  PY=${PYTHON:-python3}
  [ -f "$STAGE/pipe.xz" ] && [ -f "$STAGE/gpu_bench.xz" ] \
    || { echo "bench/gpu-stage/ is missing: run \`bench/gpu.sh stage\` first, and carry bench/gpu-stage" >&2; exit 2; }
  "$PY" -c 'import torch, transformers, peft' \
    || { echo "$PY lacks torch, transformers or peft" >&2; exit 2; }
  BIN="$WORK/bin"
  mkdir -p "$BIN"
  for name in pipe gpu_bench; do
    "$PY" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as f, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(f, out)' "$STAGE/$name.xz" "$BIN/$name" && chmod +x "$BIN/$name"
  done
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -srm), $(nproc) cores"
    "$PY" -c 'import torch, transformers, peft, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
    cat "$STAGE/manifest.json"
  } >"$PARTS/machine.txt" 2>&1
  log "$(tr '\n' ' ' <"$PARTS/machine.txt")"
  if [ "$GPU" = 1 ]; then
    find_cuda 2>"$PARTS/cuda.err" || { cat "$PARTS/cuda.err" >&2; echo 1 >"$PARTS/cuda.rc"; summarize; exit 1; }
    echo 0 >"$PARTS/cuda.rc"
  fi
  export CUBECL_DEBUG_LOG=0 RUST_BACKTRACE=1

  # (a) numerics
  part numerics_reference 120 "$PY" bench/gpu_reference.py numerics "$WORK/numerics" --device "$DEVICE" \
    && part numerics 120 "$BIN/gpu_bench" numerics "$WORK/numerics" "$DEVICE"

  # (b) speed and memory; Llama-2-7B's and TinyLlama-1.1B's shapes (config.json fields)
  local seq=512 steps=5 lora_batch=4 full_batch=8
  echo '{"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}' >"$WORK/llama-7b.json"
  echo '{"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}' >"$WORK/llama-1b.json"
  if [ "$GPU" = 0 ]; then
    seq=32 steps=2 lora_batch=2 full_batch=2
    echo '{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}' >"$WORK/llama-7b.json"
    echo '{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}' >"$WORK/llama-1b.json"
  fi
  echo "{\"seq\": $seq, \"steps\": $steps, \"lora_batch\": $lora_batch, \"full_batch\": $full_batch}" >"$PARTS/shapes.json"
  with_memory torch_lora part torch_lora 100 "$PY" bench/gpu_reference.py throughput --method lora --config "$WORK/llama-7b.json" --seq $seq --batch $lora_batch --steps $steps --device "$DEVICE"
  with_memory pipe_lora part pipe_lora 150 "$BIN/gpu_bench" throughput "$DEVICE" lora "$WORK/llama-7b.json" $seq $lora_batch $steps
  with_memory torch_full part torch_full 60 "$PY" bench/gpu_reference.py throughput --method full --config "$WORK/llama-1b.json" --seq $seq --batch $full_batch --steps $steps --device "$DEVICE"
  with_memory pipe_full part pipe_full 120 "$BIN/gpu_bench" throughput "$DEVICE" full "$WORK/llama-1b.json" $seq $full_batch $steps

  # (c) the tiny pipeline end to end on the device
  sed -e "s#\.\./examples/#$ROOT/examples/#g" -e "s#\.\./out/#$WORK/out/#g" \
      -e "s#devices: \[cpu, cpu\].*#device: $DEVICE#" pipelines/tiny.yaml >"$WORK/tiny.yaml"
  sed -i "/^    batch_size: 32/a\\    device: $DEVICE" "$WORK/tiny.yaml"
  local tiny_set=()
  [ "$GPU" = 0 ] && tiny_set=(--set params.epochs=1)
  part tiny 240 bash -c 'start=$(date +%s%N); "$0" -q --cache "$1/tiny-cache" run "$1/tiny.yaml" "${@:2}" || exit $?; echo "{\"wall_s\": $((($(date +%s%N) - start) / 1000000)).0e-3}"' \
    "$BIN/pipe" "$WORK" "${tiny_set[@]}" \
    && "$BIN/pipe" --cache "$WORK/tiny-cache" show "$WORK/tiny.yaml" eval --json >"$PARTS/tiny_eval_key.json" 2>>"$PARTS/tiny.err" \
    && cp "$WORK/tiny-cache/stages/$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["key"])' "$PARTS/tiny_eval_key.json")/out/metrics.json" "$PARTS/tiny_metrics.json"

  # (d) multiple-choice scoring
  local tok="$STAGE/tokenizer.json" rows="$STAGE/arc_easy.jsonl"
  if [ ! -f "$tok" ]; then
    tok="$ROOT/examples/tokenizer/tokenizer.json" rows="$WORK/arc_easy.jsonl"
    "$PY" - "$rows" <<'PYEOF'
import json, random, sys
random.seed(0)
words = "the a cat dog sun water tree stone runs falls grows is are of to in on".split()
with open(sys.argv[1], "w") as f:
    for i in range(300):
        q = " ".join(random.choice(words) for _ in range(random.randint(8, 30)))
        choices = [" ".join(random.choice(words) for _ in range(random.randint(1, 6))) for _ in range(4)]
        f.write(json.dumps({"id": str(i), "question": q, "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}) + "\n")
PYEOF
  fi
  local vocab
  vocab=$("$PY" -c 'import json,sys; t=json.load(open(sys.argv[1])); print(max(max(t["model"]["vocab"].values()), *[a["id"] for a in t.get("added_tokens", [])]) + 1)' "$tok")
  local limit=300
  [ "$GPU" = 0 ] && limit=20
  part scoring_model 60 "$PY" bench/gpu_reference.py scoring-model "$WORK/scoring-model" --vocab "$vocab" \
    && cp "$tok" "$WORK/scoring-model/tokenizer.json" \
    && echo '{"tokenizer_class": "PreTrainedTokenizerFast"}' >"$WORK/scoring-model/tokenizer_config.json" \
    && part scoring 150 env PIPE="$BIN/pipe" DEVICE="$DEVICE" EVAL_WORK="$WORK/eval" \
         bash bench/eval.sh "$WORK/scoring-model" "$rows" "$limit" "$PY"

  # (e) memory targets (last: skipped when the run's time is spent)
  with_memory target_lora part target_lora 120 "$BIN/gpu_bench" throughput "$DEVICE" lora "$WORK/llama-7b.json" $seq $lora_batch 1 bf16 checkpointing
  with_memory target_full part target_full 150 "$BIN/gpu_bench" throughput "$DEVICE" full "$WORK/llama-7b.json" $seq 1 1 bf16 checkpointing bf16-weights stochastic

  summarize
  rm -rf "$WORK"
}

# OUT/gpu.json (every part's figures or error) and OUT/gpu.md (the table for bench/results/).
summarize() {
  "$PY" - "$PARTS" "$OUT" <<'PYEOF'
import json, os, re, sys
parts, out = sys.argv[1], sys.argv[2]

def text(name, ext):
    p = os.path.join(parts, f"{name}.{ext}")
    return open(p, errors="replace").read() if os.path.exists(p) else None

def result(name):
    rc = text(name, "rc")
    if rc is None:
        return None
    rc = rc.strip()
    if rc != "0":
        err = (text(name, "err") or "").strip().splitlines()
        why = "timed out" if rc in ("124", "137") else ("skipped: the run's time was spent" if rc == "skipped" else f"exit {rc}")
        return {"error": why, "stderr_tail": err[-15:]}
    lines = [l for l in (text(name, "out") or "").splitlines() if l.startswith("{")]
    r = json.loads(lines[-1]) if lines else {}
    mem = text(name, "mem")
    if mem:
        used = [int(x) for x in mem.split() if x.strip().isdigit()]
        base = int((text(name, "mem0") or "0").split()[0] or 0)
        if used:
            r["peak_gpu_mib"] = max(used) - base
    return r

report = {"machine": text("machine", "txt"), "cuda_setup": result("cuda")}
report["shapes"] = json.loads(text("shapes", "json") or "{}")
report["numerics"] = result("numerics") if result("numerics_reference") and "error" not in result("numerics_reference") else result("numerics_reference")
tiny = result("tiny")
if tiny is not None and "error" not in tiny and text("tiny_metrics", "json"):
    m = json.loads(text("tiny_metrics", "json"))
    tiny["metrics"] = m
report["tiny_pipeline"] = tiny
scoring = result("scoring") if text("scoring", "rc") else result("scoring_model")
if scoring is not None and "error" not in scoring:
    js = [l for l in (text("scoring", "out") or "").splitlines() if l.startswith("json: ")]
    scoring = json.loads(js[-1][6:]) if js else {"error": "no figures", "stdout": text("scoring", "out")}
report["scoring"] = scoring
report["memory_targets"] = {"lora_r16_checkpointing": result("target_lora"), "full_bf16_weights_stochastic_checkpointing": result("target_full")}

# MFU: model FLOPs per token (fwd + bwd) over the device's dense bf16 peak. Full fine-tuning
# 6N + 12·L·d·s (weights' and activations' gradients, attention scores); LoRA 4N + 12·L·d·s
# (a frozen weight needs no gradient of its own; the adapters' FLOPs are negligible).
machine = report["machine"] or ""
peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
peak = next((v for k, v in peaks.items() if k in machine), None)
shapes = report["shapes"]
cfgs = {"lora": dict(L=32, d=4096), "full": dict(L=22, d=2048)}
for impl in ("pipe", "torch"):
    for method in ("lora", "full"):
        r = result(f"{impl}_{method}")
        if r and "tokens_per_s" in r and peak:
            n = r["params"]
            per_token = (4 if method == "lora" else 6) * n + 12 * cfgs[method]["L"] * cfgs[method]["d"] * r["seq"]
            r["mfu"] = r["tokens_per_s"] * per_token / peak
        report[f"{method}_{impl}"] = r
json.dump(report, open(os.path.join(out, "gpu.json"), "w"), indent=1)

def cell(r, key, fmt):
    if not r:
        return "—"
    if "error" in r:
        return r["error"]
    v = r.get(key)
    return "—" if v is None else fmt.format(v)

lines = ["# bench/gpu.sh", "", "```", (report["machine"] or "").strip(), "```", ""]
setup = report["cuda_setup"] or {}
if "error" in setup:
    lines += ["CUDA setup failed, nothing ran: " + " ".join(setup.get("stderr_tail", [])), ""]
n = report["numerics"] or {}
if not n:
    lines += ["(a) numerics: not run", ""]
elif "error" in n:
    lines += [f"(a) numerics: {n['error']}", ""]
elif n:
    curve = n.get("train_curve", [])
    worst = max((c.get("loss_rel_diff") or 0 for c in curve), default=None)
    lines += ["(a) numerics (pipe vs torch on the same device)", "",
              "| check | max abs | mean abs |", "|---|---:|---:|",
              f"| f32 logits | {n['f32_logits']['max_abs']:.2e} | {n['f32_logits']['mean_abs']:.2e} |",
              f"| bf16 mixed vs autocast logits | {n['bf16_logits_vs_autocast']['max_abs']:.2e} | {n['bf16_logits_vs_autocast']['mean_abs']:.2e} |",
              f"| (torch autocast vs torch f32) | {n.get('torch_autocast_vs_f32_max_abs') or 0:.2e} | |",
              f"| logits after 4 training steps | {n['final_logits_after_training']['max_abs']:.2e} | {n['final_logits_after_training']['mean_abs']:.2e} |",
              "", f"training curve: worst relative loss difference over 4 steps {worst:.2e}" if worst is not None else "", ""]
lines += ["(b) training speed and memory, " + json.dumps(shapes), "",
          "| run | tokens/s | peak GPU MiB | pipe's plan MiB | MFU | params | trainable |", "|---|---:|---:|---:|---:|---:|---:|"]
for method, label in (("lora", "Llama-2-7B shape, LoRA r16 all-linear"), ("full", "~1.1B Llama, full fine-tuning")):
    for impl in ("pipe", "torch"):
        r = report.get(f"{method}_{impl}")
        plan = (r or {}).get("memory_plan", {}).get("total")
        plan = "—" if plan is None else f"{plan / 2**20:.0f}"
        lines.append(f"| {label}: {impl} | {cell(r, 'tokens_per_s', '{:.0f}')} | {cell(r, 'peak_gpu_mib', '{:.0f}')} | {plan} | {cell(r, 'mfu', '{:.1%}')} | {cell(r, 'params', '{:,}')} | {cell(r, 'trainable_params', '{:,}')} |")
    p, t = report.get(f"{method}_pipe") or {}, report.get(f"{method}_torch") or {}
    if "tokens_per_s" in p and "tokens_per_s" in t:
        lines.append(f"| ratio pipe/torch | {p['tokens_per_s'] / t['tokens_per_s']:.2f}x | | | | | |")
t = report["tiny_pipeline"] or {}
tuned = (t.get("metrics") or {}).get("tuned", {})
lines += ["", "(c) tiny pipeline on the device: " + ("not run" if not t else t.get("error") or (
    f"{t.get('wall_s', 0):.1f} s wall; tuned held-out loss {tuned.get('heldout', {}).get('loss', float('nan')):.3f}, "
    f"exact match {tuned.get('generation', {}).get('exact_match', float('nan')):.1%}"))]
s = report["scoring"] or {}
lines += ["", "(d) multiple-choice scoring: " + ("not run" if not s else s.get("error") or f"pipe {s.get('pipe_items_per_s', 0):.1f} items/s, transformers {s.get('reference_items_per_s', 0):.1f} items/s, {s.get('n')} items, same acc/acc_norm: {s.get('same_acc')}; pipe's memory plan: {s.get('memory_plan')}")]
def target(name, r):
    if not r:
        return f"{name}: not run"
    if "error" in r:
        return f"{name}: {r['error']}"
    plan = (r.get("memory_plan") or {}).get("total")
    peak = r.get("peak_gpu_mib")
    plan = "—" if plan is None else f"{plan / 2**20:.0f}"
    return f"{name}: peak {'—' if peak is None else peak} MiB, plan {plan} MiB, {r.get('tokens_per_s', 0):.0f} tokens/s"
mt = report["memory_targets"]
lines += ["", "(e) memory targets, 7B shape: " + target("LoRA r16 mb 4 checkpointing", mt["lora_r16_checkpointing"])
          + "; " + target("full, bf16 weights, stochastic, checkpointing, mb 1", mt["full_bf16_weights_stochastic_checkpointing"])]
open(os.path.join(out, "gpu.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
}

case "${1:-}" in
  stage) stage "${2:-}" ;;
  run) run "${2:?usage: bench/gpu.sh run OUT [--cpu]}" "${3:-}" ;;
  *) echo "usage: bench/gpu.sh stage [--cpu] | run OUT [--cpu]" >&2; exit 2 ;;
esac
