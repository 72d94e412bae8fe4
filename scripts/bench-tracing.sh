#!/usr/bin/env bash
# The cost of tracing (`[telemetry]`): committed counter `Call`s over HTTP against one node with
# traces off, sampled at 1 % and at 100 % (exported over OTLP to a sink, scripts/otlp_sink.py,
# in a venv this script creates), alternated per round on the same machine. One JSON line per
# run, labelled "sampling" ("off", "0.01", "1.0"), with the node's CPU µs per call and the spans
# the sink received. Compare within one run (the machine is noisy).
#   DURATION=8 ROUNDS=2 CONCURRENCY="1 64" bash scripts/bench-tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-"1 64"}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
VENV=target/py/otlp-sink
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check grpcio==1.85.3 opentelemetry-proto==1.45.2 >&2
fi
DIRS=()
PID=
SINK=
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  [ -n "$SINK" ] && { kill "$SINK" 2>/dev/null || true; wait "$SINK" 2>/dev/null || true; }
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for round in $(seq "$ROUNDS"); do
  for sampling in off 0.01 1.0; do
    DATA=$(mktemp -d)
    DIRS+=("$DATA")
    : >"$DATA/node.toml"
    if [ "$sampling" != off ]; then
      PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      "$VENV/bin/python" scripts/otlp_sink.py "$PORT" >"$DATA/sink" 2>&1 &
      SINK=$!
      for _ in $(seq 100); do grep -q listening "$DATA/sink" && break; sleep 0.1; done
      printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsampling_ratio = %s\n' "$PORT" "$sampling" >"$DATA/node.toml"
    fi
    "$BIN" node --data-dir "$DATA/n" --config "$DATA/node.toml" --grpc-addr 127.0.0.1:0 \
      --http-addr 127.0.0.1:0 >"$DATA/out" 2>"$DATA/log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$DATA/out" && break; sleep 0.1; done
    GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    HTTP=http://$(grep -o 'http=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "$@" 2>/dev/null; }
    load --protocol http --mode call --concurrency 4 --duration 2 >/dev/null # warm-up
    for c in $CONCURRENCY; do
      before=$(cpu_ticks "$PID")
      out=$(load --protocol http --mode call --concurrency "$c" --duration "$DURATION")
      after=$(cpu_ticks "$PID")
      echo "$out" | python3 -c "
import json, os, sys
d = json.load(sys.stdin)
ops = d.get('ok') or 0
ticks = $after - $before
d['sampling'] = '$sampling'
d['round'] = $round
d['node_cpu_us_per_op'] = round(ticks * 1e6 / os.sysconf('SC_CLK_TCK') / ops, 1) if ops else None
print(json.dumps(d))"
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    if [ -n "$SINK" ]; then
      kill "$SINK"; wait "$SINK" 2>/dev/null || true; SINK=
      echo "{\"sampling\": \"$sampling\", \"round\": $round, \"sink\": \"$(grep spans "$DATA/sink" || echo none)\"}"
    fi
  done
done
