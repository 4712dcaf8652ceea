"""`serve_bench.py --overload`: /v1/classify offered at a multiple of the sustainable rate, open loop.

The sustainable rate is what the app answers closed-loop at the benchmark's concurrency. The app is
then redeployed with a per-key token bucket at a share of that rate (one shared bucket: no keys), and
requests are sent on a fixed schedule (each of `senders` threads owns every senders-th slot), whatever
the answers take: an open loop, so that a slow server is not hidden by clients that wait for it.

Printed: the rate actually offered (a 2-core machine also runs the clients), the share of 200 / 429 /
503 / other answers, the slowest answer, the p99 of the 200s against an unloaded p99 (open loop at
a quarter of the sustainable rate, no rate limit), the replicas' RSS before and after (±%), and the
replicas' CPU per answered request (closed loop) and the gateway's per refused one (429).

The p99s are printed twice: as the clients timed them, and as HAProxy timed them (`Ta` in its log,
sent to a UDP listener here: from its receiving the request to its sending the last byte of the
answer). Where the clients share the cores with the server, the first includes the clients' own
waiting for a core; the second does not.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

MAX_LATE_S = 0.25
# An HAProxy httplog line: "... frontend backend/server Tq/Tw/Tc/Tr/Ta status bytes ..." and the request line.
_LOG_LINE = re.compile(r" -?\d+/-?\d+/-?\d+/-?\d+/(\d+) (\d{3}) .*\"POST /v1/classify ")


class HAProxyLog:
    """HAProxy's access log, received over UDP on 127.0.0.1: (time received, status, Ta in ms) per
    /v1/classify request. Must be made before Ray starts: its HAProxy reads the target from the
    environment (RAY_SERVE_HAPROXY_LOG_TARGET)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str, float]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        os.environ["RAY_SERVE_HAPROXY_LOG_TARGET"] = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while True:  # a daemon thread: ends with the process
            text = self.sock.recv(65536).decode(errors="replace")
            match = _LOG_LINE.search(text)
            if match:
                self.lines.append((time.time(), match.group(2), float(match.group(1))))

    def p99_ms(self, since: float, until: float, status: str = "200") -> tuple[float, int]:
        """p99 of Ta of the answers with `status` logged in [since, until], and how many were logged."""
        values = [ta for at, code, ta in list(self.lines) if since <= at <= until and code == status]
        return (float(np.percentile(values, 99)) if values else float("nan")), len(values)


@dataclass
class OpenLoop:
    seconds: float = 0.0
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    late_s: float = 0.0  # how far behind its schedule the slowest send went
    skipped: int = 0  # slots no sender reached in time (the client machine's limit, not the server's)

    def add(self, outcome: str, latency: float, late: float) -> None:
        self.sent += 1
        self.statuses[outcome] += 1
        self.latencies.setdefault(outcome, []).append(latency)
        self.late_s = max(self.late_s, late)

    @property
    def offered_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def p99_ms(self, outcome: str = "200") -> float:
        values = self.latencies.get(outcome, [])
        return float(np.percentile(values, 99) * 1000) if values else float("nan")

    def max_ms(self) -> float:
        return 1000 * max((max(v) for v in self.latencies.values() if v), default=float("nan"))

    def over(self, limit_s: float) -> int:
        return sum(1 for values in self.latencies.values() for x in values if x > limit_s)


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[str, bool]:
    """(outcome, keep the connection): a status ('429'), or the exception's name."""
    try:
        conn.request("POST", "/v1/classify", body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        return str(response.status), (response.getheader("connection") or "").lower() != "close"
    except (OSError, http.client.HTTPException) as error:
        return type(error).__name__, False


def _open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, senders: int, offset: float,
               start_at: float, timeout_s: float = 10.0) -> OpenLoop:
    """One process's share: `senders` threads, slot j of this process due at start + (j + offset) / rate.
    A slot its sender reaches more than MAX_LATE_S late is skipped and counted, not sent in a burst that
    would measure the client's backlog rather than the server; the run stays `seconds` long."""
    host, port = url.removeprefix("http://").split(":")
    run, lock = OpenLoop(), threading.Lock()
    total, start = int(rate * seconds), time.time() + max(0.0, start_at - time.time())
    end = start + seconds

    def sender(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        for slot in range(k, total, senders):  # bounded: the schedule's slots, and its end
            due = start + (slot + offset) / rate
            time.sleep(max(0.0, due - time.time()))
            sent = time.time()
            if sent > end:
                break
            if sent - due > MAX_LATE_S:
                with lock:
                    run.skipped += 1
                continue
            outcome, keep = _post(conn, bodies[slot % len(bodies)])
            with lock:
                run.add(outcome, time.time() - sent, sent - due)
            if not keep:
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        conn.close()

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 2 * timeout_s + 30)
    run.seconds = seconds
    return run


def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float, processes: int = 4,
              senders: int = 24) -> OpenLoop:
    """`rate` requests a second for `seconds` from `processes` client processes (one GIL would not keep
    the schedule), each sending every processes-th request at its slot, or as soon as a sender is free."""
    import multiprocessing

    start_at = time.time() + 6.0  # the processes start (spawn, on a loaded machine) before the first slot
    share = rate / processes
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(_open_loop, [(url, bodies, share, seconds, senders, i / processes, start_at)
                                          for i in range(processes)])
    run = OpenLoop(seconds=seconds)
    for part in parts:
        run.sent += part.sent
        run.statuses.update(part.statuses)
        for outcome, values in part.latencies.items():
            run.latencies.setdefault(outcome, []).extend(values)
        run.late_s = max(run.late_s, part.late_s)
        run.skipped += part.skipped
    return run


def replica_rss(url: str) -> dict[str, int]:
    from po_cluster.serving.local import call

    status, health = call(f"{url}/healthz")
    return {name: int(health[name]["rss_bytes"]) for name in ("gateway", "model")} if status == 200 else {}


def measure_overload(server, args_for, bodies: list[bytes], sustainable: float, seconds: float,
                     factor: float = 4.0, share: float = 0.5, log: HAProxyLog | None = None) -> dict:
    """Unloaded p99 (a quarter of the sustainable rate, no rate limit), then `factor` × sustainable for `seconds`
    with a token bucket at `share` × sustainable (burst: a tenth of a second of it)."""
    began = time.time()
    unloaded = open_loop(server.url, bodies, 0.25 * sustainable, min(10.0, seconds))
    unloaded_window = (began, time.time())
    limited = args_for({"rate_per_s": share * sustainable, "burst": max(1, int(share * sustainable / 10))})
    server.redeploy(limited)
    open_loop(server.url, bodies, 0.5 * sustainable, 2.0)  # warm-up of the new replicas
    rss_before = replica_rss(server.url)
    began = time.time()
    overload = open_loop(server.url, bodies, factor * sustainable, seconds)
    time.sleep(1.0)  # what was still queued drains before RSS is read
    logged = {"unloaded": log.p99_ms(*unloaded_window), "overload": log.p99_ms(began, time.time())} if log else {}
    return {"sustainable": sustainable, "factor": factor, "share": share, "unloaded": unloaded,
            "overload": overload, "rss_before": rss_before, "rss_after": replica_rss(server.url),
            "haproxy": logged}


def report_overload(f: dict) -> bool:
    run, unloaded = f["overload"], f["unloaded"]
    shares = {k: v / max(run.sent, 1) for k, v in run.statuses.items()}
    other = sum(v for k, v in shares.items() if k not in ("200", "429", "503"))
    ratio = run.p99_ms() / unloaded.p99_ms()
    drift = {name: after / f["rss_before"][name] - 1 for name, after in f["rss_after"].items()
             if f["rss_before"].get(name)}
    wanted = f["factor"] * f["sustainable"]
    checks = [("offered rate", run.offered_per_s >= 0.95 * wanted), ("only 200/429/503", other == 0),
              ("every answer ≤ 1 s", run.over(1.0) == 0), ("p99 of 200s ≤ 2 × unloaded", ratio <= 2),
              ("RSS ±5 %", bool(drift) and all(abs(x) <= 0.05 for x in drift.values()))]
    lines = [
        f"overload: {f['factor']:g} × the sustainable {f['sustainable']:.0f} req/s for {run.seconds:.0f} s, "
        f"open loop; token bucket at {f['share']:g} × sustainable",
        f"  offered                                 {run.offered_per_s:8.1f} req/s of {wanted:.0f} wanted "
        f"({run.sent} requests; {run.skipped} slots skipped, the client machine behind by > "
        f"{1000 * MAX_LATE_S:.0f} ms)",
        "  answers                                 " + ", ".join(
            f"{k} {100 * v:.1f} %" for k, v in sorted(shares.items())),
        f"  slowest answer                          {run.max_ms():.0f} ms ({run.over(1.0)} over 1 s)",
        f"  p99 of the 200s                         {run.p99_ms():.1f} ms = {ratio:.2f} × unloaded p99 "
        f"{unloaded.p99_ms():.1f} ms (a quarter of the sustainable rate, open loop; target ≤ 2)",
        *_haproxy_lines(f.get("haproxy", {})),
        *_cpu_lines(f),
        "  replica RSS                             " + ", ".join(
            f"{name} {f['rss_before'][name] / 2**20:.0f} → {f['rss_after'][name] / 2**20:.0f} MiB "
            f"({100 * x:+.1f} %)" for name, x in drift.items()),
        "  " + ", ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in checks)]
    print("\n".join(lines), flush=True)
    return all(ok for _, ok in checks)


def _haproxy_lines(logged: dict) -> list[str]:
    if not logged:
        return []
    (over, n_over), (calm, n_calm) = logged["overload"], logged["unloaded"]
    return [f"  p99 of the 200s, HAProxy's Ta            {over:.1f} ms = {over / calm:.2f} × unloaded {calm:.1f} ms "
            f"({n_over} and {n_calm} answers logged)"]


def _cpu_lines(f: dict) -> list[str]:
    if "cpu_ms" not in f:
        return []
    cpu, replicas = f["cpu_ms"], f.get("gateway_replicas", 1)
    shared = f" (a 200's gateway figure is one of {replicas} replicas' share)" if replicas > 1 else ""
    return [f"  replica CPU per answer                  200: gateway {cpu['gateway']:.2f} ms + model "
            f"{cpu['model']:.2f} ms; 429: gateway {cpu['refusal']:.2f} ms{shared}"]
