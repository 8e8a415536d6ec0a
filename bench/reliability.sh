#!/usr/bin/env bash
# Reliability: the default pipeline (pipelines/tiny.yaml, one epoch) SIGKILLed at N random
# moments (default 20), re-run after each kill, then run to the end: its final artifacts —
# weights, loss curve, evaluation, export — must equal those of an uninterrupted run, and no
# stage that had finished may ever run again. Prints where each kill landed.
#
# Usage: bench/reliability.sh [N]
# (The same test runs in CI with 3 kills: tests/reliability.rs.)
set -euo pipefail
N=${1:-20}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
echo "machine: $(uname -m), $(nproc) cores; pipe $(git describe --always --dirty 2>/dev/null || echo '?'); command: $0 $*"
start=$(date +%s)
PIPE_TINY_KILLS=$N cargo test --release --quiet --test reliability -- --nocapture 2>&1 \
  | grep -E "^kill |test result|panicked|assert"
echo "$N kills survived in $(( $(date +%s) - start )) s (build included)"
