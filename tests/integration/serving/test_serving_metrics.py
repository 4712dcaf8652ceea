"""The serving app's metrics on Ray's Prometheus endpoint, and its x-request-id, over real HTTP (127.0.0.1).

The app runs under a name of its own, so that its series (Serve tags them with the application)
hold only this module's requests, whatever else the session's Ray served before. Ray exports
metrics every few seconds: the endpoint is polled until the counts arrive, within a deadline.
"""
from __future__ import annotations

import http.client
import json
import secrets
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from po_cluster.data import world
from serving_helpers import b64, encode

pytestmark = pytest.mark.integration  # `served` starts (or joins) Ray itself
KEY = "metrics-key-4b1d"
EXPORT_DEADLINE_S = 120


@dataclass
class Answer:
    status: int
    request_ids: list[str]
    body: dict


@dataclass
class Served:
    url: str
    app: str

    def call(self, method: str, path: str, body: dict | bytes | None = None, key: str | None = KEY,
             request_id: str | None = None) -> Answer:
        parts = urlsplit(self.url)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"content-type": "application/json"} if data is not None else {}
        if key:
            headers["authorization"] = f"Bearer {key}"
        if request_id is not None:
            headers["x-request-id"] = request_id
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            ids = [v for k, v in response.getheaders() if k.lower() == "x-request-id"]
            return Answer(response.status, ids, json.loads(raw) if raw else {})
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    from po_cluster.serving.local import publish_example_release, start_local

    root = tmp_path_factory.mktemp("serving-metrics")
    store = root / "store"
    publish_example_release(str(store), "r-metrics", str(root / "checkpoints"), seed=0)
    (root / "api-keys").write_text(f"{KEY}\n")
    args = {"store": str(store), "store_settings": {"cache_dir": str(root / "cache")},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
            "model": {"num_cpus": 1, "max_ongoing_requests": 32},
            "gateway": {"num_cpus": 0}, "auth": {"api_keys_file": str(root / "api-keys")}}
    app = f"po-metrics-{secrets.token_hex(3)}"
    server = start_local(args, num_cpus=2, name=app, route_prefix=f"/{app}")
    yield Served(server.url, app)
    server.stop()


def metrics_url() -> str:
    """This node's Prometheus endpoint: Ray's metrics export port, as the node reports it."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"] and n["NodeID"] == ray.get_runtime_context().get_node_id())
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(app: str) -> dict[tuple[str, frozenset], float]:
    """(series name, its labels but Serve's replica/deployment) → value, summed, for the app's series."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url(), timeout=30) as response:
        text = response.read().decode()
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("application") != app:
                continue
            labels = frozenset((k, repr(float(v)) if k == "le" else v) for k, v in sample.labels.items()
                               if k not in ("replica", "deployment", "application", "Component", "SessionName",
                                            "Version", "NodeAddress", "WorkerId", "JobId"))
            out[(sample.name, labels)] = out.get((sample.name, labels), 0.0) + sample.value
    return out


def total(series: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and want <= set(ls))


def wait_for(app: str, expected: dict[tuple, float]) -> dict:
    """Scrape until every (name, labels) total equals what was sent, or fail at the deadline with what was seen."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:  # bounded by the deadline
        series = scrape(app)
        seen = {key: total(series, key[0], **dict(key[1])) for key in expected}
        if seen == expected:
            return series
        if time.monotonic() > deadline:
            pytest.fail(f"metrics did not reach the counts sent within {EXPORT_DEADLINE_S}s: "
                        f"{ {k: (seen[k], v) for k, v in expected.items() if seen[k] != v} }")
        time.sleep(2)


def _key(name: str, **labels: str) -> tuple:
    return name, tuple(sorted(labels.items()))


def test_requests_move_the_metrics_by_what_was_sent_and_every_answer_has_an_id(served):
    image = b64(encode(world.image_set("attacked", 1, seed=5).images[0]))
    labels = list(world.SHAPES)
    prefix = f"/{served.app}"
    answers = []
    for t in (0.0, 0.5, 1.0, 1.0, 2.0):  # 5 × 200 on /v1/classify, one item each
        answers.append(served.call("POST", f"{prefix}/v1/classify", {"image": image, "labels": labels, "t": t}))
    for _ in range(3):  # 3 × 200 on /v1/embeddings, one request (of two inputs) each
        answers.append(served.call("POST", f"{prefix}/v1/embeddings", {"input": ["a star", "a ring"]}))
    answers += [
        served.call("POST", f"{prefix}/v1/classify", {"image": image, "labels": []}),  # 422 before any t
        served.call("POST", f"{prefix}/v1/classify", {"image": "!!", "labels": labels}),  # 422 invalid_base64
        served.call("POST", f"{prefix}/v1/classify", {"image": image, "labels": labels, "model": "r-nope"}),  # 404
        served.call("GET", f"{prefix}/v1/models", key=None),  # 401
        served.call("GET", f"{prefix}/no/such/route"),  # 404, route "other"
    ]
    assert [a.status for a in answers] == [200] * 8 + [422, 422, 404, 401, 404], [a.body for a in answers]
    for answer in answers:  # one id each, errors included, and all different
        assert len(answer.request_ids) == 1, answer
    assert len({a.request_ids[0] for a in answers}) == len(answers)
    # A client's id is echoed; one that cannot be an id (too long) is replaced before Serve returns it.
    assert served.call("GET", f"{prefix}/v1/models", request_id="trace-abc.1").request_ids == ["trace-abc.1"]
    [replaced] = served.call("GET", f"{prefix}/v1/models", request_id="x" * 300).request_ids
    assert replaced != "x" * 300 and len(replaced) <= 128

    requests, latency = "ray_po_serve_requests_total", "ray_po_serve_request_latency_ms_count"
    expected = {
        _key(requests, route="/v1/classify", status_class="2xx", release="r-metrics"): 5,
        _key(requests, route="/v1/embeddings", status_class="2xx"): 3,
        _key(requests, route="/v1/classify", status_class="4xx"): 3,
        _key(requests, route="/v1/classify", status_class="4xx", release="none"): 2,  # 422 schema, 404 release
        _key(requests, route="/v1/models", status_class="4xx", key_id="rejected"): 1,
        _key(requests, route="/v1/models", status_class="2xx"): 2,
        _key(requests, route="other", status_class="4xx"): 1,
        _key(latency, route="/v1/classify"): 8,
        _key(latency, route="/v1/embeddings"): 3,
        # Sent one at a time, so each reaches the model alone: 5 and 3 forwards of size 1. (Ray's
        # histogram _sum is not the sum of the values: it read 2.5 for five 1s, so counts are checked.)
        _key("ray_po_serve_batch_size_count", method="classify"): 5,
        _key("ray_po_serve_batch_size_bucket", method="classify", le="1.0"): 5,
        _key("ray_po_serve_batch_size_count", method="embed"): 3,
        _key("ray_po_serve_batch_size_bucket", method="embed", le="1.0"): 3,
        _key("ray_po_serve_t_requests_total", route="/v1/classify"): 6,  # the 5 answered and the bad image's
        _key("ray_po_serve_t_requests_total", route="/v1/classify", t_bucket="0.75..1"): 3,  # t 1, 1 and 1
        _key("ray_po_serve_t_requests_total", route="/v1/classify", t_bucket="-0.25..0"): 1,
        _key("ray_po_serve_image_decode_failures_total", code="invalid_base64"): 1,
    }
    series = wait_for(served.app, {(n, frozenset(ls)): v for (n, ls), v in expected.items()})
    assert total(series, "ray_po_serve_releases_loaded") == 1  # one model replica, one release
    assert not any(n == requests and ("route", "/no/such/route") in ls for n, ls in series), "raw paths as labels"


def test_the_dashboard_names_are_the_exported_ones(served):
    """What observe.exported_names() says Ray writes is what this Ray writes (the k8s test relies on it)."""
    from po_cluster.serving.observe import exported_names

    served.call("POST", f"/{served.app}/v1/classify", {"image": "!!", "labels": ["a"]})
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:  # bounded by the deadline
        names = {name for name, _ in scrape(served.app)}
        missing = exported_names() - names
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, f"not on Ray's endpoint: {sorted(missing)}"
