#!/usr/bin/env bash
# The StateFun playground's greeter end to end, statemesh beside Apache Flink StateFun 3.3.0:
# the upstream Python greeter (SDK 3.3.0, without its 1 s sleep) behind the playground ingress
# and egress, `bench_greeter.py N KEYS` (N sequential keep-alive PUTs over KEYS keys, then one
# GET per greeting until all came back), from ../shared/peers/statefun. statemesh runs with
# durable acknowledgements (the default) and exactly-once egress reads (the default), then with
# `egress_reads = "at-least-once"`, then with `ack = "accepted"`; StateFun runs too when it is
# built (STATEFUN_PEER: a copy of ../shared/peers/statefun where fetch-deps.sh and build.sh
# ran). RUNS runs of each; peak RSS of the node or JVM (the greeter server's is the same);
# for statemesh, the epochs committed during the run (one per PUT when each PUT's commit takes
# the previous greeting's egress record along).
#   RUNS=2 N=2000 KEYS=100 STATEFUN_PEER=/tmp/sfpeer bash scripts/bench-greeter.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEER=$(cd ../shared/peers/statefun && pwd)
SF=${STATEFUN_PEER:-$PEER}
RUNS=${RUNS:-2}; N=${N:-2000}; KEYS=${KEYS:-100}
cargo build --release -p statemesh-node >&2
BIN=$PWD/target/release/statemesh
. scripts/lib-remote.sh
for port in 8000 8090 8091; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then echo "port $port is taken (the greeter's module.yaml uses 8000, 8090, 8091)" >&2; exit 1; fi
done
PY=$PWD/$PY
(cd "$PEER/greeter" && GREETER_SLEEP_S=0 exec "$PY" functions.py) >"$TMP/greeter.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 0.1; done
peak() { awk '/VmHWM/{printf "%.0f", $2/1024}' "/proc/$1/status"; }
# statemesh: epochs committed so far (the node's metrics at $METRICS); StateFun: none.
METRICS=
epoch() { [ -n "$METRICS" ] && curl -s "$METRICS" | awk '/^statemesh_checkpoint_committed_epoch /{print $2}' || echo 0; }
bench() { # system label pid
  for r in $(seq "$RUNS"); do
    e0=$(epoch)
    out=$($PY "$PEER/bench_greeter.py" "$N" "$KEYS")
    e1=$(epoch)
    rate=$(sed -n 's/.*=> \([0-9]*\) msgs\/s end-to-end.*/\1/p' <<<"$out")
    ingress=$(sed -n 's/.*(\([0-9]*\)\/s ingress).*/\1/p' <<<"$out")
    echo "{\"bench\":\"greeter\",\"system\":\"$1\",\"mode\":\"$2\",\"run\":$r,\"messages\":$N,\"keys\":$KEYS,\"end_to_end_per_s\":${rate:-0},\"ingress_put_per_s\":${ingress:-0},\"epochs_committed\":$((${e1:-0}-${e0:-0})),\"peak_rss_mib\":$(peak "$3")}"
  done
}
statemesh() { # label config
  rm -rf "$TMP/data"; printf '%s\n' "$2" >"$TMP/node.toml"
  "$BIN" node --module "$PEER/greeter/module.yaml" --config "$TMP/node.toml" --data-dir "$TMP/data" \
    --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0 >"$TMP/node.out" 2>"$TMP/node.log" &
  local pid=$!
  wait_line "$TMP/node.out" listening
  METRICS="$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$TMP/node.out")/metrics"
  bench statemesh "$1" "$pid"
  METRICS=
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
statemesh "durable ack, exactly-once reads" ''
statemesh "durable ack, at-least-once reads" 'egress_reads = "at-least-once"'
statemesh "ack on acceptance, at-least-once reads" $'egress_reads = "at-least-once"\n[checkpoint]\nack = "accepted"'
if [ -f "$SF/build/statefun-playground-local-3.3.0.jar" ]; then
  STATEFUN_WORKDIR=$TMP/statefun "$SF/start-statefun.sh" "$PEER/greeter/module.yaml" >&2
  PIDS+=("$(cat "$TMP/statefun/statefun.pid")")
  sleep 3 # the functions task runs shortly after the ingress port opens
  bench statefun "3.3.0, ack on acceptance, egress in memory" "$(cat "$TMP/statefun/statefun.pid")"
  STATEFUN_WORKDIR=$TMP/statefun "$SF/stop-statefun.sh" >&2
else
  echo "StateFun is not built at $SF (see $PEER/README.md; STATEFUN_PEER=...): statemesh only" >&2
fi
