#!/usr/bin/env bash
# The price of durable acknowledgements on one node (issue 10): counter `Send`s and `Call`s over
# HTTP with `[checkpoint] ack = "committed"` (default: acknowledged once the epoch is durable)
# and `"accepted"` (once queued), alternated per round on the same machine. One JSON line per
# run, labelled "ack". Compare within one run (the machine is noisy).
#   DURATION=8 ROUNDS=2 CONCURRENCY="64" bash scripts/bench-ack.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-"64"}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
DATA=
PID=
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  [ -n "$DATA" ] && rm -rf "$DATA"
}
trap cleanup EXIT
for round in $(seq "$ROUNDS"); do
  for ack in committed accepted; do
    DATA=$(mktemp -d)
    printf '[checkpoint]\nack = "%s"\n' "$ack" >"$DATA/node.toml"
    "$BIN" node --data-dir "$DATA/n" --config "$DATA/node.toml" --grpc-addr 127.0.0.1:0 \
      --http-addr 127.0.0.1:0 >"$DATA/out" 2>"$DATA/log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$DATA/out" && break; sleep 0.1; done
    GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    HTTP=http://$(grep -o 'http=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "$@" 2>/dev/null; }
    load --protocol http --mode send --concurrency 4 --duration 2 >/dev/null # warm-up
    for mode in send call; do
      for c in $CONCURRENCY; do
        load --protocol http --mode "$mode" --concurrency "$c" --duration "$DURATION" |
          python3 -c "import json,sys; d=json.load(sys.stdin); d['ack']='$ack'; d['round']=$round; print(json.dumps(d))"
      done
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    rm -rf "$DATA"; DATA=
  done
done
