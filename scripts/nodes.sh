# Shared by the cluster benchmarks (sourced): a scratch directory ROOT, statemesh nodes on
# loopback ports chosen at run time, all stopped on exit (KEEP=1 keeps ROOT: logs, data).
# Needs B (the statemesh binary).
ROOT=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $ROOT" >&2; else rm -rf "$ROOT"; fi
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start ID [JOIN] -> sets GRPC_<ID>, HTTP_<ID>, PID_<ID>; NODE_ARGS (an array) adds arguments
start() {
  local id=$1 join=${2:-} g h
  g=$(port); h=$(port)
  local args=(node --data-dir "$ROOT/n$id" --grpc-addr "127.0.0.1:$g" --http-addr "127.0.0.1:$h" --node-id "$id" ${NODE_ARGS[@]+"${NODE_ARGS[@]}"})
  [ -n "$join" ] && args+=(--join "$join")
  "$B" "${args[@]}" >"$ROOT/n$id.out" 2>"$ROOT/n$id.log" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 300); do grep -q listening "$ROOT/n$id.out" && break; sleep 0.1; done
  grep -q listening "$ROOT/n$id.out" || { cat "$ROOT/n$id.log" >&2; exit 1; }
  printf -v "GRPC_$id" '%s' "127.0.0.1:$g"
  printf -v "HTTP_$id" '%s' "127.0.0.1:$h"
  printf -v "PID_$id" '%s' "$pid"
}

# ready HTTP... -> waits (up to 30 s each) until the nodes answer /readyz with 200
ready() { # HTTP...
  for h in "$@"; do
    for _ in $(seq 300); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$h/readyz")" = 200 ] && break
      sleep 0.1
    done
  done
}

# spread HTTP ID... -> waits (up to 60 s) until each node ID owns over 250 key groups, as HTTP sees it
spread() {
  local http=$1; shift
  local ids; ids=$(IFS=,; echo "$*")
  for _ in $(seq 600); do
    n=$(curl -s "http://$http/v1/cluster/key-groups" |
      python3 -c "import json,sys; o=json.load(sys.stdin)['owners']; print(min(o.count(i) for i in ($ids,)))")
    [ "$n" -gt 250 ] && break
    sleep 0.1
  done
}
