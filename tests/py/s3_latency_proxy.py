"""An HTTP proxy in front of an S3-compatible server (moto) that adds a fixed latency to every
request and counts the requests, as a stand-in for S3 across a network (issue 10: the S3
budgets). Standard library only.

    python s3_latency_proxy.py --upstream http://127.0.0.1:5000 --port 0 --delay-ms 30

Prints `listening <port>` once it listens. `GET /__proxy/stats` answers the counts so far as
JSON (`{"total": n, "by_method": {...}, "by_kind": {...}, "since_s": s}`; listings count as
`LIST`; `by_kind` names what each was for, as `GET n1/manifests/*`); `POST /__proxy/reset`
zeroes them.
Neither is forwarded or counted.
"""

import argparse
import http.client
import http.server
import json
import sys
import threading
import time
import urllib.parse

LOCK = threading.Lock()
STATS = {"total": 0, "by_method": {}, "by_kind": {}, "since": time.monotonic()}


def kind(method, path):
    """`METHOD a/b`: the object's path without its bucket, numbers and names of one object
    replaced by `*` (what a request was for: manifests, parts, the lease)."""
    segs = [s for s in path.split("?")[0].split("/") if s][1:]
    segs = ["*" if any(ch.isdigit() for ch in s) else s for s in segs]
    return method + " " + "/".join(segs[:3])


def count(method, path):
    with LOCK:
        STATS["total"] += 1
        STATS["by_method"][method] = STATS["by_method"].get(method, 0) + 1
        k = kind(method, path)
        STATS["by_kind"][k] = STATS["by_kind"].get(k, 0) + 1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None
    delay = 0.0
    local = threading.local()

    def log_message(self, *args):
        pass

    def conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
            self.local.conn = c
        return c

    def reply(self, status, body, headers=(), length=None):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.path.startswith("/__proxy/"):
            if self.path == "/__proxy/reset":
                with LOCK:
                    STATS["total"] = 0
                    STATS["by_method"] = {}
                    STATS["by_kind"] = {}
                    STATS["since"] = time.monotonic()
                return self.reply(200, b"{}")
            with LOCK:
                out = {
                    "total": STATS["total"],
                    "by_method": dict(STATS["by_method"]),
                    "by_kind": dict(STATS["by_kind"]),
                    "since_s": time.monotonic() - STATS["since"],
                }
            return self.reply(200, json.dumps(out).encode(), [("Content-Type", "application/json")])
        # A listing is a GET of the bucket with a query (priced like a PUT).
        listing = self.command == "GET" and ("list-type=" in self.path or "prefix=" in self.path)
        count("LIST" if listing else self.command, self.path)
        time.sleep(self.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
        for attempt in range(2):
            try:
                c = self.conn()
                c.request(self.command, self.path, body=body, headers=headers)
                r = c.getresponse()
                data = r.read()
                break
            except (http.client.HTTPException, OSError):
                self.local.conn = None
                if attempt == 1:
                    return self.reply(502, b"upstream failed")
        hop = ("connection", "keep-alive", "transfer-encoding", "content-length")
        # A HEAD's length is the object's, without a body.
        length = r.getheader("Content-Length") if self.command == "HEAD" else None
        self.reply(r.status, data, [(k, v) for k, v in r.getheaders() if k.lower() not in hop], length)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=30.0)
    a = p.parse_args()
    Handler.upstream = urllib.parse.urlparse(a.upstream)
    Handler.delay = a.delay_ms / 1000.0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
