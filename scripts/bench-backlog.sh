#!/usr/bin/env bash
# A backlog behind a slow remote function (issue 10, item 5): N one-way HTTP sends (32 at a
# time, durable acknowledgements) to 4 addresses of `py/slower` (StateFun 3.3 Python SDK, 10 ms
# a message), so thousands of messages wait in inboxes for seconds while epochs are cut. One
# JSON line: ingress and drain time, and what the epochs wrote while the backlog drained
# (mean bytes and listed pending messages per epoch of the node's last 64, one second after
# the sends), with the pending-message counters. Before pending message records, every epoch
# listed the whole backlog again.
#   N=3000 bash scripts/bench-backlog.sh      # BIN=… to measure another build
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-3000}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p statemesh-node >&2
  BIN=target/release/statemesh
fi
. scripts/lib-remote.sh
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

$PY tests/py/statefun3_functions.py 0 >"$TMP/py.out" 2>"$TMP/py.log" & PIDS+=($!)
wait_line "$TMP/py.out" serving
printf 'kind: io.statefun.endpoints.v2/http\nspec:\n  functions: py/*\n  urlPathTemplate: http://127.0.0.1:%s/statefun\n  maxNumBatchRequests: 1000\n' \
  "$(awk '{print $3}' "$TMP/py.out")" > "$TMP/module.yaml"
HTTP_PORT=$(free_port)
"$BIN" node --module "$TMP/module.yaml" --data-dir "$TMP/data" --http-addr "127.0.0.1:$HTTP_PORT" \
  --grpc-addr 127.0.0.1:0 >"$TMP/node.log" 2>&1 & PIDS+=($!)
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null && break; sleep 0.1; done
python3 - "http://127.0.0.1:$HTTP_PORT" "$N" <<'PY'
import sys, time, json, urllib.request, concurrent.futures
http, n = sys.argv[1], int(sys.argv[2])
get = lambda path: urllib.request.urlopen(f"{http}{path}").read()
def send(i):
    req = urllib.request.Request(f"{http}/v1/send/py/slower/b{i % 4}", data=b"1", method="POST",
                                 headers={"content-type": "application/vnd.io.statefun.types/long"})
    urllib.request.urlopen(req).read()
t0 = time.time()
with concurrent.futures.ThreadPoolExecutor(32) as ex:
    list(ex.map(send, range(n)))
sent = time.time() - t0
time.sleep(1.0)
recent = json.loads(get("/v1/checkpoints")).get("recent", [])
mean = lambda k: sum(e[k] for e in recent) / max(1, len(recent))
while sum(int((json.loads(get(f"/v1/state/py/slower/b{a}"))["states"].get("n") or {}).get("value") or 0)
          for a in range(4)) < n:
    time.sleep(0.1)
drained = time.time() - t0
m = {}
for line in get("/metrics").decode().splitlines():
    if line.startswith(("statemesh_checkpoint_pending", "statemesh_checkpoint_committed_epoch")):
        k, v = line.split()[:2]
        m[k.removeprefix("statemesh_checkpoint_")] = float(v)
print(json.dumps({"bench": "backlog", "messages": n, "sent_s": round(sent, 2),
                  "ingress_per_s": round(n / sent), "drained_s": round(drained, 2),
                  "epochs_sampled": len(recent), "epoch_mean_bytes": round(mean("bytes")),
                  "epoch_mean_listed": round(mean("pending"), 1), **m}))
PY
