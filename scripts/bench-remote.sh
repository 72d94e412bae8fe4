#!/usr/bin/env bash
# Remote-function benchmarks, release mode, one JSON line each:
#  1. counter throughput and p50/p99 through the Rust remote-function server and through the
#     StateFun 3.3 Python SDK, at 1, 64 and 1,024 concurrent addresses (one caller each), via
#     the node; and the same function server loaded directly with the same request shape
#     (`bench direct`) — the ratio is statemesh's runtime overhead;
#  2. the batching curve: one contended address, growing concurrency: mean batch size and
#     throughput grow together;
#  3. a committed one-way `Send` from one client (durable acknowledgement), embedded vs the Rust
#     and the Python remote counter: the remote path's acknowledgement against the embedded one.
#   bash scripts/bench-remote.sh        # DURATION=10 by default
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
cargo build --release -p statemesh-node -p statemesh-examples >&2
BIN=target/release/statemesh
. scripts/lib-remote.sh

target/release/statemesh-remote-example 127.0.0.1:0 >"$TMP/rs.out" 2>"$TMP/rs.log" & PIDS+=($!)
$PY tests/py/statefun3_functions.py 0 >"$TMP/py.out" 2>"$TMP/py.log" & PIDS+=($!)
wait_line "$TMP/rs.out" serving; wait_line "$TMP/py.out" serving
RS=http://127.0.0.1:$(awk '{print $3}' "$TMP/rs.out")/statefun
PYURL=http://127.0.0.1:$(awk '{print $3}' "$TMP/py.out")/statefun
cat >"$TMP/module.yaml" <<YAML
kind: io.statefun.endpoints.v2/http
spec:
  functions: rs/*
  urlPathTemplate: $RS
---
kind: io.statefun.endpoints.v2/http
spec:
  functions: py/*
  urlPathTemplate: $PYURL
YAML
$BIN node --module "$TMP/module.yaml" --data-dir "$TMP/data" --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$TMP/node.out" 2>"$TMP/node.log" & PIDS+=($!)
wait_line "$TMP/node.out" listening
GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$TMP/node.out" | cut -d= -f2)
HTTP=http://$(grep -o 'http=[0-9.:]*' "$TMP/node.out" | cut -d= -f2)
load() { $BIN bench load --grpc "$GRPC" --http "$HTTP" --duration "$DURATION" --mode call "$@" 2>/dev/null; }
send() { $BIN bench load --grpc "$GRPC" --http "$HTTP" --duration "$DURATION" --mode send "$@" 2>/dev/null; }

for fn in rs py; do
  url=$RS; [ $fn = py ] && url=$PYURL
  for c in 1 64 1024; do
    load --function $fn/counter --keys $c --concurrency $c --connections 8
    $BIN bench direct --url "$url" --function $fn/counter --concurrency $c --duration "$DURATION" 2>/dev/null
  done
done
for c in 1 4 16 64 256; do
  load --function rs/counter --keys 1 --concurrency $c
done
for c in 1 4 16 64 256; do
  load --function py/counter --keys 1 --concurrency $c
done
for fn in example/counter rs/counter py/counter; do
  send --function $fn --keys 100 --concurrency 1
done
