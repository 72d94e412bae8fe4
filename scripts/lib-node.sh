# Shared by the one-node benchmarks (sourced, from the repository's root): builds the release
# binary, starts a node on loopback ports chosen at run time (start_node), runs the load
# generator against it and prints its JSON with labels and the node's CPU µs per operation
# (measure), and stops everything it started on exit (by PID; add others to SIDE_PIDS).
cargo build --release -p statemesh-node >&2
BIN=target/release/statemesh
DIRS=()
PID=
SIDE_PIDS=()
SCHEME=http
CA_ARGS=()
cleanup() {
  for p in $PID "${SIDE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
# A scratch directory, removed on exit.
scratch() { local d; d=$(mktemp -d); DIRS+=("$d"); echo "$d"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# start_node DIR: a node on DIR/n with the configuration DIR/node.toml (created empty if
# missing); sets PID, GRPC and HTTP (with SCHEME, "https" under [tls]).
start_node() {
  [ -f "$1/node.toml" ] || : >"$1/node.toml"
  "$BIN" node --data-dir "$1/n" --config "$1/node.toml" --grpc-addr 127.0.0.1:0 \
    --http-addr 127.0.0.1:0 >"$1/out" 2>"$1/log" &
  PID=$!
  for _ in $(seq 100); do grep -q listening "$1/out" && break; sleep 0.1; done
  grep -q listening "$1/out" || { echo "the node did not start: $(tail -5 "$1/log")" >&2; exit 1; }
  GRPC=$SCHEME://$(grep -o 'grpc=[0-9.:]*' "$1/out" | cut -d= -f2)
  HTTP=$SCHEME://$(grep -o 'http=[0-9.:]*' "$1/out" | cut -d= -f2)
}
stop_node() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }
load() { "$BIN" bench load --grpc "$GRPC" --http "$HTTP" "${CA_ARGS[@]}" "$@" 2>/dev/null; }
# measure LABELS_JSON LOAD_ARGS...: one load run, printed as one JSON line with LABELS_JSON's
# fields added and the node's CPU µs per operation.
measure() {
  local labels=$1 before after out
  shift
  before=$(cpu_ticks "$PID")
  out=$(load "$@")
  after=$(cpu_ticks "$PID")
  echo "$out" | python3 -c "
import json, os, sys
d = json.load(sys.stdin)
d.update(json.loads(sys.argv[1]))
ops = d.get('ok') or 0
d['node_cpu_us_per_op'] = round(($after - $before) * 1e6 / os.sysconf('SC_CLK_TCK') / ops, 1) if ops else None
print(json.dumps(d))" "$labels"
}
