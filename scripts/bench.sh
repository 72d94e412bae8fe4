#!/usr/bin/env bash
# The single-node benchmark set, in release mode, each printing one JSON line:
# in-process embedded messaging, memory, then a node loaded over gRPC and HTTP.
#   bash scripts/bench.sh            # DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
$BIN bench embedded --instances 10000 --tokens 2000 --duration "$DURATION" 2>/dev/null
$BIN bench memory --instances 100000 2>/dev/null

DATA=$(mktemp -d)
OUT=$(mktemp)
$BIN node --data-dir "$DATA" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$OUT" 2>"$DATA.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA" "$DATA.log" "$OUT"' EXIT
for _ in $(seq 100); do grep -q listening "$OUT" && break; sleep 0.1; done
GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$OUT" | cut -d= -f2)
HTTP=http://$(grep -o 'http=[0-9.:]*' "$OUT" | cut -d= -f2)
sleep 1
echo "{\"bench\":\"idle-node\",\"rss_kib\":$(awk '/VmRSS/{print $2}' /proc/$PID/status)}"
load() { $BIN bench load --grpc "$GRPC" --http "$HTTP" --duration "$DURATION" "$@" 2>/dev/null; }
load --protocol grpc --mode call --concurrency 1
load --protocol grpc --mode call --concurrency 64
load --protocol grpc --mode send --concurrency 64
load --protocol http --mode call --concurrency 1
load --protocol http --mode call --concurrency 64
load --protocol grpc --mode stream --concurrency 4 --keys 100000
