#!/usr/bin/env bash
# A third node joins a cluster of two under load (release builds, loopback, checkpoints on
# local files, durable acknowledgements). Counter `Call`s over HTTP go to node 1 for
# BEFORE seconds, node 3 joins, and the load goes on until the key groups have moved and
# AFTER more seconds have passed. Callers retry what is refused with 503 (a rollback, a key
# group moving), so a call's latency is the whole wait. Prints one JSON line: the time from the
# join to node 3 owning its share in node 1's table, the pause of a moved key (per key: its
# longest call during the join; p50/p99/max over the keys), the same for keys that did not
# move and for every key in the 5 s before the join, and p50/p99 of calls before and during the
# join (from the join to AFTER seconds after the handover), and of the unmoved keys after that.
#   BEFORE=8 AFTER=8 CONCURRENCY=16 KEYS=256 bash scripts/bench-join.sh
# MODE=leave measures the other way: three nodes share the key groups, and node 3 leaves
# (`statemesh cluster leave`) under the same load; the handover ends when node 3 owns nothing
# in node 1's table ("left_s": when the CLI returned, node 3 gone).
# MODE=first: node 1 is alone under the load, and node 2 joins it (its first member); the
# handover ends when node 2 owns its half (within 10 %). `load.retried_unavailable` counts the
# calls refused with 503 (a rollback, a key group moving) and retried.
# "rollbacks" counts the rollbacks of the members that were there before the join (node 1, and
# node 2 but in MODE=first) since they started; "retried_unavailable" also counts calls refused
# while their key group moved live.
# BIN=<path to a release statemesh> skips the build (to compare two builds).
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${BEFORE:-8}
AFTER=${AFTER:-8}
CONCURRENCY=${CONCURRENCY:-16}
KEYS=${KEYS:-256}
MODE=${MODE:-join}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p statemesh-node >&2
fi
B=${BIN:-target/release/statemesh}
. scripts/nodes.sh
now_ms() { python3 -c 'import time; print(int(time.time()*1000))'; }

owned_by() { # HTTP NODE -> key groups NODE owns in HTTP's table
  curl -s "http://$1/v1/cluster/key-groups" |
    python3 -c "import json,sys; print(sum(1 for o in json.load(sys.stdin)['owners'] if o == $2))"
}

start 1
[ "$MODE" = first ] || start 2 "$GRPC_1"
# Until the two (leave: the three) share the key groups.
if [ "$MODE" = first ]; then
  for _ in $(seq 600); do
    [ "$(owned_by "$HTTP_1" 1)" -eq 1024 ] && break
    sleep 0.1
  done
elif [ "$MODE" = leave ]; then
  start 3 "$GRPC_1"
  for _ in $(seq 600); do
    [ "$(owned_by "$HTTP_1" 3)" -ge 307 ] && [ "$(owned_by "$HTTP_1" 2)" -ge 307 ] && break
    sleep 0.1
  done
else
  for _ in $(seq 600); do
    [ "$(owned_by "$HTTP_1" 2)" -gt 400 ] && break
    sleep 0.1
  done
fi
curl -s "http://$HTTP_1/v1/cluster/key-groups" >"$ROOT/before.json"
# Long enough for the handover (it ends on its own: the timeline is written at the end).
TOTAL=$((BEFORE + AFTER + 12))
"$B" bench load --grpc "http://$GRPC_1" --http "http://$HTTP_1" --protocol http --mode call \
  --concurrency "$CONCURRENCY" --duration "$TOTAL" --keys "$KEYS" --timeline "$ROOT/timeline.csv" \
  --retry-unavailable \
  >"$ROOT/load.json" &
LOAD=$!
sleep "$BEFORE"
JOIN_MS=$(now_ms)
LEFT_S=null
if [ "$MODE" = leave ]; then
  "$B" cluster leave --node "http://$GRPC_3" >"$ROOT/leave.out" &
  LEAVE=$!
  # Poll the table until node 3 owns nothing.
  DONE_MS=""
  for _ in $(seq 1200); do
    n=$(owned_by "$HTTP_1" 3)
    if [ "$n" -eq 0 ]; then DONE_MS=$(now_ms); break; fi
    sleep 0.05
  done
  [ -n "$DONE_MS" ] || { echo "node 3 still owned key groups 60 s after its leave" >&2; tail -50 "$ROOT/n3.log" >&2; exit 1; }
  wait "$LEAVE"
  LEFT_S=$(python3 -c "print(round(($(now_ms) - $JOIN_MS) / 1000, 2))")
else
  # The joiner owns its share (node 2 its half, node 3 a third; within 10 %).
  if [ "$MODE" = first ]; then J=2 SHARE=460; else J=3 SHARE=307; fi
  start "$J" "$GRPC_1"
  DONE_MS=""
  for _ in $(seq 1200); do
    n=$(owned_by "$HTTP_1" "$J")
    if [ "$n" -ge "$SHARE" ]; then DONE_MS=$(now_ms); break; fi
    sleep 0.05
  done
  [ -n "$DONE_MS" ] || { echo "node $J did not get its share within 60 s" >&2; tail -50 "$ROOT/n1.log" >&2; exit 1; }
fi
wait "$LOAD"
curl -s "http://$HTTP_1/v1/cluster/key-groups" >"$ROOT/after.json"
# Rollbacks of the members that were there before (a member taken in rolls back once, alone).
rollbacks() { curl -s "http://$1/metrics" | awk '$1 == "statemesh_checkpoint_rollbacks_total" { print $2 }'; }
ROLLBACKS="{\"1\": $(rollbacks "$HTTP_1")"
[ "$MODE" = first ] || ROLLBACKS="$ROLLBACKS, \"2\": $(rollbacks "$HTTP_2")"
ROLLBACKS="$ROLLBACKS}"
python3 - "$ROOT" "$JOIN_MS" "$DONE_MS" "$AFTER" "$MODE" "$LEFT_S" "$ROLLBACKS" <<'PY'
import csv, json, sys
root, join_ms, done_ms, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
mode, left_s, rollbacks = sys.argv[5], json.loads(sys.argv[6]), json.loads(sys.argv[7])
load = json.load(open(f"{root}/load.json"))
before = json.load(open(f"{root}/before.json"))["owners"]
after_t = json.load(open(f"{root}/after.json"))["owners"]
moved = {kg for kg, (a, b) in enumerate(zip(before, after_t)) if a != b}
lines = open(f"{root}/timeline.csv").read().splitlines()
t0 = int(lines[0].split("=")[1])
rows = [(int(r["start_us"]), int(r["latency_us"]), int(r["key"]), int(r["key_group"]), r["ok"] == "1")
        for r in csv.DictReader(lines[1:])]
join = (join_ms - t0) * 1000
end = (done_ms - t0) * 1000 + int(after * 1e6)
def pct(v, q):
    v = sorted(v)
    return round(v[min(len(v) - 1, int(q * len(v)))] / 1000, 2) if v else None
def window(lo, hi, pred):
    sel = [r for r in rows if lo <= r[0] < hi and pred(r[3])]
    ok = [r[1] for r in sel if r[4]]
    return {"calls": len(sel), "errors": sum(1 for r in sel if not r[4]),
            "p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99),
            "per_s": round(len(ok) / max((hi - lo) / 1e6, 1e-9))}
def pauses(lo, hi, pred):
    # Per key: the longest call (retried while refused) started in the window.
    worst = {}
    for s, lat, key, kg, ok in rows:
        if lo <= s < hi and pred(kg):
            worst[key] = max(worst.get(key, 0), lat)
    v = list(worst.values())
    return {"keys": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99), "max_ms": pct(v, 1.0)}
stay = lambda kg: kg not in moved
move = lambda kg: kg in moved
print(json.dumps({
    "bench": mode,
    "key_groups_moved": len(moved),
    "handover_s": round((done_ms - join_ms) / 1000, 2),
    "left_s": left_s,
    # Since each node started (their rollbacks before the load included).
    "rollbacks": rollbacks,
    "before": window(0, join, lambda kg: True),
    "during_unmoved": window(join, end, stay),
    "during_moved": window(join, end, move),
    # The same keys once the move is over (the cluster's new steady state: on a small machine
    # a third process alone changes latencies, whatever moved).
    "after_unmoved": window(end, 1 << 62, stay),
    "pause_moved_keys": pauses(join, end, move),
    "pause_unmoved_keys": pauses(join, end, stay),
    "pause_before_join": pauses(max(0, join - 5_000_000), join, lambda kg: True),
    "load": {k: load.get(k) for k in ("ok", "errors", "retried_unavailable", "first_retried", "first_error", "throughput_per_s", "node_peak_rss_mib")},
}))
PY
