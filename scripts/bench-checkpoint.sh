#!/usr/bin/env bash
# Checkpoint benchmarks, in release mode, each printing one JSON line:
# - the embedded ring with checkpoints off and on (100 ms), alternated, for 1e4 and 1e6 keys
#   (compare invocations_per_s and cpu_us_per_invocation within one run: the machine is noisy);
# - checkpoint bytes and duration vs state size (1e5 and 1e6 keys x 100 B, 1 % changed per round);
# - recovery time to the first served call for 1e6 keys, from sled and from blob storage alone;
# - committed Send/Call latency against a node (file backend) at 1 and 64 clients.
#   bash scripts/bench-checkpoint.sh       # DURATION=8 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
for keys in 10000 1000000; do
  for round in 1 2 3; do
    for cp in false true; do
      $BIN bench embedded --instances "$keys" --tokens 2000 --duration "$DURATION" --checkpoints "$cp" 2>/dev/null
    done
  done
done
$BIN bench checkpoint --keys 100000 --change 0.01 --rounds 20 2>/dev/null
$BIN bench checkpoint --keys 1000000 --change 0.01 --rounds 20 2>/dev/null
$BIN bench recovery --keys 1000000 2>/dev/null

DATA=$(mktemp -d)
OUT=$(mktemp)
$BIN node --data-dir "$DATA" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$OUT" 2>"$DATA.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.log" "$OUT"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT" && break; sleep 0.1; done
GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$OUT" | cut -d= -f2)
HTTP=http://$(grep -o 'http=[0-9.:]*' "$OUT" | cut -d= -f2)
load() { $BIN bench load --grpc "$GRPC" --http "$HTTP" --duration "$DURATION" "$@" 2>/dev/null; }
load --protocol grpc --mode send --concurrency 1 >/dev/null   # warm-up: activate the keys
load --protocol grpc --mode send --concurrency 1
load --protocol grpc --mode call --concurrency 1
load --protocol grpc --mode send --concurrency 64
load --protocol grpc --mode call --concurrency 64
load --protocol http --mode call --concurrency 64
