#!/usr/bin/env bash
# What an idle node costs: one node (defaults, the bundled examples), a short load, then
# IDLE seconds with nothing to do. Prints one JSON line: the node's CPU in that time (% of one
# core), its peak RSS, and voluntary wake-ups per second by thread name (the threads alive at
# both ends of the window, summed per name; `threads` says how many: a shard's thread and an
# HTTP worker are both `actix-rt|system`).
#   IDLE=10 bash scripts/bench-idle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10}
. scripts/lib-node.sh
DATA=$(scratch)
start_node "$DATA"
load --protocol http --mode send --concurrency 4 --duration 1 >/dev/null
sleep 3
# One line per thread: id, name, voluntary switches.
wakes() {
  for t in /proc/"$PID"/task/*; do
    printf '%s\t%s\t%s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" \
      "$(awk '/^voluntary_ctxt_switches/ {print $2}' "$t/status" 2>/dev/null)"
  done
}
w0=$(wakes)
c0=$(cpu_ticks "$PID")
t0=$(date +%s.%N)
sleep "$IDLE"
w1=$(wakes)
c1=$(cpu_ticks "$PID")
t1=$(date +%s.%N)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
python3 - "$w0" "$w1" "$c0" "$c1" "$t0" "$t1" "$rss" <<'PY'
import collections, json, os, re, sys
w0, w1, c0, c1, t0, t1, rss = sys.argv[1:]
secs = float(t1) - float(t0)
def by_tid(text):
    d = {}
    for line in text.splitlines():
        tid, name, n = (line.split("\t") + ["", ""])[:3]
        if n.isdigit():
            d[tid] = (re.sub(r"-\d+$", "", name), int(n))
    return d
a, b = by_tid(w0), by_tid(w1)
wakes, threads = collections.Counter(), collections.Counter()
for tid, (name, n) in b.items():
    if tid in a:
        wakes[name] += n - a[tid][1]
        threads[name] += 1
wakes = {k: round(v / secs, 1) for k, v in sorted(wakes.items()) if v > 0}
print(json.dumps({
    "bench": "idle",
    "idle_s": round(secs, 2),
    "cpu_percent_of_a_core": round((int(c1) - int(c0)) / os.sysconf("SC_CLK_TCK") / secs * 100, 2),
    "peak_rss_mib": round(int(rss) / 1024, 1),
    "wakes_per_s": wakes,
    "threads": {k: threads[k] for k in wakes},
}))
PY
