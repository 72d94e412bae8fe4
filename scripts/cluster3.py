"""A cluster of three `statemesh` nodes on loopback for the scripts' benchmarks
(`bench-failover.sh`, `bench-stop.sh`): start nodes, call counters over HTTP, compute a key
group as the node does, wait until the cluster has settled. `setup(binary, root)` first."""
import json, signal, socket, subprocess, sys, time, urllib.error, urllib.request

B = ROOT = None


def setup(binary, root):
    global B, ROOT
    B, ROOT = binary, root


M64 = (1 << 64) - 1

def fmix64(k):
    k ^= k >> 33; k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33; k = (k * 0xC4CEB9FE1A85EC53) & M64
    return k ^ (k >> 33)

def key_group(ns, typ, id_, k=1024):
    h = 0xCBF29CE484222325
    for b in ns.encode() + b"\x1f" + typ.encode() + b"\x1f" + id_.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return fmix64(h) % k

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

nodes = {}
def start(i, join=None):
    g, h = nodes[i]["ports"] if i in nodes else (port(), port())
    args = [B, "node", "--data-dir", f"{ROOT}/n{i}", "--grpc-addr", f"127.0.0.1:{g}",
            "--http-addr", f"127.0.0.1:{h}", "--node-id", str(i)]
    if join:
        args += ["--join", join]
    out = open(f"{ROOT}/n{i}.out", "a"); log = open(f"{ROOT}/n{i}.log", "a")
    p = subprocess.Popen(args, stdout=out, stderr=log)
    nodes[i] = {"ports": (g, h), "proc": p, "http": f"http://127.0.0.1:{h}"}

def get(url, timeout=2):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
    except Exception:
        return None, None
    try:
        return r.status, json.loads(body)
    except ValueError:
        return r.status, None

def call(http, id_, timeout_ms=500, errors=None):
    req = urllib.request.Request(f"{http}/v1/call/example/counter/{id_}?timeout_ms={timeout_ms}",
        data=b"0", method="POST", headers={"Content-Type": "application/vnd.io.statefun.types/long"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_ms / 1000 + 1) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        if errors is not None:
            errors.append(e.code)
        return False
    except Exception:
        if errors is not None:
            errors.append("no answer")
        return False

def view(i):
    return get(nodes[i]["http"] + "/v1/cluster")[1]

def settled(members):
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = True
        for i in members:
            v = view(i)
            if not v or len(v["members"]) != 3 or not all(m["alive"] for m in v["members"]) \
                    or not all(m["key_groups"] > 200 for m in v["members"]) \
                    or get(nodes[i]["http"] + "/readyz")[0] != 200:
                ok = False; break
        if ok:
            return
        time.sleep(0.2)
    sys.exit("the cluster did not settle")


def stop_all():
    """SIGTERM to every node still running, then waits for each (30 s, then SIGKILL)."""
    for n in nodes.values():
        if n["proc"].poll() is None:
            n["proc"].send_signal(signal.SIGTERM)
    for n in nodes.values():
        try:
            n["proc"].wait(timeout=30)
        except Exception:
            n["proc"].kill()
