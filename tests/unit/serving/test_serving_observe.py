"""The request id, the access log and the metric names, on the real FastAPI app driven over ASGI (no Ray).

Without Ray the metrics are not recorded (observe.Metrics.get() is None); the integration test
(test_serving.py) reads them from Ray's Prometheus endpoint. Here: every answer, errors of
every layer included, carries one x-request-id, and each request writes one JSON log line.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest

from po_cluster.serving import observe


def asgi_call(app, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
              root_path: str = "") -> dict:
    """One HTTP request through the ASGI app: status, headers (a list: repeats show), body."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "root_path": root_path, "scheme": "http", "query_string": b"",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
             + [(b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)  # as a server does: nothing more until the client goes
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except RuntimeError as error:  # Starlette re-raises an unhandled error after answering 500
            if "boom" not in str(error):
                raise

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    return {"status": start["status"], "headers": [(k.decode(), v.decode()) for k, v in start["headers"]],
            "body": b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")}


def ids(answer: dict) -> list[str]:
    return [v for k, v in answer["headers"] if k.lower() == observe.REQUEST_ID]


class Exploding:
    """A model side that fails with an error of ours (a bug): the 500 path, which no real request reaches."""

    async def classify(self, *args):
        raise RuntimeError("boom")

    embed = classify

    async def health(self):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def published(release_template, tmp_path_factory) -> str:
    from po_cluster.store.artifacts import open_store

    root = tmp_path_factory.mktemp("observe-store")
    open_store(str(root)).publish_release(release_template, "r-one")
    return str(root)


def make_app(store: str, echo: bool = True, keys: str | None = None):
    from po_cluster.serving.api import make_api
    from po_cluster.serving.args import ServeConfig
    from po_cluster.serving.gateway import GatewayService

    auth = {"api_keys_env": "PO_TEST_KEYS"} if keys else {}
    args = ServeConfig(store=store, limits={"max_body_bytes": 4096}, auth=auth)
    return make_api(GatewayService(args, Exploding(), environ={"PO_TEST_KEYS": keys or ""}), echo_request_id=echo)


@pytest.fixture()
def access_lines():
    lines: list[dict] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(record.getMessage()))

    logger, handler = observe.access_logger(), Keep()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _png() -> str:
    import numpy as np

    from po_cluster.serving.local import png_base64

    return png_base64(np.zeros((8, 8, 3), dtype=np.uint8))


def test_every_status_carries_one_request_id_and_logs_one_line(published, access_lines):
    app = make_app(published, keys="k1")
    auth = {"authorization": "Bearer k1", "content-type": "application/json"}
    cases = [  # (method, path, body, headers, status, route)
        ("GET", "/v1/models", b"", {}, 401, "/v1/models"),
        ("GET", "/v1/models", b"", auth, 200, "/v1/models"),
        ("POST", "/v1/classify", b"{", auth, 400, "/v1/classify"),
        ("GET", "/no/such/path/123", b"", auth, 404, "other"),
        ("GET", "/v1/classify", b"", auth, 405, "/v1/classify"),
        ("POST", "/v1/classify", b"x" * 5000, auth, 413, "/v1/classify"),
        ("POST", "/v1/classify", b'{"image": "aGVsbG8=", "labels": ["a"]}', auth, 422, "/v1/classify"),
        ("POST", "/v1/classify", json.dumps({"model": "r-none", "image": _png(), "labels": ["a"]}).encode(),
         auth, 404, "/v1/classify"),
        ("GET", "/healthz", b"", {}, 503, "/healthz"),
        ("POST", "/v1/classify", json.dumps({"image": _png(), "labels": ["a"], "t": 0.5}).encode(),
         auth, 500, "/v1/classify"),
    ]
    for method, path, body, headers, status, route in cases:
        answer = asgi_call(app, method, path, body, headers)
        assert answer["status"] == status, (path, answer)
        [request_id] = ids(answer)
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        line = access_lines[-1]
        assert line["id"] == request_id and line["status"] == status and line["route"] == route
        assert line["ms"] >= 0
    assert len(access_lines) == len(cases)
    assert access_lines[-1]["release"] == "r-one" and access_lines[-1]["t"] == 0.5
    assert access_lines[-3]["release"] is None  # 404 of a release: the name asked is not a label


def test_a_given_id_is_echoed_and_an_unusable_one_replaced(published, access_lines):
    app = make_app(published)
    assert ids(asgi_call(app, "GET", "/v1/models", headers={"x-request-id": "trace-42.a_b"})) == ["trace-42.a_b"]
    for bad in ("x" * 129, "has space", "tab\there", "caf\u00e9"):
        [replaced] = ids(asgi_call(app, "GET", "/v1/models", headers={"x-request-id": bad}))
        assert replaced != bad and re.fullmatch(r"[0-9a-f]{32}", replaced)
        assert access_lines[-1]["id"] == replaced


def test_in_serve_the_app_leaves_the_header_to_serve(published, access_lines):
    """echo_request_id=False (app.py): Serve's middleware returns the id, once; the log still has it."""
    app = make_app(published, echo=False)
    answer = asgi_call(app, "GET", "/v1/models", headers={"x-request-id": "abc"})
    assert answer["status"] == 200 and ids(answer) == []
    assert access_lines[-1]["id"] == "abc"


def test_serve_callback_replaces_before_serve_reads():
    seen = []

    async def inner(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))

    [middleware] = observe.serve_middlewares()
    check = middleware.cls(inner)
    for given, kept in ((b"ok-1", True), (b"\x7fbad", False), (None, False)):
        headers = [(b"x-request-id", given)] if given is not None else []
        asyncio.run(check({"type": "http", "headers": headers}, None, None))
        assert (seen[-1] == given) is kept and observe.clean_request_id(seen[-1]) == seen[-1].decode()


def test_exported_names_follow_rays_prometheus_naming():
    names = observe.exported_names()
    assert "ray_po_serve_requests_total" in names and "ray_po_serve_request_latency_ms_bucket" in names
    assert "ray_po_serve_releases_loaded" in names and "ray_po_serve_batch_size_count" in names
    for name, (kind, tags, _) in observe.METRICS.items():
        assert not {"deployment", "replica", "application"} & set(tags), f"{name}: Serve's own tags"
        assert (kind == "histogram") == (name in observe.BOUNDARIES)
        assert all(b > 0 for b in observe.BOUNDARIES.get(name, [1])), f"{name}: Ray takes only boundaries > 0"


def test_t_buckets_are_bounded_and_cover_every_t():
    assert [observe.t_bucket(t) for t in (-9, -2, -1.5, 0, 0.1, 1, 1.0001, 4, 40)] == \
        ["le-2", "le-2", "-2..-1", "-0.25..0", "0..0.25", "0.75..1", "1..1.25", "3..4", "gt4"]


def test_under_a_route_prefix_keys_are_still_asked_and_routes_still_named(published, access_lines):
    """Serve passes the full path and the prefix as root_path: the guard and the labels use the app's path."""
    app = make_app(published, keys="k1")
    answer = asgi_call(app, "GET", "/po/v1/models", root_path="/po")
    assert answer["status"] == 401 and access_lines[-1]["route"] == "/v1/models"
    answer = asgi_call(app, "GET", "/po/v1/models", headers={"authorization": "Bearer k1"}, root_path="/po")
    assert answer["status"] == 200
    for root in ("", "/"):  # no prefix, however written
        answer = asgi_call(app, "GET", "/v1/models", root_path=root)
        assert answer["status"] == 401 and access_lines[-1]["route"] == "/v1/models"
