"""Serving benchmark: /v1/classify over HTTP on 127.0.0.1 at a fixed concurrency, against the in-process limit.

    .venv/bin/python benchmarks/serve_bench.py [--concurrency 16] [--load-seconds 60]
    .venv/bin/python benchmarks/serve_bench.py --overload [--overload-seconds 30]

Prints, in one run:
  - throughput with @serve.batch relative to the in-process batched forward of the same
    release (the same engine code, same torch threads; target ≥ 0.5);
  - relative to the same app with max_batch_size = 1 (target ≥ 2);
  - p50 / p99 latency;
  - t = 0.5 relative to t = 1 (interleaved rounds; target < 5 % slower);
  - a load run of --load-seconds: errors (target 0) and the model replica's RSS at its end
    relative to its start (read from /healthz; target within 10 %).
With --overload: the throughput (t = 1, as above), then 4 × that rate offered open loop for
--overload-seconds against the app with a token bucket (benchmarks/serve_overload.py says what it prints).
Every loop is bounded (a request count or a deadline). Nothing leaves 127.0.0.1.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABELS = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon"]


@dataclass
class Run:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


def _worker(url: str, bodies: list[bytes], count: int, deadline: float, run: Run, lock: threading.Lock) -> None:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"content-type": "application/json"}
    try:
        for i in range(count):  # bounded: a count, and a deadline
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/classify", body=bodies[i % len(bodies)], headers=headers)
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException) as error:
                ok, payload = False, repr(error).encode()
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
            with lock:
                if ok:
                    run.latencies.append(time.perf_counter() - start)
                else:
                    run.errors.append(payload[:200].decode(errors="replace"))
    finally:
        conn.close()


def load(url: str, bodies: list[bytes], concurrency: int, per_thread: int, seconds: float = 3600) -> Run:
    """`concurrency` threads, each with its own keep-alive connection, `per_thread` requests or `seconds`."""
    run, lock = Run(), threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=_worker, args=(url, bodies, per_thread, deadline, run, lock))
               for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds = time.perf_counter() - start
    return run


def bodies_for(images: np.ndarray, t: float) -> list[bytes]:
    from po_cluster.serving.local import png_base64

    return [json.dumps({"image": png_base64(image), "labels": LABELS, "t": t}).encode() for image in images]


def in_process(folder: Path, images: np.ndarray, batch: int, threads: int, batches: int) -> float:
    """Images/s of the replica's own code (classify_many) on full batches, in this process: the limit."""
    import torch

    from po_cluster.model.release import Knob, ReleaseModel

    torch.set_num_threads(threads)
    release = ReleaseModel.load("bench", folder)
    prompts = [release.prompt_template.replace("{}", label) for label in LABELS]
    chunks = [list(images[i:i + batch]) for i in range(0, len(images) - batch + 1, batch)]
    release.classify_many(chunks[0], [prompts] * batch, [Knob(1.0)] * batch)  # warm-up, fills the text cache
    start, done = time.perf_counter(), 0
    for i in range(batches):  # bounded: a count, and ~10 s for heavy architectures
        release.classify_many(chunks[i % len(chunks)], [prompts] * batch, [Knob(1.0)] * batch)
        done += batch
        if i >= 2 and time.perf_counter() - start > 10:
            break
    return done / (time.perf_counter() - start)


def model_rss(url: str) -> int:
    from po_cluster.serving.local import call

    status, health = call(f"{url}/healthz")
    return int(health["model"]["rss_bytes"]) if status == 200 else 0


def replica_cpu(url: str) -> dict[str, float]:
    """CPU seconds used so far by the gateway and model replicas (pids from /healthz, times from /proc)."""
    import os

    from po_cluster.serving.local import call

    _, health = call(f"{url}/healthz")
    seconds = {}
    for name in ("gateway", "model"):
        with open(f"/proc/{health[name]['pid']}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        seconds[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def app_args(store: str, cache: str, batch: int, threads: int, wait_s: float = 0.005) -> dict:
    return {"store": store, "store_settings": {"cache_dir": cache},
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": wait_s},
            "model": {"num_cpus": 1, "torch_threads": threads, "max_ongoing_requests": 64},
            "gateway": {"num_cpus": 0}}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batch", type=int, default=8,
                   help="max_batch_size of the batched app; the default, half the concurrency, keeps two "
                        "gateway batches in flight, so the gateway decodes while the model computes")
    p.add_argument("--batch-wait", type=float, default=0.005, help="batch_wait_timeout_s of the batched app")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="of the model replica (num_cpus 1) and of the in-process run")
    p.add_argument("--per-thread", type=int, default=25, help="requests per thread in a measured round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved t = 1 / t = 0.5 rounds")
    p.add_argument("--load-seconds", type=float, default=60)
    p.add_argument("--arch", default=None, help="serve an open_clip architecture with random weights (e.g. "
                   "ViT-B-32) instead of the shipped base model: a forward of production size")
    p.add_argument("--json-out", help="also write the figures to this JSON file")
    p.add_argument("--overload", action="store_true", help="throughput, then 4 × it offered open loop")
    p.add_argument("--overload-seconds", type=float, default=30, help="how long the overload lasts")
    p.add_argument("--overload-factor", type=float, default=4.0, help="offered rate / sustainable rate")
    p.add_argument("--overload-share", type=float, default=0.5,
                   help="token bucket rate / sustainable rate (what is left of the cores after the refusals)")
    p.add_argument("--gateway-replicas", type=int, default=1,
                   help="with --overload: gateway replicas (each refuses over-rate requests in its own event loop)")
    return p.parse_args()


def merged(runs: list[Run]) -> Run:
    return Run(sum(r.seconds for r in runs), [x for r in runs for x in r.latencies],
               [x for r in runs for x in r.errors])


def measure_batched(url: str, images: np.ndarray,
                    a: argparse.Namespace) -> tuple[Run, Run, float, dict[str, float]]:
    """t = 1 and t = 0.5 in interleaved rounds, so that drifting load on the machine hits both alike;
    the median over rounds of t = 0.5's throughput relative to its neighbouring t = 1 round; and the
    replicas' CPU milliseconds per request over all rounds."""
    ones, halves = bodies_for(images, 1.0), bodies_for(images, 0.5)
    load(url, ones + halves, a.concurrency, 6)  # warm-up: release loaded, text cache filled, pools sized
    rounds: tuple[list[Run], list[Run]] = ([], [])
    cpu_before = replica_cpu(url)
    for _ in range(a.rounds):
        rounds[0].append(load(url, ones, a.concurrency, a.per_thread))
        rounds[1].append(load(url, halves, a.concurrency, a.per_thread))
    t1, t05 = merged(rounds[0]), merged(rounds[1])
    n = len(t1.latencies) + len(t05.latencies)
    cpu = {name: 1000 * (used - cpu_before[name]) / max(n, 1) for name, used in replica_cpu(url).items()}
    relative = statistics.median(h.throughput / o.throughput for o, h in zip(*rounds, strict=True) if o.throughput)
    return t1, t05, relative, cpu


def soak(url: str, images: np.ndarray, a: argparse.Namespace) -> tuple[Run, int, int]:
    before = model_rss(url)
    cap = int(a.load_seconds * 500)  # per thread: far above any reachable rate, a bound all the same
    run = load(url, bodies_for(images, 1.0), a.concurrency, cap, seconds=a.load_seconds)
    return run, before, model_rss(url)


def measure(a: argparse.Namespace, tmp: str) -> dict:
    from po_cluster.data import world
    from po_cluster.serving.local import publish_example_release, start_local
    from po_cluster.store.artifacts import open_store

    store, cache = f"{tmp}/store", f"{tmp}/cache"
    publish_example_release(store, "r-bench", f"{tmp}/checkpoints", architecture=a.arch)
    images = world.image_set("attacked", 64, seed=7).images
    folder = open_store(store).pull_release("r-bench", cache_dir=cache)
    limit = in_process(folder, images, a.batch, a.torch_threads, batches=40)
    # The same forward on twice the batch: what a bigger max_batch_size would give the model, were the
    # requests there to fill it (with concurrency 16 they are not: see --batch).
    bigger = in_process(folder, images, 2 * a.batch, a.torch_threads, batches=20)
    server = start_local(app_args(store, cache, a.batch, a.torch_threads, a.batch_wait), num_cpus=2)
    try:
        t1, t05, relative, cpu = measure_batched(server.url, images, a)
        soaked, rss_start, rss_end = soak(server.url, images, a)
        server.redeploy(app_args(store, cache, 1, a.torch_threads))  # the same app, without batching
        load(server.url, bodies_for(images, 1.0), a.concurrency, 2)
        single = load(server.url, bodies_for(images, 1.0), a.concurrency, max(4, a.per_thread // 3))
    finally:
        server.stop()
    return {"in_process_img_per_s": limit, "in_process_2x_img_per_s": bigger, "batched_req_per_s": t1.throughput,
            "unbatched_req_per_s": single.throughput, "t05_relative_throughput": relative,
            "p50_ms": t1.percentile(50), "p99_ms": t1.percentile(99),
            "unbatched_p50_ms": single.percentile(50), "t05_req_per_s": t05.throughput,
            "t05_p50_ms": t05.percentile(50), "errors_measured": len(t1.errors) + len(t05.errors) + len(single.errors),
            "load_seconds": soaked.seconds, "load_requests": len(soaked.latencies), "load_errors": len(soaked.errors),
            "load_p99_ms": soaked.percentile(99), "rss_start": rss_start, "rss_end": rss_end,
            "gateway_cpu_ms_per_request": cpu["gateway"], "model_cpu_ms_per_request": cpu["model"],
            "in_process_cpu_ms_per_image": 1000 * a.torch_threads / limit,
            "first_errors": (t1.errors + t05.errors + single.errors + soaked.errors)[:3]}


def report(f: dict, a: argparse.Namespace) -> bool:
    vs_limit = f["batched_req_per_s"] / f["in_process_img_per_s"]
    vs_single = f["batched_req_per_s"] / f["unbatched_req_per_s"]
    slower = 1 - f["t05_relative_throughput"]
    rss = f["rss_end"] / f["rss_start"] - 1 if f["rss_start"] else float("nan")
    checks = [("batched / in-process", vs_limit >= 0.5), ("batched / unbatched", vs_single >= 2),
              ("t≠1 slowdown", slower < 0.05), ("load errors", f["load_errors"] == 0 and f["errors_measured"] == 0),
              ("RSS drift", abs(rss) <= 0.10)]
    lines = [
        f"serve_bench: {a.arch or 'shipped base model (po-tiny-rn)'}, /v1/classify, {len(LABELS)} labels, "
        f"64×64 PNG, concurrency {a.concurrency}, "
        f"torch threads {a.torch_threads}, max_batch_size {a.batch}",
        f"  in-process batched forward (batch {a.batch})  {f['in_process_img_per_s']:8.1f} img/s",
        f"  HTTP, @serve.batch                      {f['batched_req_per_s']:8.1f} req/s   "
        f"= {vs_limit:.2f} × in-process (target ≥ 0.5)",
        f"  in-process at batch {2 * a.batch:<3d}                   {f['in_process_2x_img_per_s']:8.1f} img/s   "
        f"HTTP = {f['batched_req_per_s'] / f['in_process_2x_img_per_s']:.2f} × this",
        f"  HTTP, max_batch_size = 1                {f['unbatched_req_per_s']:8.1f} req/s   "
        f"batched = {vs_single:.2f} × this (target ≥ 2)",
        f"  latency, batched, t = 1                 p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms "
        f"(unbatched p50 {f['unbatched_p50_ms']:.1f} ms)",
        f"  t = 0.5 vs t = 1                        {f['t05_req_per_s']:8.1f} req/s   "
        f"{100 * slower:+.1f} % slower (median of paired rounds; target < 5 %), "
        f"p50 {f['t05_p50_ms']:.1f} ms",
        f"  load run {f['load_seconds']:.0f} s                          {f['load_requests']} requests, "
        f"{f['load_errors']} errors, p99 {f['load_p99_ms']:.1f} ms",
        f"  model replica RSS                       {f['rss_start'] / 2**20:.0f} MiB → "
        f"{f['rss_end'] / 2**20:.0f} MiB "
        f"({100 * rss:+.1f} %, target within ±10 %)",
        f"  CPU per request (batched)               gateway {f['gateway_cpu_ms_per_request']:.1f} ms, model replica "
        f"{f['model_cpu_ms_per_request']:.1f} ms (in-process: {f['in_process_cpu_ms_per_image']:.2f} ms per image)",
        "  " + ", ".join(f"{name}: {'ok' if ok else 'MISSED'}" for name, ok in checks)]
    if f["first_errors"]:
        lines.append(f"  first errors: {f['first_errors']}")
    print("\n".join(lines), flush=True)
    return all(ok for _, ok in checks)


def overload(a: argparse.Namespace, tmp: str) -> bool:
    from serve_overload import HAProxyLog, measure_overload, report_overload

    from po_cluster.data import world
    from po_cluster.serving.local import publish_example_release, start_local

    store, cache = f"{tmp}/store", f"{tmp}/cache"
    publish_example_release(store, "r-bench", f"{tmp}/checkpoints", architecture=a.arch)
    images = world.image_set("attacked", 64, seed=7).images

    def args_for(rate_limit: dict | None = None) -> dict:
        base = app_args(store, cache, a.batch, a.torch_threads, a.batch_wait)
        base["gateway"]["num_replicas"] = a.gateway_replicas
        return {**base, "rate_limit": rate_limit or {}}

    log = HAProxyLog()  # before Ray starts: its HAProxy takes the log target from the environment
    server = start_local(args_for(), num_cpus=2)
    try:
        t1, _, _, cpu = measure_batched(server.url, images, a)
        print(f"throughput (closed loop, concurrency {a.concurrency}, t = 1)  {t1.throughput:8.1f} req/s, "
              f"p50 {t1.percentile(50):.1f} ms, p99 {t1.percentile(99):.1f} ms", flush=True)
        figures = measure_overload(server, args_for, bodies_for(images, 1.0), t1.throughput,
                                   a.overload_seconds, a.overload_factor, a.overload_share, log)
        figures["gateway_replicas"] = a.gateway_replicas
        figures["cpu_ms"] = {**cpu, "refusal": refusal_cpu_ms(server, args_for({"rate_per_s": 0.1, "burst": 1}),
                                                              bodies_for(images, 1.0))}
    finally:
        server.stop()
    return report_overload(figures)


def refusal_cpu_ms(server, limited: dict, bodies: list[bytes]) -> float:
    """The gateway's CPU milliseconds per 429, closed loop against a bucket that admits next to nothing.
    One gateway replica, so that the one /healthz names is the one that did the work."""
    server.redeploy({**limited, "gateway": {**limited["gateway"], "num_replicas": 1}})
    load(server.url, bodies, 8, 5)  # warm-up, and the bucket's one token
    before = replica_cpu(server.url)["gateway"]
    run = load(server.url, bodies, 8, 200)
    return 1000 * (replica_cpu(server.url)["gateway"] - before) / max(len(run.errors) + len(run.latencies), 1)


def main() -> int:
    a = parse()
    if a.overload:
        with tempfile.TemporaryDirectory(prefix="po-serve-bench-") as tmp:
            return 0 if overload(a, tmp) else 1
    with tempfile.TemporaryDirectory(prefix="po-serve-bench-") as tmp:
        figures = measure(a, tmp)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if report(figures, a) else 1


if __name__ == "__main__":
    sys.exit(main())
