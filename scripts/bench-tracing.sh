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
VENV=target/py/otlp-sink
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check grpcio==1.85.3 opentelemetry-proto==1.45.2 >&2
fi
. scripts/lib-node.sh
for round in $(seq "$ROUNDS"); do
  for sampling in off 0.01 1.0; do
    DATA=$(scratch)
    SINK=
    if [ "$sampling" != off ]; then
      PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      "$VENV/bin/python" scripts/otlp_sink.py "$PORT" >"$DATA/sink" 2>&1 &
      SINK=$!
      SIDE_PIDS+=("$SINK")
      for _ in $(seq 100); do grep -q listening "$DATA/sink" && break; sleep 0.1; done
      printf '[telemetry]\notlp_endpoint = "http://127.0.0.1:%s"\nsampling_ratio = %s\n' "$PORT" "$sampling" >"$DATA/node.toml"
    fi
    start_node "$DATA"
    load --protocol http --mode call --concurrency 4 --duration 2 >/dev/null # warm-up
    for c in $CONCURRENCY; do
      measure "{\"sampling\": \"$sampling\", \"round\": $round}" \
        --protocol http --mode call --concurrency "$c" --duration "$DURATION"
    done
    stop_node
    if [ -n "$SINK" ]; then
      kill "$SINK"; wait "$SINK" 2>/dev/null || true
      echo "{\"sampling\": \"$sampling\", \"round\": $round, \"sink\": \"$(grep spans "$DATA/sink" || echo none)\"}"
    fi
  done
done
