#!/usr/bin/env bash
# The S3 budgets of issue 10: committed counter `Call`s against one node whose blob storage is
# moto's S3 server behind tests/py/s3_latency_proxy.py (30 ms added to every request), with the
# epoch log (default) and without it (`log = false`: every epoch commits to S3), then idle.
# Per run one JSON line: the load's figures (throughput, p50/p99 latency, peak RSS) plus the S3
# requests per second it caused and their monthly cost at S3 Standard list prices
# (PUT/POST/LIST $0.005 per 1,000, GET/HEAD $0.0004 per 1,000, DELETE free).
# MODES (empty: none): `true` (one node, epoch log), `false` (one node, no log), `cluster` (three nodes
# sharing the bucket, epochs committed to S3; the load goes through node 1, so two thirds of
# the calls are forwarded), `cluster-log` (the same three nodes, epochs committed through the
# control group: `cluster_log = true`).
# RECOVERY_KEYS (unset: skipped): afterwards, `statemesh bench recovery` with that many keys on
# the same S3 (populate, restart from sled, restart from blob storage alone), with the S3
# requests of the whole run.
# BIN: a statemesh binary to use instead of building this tree's.
#   DURATION=10 CONCURRENCY="1 16 64" IDLE=30 DELAY_MS=30 MODES="true false cluster cluster-log" \
#     bash scripts/bench-s3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
IDLE=${IDLE:-30}
DELAY_MS=${DELAY_MS:-30}
MODES=${MODES-"true false"}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p statemesh-node >&2
  BIN=target/release/statemesh
fi
VENV=target/py/moto
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "moto[server]==5.2.5" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "moto[server]==5.2.5"
  echo -n "moto[server]==5.2.5" >"$VENV/.installed"
fi
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOTO_PORT=$(free_port)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >/dev/null 2>&1 &
PIDS+=($!)
"$VENV/bin/python" tests/py/s3_latency_proxy.py --upstream "http://127.0.0.1:$MOTO_PORT" \
  --port 0 --delay-ms "$DELAY_MS" >"$WORK/proxy.out" &
PIDS+=($!)
for _ in $(seq 100); do grep -q listening "$WORK/proxy.out" 2>/dev/null && break; sleep 0.1; done
PROXY=http://127.0.0.1:$(cut -d' ' -f2 "$WORK/proxy.out")
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT" && break; sleep 0.1; done
curl -s -X PUT "$PROXY/bench" >/dev/null
stats() { curl -s "$PROXY/__proxy/stats"; }
reset() { curl -s -X POST "$PROXY/__proxy/reset" >/dev/null; }
# The S3 figures of the requests since the last reset, merged into the JSON line on stdin.
merge() {
  python3 -c '
import json, sys
d = json.loads(sys.stdin.readline())
s = json.loads(sys.argv[1])
m = s["by_method"]
rate = s["total"] / s["since_s"]
cost_s = sum(m.get(k, 0) for k in ("PUT", "POST", "LIST")) * 0.005e-3 \
    + sum(m.get(k, 0) for k in ("GET", "HEAD")) * 0.0004e-3
d.update({"setup": sys.argv[2], "s3_requests": s["total"], "s3_by_method": m, "s3_by_kind": s.get("by_kind", {}),
          "s3_requests_per_s": round(rate, 2),
          "s3_usd_per_month": round(cost_s / s["since_s"] * 2592000, 2)})
print(json.dumps(d))' "$(stats)" "$1"
}
# The nodes' S3 settings: moto behind the proxy.
s3_section() {
  cat <<EOF
[checkpoint.s3]
endpoint = "$PROXY"
region = "us-east-1"
access_key_id = "test"
secret_access_key = "test"
allow_http = true
EOF
}
N=0
for mode in $MODES; do
  N=$((N + 1))
  DATA=$WORK/n$N
  mkdir -p "$DATA"
  log=$mode cluster_log=false
  case $mode in
    cluster) log=true ;;
    cluster-log) log=true cluster_log=true ;;
  esac
  cat >"$DATA/node.toml" <<EOF
[checkpoint]
url = "s3://bench/n$N"
log = $log
cluster_log = $cluster_log
$(s3_section)
EOF
  if [ "$mode" != true ] && [ "$mode" != false ]; then
    # Three nodes (node 1 bootstraps, 2 and 3 join); the load waits for the key groups'
    # spread.
    PID=""
    for id in 1 2 3; do
      p=$(free_port) h=$(free_port)
      args=(node --data-dir "$DATA/d$id" --config "$DATA/node.toml" --node-id "$id"
        --grpc-addr "127.0.0.1:$p" --http-addr "127.0.0.1:$h")
      [ "$id" = 1 ] || args+=(--join "$GRPC1")
      "$BIN" "${args[@]}" >"$DATA/out$id" 2>"$DATA/log$id" &
      PIDS+=($!)
      PID="$PID $!"
      for _ in $(seq 300); do grep -q listening "$DATA/out$id" && break; sleep 0.1; done
      [ "$id" = 1 ] && GRPC1=127.0.0.1:$p HTTP1=127.0.0.1:$h
    done
    GRPC=http://$GRPC1 HTTP=http://$HTTP1
    for _ in $(seq 600); do
      n=$(curl -s "$HTTP/v1/cluster/key-groups" | python3 -c \
        "import json,sys; o=json.load(sys.stdin)['owners']; print(min(o.count(i) for i in (1,2,3)))" \
        2>/dev/null || echo 0)
      [ "$n" -gt 250 ] && break
      sleep 0.1
    done
  else
    "$BIN" node --data-dir "$DATA/d" --config "$DATA/node.toml" --grpc-addr 127.0.0.1:0 \
      --http-addr 127.0.0.1:0 >"$DATA/out" 2>"$DATA/log" &
    PID=$!
    PIDS+=($PID)
    for _ in $(seq 300); do grep -q listening "$DATA/out" && break; sleep 0.1; done
    GRPC=http://$(grep -o 'grpc=[0-9.:]*' "$DATA/out" | cut -d= -f2)
    HTTP=http://$(grep -o 'http=[0-9.:]*' "$DATA/out" | cut -d= -f2)
  fi
  load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "$@" 2>/dev/null; }
  load --protocol http --mode call --concurrency 4 --duration 2 >/dev/null # warm-up
  for c in $CONCURRENCY; do
    reset
    # The counts are read once the load is over.
    out=$(load --protocol http --mode call --concurrency "$c" --duration "$DURATION")
    echo "$out" | merge "$mode"
  done
  # Idle: after the last upload and the lease renewal that follows it.
  sleep 5
  reset
  sleep "$IDLE"
  out='{"idle_s": '"$IDLE"'}'
  echo "$out" | merge "$mode"
  for p in $PID; do kill "$p"; done
  for p in $PID; do wait "$p" 2>/dev/null || true; done
done
if [ -n "${RECOVERY_KEYS:-}" ]; then
  cat >"$WORK/recovery.toml" <<EOF
[checkpoint]
url = "s3://bench/recovery"
$(s3_section)
EOF
  reset
  out=$("$BIN" bench recovery --keys "$RECOVERY_KEYS" --config "$WORK/recovery.toml" 2>/dev/null)
  echo "$out" | merge recovery
fi
