#!/usr/bin/env bash
# The cost of TLS (`[tls]`): committed counter `Call`s against one node with TLS off and on
# (certificates made here with openssl: a CA and a node certificate for 127.0.0.1), over gRPC
# and HTTPS, alternated per round on the same machine. One JSON line per run, labelled "tls":
# "off"|"on", with the node's CPU µs per call. Compare within one run (the machine is noisy).
#   DURATION=8 ROUNDS=2 CONCURRENCY="1 64" PROTOCOLS="grpc http" bash scripts/bench-tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-"1 64"}
PROTOCOLS=${PROTOCOLS:-"grpc http"}
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
CERTS=$(mktemp -d)
DIRS=("$CERTS")
PID=
cleanup() {
  [ -n "$PID" ] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
(
  cd "$CERTS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=node \
    -keyout node.key -out node.csr 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >ext
  openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile ext -out node.pem 2>/dev/null
)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for round in $(seq "$ROUNDS"); do
  for tls in off on; do
    DATA=$(mktemp -d)
    DIRS+=("$DATA")
    scheme=http
    ca=()
    : >"$DATA/node.toml"
    if [ "$tls" = on ]; then
      printf '[tls]\ncert = "%s/node.pem"\nkey = "%s/node.key"\nca = "%s/ca.pem"\n' \
        "$CERTS" "$CERTS" "$CERTS" >"$DATA/node.toml"
      scheme=https
      ca=(--ca "$CERTS/ca.pem")
    fi
    "$BIN" node --data-dir "$DATA/n" --config "$DATA/node.toml" --grpc-addr 127.0.0.1:0 \
      --http-addr 127.0.0.1:0 >"$DATA/out" 2>"$DATA/log" &
    PID=$!
    for _ in $(seq 100); do grep -q listening "$DATA/out" && break; sleep 0.1; done
    GRPC=$scheme://$(grep -o 'grpc=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    HTTP=$scheme://$(grep -o 'http=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "${ca[@]}" "$@" 2>/dev/null; }
    load --protocol grpc --mode call --concurrency 4 --duration 2 >/dev/null # warm-up
    for protocol in $PROTOCOLS; do
      for c in $CONCURRENCY; do
        before=$(cpu_ticks "$PID")
        out=$(load --protocol "$protocol" --mode call --concurrency "$c" --duration "$DURATION")
        after=$(cpu_ticks "$PID")
        echo "$out" | python3 -c "
import json, os, sys
d = json.load(sys.stdin)
ops = d.get('ok') or 0
d['tls'] = '$tls'
d['round'] = $round
d['node_cpu_us_per_op'] = round(($after - $before) * 1e6 / os.sysconf('SC_CLK_TCK') / ops, 1) if ops else None
print(json.dumps(d))"
      done
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
  done
done
