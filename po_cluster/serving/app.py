"""The Ray Serve application: `build_app(args)` is the import_path of serve/config.yaml.

Two deployments:

    HTTP ─► Gateway (FastAPI ingress: keys, limits, decoding, release lookup)
              │ handle.options(multiplexed_model_id=<release id>)
              ▼
            AlignedModel (releases multiplexed, LRU-bounded per replica; towers batched
                          with @serve.batch across requests; autoscaled)

The release is chosen by the request's `model` field ("latest" by default); the
gateway resolves it to an id, so a replica only ever caches immutable ids, and
Serve routes each request to a replica that already holds its release.
"""
from __future__ import annotations

import asyncio
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from po_cluster.serving.api import make_api
from po_cluster.serving.args import ServeArgs
from po_cluster.serving.engine import Knob, ReleaseModel
from po_cluster.serving.gateway import GatewayService
from po_cluster.serving.limits import ApiError, rss_bytes
from po_cluster.storage import StoreError, open_store


@serve.deployment(name="AlignedModel")
class AlignedModel:
    def __init__(self, args: dict[str, Any]) -> None:
        import torch

        self.args = ServeArgs.model_validate(args)
        settings = self.args.model
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = "cuda" if settings.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.store = open_store(self.args.store, self.args.store_settings)
        # One forward at a time, off the event loop: the loop keeps filling the next batch meanwhile,
        # and two concurrent forwards would only fight over the same cores.
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="po-forward")
        self.loaded: weakref.WeakValueDictionary[str, ReleaseModel] = weakref.WeakValueDictionary()

        async def load(release_id: str) -> ReleaseModel:
            return await self._load(release_id)

        # Applied here rather than on the class so that the bound comes from the args.
        self.release = serve.multiplexed(max_num_models_per_replica=settings.max_releases_per_replica)(load)
        for batched in (self.classify_batch, self.image_batch, self.text_batch):
            batched.set_max_batch_size(self.args.batching.max_batch_size)
            batched.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)

    async def _run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def _load(self, release_id: str) -> ReleaseModel:
        folder = await asyncio.to_thread(self.store.pull_release, release_id)  # verified against its manifest
        release = await self._run(ReleaseModel.load, release_id, folder, self.args.model.text_cache_size,
                                  self.device)
        self.loaded[release_id] = release
        return release

    async def _current(self) -> ReleaseModel:
        return await self.release(serve.get_multiplexed_model_id())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # sizes reset from the args in __init__
    async def image_batch(self, images: list[np.ndarray], knobs: list[Knob]) -> list[np.ndarray]:
        """Projected f(x) of one image per request; Serve splits batches by release."""
        release = await self._current()
        rows = await self._run(lambda: release.project(release.image_features(images), knobs).numpy())
        return list(rows)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def text_batch(self, texts: list[list[str]], knobs: list[Knob]) -> list[tuple[np.ndarray, int]]:
        """Projected g(y) [L, d] and the token count, for one list of texts per request."""
        release = await self._current()

        def run() -> list[tuple[np.ndarray, int]]:
            flat = [text for group in texts for text in group]
            features, counts = release.text_features(flat)
            rows = release.project(features, [knob for group, knob in zip(texts, knobs) for _ in group]).numpy()
            out, start = [], 0
            for group in texts:
                out.append((rows[start:start + len(group)], sum(counts[start:start + len(group)])))
                start += len(group)
            return out

        return await self._run(run)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def classify_batch(self, images: list[np.ndarray], prompts: list[list[str]],
                             knobs: list[Knob]) -> list[tuple[list[float], list[float]]]:
        """(logits, probabilities) per request: images and prompts of the whole batch in one forward each."""
        release = await self._current()
        return await self._run(release.classify_many, images, prompts, knobs)

    async def classify(self, image: np.ndarray, prompts: list[str], knob: Knob) -> tuple[list[float], list[float]]:
        return await self.classify_batch(image, prompts, knob)

    async def embed(self, images: list[np.ndarray], texts: list[str],
                    knob: Knob) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        jobs = [self.image_batch(image, knob) for image in images]
        if texts:
            jobs.append(self.text_batch(texts, knob))
        results = await asyncio.gather(*jobs)
        text_rows, tokens = results[len(images)] if texts else ([], 0)
        return list(results[:len(images)]), list(text_rows), int(tokens)

    async def health(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "releases_loaded": sorted(self.loaded.keys())}


class HandleClient:
    """The gateway's ModelClient: the model deployment's handle, routed by release id."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def _call(self, release_id: str, method: str, *args: Any) -> Any:
        from po_cluster.checkpoint import CheckpointError
        from po_cluster.model.loading import ModelLoadError

        target = getattr(self.handle.options(multiplexed_model_id=release_id), method)
        try:
            return await target.remote(*args)
        except (StoreError, CheckpointError, ModelLoadError) as error:  # a broken release: ours, not the caller's
            raise ApiError(503, "model", f"release {release_id} cannot be served: {error}",
                           "release_unavailable") from None

    async def classify(self, release_id: str, image: np.ndarray, prompts: list[str],
                       knob: Knob) -> tuple[list[float], list[float]]:
        return await self._call(release_id, "classify", image, prompts, knob)

    async def embed(self, release_id: str, images: list[np.ndarray], texts: list[str],
                    knob: Knob) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        return await self._call(release_id, "embed", images, texts, knob)

    async def health(self) -> dict[str, Any]:
        return await self.handle.health.remote()


@serve.deployment(name="Gateway")
@serve.ingress()
class Gateway:
    def __init__(self, model: DeploymentHandle, args: dict[str, Any]) -> None:
        self.service = GatewayService(ServeArgs.model_validate(args), HandleClient(model))

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Late-bound ingress: the app is built per replica, with this replica's limits and keys.
        return make_api(self.service)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` (ServeArgs; a ValidationError names the bad field)."""
    parsed = ServeArgs.model_validate(args)
    plain = parsed.model_dump(mode="json")  # replicas re-validate the same dict
    model, gateway = parsed.model, parsed.gateway
    scaling: dict[str, Any] = ({"autoscaling_config": model.autoscaling.model_dump(exclude_none=True)}
                               if model.autoscaling else {"num_replicas": model.num_replicas})
    model_app = AlignedModel.options(
        ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": model.num_gpus},
        max_ongoing_requests=model.max_ongoing_requests, **scaling).bind(plain)
    return Gateway.options(ray_actor_options={"num_cpus": gateway.num_cpus}, num_replicas=gateway.num_replicas,
                           max_ongoing_requests=gateway.max_ongoing_requests).bind(model_app, plain)
