"""What the serving app says about itself: Prometheus metrics, the x-request-id, one access-log line a request.

Metrics go through Ray Serve's metrics API (`ray.serve.metrics`), so every replica's values
reach Ray's Prometheus endpoint with Serve's deployment/replica/application tags added; Ray
prefixes the names with `ray_` (and counters get `_total`): `EXPORTED` is what a scrape shows.
Labels are bounded: route templates (anything else is "other"), status classes, release ids
that resolved, API-key ids (a digest prefix, never the key), image error codes.

The request id: a client's `x-request-id` if it is printable ASCII of at most 128 characters,
otherwise a fresh uuid4 hex. In Serve, `serve_middlewares` (Serve's HTTP callback, named by
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`) does this before Serve's own request-id middleware,
which then uses that same id for its logs and returns it on every response, errors included.
`AccessLog`, inside the app, checks it again (the app may run without the callback) and returns it
itself only when told that no Serve is outside (`echo`), so that a response never carries two.

Nothing here imports Ray at import time: the gateway runs without it in unit tests.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Collection
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from po_cluster.serving.limits import app_path

REQUEST_ID = "x-request-id"
MAX_REQUEST_ID = 128
ACCESS_LOGGER = "po_cluster.serving.access"
OTHER_ROUTE = "other"

# Milliseconds: from a cache hit on the tiny model (the first bucket) to a cold release load (seconds).
LATENCY_MS_BOUNDARIES: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128]
# t: 0 (base) and 1 (release) are the usual asks; buckets of 0.25 between, coarser outside. A counter
# with the bucket as a label, not a Histogram: Ray's histograms take only boundaries above 0, and t
# may be negative. Bucket (lo, hi] is labelled "lo..hi", below the first "le-2", above the last "gt4".
T_BOUNDARIES: list[float] = [-2, -1, -0.5, -0.25, 0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4]

# name → (kind, tag keys, description); Serve adds deployment, replica and application.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "po_serve_requests": ("counter", ("route", "release", "status_class", "key_id"),
                          "HTTP requests answered, by route template, release, status class and API-key id"),
    "po_serve_request_latency_ms": ("histogram", ("route",), "time from the request's arrival to its answer"),
    "po_serve_batch_size": ("histogram", ("method",), "items in one forward of the model"),
    "po_serve_t_requests": ("counter", ("route", "t_bucket"), "requests by the bucket of the t they asked for"),
    "po_serve_releases_loaded": ("gauge", (), "releases held by this model replica"),
    "po_serve_image_decode_failures": ("counter", ("code",), "images refused, by error code"),
}
BOUNDARIES: dict[str, list[float]] = {"po_serve_request_latency_ms": LATENCY_MS_BOUNDARIES,
                                      "po_serve_batch_size": BATCH_BOUNDARIES}
# Serve's own metrics the k8s dashboard and alerts use as well (replicas per deployment, replica starts).
SERVE_METRICS = ("ray_serve_deployment_replica_healthy", "ray_serve_deployment_replica_starts_total")


def exported_names() -> set[str]:
    """Every series name a Prometheus scrape shows for METRICS (as Ray 2.60 writes them) and SERVE_METRICS."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    return {f"ray_{name}{suffix}" for name, (kind, _, _) in METRICS.items() for suffix in suffixes[kind]} \
        | set(SERVE_METRICS)


# ---------------------------------------------------------------- metrics


class Metrics:
    """The metric objects of this process, created on first use (inside a replica: Serve's tags apply)."""

    _instance: Metrics | None = None
    _warned = False

    def __init__(self) -> None:
        from ray.serve import metrics

        kinds: dict[str, Any] = {"counter": metrics.Counter, "gauge": metrics.Gauge}
        self.by_name: dict[str, Any] = {}
        for name, (kind, tag_keys, description) in METRICS.items():
            tags: Any = tag_keys or None  # Ray's annotation says tuple[str]: a one-element tuple, wrongly
            if kind == "histogram":
                self.by_name[name] = metrics.Histogram(name, description=description, boundaries=BOUNDARIES[name],
                                                       tag_keys=tags)
            else:
                self.by_name[name] = kinds[kind](name, description=description, tag_keys=tags)

    @classmethod
    def get(cls) -> Metrics | None:
        """This process's metrics, or None where Ray's metrics cannot be used (no Ray: unit tests)."""
        if cls._instance is None:
            try:
                cls._instance = cls()
            except Exception as error:  # no Ray here (unit tests): the app still serves, it only says nothing
                if not cls._warned:
                    cls._warned = True
                    logging.getLogger("po_cluster.serving").warning("serving metrics are off: %s", error)
                return None
        return cls._instance


def _metric(name: str) -> Any:
    found = Metrics.get()
    return found.by_name[name] if found is not None else None


def record_request(route: str, release: str, status: int, key_id: str, ms: float) -> None:
    requests, latency = _metric("po_serve_requests"), _metric("po_serve_request_latency_ms")
    if requests is None:
        return
    requests.inc(tags={"route": route, "release": release, "status_class": f"{status // 100}xx", "key_id": key_id})
    latency.observe(ms, tags={"route": route})


def record_batch(method: str, size: int) -> None:
    metric = _metric("po_serve_batch_size")
    if metric is not None:
        metric.observe(size, tags={"method": method})


def t_bucket(t: float) -> str:
    """The label of t's bucket: "lo..hi" for lo < t ≤ hi, "le-2" / "gt4" outside T_BOUNDARIES."""
    if t <= T_BOUNDARIES[0]:
        return f"le{T_BOUNDARIES[0]:g}"
    for lo, hi in pairwise(T_BOUNDARIES):
        if t <= hi:
            return f"{lo:g}..{hi:g}"
    return f"gt{T_BOUNDARIES[-1]:g}"


def record_t(route: str, t: float) -> None:
    metric = _metric("po_serve_t_requests")
    if metric is not None:
        metric.inc(tags={"route": route, "t_bucket": t_bucket(t)})


def record_releases_loaded(count: int) -> None:
    metric = _metric("po_serve_releases_loaded")
    if metric is not None:
        metric.set(count)


def keep_reporting_releases(count: Any, every_s: float = 5.0) -> threading.Thread:
    """Re-set the releases gauge every few seconds from a daemon thread: Ray's metrics agent drops a
    gauge's value some time after it was last set, and a replica that gets no requests sets nothing."""
    def loop() -> None:
        while True:  # until the replica's process ends (daemon thread)
            with contextlib.suppress(Exception):  # the count is only a reading; the next turn tries again
                record_releases_loaded(int(count()))
            time.sleep(every_s)

    thread = threading.Thread(target=loop, name="po-serve-gauges", daemon=True)
    thread.start()
    return thread


def record_decode_failure(code: str) -> None:
    metric = _metric("po_serve_image_decode_failures")
    if metric is not None:
        metric.inc(tags={"code": code})


# ---------------------------------------------------------------- request ids and the access log


def clean_request_id(value: str | bytes | None) -> str | None:
    """The id if a client's value may be one (1..128 printable ASCII characters, no spaces), else None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value is None or not 0 < len(value) <= MAX_REQUEST_ID:
        return None
    return value if all("!" <= c <= "~" for c in value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def _request_id_of(scope: dict) -> str:
    """The request's id, the scope's header replaced by it."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != REQUEST_ID.encode()]
    given = [v for k, v in scope.get("headers") or [] if k.lower() == REQUEST_ID.encode()]
    found = clean_request_id(given[0]) if len(given) == 1 else None
    request_id = found or new_request_id()
    scope["headers"] = [*headers, (REQUEST_ID.encode(), request_id.encode())]
    return request_id


class RequestIdCheck:
    """ASGI middleware outside Serve's own: replaces a missing or unusable x-request-id before Serve reads it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            _request_id_of(scope)
        await self.app(scope, receive, send)


def serve_middlewares() -> list:
    """Serve's HTTP callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the middlewares around its ASGI server."""
    from starlette.middleware import Middleware

    return [Middleware(RequestIdCheck)]


@dataclass
class RequestRecord:
    """What the app learns about a request while answering it, for its log line and its metrics."""

    request_id: str
    route: str
    release: str = ""
    t: float | None = None
    key_id: str = "anonymous"


_current: ContextVar[RequestRecord | None] = ContextVar("po_serving_request", default=None)


def current() -> RequestRecord | None:
    """The record of the request being answered (None outside one); the gateway fills in release, t, key."""
    return _current.get()


def access_logger() -> logging.Logger:
    """The access log: one JSON object a line on stderr unless configured otherwise (a handler set on it)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the line is already JSON: a root handler would wrap it again
    return logger


class AccessLog:
    """ASGI middleware, outermost in the app: the request's id and record, its metrics, its log line."""

    def __init__(self, app: Any, routes: Collection[str], echo: bool = True) -> None:
        self.app, self.routes, self.echo, self.log = app, set(routes), echo, access_logger()

    def _route(self, scope: dict) -> str:
        path = app_path(scope)
        return path if path in self.routes else OTHER_ROUTE  # never a raw path: unbounded labels

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = _request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id  # for the 500 handler, which runs outside
        record, start, status = RequestRecord(request_id, self._route(scope)), time.perf_counter(), 500
        token = _current.set(record)

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:  # not in Serve, which returns it itself: a second header would repeat it
                    message["headers"] = [*message.get("headers", []), (REQUEST_ID.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:  # an exception here is answered 500 by the app's last handler, outside this middleware
            _current.reset(token)
            self._done(record, status, (time.perf_counter() - start) * 1000)

    def _done(self, record: RequestRecord, status: int, ms: float) -> None:
        release = record.release or "none"
        record_request(record.route, release, status, record.key_id, ms)
        self.log.info(json.dumps({"id": record.request_id, "route": record.route, "release": record.release or None,
                                  "t": record.t, "status": status, "ms": round(ms, 3)}))
