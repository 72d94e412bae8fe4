#!/usr/bin/env bash
# Failover time on a cluster of three (release builds, loopback, checkpoints on local files,
# the default [mesh] options): KILLS times, SIGKILL one node (the leader every third time, a
# follower otherwise), and measure from the kill to the first successful `Call` through a survivor to a
# counter whose key group the killed node owned (retried every 20 ms, 500 ms timeout each).
# Then the node restarts and the script waits until it has its share back. Prints one JSON
# line per kill and a summary (p50/p90/max, and the same for kills of the leader).
#   KILLS=10 bash scripts/bench-failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
KILLS=${KILLS:-10}
. scripts/lib-cluster3.sh
python3 - "$BIN" "$ROOT" "$KILLS" <<'EOF'
import json, signal, sys, time
sys.path.insert(0, "scripts")
import cluster3
from cluster3 import call, get, key_group, nodes, settled, start, view

B, ROOT, KILLS = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster3.setup(B, ROOT)

try:
    start(1)
    time.sleep(1)
    seed = f"127.0.0.1:{nodes[1]['ports'][0]}"
    start(2, seed); start(3, seed)
    settled([1, 2, 3])
    times, leader_times = [], []
    for k in range(KILLS):
        # Every third kill the leader, the others a follower (as a random node would be).
        leader = view(1 if nodes[1]["proc"].poll() is None else 2)["leader"]
        followers = [i for i in (1, 2, 3) if i != leader]
        victim = leader if k % 3 == 0 else followers[k % 2]
        survivor = next(i for i in (1, 2, 3) if i != victim)
        was_leader = victim == leader
        owners = get(nodes[survivor]["http"] + "/v1/cluster/key-groups")[1]["owners"]
        id_ = next(f"fo-{k}-{j}" for j in range(100000)
                   if owners[key_group("example", "counter", f"fo-{k}-{j}")] == victim)
        while not call(nodes[survivor]["http"], id_):
            time.sleep(0.05)
        nodes[victim]["proc"].send_signal(signal.SIGKILL)
        nodes[victim]["proc"].wait()
        t0 = time.monotonic()
        while not call(nodes[survivor]["http"], id_):
            time.sleep(0.02)
        t = time.monotonic() - t0
        times.append(t)
        if was_leader:
            leader_times.append(t)
        print(json.dumps({"kill": k + 1, "node": victim, "leader": was_leader,
                          "failover_s": round(t, 3)}), flush=True)
        start(victim, seed if victim != 1 else f"127.0.0.1:{nodes[2]['ports'][0]}")
        settled([1, 2, 3])
    def pct(xs, q):
        xs = sorted(xs); return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None
    print(json.dumps({"kills": len(times), "p50_s": pct(times, 0.5), "p90_s": pct(times, 0.9),
                      "max_s": round(max(times), 3), "leader_kills": len(leader_times),
                      "leader_p50_s": pct(leader_times, 0.5),
                      "follower_p50_s": pct([t for t in times if t not in leader_times], 0.5)}))
finally:
    cluster3.stop_all()
EOF
