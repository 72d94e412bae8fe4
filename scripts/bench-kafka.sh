#!/usr/bin/env bash
# Kafka through statemesh, exactly once on the ingress side and SEMANTIC (exactly-once unless
# set: at-least-once, none) on the egress
# (release builds, loopback, checkpoints on local files, durable epochs): RECORDS records are
# produced to topic "in" (4 partitions); a Kafka ingress hands each to `example/forward`, which
# sends it to the Kafka egress `example/kafka` (topic "forwarded", 4 partitions), where
# `statemesh bench kafka` reads it back. One JSON line per scenario (one node, three nodes):
# records/s, end-to-end latency produced → read back (p50/p99), missing and duplicate records,
# and the CPU time of all node processes per record. The broker is tansu, a release build
# (TANSU=path to use another; built once into target/tools/tansu-release, about 12 minutes).
#   RECORDS=200000 RATE=0 SEMANTIC=exactly-once bash scripts/bench-kafka.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RECORDS=${RECORDS:-200000}
RATE=${RATE:-0}
SEMANTIC=${SEMANTIC:-exactly-once}
case $SEMANTIC in
  exactly-once) DELIVERY="type: exactly-once
    transactionTimeout: 15min" ;;
  at-least-once|none) DELIVERY="type: $SEMANTIC" ;;
  *) echo "SEMANTIC: exactly-once, at-least-once or none, not $SEMANTIC" >&2; exit 2 ;;
esac
if [ -n "${BIN:-}" ]; then
  B=$BIN
else
  cargo build --release -p statemesh-node >&2
  B=target/release/statemesh
fi
T=${TANSU:-target/tools/tansu-release/bin/tansu}
if [ ! -x "$T" ]; then
  echo "building tansu 0.6.0 (release) into target/tools/tansu-release, once" >&2
  CARGO_TARGET_DIR=target/tools/tansu-release-build cargo install tansu --version 0.6.0 \
    --no-default-features --features dynostore --locked --root target/tools/tansu-release >&2
  rm -rf target/tools/tansu-release-build
fi
. scripts/nodes.sh

BROKER_PID=
broker() { # fresh in-memory broker with empty topics -> BOOT
  [ -n "$BROKER_PID" ] && { kill "$BROKER_PID" 2>/dev/null || true; wait "$BROKER_PID" 2>/dev/null || true; }
  local p; p=$(port)
  BOOT=127.0.0.1:$p
  "$T" broker --listener-url "tcp://$BOOT" --advertised-listener-url "tcp://$BOOT" \
    --storage-engine memory://tansu/ >"$ROOT/broker.log" 2>&1 &
  BROKER_PID=$!
  PIDS+=("$BROKER_PID")
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
  "$T" topic create in --partitions 4 --broker "tcp://$BOOT" >/dev/null
  "$T" topic create forwarded --partitions 4 --broker "tcp://$BOOT" >/dev/null
  cat >"$ROOT/module.yaml" <<YAML
kind: io.statefun.kafka.v1/ingress
spec:
  id: bench/in
  address: $BOOT
  startupPosition:
    type: earliest
  properties:
    # tansu answers a fetch only at fetch.wait.max.ms (500 ms by default) when it has
    # nothing at once; Kafka answers as soon as records arrive.
    - fetch.wait.max.ms: 5
  topics:
    - topic: in
      valueType: bench/Bytes
      targets:
        - example/forward
---
kind: io.statefun.kafka.v1/egress
spec:
  id: example/kafka
  address: $BOOT
  deliverySemantic:
    $DELIVERY
YAML
}

run() { # NAME PID...
  local name=$1; shift
  local pids; pids=$(IFS=,; echo "$*")
  "$B" bench kafka --bootstrap "$BOOT" --records "$RECORDS" --rate "$RATE" --pids "$pids" |
    python3 -c "import json,sys; d=json.load(sys.stdin); print(json.dumps({'scenario': sys.argv[1], 'egress': sys.argv[2], **d}))" "$name" "$SEMANTIC"
}

NODE_ARGS=(--module "$ROOT/module.yaml")
broker
start 1
ready "$HTTP_1"
sleep 1
run single "$PID_1"
kill "$PID_1"; wait "$PID_1" 2>/dev/null || true

broker
start 11
ready "$HTTP_11"
start 12 "$GRPC_11"
start 13 "$GRPC_11"
ready "$HTTP_12" "$HTTP_13"
spread "$HTTP_11" 11 12 13
sleep 1
run cluster3 "$PID_11" "$PID_12" "$PID_13"
