#!/usr/bin/env bash
# Remote cache throughput: `pipe push` and `pipe pull` of one stage whose output is a single
# SIZE_MB artifact (random bytes) against a real S3-compatible server on 127.0.0.1 (moto's
# standalone server, from tests/setup.sh), beside `aws s3 cp` of the same file to and from the
# same server in the same run. Prints a table (MB/s); writes it to bench/results/remote.md.
#
# Usage: bench/remote.sh [SIZE_MB]   (default 500; PIPE_BIN=path measures that binary)
# Needs a Rust toolchain and Python 3; awscli is installed into target/bench-awscli on first use.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MB=${1:-500}
cd "$ROOT"
# PIPE_BIN: a pipe binary to measure instead of building one.
if [ -z "${PIPE_BIN:-}" ]; then cargo build --release --quiet; fi
PIPE=${PIPE_BIN:-$ROOT/target/release/pipe}
bash tests/setup.sh >/dev/null
MOTO="$ROOT/target/test-tools/bin/moto_server"
[ -x target/bench-awscli/bin/aws ] || { python3 -m venv target/bench-awscli && target/bench-awscli/bin/pip install -q awscli==1.46.3; }
AWS="$ROOT/target/bench-awscli/bin/aws"

WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.2; done
export AWS_ENDPOINT_URL="http://127.0.0.1:$PORT" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
"$AWS" s3 mb s3://bench >/dev/null

mkdir -p "$WORK/a" "$WORK/b"
cat >"$WORK/a/p.yaml" <<EOF
name: remote-bench
stages:
  blob:
    kind: command
    cmd: head -c $((SIZE_MB * 1000000)) /dev/urandom > \${out}/blob.bin
    outs: [blob.bin]
EOF
cp "$WORK/a/p.yaml" "$WORK/b/p.yaml"
(cd "$WORK/a" && "$PIPE" -q run p.yaml --no-remote)
BLOB=$(ls "$WORK"/a/cache/stages/*/out/blob.bin)

seconds() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
rate() { echo "scale=1; $SIZE_MB / $1" | bc -l; }

PUSH=$(cd "$WORK/a" && seconds "$PIPE" -q push p.yaml --remote s3://bench/pipe)
PULL=$(cd "$WORK/b" && seconds "$PIPE" -q pull p.yaml --remote s3://bench/pipe)
cmp "$BLOB" "$(ls "$WORK"/b/cache/stages/*/out/blob.bin)"
UP=$(seconds "$AWS" s3 cp "$BLOB" s3://bench/awscli/blob.bin)
DOWN=$(seconds "$AWS" s3 cp s3://bench/awscli/blob.bin "$WORK/down.bin")

TABLE="| $SIZE_MB MB to/from moto_server on 127.0.0.1 | upload | download |
|---|---|---|
| pipe push / pipe pull | $(printf %.1f "$PUSH") s, $(rate "$PUSH") MB/s | $(printf %.1f "$PULL") s, $(rate "$PULL") MB/s |
| aws s3 cp (awscli 1.46.3) | $(printf %.1f "$UP") s, $(rate "$UP") MB/s | $(printf %.1f "$DOWN") s, $(rate "$DOWN") MB/s |"
echo "machine: $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
echo "$TABLE"
mkdir -p bench/results
{
  echo "# Remote cache throughput ($(date -u +%F), $(nproc) cores, bench/remote.sh $SIZE_MB)"
  echo
  echo "$TABLE"
  echo
  echo "pipe's times include hashing: each object is verified by its blake3 on arrival, and push first asks the server which objects it has."
} >bench/results/remote.md
