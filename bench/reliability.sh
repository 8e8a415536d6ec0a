#!/usr/bin/env bash
# Reliability: the default pipeline (pipelines/tiny.yaml, one epoch) SIGKILLed at N random
# moments (default 20), re-run after each kill: every store, once its pipeline has finished,
# must equal the store of an uninterrupted run (same keys, same bytes: weights, loss curve,
# evaluation, export), and no stage that had finished may ever run again; a finished store
# makes the next kills start a fresh one. Prints where each kill landed.
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
  | grep -E "^kill |kills,|test result|panicked|assert"
echo "$N kills survived in $(( $(date +%s) - start )) s (build included)"
