#!/usr/bin/env bash
# Runs ../shared/peers/load.sh (the load generator and correctness check used for Restate in
# ../shared/peers/restate/bench.sh) against a statemesh node with the counter example, so the
# two systems are measured the same way. Needs oha (the Restate bench installs it into
# $RESTATE_PEER_CACHE/oha). One JSON line per scenario on stdout.
#   DURATION=10 CONCURRENCY="1 16 64" MODES="call send" bash scripts/peer-compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${PEERS:-$(cd ../shared/peers && pwd)}
export LOAD_OHA=${LOAD_OHA:-${RESTATE_PEER_CACHE:-/tmp/restate-peer-cache}/oha/bin/oha}
[ -x "$LOAD_OHA" ] || { echo "oha not found at $LOAD_OHA (run $PEERS/restate/bench.sh once, or set LOAD_OHA)" >&2; exit 1; }
DURATION=${DURATION:-10}; CONCURRENCY=${CONCURRENCY:-"1 16 64"}; MODES=${MODES:-"call send"}
cargo build --release -p statemesh-node >&2
DATA=$(mktemp -d)
target/release/statemesh node --data-dir "$DATA" >"$DATA.out" 2>"$DATA.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.out" "$DATA.log"' EXIT
for _ in $(seq 100); do grep -q listening "$DATA.out" && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$PEERS/load.sh"
export LOAD_SYSTEM=statemesh LOAD_DURATION=$DURATION LOAD_CONTENT_TYPE=application/vnd.io.statefun.types/long LOAD_READ_BODY=0 LOAD_PIDS="statemesh:$PID"
BASE=http://127.0.0.1:8090/v1
for mode in $MODES; do
  for c in $CONCURRENCY; do
    if [ "$mode" = call ]; then
      LOAD_CONCURRENCY=$c scenario add "$BASE/call/example/counter/{key}" "$BASE/call/example/counter/{key}"
    else
      LOAD_CONCURRENCY=$c LOAD_ASYNC=1 scenario add_send "$BASE/send/example/counter/{key}" "$BASE/call/example/counter/{key}"
    fi
  done
done
