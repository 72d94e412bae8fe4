#!/usr/bin/env bash
# One node vs a cluster of three (release builds, loopback, checkpoints on local files, durable
# acknowledgements): counter `Call` over HTTP at each concurrency. In the cluster the key
# groups are spread over the three nodes (rendezvous hashing; the script waits for the moves),
# so a call through any node is local for a third of the keys and forwarded for the rest; the
# Raft leader runs the epochs of all three participants. One JSON line per scenario: the load
# generator's figures (throughput, p50/p99, errors, the target node's peak RSS), the epoch
# barrier-to-commit p50/p99 of the target node, and the CPU time of all node processes during
# the run, per call (`cpu_us_per_call`) and per node.
# BIN: a statemesh binary to use instead of building this tree's.
#   DURATION=8 CONCURRENCY="1 16 64" bash scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
KEYS=${KEYS:-1000}
if [ -n "${BIN:-}" ]; then
  B=$BIN
else
  cargo build --release -p statemesh-node >&2
  B=target/release/statemesh
fi
. scripts/nodes.sh
TCK=$(getconf CLK_TCK)

ticks() { # PID... -> total utime+stime in clock ticks
  local t=0 p f
  for p in "$@"; do
    read -r -a f < "/proc/$p/stat"
    t=$((t + f[13] + f[14]))
  done
  echo "$t"
}

# run NAME TARGET_HTTP TARGET_GRPC C PID...
run() {
  local name=$1 http=$2 grpc=$3 c=$4; shift 4
  local before=() p
  for p in "$@"; do before+=("$(ticks "$p")"); done
  local out
  out=$("$B" bench load --grpc "http://$grpc" --http "http://$http" --protocol http --mode call \
    --concurrency "$c" --duration "$DURATION" --keys "$KEYS")
  local per=()
  local i=0
  for p in "$@"; do per+=("$(( $(ticks "$p") - before[i] ))"); i=$((i + 1)); done
  # The target node's last (up to 64) committed epochs: barrier to commit (in a cluster, the
  # leader's barrier to the manifest and the participant's release).
  local ck
  ck=$(curl -s "http://$OWNER_HTTP/v1/checkpoints")
  python3 - "$name" "$TCK" "$out" "$ck" "${per[@]}" <<'EOF'
import json, sys
name, tck, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
recent = sorted(e["duration_ms"] for e in json.loads(sys.argv[4]).get("recent", []))
pct = lambda q: round(recent[min(len(recent) - 1, int(q * len(recent)))], 2) if recent else None
per = [int(x) * 1e6 / tck for x in sys.argv[5:]]
ok = max(out["ok"], 1)
out = {"scenario": name, **out,
       "epoch_barrier_to_commit_ms_p50": pct(0.5),
       "epoch_barrier_to_commit_ms_p99": pct(0.99),
       "cpu_us_per_call": round(sum(per) / ok, 1),
       "cpu_us_per_call_per_node": [round(x / ok, 1) for x in per],
       "cpu_cores_used": round(sum(per) / 1e6 / out["duration_s"], 2)}
print(json.dumps(out))
EOF
}

# One node.
start 1
ready "$HTTP_1"
OWNER_HTTP=$HTTP_1
for c in $CONCURRENCY; do run single "$HTTP_1" "$GRPC_1" "$c" "$PID_1"; done
kill "$PID_1"; wait "$PID_1" 2>/dev/null || true; PIDS=()

# Three nodes: node 11 bootstraps, 12 and 13 join and get their share of the key groups.
start 11
ready "$HTTP_11"
start 12 "$GRPC_11"
start 13 "$GRPC_11"
ready "$HTTP_12" "$HTTP_13"
spread "$HTTP_11" 11 12 13
for c in $CONCURRENCY; do
  OWNER_HTTP=$HTTP_11
  run cluster3-via-node1 "$HTTP_11" "$GRPC_11" "$c" "$PID_11" "$PID_12" "$PID_13"
  OWNER_HTTP=$HTTP_12
  run cluster3-via-node2 "$HTTP_12" "$GRPC_12" "$c" "$PID_11" "$PID_12" "$PID_13"
done
