"""Run the serving app locally (127.0.0.1) and talk to it over HTTP: for `po-cluster serve` and `make demo`.

`serve_and_ask` is the end of the demo: serve a release, ask it about an
(attacked) image at t = 0 and t = 1, return both answers.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np

from po_cluster.serving import ingress

APP_NAME = "po-cluster"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def png_base64(image: np.ndarray) -> str:
    """uint8 [H, W, 3] → base64 of a PNG file, as the API takes images."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def call(url: str, body: dict | None = None, key: str | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a POST; HTTP errors are answers, not exceptions."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    if key:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@dataclass
class LocalServer:
    url: str  # the app's base URL (proxy address + route prefix)
    name: str
    route_prefix: str
    started_ray: bool
    started_serve: bool

    def wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:  # bounded by the deadline
            try:
                if call(f"{self.url}/healthz", timeout=10)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the serving app did not become healthy on {self.url}")
            time.sleep(0.5)

    def redeploy(self, args: dict[str, Any]) -> None:
        """Replace the running app with one built from new args (same proxy, same URL)."""
        from ray import serve

        from po_cluster.serving.app import local_app

        serve.run(local_app(args), name=self.name, route_prefix=self.route_prefix)
        self.wait_healthy()

    def stop(self) -> None:
        """Remove what start_local started: the app, Serve, Ray — never more than that."""
        import ray
        from ray import serve

        if self.started_serve:
            serve.shutdown()
            _wait_controller_gone()
        else:
            serve.delete(self.name)
        if self.started_ray:
            node_id = ray.get_runtime_context().get_node_id()
            ray.shutdown()
            ingress.reap_haproxy(node_id)


def _wait_controller_gone(timeout_s: float = 120) -> None:
    """Serve's shutdown returns when its wait for the controller times out, while the controller may
    still be tearing down; a Serve started before it is gone would attach to it and die with it. So
    wait until the controller's named actor is gone."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # no such actor: it is gone
            return
        time.sleep(0.2)
    raise RuntimeError(f"Serve's controller is still alive {timeout_s:.0f} s after its shutdown")


def _serve_client() -> Any:
    """The running Serve instance's client, or None (a private API, used only to read what is running)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None


def _proxy_url(host: str, port: int) -> str:
    """Where the proxy listens: Serve keeps the options it was first started with in this Ray instance."""
    client = _serve_client()
    if client is not None:
        config = client.http_config
        host, port = ("127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host), config.port
    return f"http://{host}:{port}"


def start_local(args: dict[str, Any], host: str = "127.0.0.1", port: int | None = None,
                num_cpus: int | None = None, name: str = APP_NAME, route_prefix: str = "/",
                ready_timeout_s: float = 120) -> LocalServer:
    """Run the app under `name` with the proxy on host:port, starting Ray and Serve only where this
    process has none (then they are ours to stop); wait until it answers."""
    import ray
    from ray import serve

    from po_cluster.serving.app import local_app

    started_ray = not ray.is_initialized()
    if started_ray:  # "local": never attach to somebody else's cluster found on this machine
        ingress.enable()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    started_serve = _serve_client() is None
    port = port or free_port(host)
    server = LocalServer(f"http://{host}:{port}", name, route_prefix, started_ray, started_serve)
    try:
        serve.start(http_options={"host": host, "port": port})
        server.url = _proxy_url(host, port) + route_prefix.rstrip("/")
        serve.run(local_app(args), name=name, route_prefix=route_prefix)
        server.wait_healthy(ready_timeout_s)  # serve.run returns once replicas are up; the proxy may lag
    except BaseException:
        server.stop()
        raise
    return server


def serve_and_ask(store_uri: str, release_id: str, image_uint8: np.ndarray, labels: list[str],
                  keep_running: bool = False, args: dict[str, Any] | None = None,
                  **start_options: Any) -> dict[str, Any]:
    """Serve `release_id` from the store on 127.0.0.1, classify the image at t = 0 and t = 1 over HTTP.

    `args` adds to the app args, `start_options` go to start_local (port, name, route_prefix, …).
    Returns {"url", "release", "t0", "t1"} (t0/t1: the /v1/classify answers), plus "server" (a
    LocalServer: call .stop()) when keep_running; otherwise everything started here is stopped.
    """
    server = start_local({"store": store_uri, "default_release": release_id, **(args or {})}, **start_options)
    try:
        image = png_base64(image_uint8)
        answers = {}
        for name, t in (("t0", 0.0), ("t1", 1.0)):
            status, body = call(f"{server.url}/v1/classify", {"image": image, "labels": list(labels), "t": t})
            if status != 200:
                raise RuntimeError(f"/v1/classify at t={t} answered {status}: {body}")
            answers[name] = body
    except BaseException:
        server.stop()
        raise
    result: dict[str, Any] = {"url": server.url, "release": release_id, **answers}
    if keep_running:
        result["server"] = server
    else:
        server.stop()
    return result


def publish_example_release(store_uri: str, release_id: str, workdir: str, seed: int = 0,
                            architecture: str | None = None) -> str:
    """Publish the shipped base model (or an open_clip `architecture` with random weights, no download)
    with a random, non-trivial spectral layer: for tests and benchmarks.

    log σ ~ N(0, 0.5²) and the skew parameters ~ N(0, 0.3²), so that t visibly matters.
    """
    from pathlib import Path

    import torch

    from po_cluster.config import ModelConfig
    from po_cluster.data import world
    from po_cluster.model.aligned import AlignedCLIP
    from po_cluster.model.checkpoint import model_description, save_checkpoint
    from po_cluster.model.loading import load_clip
    from po_cluster.store.artifacts import open_store

    cfg = ModelConfig(image_tower="frozen") if architecture is None else \
        ModelConfig(name=architecture, pretrained=None, image_tower="frozen")
    model = AlignedCLIP(load_clip(cfg), "frozen")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dim = model.spectral.dim
        model.spectral.log_sigma.copy_(torch.randn(dim, generator=generator) * 0.5)
        model.spectral.skew.copy_(torch.randn(dim, dim, generator=generator) * 0.3)
    folder = save_checkpoint(Path(workdir) / release_id, model,
                             model_description(model, cfg, world.SHAPES, world.PROMPT_TEMPLATE),
                             {"example": True, "seed": seed}, {})
    return open_store(store_uri).publish_release(folder, release_id)


def format_answer(answer: dict, top: int = 3) -> str:
    """One line: 't=1: square 0.91, circle 0.05, …'."""
    scores = ", ".join(f"{s['label']} {s['probability']:.2f}" for s in answer["scores"][:top])
    return f"t={answer['t']:g}: {scores}"
