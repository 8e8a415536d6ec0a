#!/usr/bin/env bash
# Two nodes on 127.0.0.1, one CPU device each, doing three global all-reduces with
# burn-collective 0.21 (an orchestrator process and two node processes); then the same with
# node 1 SIGKILLed before its second all-reduce. Node 0 is limited to 60 s.
# Measured 2026-11-30 (README, "Multi-node training"): all-reduce #0 is right (3 = 1 + 2), #1
# never returns on either node; with node 1 killed, node 0's #1 fails with LocalServerMissing
# after two of its tasks panic ("Peer closed download connection").
set -uo pipefail
cd "$(dirname "$0")"
cargo build --release --quiet || exit 1
BIN=${CARGO_TARGET_DIR:-target}/release/burn-collective-probe
LOGS=$(mktemp -d)
pair() { # TAG ORCH_PORT DATA_PORT_BASE [env for node 1...]
  local tag=$1 op=$2 db=$3; shift 3
  "$BIN" orchestrator "$op" > "$LOGS/$tag.orchestrator" 2>&1 & local orch=$!
  sleep 1
  ORCH_PORT=$op DATA_PORT_BASE=$db timeout 60 "$BIN" node 0 > "$LOGS/$tag.node0" 2>&1 & local n0=$!
  env ORCH_PORT="$op" DATA_PORT_BASE="$db" "$@" "$BIN" node 1 > "$LOGS/$tag.node1" 2>&1 & local n1=$!
  if [ "$tag" = kill ]; then sleep 2; kill -9 "$n1"; echo "== $tag: node 1 SIGKILLed"; fi
  wait "$n0"; echo "== $tag: node 0 exited with $? (124: killed at its 60 s limit)"
  kill -9 "$n1" 2>/dev/null; wait "$n1" 2>/dev/null
  kill "$orch" 2>/dev/null; wait "$orch" 2>/dev/null
  grep -h "all_reduce\|panicked" "$LOGS/$tag.node0" "$LOGS/$tag.node1" | sed 's/\x1b\[[0-9;]*m//g'
}
pair consecutive 30000 30100
pair kill 30010 30110 SLEEP_BEFORE_2ND_RANK=1 SLEEP_BEFORE_2ND_SECS=5
echo "logs: $LOGS"
