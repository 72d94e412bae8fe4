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
. scripts/lib-node.sh
for round in $(seq "$ROUNDS"); do
  for value in $VALUES; do
    DATA=$(scratch)
    printf '[checkpoint]\n%s = %s\n' "$SETTING" "$value" >"$DATA/node.toml"
    start_node "$DATA"
    load --protocol http --mode send --concurrency 4 --duration 2 >/dev/null # warm-up
    for mode in $MODES; do
      for c in $CONCURRENCY; do
        measure "{\"$SETTING\": \"${value//\"/}\", \"round\": $round}" \
          --protocol http --mode "$mode" --concurrency "$c" --duration "$DURATION"
      done
    done
    stop_node
  done
done
