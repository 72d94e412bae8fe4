#!/usr/bin/env bash
# Graceful stops on a cluster of three (release builds, loopback, checkpoints on local files,
# the default [mesh] options): STOPS times, SIGTERM one node (a follower and the leader in
# turn) while two clients call counters owned by the two other nodes, one call after another.
# Measures from the SIGTERM to the node's exit, to the first successful `Call` through a
# survivor to a counter whose key group the stopped node owned (retried every 20 ms), and the
# longest call of the other clients from 0.5 s before the SIGTERM to 1 s after that key group
# is served again (what the stop cost the rest of the cluster), with their failed calls (503
# "rolled back, retry" answers, which the SDK client retries). Then the node restarts and the
# script waits until it has its share back. Prints one JSON line per stop and a summary.
#   STOPS=6 bash scripts/bench-stop.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STOPS=${STOPS:-6}
. scripts/lib-cluster3.sh
python3 - "$BIN" "$ROOT" "$STOPS" <<'EOF'
import json, signal, sys, threading, time
sys.path.insert(0, "scripts")
import cluster3
from cluster3 import call, get, key_group, nodes, settled, start, view

B, ROOT, STOPS = sys.argv[1], sys.argv[2], int(sys.argv[3])
cluster3.setup(B, ROOT)
ERRS = []

try:
    start(1)
    time.sleep(1)
    seed = f"127.0.0.1:{nodes[1]['ports'][0]}"
    start(2, seed); start(3, seed)
    settled([1, 2, 3])
    rows = []
    for k in range(STOPS):
        leader = view(1 if nodes[1]["proc"].poll() is None else 2)["leader"]
        followers = [i for i in (1, 2, 3) if i != leader]
        victim = leader if k % 2 == 1 else followers[0]
        survivors = [i for i in (1, 2, 3) if i != victim]
        owners = get(nodes[survivors[0]]["http"] + "/v1/cluster/key-groups")[1]["owners"]
        def owned_by(prefix, o):
            return next(f"{prefix}-{j}" for j in range(100000)
                        if owners[key_group("example", "counter", f"{prefix}-{j}")] == o)
        vid = owned_by(f"st-{k}", victim)
        sids = [owned_by(f"so-{k}-{s}", s) for s in survivors]
        lat, stop = [], [False]
        def loop(http, id_):
            while not stop[0]:
                t = time.monotonic(); ok = call(http, id_, 3000, ERRS)
                lat.append((t, time.monotonic() - t, ok))
        ths = [threading.Thread(target=loop, args=(nodes[s]["http"], i)) for s, i in zip(survivors, sids)]
        for th in ths:
            th.start()
        time.sleep(1.0)
        ERRS.clear()
        t0 = time.monotonic()
        nodes[victim]["proc"].send_signal(signal.SIGTERM)
        code = nodes[victim]["proc"].wait()
        exit_s = time.monotonic() - t0
        while not call(nodes[survivors[0]]["http"], vid):
            time.sleep(0.02)
        served_s = time.monotonic() - t0
        time.sleep(1.0)
        stop[0] = True
        for th in ths:
            th.join()
        window = [(l, ok) for (t, l, ok) in lat if t >= t0 - 0.5]
        row = {"stop": k + 1, "node": victim, "leader": victim == leader, "exit_code": code,
               "exit_s": round(exit_s, 3), "moved_key_served_s": round(served_s, 3),
               "others_max_call_s": round(max(l for l, _ in window), 3),
               "others_calls": len(window), "others_failed": sum(1 for _, ok in window if not ok),
               "errors": sorted(set(map(str, ERRS)))}
        rows.append(row)
        print(json.dumps(row), flush=True)
        start(victim, seed if victim != 1 else f"127.0.0.1:{nodes[2]['ports'][0]}")
        settled([1, 2, 3])
    def pct(xs, q):
        xs = sorted(xs); return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None
    served = [r["moved_key_served_s"] for r in rows]
    others = [r["others_max_call_s"] for r in rows]
    print(json.dumps({"stops": len(rows), "moved_key_served_p50_s": pct(served, 0.5),
                      "moved_key_served_max_s": max(served),
                      "others_max_call_p50_s": pct(others, 0.5), "others_max_call_max_s": max(others),
                      "others_failed_total": sum(r["others_failed"] for r in rows)}))
finally:
    cluster3.stop_all()
EOF
