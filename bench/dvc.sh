#!/usr/bin/env bash
# Orchestration overhead of pipe vs DVC on the pipeline of bench/engine.sh.
#
# The same 6-stage pipeline for both tools: stage s1 reads a 200 MB random file, s2..s6 are tiny
# shell commands, and s3 uses the param `factor`. pipe runs p.yaml (as in bench/engine.sh); DVC
# runs an equivalent dvc.yaml + params.yaml: the same commands, with every stage's inputs declared
# as deps (so DVC md5-hashes the 200 MB file too) and its output declared as an out (so DVC caches
# it, as pipe does). DVC runs without git (`dvc init --no-scm`), analytics off, and with its state
# database (its hash memo) inside the work dir. Each repeat times, for each tool:
#   first run         a cold cache (pipe: no store; DVC: no dvc.lock, outputs, cache or state db)
#   no-op re-run      nothing changed: `pipe run` / `dvc repro` skip every stage
#   status            `pipe status` / `dvc status`
#   param change      `factor` edited in the pipeline's params file, then `pipe run` / `dvc repro`
#                     (s3..s6 run)
# and prints the median of each in ms and the ratio dvc/pipe. Both tools' runs alternate, on the
# same file (hard-linked), so they see the same page cache and machine noise.
#
# Usage: bench/dvc.sh [REPEATS]     (default 5)
#   DVC is pip-installed (pinned, DVC_VERSION, default below) into a venv in
#   ${XDG_CACHE_HOME:-~/.cache}/pipe-bench/dvc-venv, reused across runs; PYTHON picks the
#   interpreter (default python3). The release binary is built only if it is missing.
set -euo pipefail
REPEATS=${1:-5}
DVC_VERSION=${DVC_VERSION:-3.67.1}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMMAND="$0 $*"

PIPE="$ROOT/target/release/pipe"
if [[ ! -x "$PIPE" ]]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi

VENV="${XDG_CACHE_HOME:-$HOME/.cache}/pipe-bench/dvc-venv"
if [[ "$("$VENV/bin/dvc" --version 2>/dev/null || true)" != "$DVC_VERSION" ]]; then
  echo "installing dvc==$DVC_VERSION into $VENV ..." >&2
  mkdir -p "$(dirname "$VENV")"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "dvc==$DVC_VERSION" >&2
fi
DVC="$VENV/bin/dvc"
export DVC_NO_ANALYTICS=1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/pipe" "$WORK/dvc"

head -c 200000000 /dev/urandom > "$WORK/pipe/big.bin"
ln "$WORK/pipe/big.bin" "$WORK/dvc/big.bin"

# pipe: the pipeline of bench/engine.sh.
cp "$ROOT/bench/six-stages.yaml" "$WORK/pipe/p.yaml"

# DVC: the same stages; `${factor}` is interpolated from params.yaml.
cd "$WORK/dvc"
"$DVC" init --no-scm --quiet
"$DVC" config core.analytics false
"$DVC" config core.check_update false
"$DVC" config core.site_cache_dir "$WORK/dvc-site"
echo "factor: 2" > params.yaml
cat > dvc.yaml <<'YAML'
stages:
  s1:
    cmd: head -c 1000 big.bin | od -An -tx1 | head -5 > s1.sample.txt
    deps: [big.bin]
    outs: [s1.sample.txt]
  s2:
    cmd: wc -c < s1.sample.txt > s2.n
    deps: [s1.sample.txt]
    outs: [s2.n]
  s3:
    cmd: echo $(( $(cat s2.n) * ${factor} )) > s3.n
    deps: [s2.n]
    params: [factor]
    outs: [s3.n]
  s4:
    cmd: cat s3.n s3.n > s4.n
    deps: [s3.n]
    outs: [s4.n]
  s5:
    cmd: sort s4.n > s5.n
    deps: [s4.n]
    outs: [s5.n]
  s6:
    cmd: cat s5.n > s6.n
    deps: [s5.n]
    outs: [s6.n]
YAML
sleep 1.1  # let the file's mtime settle so the hash memos (pipe's, DVC's state db) may remember it

now_ms() { date +%s%N | awk '{printf "%.1f", $1/1e6}'; }
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.1f", m}'; }
# time_cmd CMD...: sets T to its wall time in ms; its output goes to $WORK/last.log; a failure
# stops the benchmark, showing that output.
time_cmd() {
  local t0 t1 rc=0
  t0=$(now_ms); "$@" >"$WORK/last.log" 2>&1 || rc=$?; t1=$(now_ms)
  if ((rc != 0)); then
    echo "failed ($rc): $*" >&2; cat "$WORK/last.log" >&2; exit 1
  fi
  T=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
}
set_factor_pipe() { sed -i "s/^  factor: .*/  factor: $1/" "$WORK/pipe/p.yaml"; }
set_factor_dvc() { echo "factor: $1" > "$WORK/dvc/params.yaml"; }
reset_dvc() {  # everything DVC remembers of earlier runs
  rm -rf "$WORK/dvc/.dvc/cache" "$WORK/dvc/.dvc/tmp" "$WORK/dvc-site" "$WORK/dvc/dvc.lock" \
    "$WORK"/dvc/s1.sample.txt "$WORK"/dvc/s[2-6].n
}

p_first=(); p_noop=(); p_status=(); p_change=()
d_first=(); d_noop=(); d_status=(); d_change=()
for i in $(seq "$REPEATS"); do
  cd "$WORK/pipe"
  rm -rf cache; set_factor_pipe 2
  time_cmd "$PIPE" run p.yaml; p_first+=("$T")
  time_cmd "$PIPE" run p.yaml; p_noop+=("$T")
  time_cmd "$PIPE" status p.yaml; p_status+=("$T")
  set_factor_pipe $((i + 2))
  time_cmd "$PIPE" run p.yaml; p_change+=("$T")

  cd "$WORK/dvc"
  reset_dvc; set_factor_dvc 2
  time_cmd "$DVC" repro; d_first+=("$T")
  time_cmd "$DVC" repro; d_noop+=("$T")
  time_cmd "$DVC" status; d_status+=("$T")
  set_factor_dvc $((i + 2))
  time_cmd "$DVC" repro; d_change+=("$T")
done

# What each tool's no-op and param-change runs actually did, and that both computed the same.
cd "$WORK/pipe"
set_factor_pipe 99
"$PIPE" run p.yaml >/dev/null 2>&1
p_noop_ran=$("$PIPE" run p.yaml 2>&1 | grep -o '^ *INFO *s[0-9]: done' | grep -o 's[0-9]' | tr '\n' ' ' || true)
set_factor_pipe 100
p_change_log=$("$PIPE" run p.yaml 2>&1)
p_change_ran=$(grep -o '^ *INFO *s[0-9]: done' <<<"$p_change_log" | grep -o 's[0-9]' | tr '\n' ' ' || true)
p_result=$(tr '\n' ' ' < "$(awk '$1 == "s6" {print $NF}' <<<"$p_change_log")/n")
cd "$WORK/dvc"
set_factor_dvc 99
"$DVC" repro >/dev/null 2>&1
d_noop_ran=$("$DVC" repro 2>&1 | grep -o "^Running stage 's[0-9]'" | grep -o 's[0-9]' | tr '\n' ' ' || true)
set_factor_dvc 100
d_change_ran=$("$DVC" repro 2>&1 | grep -o "^Running stage 's[0-9]'" | grep -o 's[0-9]' | tr '\n' ' ' || true)
d_result=$(tr '\n' ' ' < s6.n)

pipe_version="$("$PIPE" --version) ($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo "no git"))"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
echo "pipe vs DVC orchestration benchmark — $REPEATS repeats"
echo "command:  $COMMAND"
echo "machine:  $(uname -m), $(nproc) cores, ${cpu:-unknown CPU}"
echo "versions: $pipe_version; dvc $("$DVC" --version); $("$VENV/bin/python" --version)"
echo "pipeline: 6 command stages, stage 1 depends on a 200 MB file"
row() {  # row LABEL PIPE_TIMES... -- DVC_TIMES...
  local label=$1 p d; shift
  local -a pt=() dt=(); while [[ $1 != -- ]]; do pt+=("$1"); shift; done; shift; dt=("$@")
  p=$(printf '%s\n' "${pt[@]}" | median); d=$(printf '%s\n' "${dt[@]}" | median)
  printf "%-38s %12s %12s %10s\n" "$label" "$p" "$d" "$(awk -v p="$p" -v d="$d" 'BEGIN {printf "%.1fx", d / p}')"
}
printf "%-38s %12s %12s %10s\n" "measure (median ms)" "pipe" "dvc" "dvc/pipe"
row "first run (hashes 200 MB)" "${p_first[@]}" -- "${d_first[@]}"
row "no-op re-run (all cached)" "${p_noop[@]}" -- "${d_noop[@]}"
row "status (pipe status / dvc status)" "${p_status[@]}" -- "${d_status[@]}"
row "re-run after a middle param change" "${p_change[@]}" -- "${d_change[@]}"
echo "stages run by a no-op re-run: pipe: ${p_noop_ran:-none}; dvc: ${d_noop_ran:-none} (expected none)"
echo "stages run after changing the param of s3: pipe: ${p_change_ran:-none}; dvc: ${d_change_ran:-none} (expected s3 s4 s5 s6)"
if [[ "$p_result" == "$d_result" ]]; then
  echo "final output (s6) identical: $p_result"
else
  echo "final output (s6) DIFFERS: pipe: $p_result; dvc: $d_result" >&2; exit 1
fi
