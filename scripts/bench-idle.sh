#!/usr/bin/env bash
# What an idle node costs: one node (defaults, the bundled examples), a short load, then
# IDLE seconds with nothing to do. Prints one JSON line: the node's CPU in that time (% of one
# core), its peak RSS, and voluntary wake-ups per second by thread (threads of one name summed).
#   IDLE=10 bash scripts/bench-idle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10}
. scripts/lib-node.sh
DATA=$(scratch)
start_node "$DATA"
load --protocol http --mode send --concurrency 4 --duration 1 >/dev/null
sleep 3
# One line per thread: name, voluntary switches.
wakes() {
  for t in /proc/"$PID"/task/*; do
    printf '%s\t%s\n' "$(cat "$t/comm" 2>/dev/null)" \
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
def by_name(text):
    d = collections.Counter()
    for line in text.splitlines():
        name, _, n = line.rpartition("\t")
        if n.isdigit():
            d[re.sub(r"-\d+$", "", name)] += int(n)
    return d
a, b = by_name(w0), by_name(w1)
wakes = {k: round((b[k] - a.get(k, 0)) / secs, 1) for k in sorted(b) if b[k] > a.get(k, 0)}
print(json.dumps({
    "bench": "idle",
    "idle_s": round(secs, 2),
    "cpu_percent_of_a_core": round((int(c1) - int(c0)) / os.sysconf("SC_CLK_TCK") / secs * 100, 2),
    "peak_rss_mib": round(int(rss) / 1024, 1),
    "wakes_per_s": wakes,
}))
PY
