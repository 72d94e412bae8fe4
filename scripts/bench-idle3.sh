#!/usr/bin/env bash
# What an idle cluster of three costs (loopback, checkpoints on local files, the default
# [mesh] options): nodes 2 and 3 join node 1, the cluster settles, a short load of counter
# calls, 3 s, then IDLE seconds with nothing to do. Prints one JSON line per node: its CPU in
# that time (% of one core), voluntary wake-ups per second of all its threads, its peak RSS,
# and whether it leads the control group. BIN=<binary> skips the release build.
#   IDLE=10 bash scripts/bench-idle3.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10}
. scripts/lib-cluster3.sh
python3 - "$BIN" "$ROOT" "$IDLE" <<'PY'
import json, os, sys, time
sys.path.insert(0, "scripts")
import cluster3
from cluster3 import call, nodes, settled, start, view

B, ROOT, IDLE = sys.argv[1], sys.argv[2], float(sys.argv[3])
cluster3.setup(B, ROOT)
HZ = os.sysconf("SC_CLK_TCK")

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

def wakes(pid):
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            for line in open(f"/proc/{pid}/task/{t}/status"):
                if line.startswith("voluntary_ctxt_switches"):
                    n += int(line.split()[1])
        except OSError:
            pass
    return n

try:
    start(1)
    time.sleep(1)
    seed = f"127.0.0.1:{nodes[1]['ports'][0]}"
    start(2, seed); start(3, seed)
    settled([1, 2, 3])
    t = time.time()
    i = 0
    while time.time() < t + 1:
        call(nodes[1 + i % 3]["http"], f"idle-{i % 100}")
        i += 1
    time.sleep(3)
    leader = view(1)["leader"]
    pids = {k: nodes[k]["proc"].pid for k in (1, 2, 3)}
    c0 = {k: cpu(p) for k, p in pids.items()}
    w0 = {k: wakes(p) for k, p in pids.items()}
    t0 = time.time()
    time.sleep(IDLE)
    dt = time.time() - t0
    for k, p in pids.items():
        rss = [l for l in open(f"/proc/{p}/status") if l.startswith("VmHWM")][0].split()[1]
        print(json.dumps({
            "node": k, "leader": k == leader, "idle_s": round(dt, 1),
            "cpu_pct": round(100 * (cpu(p) - c0[k]) / HZ / dt, 2),
            "wakes_per_s": round((wakes(p) - w0[k]) / dt),
            "peak_rss_mb": round(int(rss) / 1024),
        }))
finally:
    cluster3.stop_all()
PY
