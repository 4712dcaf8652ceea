"""Changing the running app with `serve deploy` of an edited config, under load, as an operator does.

A config in Serve's terms (serve/config.yaml's shape: args = the store; each deployment's options and
user_config) is deployed with Serve's own CLI to the session's Ray (its dashboard, 127.0.0.1), with
2 gateways and 2 model replicas. While 16 clients send requests, three edits are deployed one after
another: a replica count (the model deployment 2 → 3), a rate limit (none → a bound a probe key
exceeds) and a default_release pin. Each must fail no request and replace no replica: every replica
that exists before and after keeps its id and its process. A change of the store (the app's args)
replaces them all, as docs/serving.md says.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from serving_helpers import request

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]
LOAD_KEY, PROBE_KEY = "load-key-8d1e", "probe-key-21fa"
CLIENTS = 16
CLIENT_PERIOD_S = 0.5  # each client's pace: the load stays below the rate limit deployed later
SETTLE_S = 4  # load kept going after an update is in place
DEPLOY_DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster(ray_cluster, tmp_path_factory):
    """(dashboard address, HTTP base URL, folder) of the session's Ray with Serve on 127.0.0.1, and two
    stores: each with releases r-old and r-new (r-new published last: latest)."""
    import ray
    from ray import serve

    from po_cluster.serving.local import _serve_client, free_port, publish_example_release

    root = tmp_path_factory.mktemp("live-update")
    for store in ("store-a", "store-b"):
        publish_example_release(str(root / store), "r-old", str(root / "checkpoints"), seed=1)
        publish_example_release(str(root / store), "r-new", str(root / "checkpoints"), seed=0)
    (root / "api-keys").write_text(f"{LOAD_KEY}\n{PROBE_KEY}\n")
    if _serve_client() is None:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    config = _serve_client().http_config
    dashboard = ray._private.worker._global_node.webui_url  # the session's Ray, 127.0.0.1
    return f"http://{dashboard}", f"http://127.0.0.1:{config.port}", root, config.port


def config_document(root: Path, port: int, name: str, store: str = "store-a") -> dict:
    """serve/config.yaml, made local: this Ray's proxy, a folder store, 2 + 2 replicas on a 2-CPU Ray."""
    document = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    document["http_options"] = {"host": "127.0.0.1", "port": port}
    [app] = document["applications"]
    app.update(name=name, route_prefix=f"/{name}")
    app["args"] = {"store": str(root / store), "store_settings": {"cache_dir": str(root / "cache")},
                   "model": app["args"]["model"]}
    entries = {d["name"]: d for d in app["deployments"]}
    gateway, model = entries["Gateway"], entries["AlignedModel"]
    gateway["ray_actor_options"] = {"num_cpus": 0}
    gateway["user_config"]["auth"] = {"api_keys_file": str(root / "api-keys")}
    gateway["user_config"]["rate_limit"] = {}  # none to start with
    model.pop("autoscaling_config")
    model.update(num_replicas=2, ray_actor_options={"num_cpus": 0, "num_gpus": 0})
    model.pop("max_replicas_per_node")  # one node here
    model["user_config"]["torch_threads"] = 1
    return document


def serve_deploy(dashboard: str, document: dict, folder: Path) -> None:
    """Serve's CLI, as an operator runs it on an edited config file."""
    path = folder / f"config-{secrets.token_hex(3)}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "ray.serve.scripts", "deploy", str(path), "--address", dashboard],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert run.returncode == 0, run.stdout + run.stderr


def replicas(app: str) -> dict[str, dict[str, int]]:
    """deployment → {replica id: pid} of the app's live replicas (Ray's state API: Serve's replica actors)."""
    from ray.util.state import list_actors

    out: dict[str, dict[str, int]] = {"Gateway": {}, "AlignedModel": {}}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        name = actor.name or ""
        if name.startswith("SERVE_REPLICA::"):  # SERVE_REPLICA::<app>#<deployment>#<replica id>
            owner, deployment, replica_id = name.removeprefix("SERVE_REPLICA::").split("#")
            if owner == app:
                out[deployment][replica_id] = actor.pid
    return out


def wait_until(what: str, check, deadline_s: float = DEPLOY_DEADLINE_S):
    deadline = time.monotonic() + deadline_s
    while True:  # bounded by the deadline
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"not within {deadline_s}s: {what}")
        time.sleep(1)


def running(app: str, gateways: int, models: int):
    from ray import serve

    def check():
        status = serve.status().applications.get(app)
        if status is None or status.status != "RUNNING":
            return None
        now = replicas(app)
        healthy = all(d.status == "HEALTHY" for d in status.deployments.values())
        return now if healthy and (len(now["Gateway"]), len(now["AlignedModel"])) == (gateways, models) else None
    return check


class Load:
    """CLIENTS threads, each sending /v1/embeddings (a text, no model named) at its pace; every answer kept."""

    def __init__(self, base: str, app: str) -> None:
        self.base, self.path, self.stop = base, f"/{app}/v1/embeddings", threading.Event()
        self.answers: list[tuple[float, int, str]] = []  # (time, status, release that answered or error code)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _client(self, i: int) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                status, body = request(self.base, "POST", self.path, {"input": f"a photo of a star {i}"},
                                       key=LOAD_KEY, timeout=60)
                what = body.get("model", "") if status == 200 else body.get("error", {}).get("code", "?")
            except OSError as error:  # a refused or dropped connection is a failed request too
                status, what = 0, type(error).__name__
            with self.lock:
                self.answers.append((time.monotonic(), status, what))
            self.stop.wait(max(0.0, CLIENT_PERIOD_S - (time.monotonic() - started)))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def since(self, moment: float) -> list[tuple[float, int, str]]:
        with self.lock:
            return [a for a in self.answers if a[0] >= moment]


def probe_burst(base: str, app: str, n: int = 100) -> Counter:
    """n requests at once with the probe key (a bucket of its own): the statuses they get."""
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status, _ = request(base, "POST", f"/{app}/v1/embeddings", {"input": "probe"}, key=PROBE_KEY, timeout=60)
        with lock:
            results.append(status)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return Counter(results)


def test_options_and_user_config_change_in_place_under_load_and_the_store_restarts(cluster):
    dashboard, base, root, port = cluster
    app = f"po-live-{secrets.token_hex(2)}"
    document = config_document(root, port, app)
    serve_deploy(dashboard, document, root)
    before = wait_until("2 + 2 replicas running", running(app, 2, 2))
    assert probe_burst(base, app)[429] == 0, "no rate limit yet"
    report: dict[str, dict] = {}
    entries = {d["name"]: d for d in document["applications"][0]["deployments"]}
    try:
        with Load(base, app) as load:
            time.sleep(SETTLE_S)
            assert {s for _, s, _ in load.since(0)} == {200}, "the load is answered before any change"

            # 1. a replica count: the model deployment 2 → 3
            start = time.monotonic()
            entries["AlignedModel"]["num_replicas"] = 3
            serve_deploy(dashboard, document, root)
            after = wait_until("3 model replicas", running(app, 2, 3))
            time.sleep(SETTLE_S)
            report["replicas 2 → 3"] = _kept(before, after, load.since(start))
            assert set(after["AlignedModel"]) > set(before["AlignedModel"])

            # 2. a rate limit: none → a bound per key and gateway replica that the load stays under
            start, before = time.monotonic(), after
            entries["Gateway"]["user_config"]["rate_limit"] = {"rate_per_s": 40, "burst": 20}
            serve_deploy(dashboard, document, root)
            wait_until("the rate limit in force", lambda: probe_burst(base, app)[429] > 0)
            after = wait_until("still 2 + 3", running(app, 2, 3))
            time.sleep(SETTLE_S)
            report["rate limit"] = _kept(before, after, load.since(start))

            # 3. a default_release pin: requests naming no release get r-old
            start, before = time.monotonic(), after
            entries["Gateway"]["user_config"]["default_release"] = "r-old"
            serve_deploy(dashboard, document, root)
            wait_until("the pin in force", lambda: [w for _, s, w in load.since(time.monotonic() - 1)
                                                     if s == 200][-1:] == ["r-old"])
            after = wait_until("still 2 + 3", running(app, 2, 3))
            pinned = time.monotonic()
            time.sleep(SETTLE_S)
            report["default_release pin"] = _kept(before, after, load.since(start))
            assert {w for _, s, w in load.since(pinned) if s == 200} == {"r-old"}

        for change, seen in report.items():
            print(f"{change}: {seen}")
            assert seen["failed"] == 0, (change, seen)
            assert seen["replaced"] == [] and seen["pids_changed"] == [], (change, seen)
            assert seen["answered"] > CLIENTS, (change, seen)

        # 4. the store (the app's args): every replica is replaced
        before = after
        document["applications"][0]["args"]["store"] = str(root / "store-b")
        serve_deploy(dashboard, document, root)

        def replaced():
            now = running(app, 2, 3)()
            gone = now and not (set(now["Gateway"]) | set(now["AlignedModel"])) & \
                (set(before["Gateway"]) | set(before["AlignedModel"]))
            return now if gone else None
        wait_until("every replica replaced after a store change", replaced)
    finally:
        from ray import serve

        serve.delete(app)


def _kept(before: dict, after: dict, answers: list) -> dict:
    """What a change did: requests answered and failed, replicas replaced, processes changed."""
    statuses = Counter(status for _, status, _ in answers)
    replaced, pids_changed = [], []
    for deployment, ids in before.items():
        for replica_id, pid in ids.items():
            if replica_id not in after[deployment]:
                replaced.append(f"{deployment}#{replica_id}")
            elif after[deployment][replica_id] != pid:
                pids_changed.append(f"{deployment}#{replica_id}")
    kept = sum(1 for d, ids in before.items() for r in ids if r in after[d] and after[d][r] == ids[r])
    return {"answered": statuses[200], "failed": sum(n for s, n in statuses.items() if s != 200),
            "statuses": dict(statuses), "kept": kept, "replaced": replaced, "pids_changed": pids_changed}
