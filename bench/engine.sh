#!/usr/bin/env bash
# Orchestration overhead of the pipe engine (issue: pipeline engine benchmark).
#
# A 6-stage `command` pipeline whose first stage reads a 200 MB file. Prints the median wall
# time of: the first run, a no-op re-run (everything cached), `pipe status`, and a re-run after
# changing one middle param (only the stages downstream of it run), and how many bytes of the
# 200 MB file each no-op run re-read (from the hash memo's point of view: none).
#
# Usage: bench/engine.sh [REPEATS]     (default 7; builds the release binary first)
set -euo pipefail
REPEATS=${1:-7}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
PIPE="$ROOT/target/release/pipe"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

head -c 200000000 /dev/urandom > big.bin
cp "$ROOT/bench/six-stages.yaml" p.yaml
sleep 1.1  # let the file's mtime settle so the hash memo may remember it

now_ms() { date +%s%N | awk '{printf "%.1f", $1/1e6}'; }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m}'; }
time_cmd() { local t0 t1; t0=$(now_ms); "$@" >/dev/null 2>&1; t1=$(now_ms); awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}'; }

first=(); noop=(); status=(); change=()
for i in $(seq "$REPEATS"); do
  rm -rf cache
  first+=("$(time_cmd "$PIPE" run p.yaml)")
  noop+=("$(time_cmd "$PIPE" run p.yaml)")
  status+=("$(time_cmd "$PIPE" status p.yaml)")
  change+=("$(time_cmd "$PIPE" run p.yaml --set params.factor=$((i + 2)))")
done
# What a no-op run and a middle-param run actually did.
"$PIPE" run p.yaml >/dev/null 2>&1
noop_log=$("$PIPE" -v run p.yaml 2>&1)
ran=$(grep -c ': done ' <<<"$noop_log" || true)
hashed=$(grep -o 'read [0-9]* bytes of external inputs' <<<"$noop_log" | grep -o '[0-9]*' || echo "?")
change_ran=$("$PIPE" run p.yaml --set params.factor=99 2>&1 | grep -o '^ *INFO *s[0-9]: done' | grep -o 's[0-9]' | tr '\n' ' ')

echo "pipe engine benchmark — $(uname -m), $(nproc) cores, $("$PIPE" --version), $REPEATS repeats"
echo "pipeline: 6 command stages, stage 1 depends on a 200 MB file"
printf "%-40s %10s\n" "measure" "median ms"
printf "%-40s %10s\n" "first run (hashes 200 MB)" "$(printf '%s\n' "${first[@]}" | median)"
printf "%-40s %10s\n" "no-op re-run (all cached)" "$(printf '%s\n' "${noop[@]}" | median)"
printf "%-40s %10s\n" "pipe status" "$(printf '%s\n' "${status[@]}" | median)"
printf "%-40s %10s\n" "re-run after a middle param change" "$(printf '%s\n' "${change[@]}" | median)"
echo "stages run by a no-op re-run: $ran (expected 0); bytes of external inputs it read to hash: $hashed (expected 0)"
echo "stages run after changing the param of s3: $change_ran(expected s3 s4 s5 s6, fewer where outputs came out identical)"
