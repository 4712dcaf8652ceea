"""The Ray Serve application: `build_app(args)` is the import_path of serve/config.yaml.

In Serve's terms (args.py): `args` is the store (a change replaces the replicas); each deployment's
options and `user_config` come from the config's `deployments:` entries, and `reconfigure` applies a
new user_config to the running replicas, which keep their ids, processes and loaded releases.

Two deployments:

    HTTP ─► Gateway (FastAPI ingress: keys, limits, decoding, release lookup;
              │      concurrent requests coalesced with @serve.batch, one call per release)
              │ handle.options(multiplexed_model_id=<release id>)
              ▼
            AlignedModel (releases multiplexed, LRU-bounded per replica; the chunks that queue
                          while a forward runs merged into the next one; autoscaled)

The release is chosen by the request's `model` field ("latest" by default); the
gateway resolves it to an id, so a replica only ever caches immutable ids, and
Serve routes each call to a replica that already holds its release. Coalescing at
the gateway is what makes batching pay on small models: a handle call costs a few
milliseconds of CPU on each side, as much as a whole forward of the shipped model.
"""
from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from fastapi import FastAPI
from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle

from po_cluster.model.release import ClassifyItem, EmbedRequest, EmbedResult, ReleaseModel, Scores
from po_cluster.serving.api import make_api
from po_cluster.serving.args import (
    GATEWAY,
    MODEL,
    AppConfig,
    GatewayUserConfig,
    ModelUserConfig,
    ServeConfig,
    validated,
)
from po_cluster.serving.client import HandleClient
from po_cluster.serving.gateway import GatewayService
from po_cluster.serving.limits import rss_bytes
from po_cluster.serving.observe import keep_reporting_releases, record_batch, record_releases_loaded
from po_cluster.store.artifacts import open_store


@serve.deployment(name=MODEL)
class AlignedModel:
    def __init__(self, args: dict[str, Any]) -> None:
        import ray
        import torch

        self.args = validated(AppConfig, args, "args")
        memory = self.args.model
        self.settings = ModelUserConfig()  # until reconfigure brings the deployment's user_config
        # A GPU only where Ray gave this replica one (ray_actor_options num_gpus).
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.store = open_store(self.args.store, self.args.store_settings)
        # One forward at a time, off the event loop: the loop keeps filling the next batch meanwhile,
        # and two concurrent forwards would only fight over the same cores.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="po-forward")
        self.loaded: weakref.WeakValueDictionary[str, ReleaseModel] = weakref.WeakValueDictionary()
        keep_reporting_releases(lambda: len(self.loaded))

        async def load(release_id: str) -> ReleaseModel:
            return await self._load(release_id)

        # Applied here rather than on the class so that the bound comes from the args.
        self.release = serve.multiplexed(max_num_models_per_replica=memory.max_releases_per_replica)(load)
        self.reconfigure(None)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """The deployment's user_config (ModelUserConfig), at the start and on every change, in place."""
        import torch

        self.settings = validated(ModelUserConfig, user_config, f"deployments[{MODEL}].user_config")
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        # Calls arrive as chunks already coalesced by the gateways; chunks that queue while a forward
        # runs are merged into the next one (no waiting: the gateways did that).
        # Serve's batch wrappers carry this setter; its type stubs do not declare it.
        wrappers: tuple[Any, ...] = (self._classify_chunks, self._embed_chunks)
        for batched in wrappers:
            batched.set_max_batch_size(self.settings.max_batch_size)
        for release in list(self.loaded.values()):  # the releases held keep serving, in the new chunk size
            release.max_forward = self.settings.max_batch_size

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def _load(self, release_id: str) -> ReleaseModel:
        folder = await asyncio.to_thread(self.store.pull_release, release_id)  # verified against its manifest
        release = await self._run(ReleaseModel.load, release_id, folder, self.args.model.text_cache_size,
                                  self.device, self.settings.max_batch_size, False,
                                  self.args.model.tower_cache_size)
        self.loaded[release_id] = release
        record_releases_loaded(len(self.loaded))
        return release

    async def _current(self) -> ReleaseModel:
        return await self.release(serve.get_multiplexed_model_id())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0)  # size reset from the args in __init__
    async def _classify_chunks(self, chunks: list[list[ClassifyItem]]) -> list[list[Scores]]:
        """Serve splits batches by release: every chunk here is for the current one."""
        release = await self._current()
        items = [item for chunk in chunks for item in chunk]
        self._handing("classify", len(items))
        scores = await self._run(release.classify_many, *map(list, zip(*items, strict=True)))
        return _split(scores, [len(chunk) for chunk in chunks])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0)
    async def _embed_chunks(self, chunks: list[list[EmbedRequest]]) -> list[list[EmbedResult]]:
        release = await self._current()
        requests = [request for chunk in chunks for request in chunk]
        self._handing("embed", len(requests))
        results = await self._run(release.embed_many, requests)
        return _split(results, [len(chunk) for chunk in chunks])

    def _handing(self, method: str, size: int) -> None:
        """What one forward gets: the batch size, and the releases this replica now holds (the
        multiplexer's evictions drop them from `loaded`, so the count is refreshed here too)."""
        record_batch(method, size)
        record_releases_loaded(len(self.loaded))

    async def classify(self, items: list[ClassifyItem]) -> list[Scores]:
        """(logits, probabilities) per (image, prompts, knob) item."""
        return await self._classify_chunks(items)

    async def embed(self, requests: list[EmbedRequest]) -> list[EmbedResult]:
        """(image rows, text rows, token count) per (images, texts, knob) request."""
        return await self._embed_chunks(requests)

    async def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "releases_loaded": sorted(self.loaded.keys())}


def _split(flat: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for size in sizes:
        out.append(flat[start:start + size])
        start += size
    return out


class LiveApp:
    """The gateway's ASGI app as Serve sees it: it hands each request to the FastAPI app of the current
    settings. Serve builds a replica's ASGI app once; reconfigure replaces the FastAPI app behind this
    (its limits, keys and statuses are baked into its routes and document), and a request already
    inside the old one finishes there."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


@serve.deployment(name=GATEWAY)
@serve.ingress()
class GatewayDeployment:
    def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        self.args = validated(AppConfig, args, "args")
        settings = self._settings(GatewayUserConfig())  # until reconfigure brings the user_config
        self.client = HandleClient(model, settings.batching)
        self.service = GatewayService(settings, self.client)
        self.live = LiveApp(make_api(self.service, echo_request_id=False))  # Serve returns the x-request-id

    def _settings(self, settings: GatewayUserConfig) -> ServeConfig:
        # GatewayService reads these fields of ServeConfig; each part is validated already, and the one rule
        # across them (model.max_ongoing_requests ≥ batch size) is the model deployment's, not this one's.
        return ServeConfig.model_construct(store=self.args.store, store_settings=self.args.store_settings,
                                         **dict(settings))

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """The deployment's user_config (GatewayUserConfig), at the start and on every change, in place."""
        settings = self._settings(validated(GatewayUserConfig, user_config, f"deployments[{GATEWAY}].user_config"))
        self.client.configure(settings.batching)
        self.service.configure(settings)
        self.live.app = make_api(self.service, echo_request_id=False)

    def __serve_build_asgi_app__(self) -> LiveApp:
        # Late-bound ingress: the app is built per replica, with this replica's limits and keys.
        return self.live


def _bind(args: dict[str, Any], options: dict[str, dict[str, Any]]) -> Application:
    parsed = validated(AppConfig, args, "args")
    plain = parsed.model_dump(mode="json")  # replicas re-validate the same dict
    # @serve.deployment turned both classes into Deployments; mypy does not apply class decorators.
    model_deployment, gateway_deployment = cast(Deployment, AlignedModel), cast(Deployment, GatewayDeployment)
    model_app = model_deployment.options(**options.get(MODEL, {})).bind(plain)
    return gateway_deployment.options(**options.get(GATEWAY, {})).bind(model_app, plain)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for the config's `args` (AppConfig: a ConfigError names the bad field). The
    deployments' options and user_configs are the config's `deployments:` entries, which Serve applies."""
    return _bind(args, {})


def local_app(args: dict[str, Any]) -> Application:
    """The same application from one ServeConfig document (`po-cluster serve`, start_local): its options and
    user_configs are those ServeConfig.deployments() writes, as a config file would state them."""
    parsed = ServeConfig.model_validate(args)
    # max_queued_requests: past that, Serve answers BackPressureError at once instead of queueing
    # without bound (the client maps it to a 503 with Retry-After; the proxy does the same for HTTP).
    options = {entry["name"]: {k: v for k, v in entry.items() if k != "name"} for entry in parsed.deployments()}
    return _bind(parsed.app_args(), options)
