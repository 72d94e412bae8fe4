#!/usr/bin/env bash
# The cost of durable local checkpoints (`[checkpoint] fsync`, default on): committed counter
# `Call`s and `Send`s over HTTP against one node (file backend), with fsync on and off,
# alternated per round so that both see the same machine. One JSON line per run, labelled
# "fsync": "true"|"false"; compare within one run (the machine is noisy). Any other
# `[checkpoint]` setting can be varied the same way (SETTING, VALUES as TOML; see bench-ack.sh).
#   DURATION=8 ROUNDS=2 CONCURRENCY="1 16 64" MODES="call send" bash scripts/bench-fsync.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
MODES=${MODES:-"call send"}
SETTING=${SETTING:-fsync}
VALUES=${VALUES:-"true false"}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
DIRS=()
PID=
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
for round in $(seq "$ROUNDS"); do
  for value in $VALUES; do
    DATA=$(mktemp -d)
    DIRS+=("$DATA")
    printf '[checkpoint]\n%s = %s\n' "$SETTING" "$value" >"$DATA/node.toml"
    "$BIN" node --data-dir "$DATA/n" --config "$DATA/node.toml" --grpc-addr 127.0.0.1:0 \
      --http-addr 127.0.0.1:0 >"$DATA/out" 2>"$DATA/log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$DATA/out" && break; sleep 0.1; done
    GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    HTTP=http://$(grep -o 'http=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "$@" 2>/dev/null; }
    load --protocol http --mode send --concurrency 4 --duration 2 >/dev/null # warm-up
    for mode in $MODES; do
      for c in $CONCURRENCY; do
        load --protocol http --mode "$mode" --concurrency "$c" --duration "$DURATION" |
          python3 -c "import json,sys; d=json.load(sys.stdin); d[sys.argv[1]]=sys.argv[2].strip('\"'); d['round']=$round; print(json.dumps(d))" "$SETTING" "$value"
      done
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  done
done
