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
. scripts/lib-node.sh
CERTS=$(scratch)
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
for round in $(seq "$ROUNDS"); do
  for tls in off on; do
    DATA=$(scratch)
    SCHEME=http
    CA_ARGS=()
    if [ "$tls" = on ]; then
      printf '[tls]\ncert = "%s/node.pem"\nkey = "%s/node.key"\nca = "%s/ca.pem"\n' \
        "$CERTS" "$CERTS" "$CERTS" >"$DATA/node.toml"
      SCHEME=https
      CA_ARGS=(--ca "$CERTS/ca.pem")
    fi
    start_node "$DATA"
    load --protocol grpc --mode call --concurrency 4 --duration 2 >/dev/null # warm-up
    for protocol in $PROTOCOLS; do
      for c in $CONCURRENCY; do
        measure "{\"tls\": \"$tls\", \"round\": $round}" \
          --protocol "$protocol" --mode call --concurrency "$c" --duration "$DURATION"
      done
    done
    stop_node
  done
done
