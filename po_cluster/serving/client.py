"""The gateway's ModelClient in Serve: concurrent requests coalesced into one handle call per release.

Each gateway replica batches its requests (@serve.batch, sizes from the args) and
sends each batch's requests for one release as a single call to the model
deployment, routed there by `multiplexed_model_id`. A call's cost (routing,
serialisation, the replica's request machinery) is then paid once per batch
instead of once per request. Several batches may be in flight at once, so the
gateway keeps decoding and validating while the model computes.

A call whose replica died or was draining is sent once more (classify and embed are
idempotent), and Serve's router picks a live replica for it; a call that still
cannot be placed, or that Serve's back-pressure refuses, is a 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from po_cluster.model.release import EmbedResult, Knob, Scores
from po_cluster.serving.args import BatchingConfig
from po_cluster.serving.limits import ApiError
from po_cluster.store.artifacts import StoreError

# A replica that died (ActorDiedError is a RayActorError) or is going away: another may answer.
_LOST_REPLICA = (RayActorError, ActorUnavailableError, ReplicaUnavailableError)
RETRY_AFTER_S = 1.0


class HandleClient:
    def __init__(self, handle: DeploymentHandle, batching: BatchingConfig) -> None:
        self.handle = handle
        self.configure(batching)

    def configure(self, batching: BatchingConfig) -> None:
        """New batch bounds, in place (Serve's batch wrappers take them for the next batch)."""
        # Serve's batch wrappers carry these setters; its type stubs do not declare them.
        wrappers: tuple[Any, ...] = (self._classify, self._embed)
        for batched in wrappers:
            batched.set_max_batch_size(batching.max_batch_size)
            batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    async def _call(self, release_id: str, method: str, items: list) -> list:
        from po_cluster.model.checkpoint import CheckpointError
        from po_cluster.model.loading import ModelLoadError

        target = getattr(self.handle.options(multiplexed_model_id=release_id), method)
        try:
            try:
                return await target.remote(items)
            except _LOST_REPLICA:
                return await target.remote(items)  # once more: the router has dropped the lost replica
        except (StoreError, CheckpointError, ModelLoadError) as error:  # a broken release: ours, not the caller's
            raise ApiError(503, "model", f"release {release_id} cannot be served: {error}",
                           "release_unavailable", retry_after_s=RETRY_AFTER_S) from None
        except BackPressureError:
            raise ApiError(503, None, "the model deployment is at capacity, retry shortly", "overloaded",
                           retry_after_s=RETRY_AFTER_S) from None
        except (*_LOST_REPLICA, DeploymentUnavailableError) as error:
            raise ApiError(503, None, f"no model replica could answer ({type(error).__name__}), retry shortly",
                           "replica_unavailable", retry_after_s=RETRY_AFTER_S) from None

    async def _per_release(self, method: str, batch: list[tuple[str, tuple]]) -> list:
        """One call per release in the batch; a release that cannot be served fails only its own requests."""
        groups: dict[str, list[int]] = {}
        for i, (release_id, _) in enumerate(batch):
            groups.setdefault(release_id, []).append(i)
        items = [item for _, item in batch]

        async def one(release_id: str, rows: list[int]) -> list:
            try:
                return await self._call(release_id, method, [items[i] for i in rows])
            except ApiError as error:
                return [error] * len(rows)

        answers = await asyncio.gather(*(one(release_id, rows) for release_id, rows in groups.items()))
        out: list[Any] = [None] * len(items)
        for rows, answer in zip(groups.values(), answers, strict=True):
            for i, value in zip(rows, answer, strict=True):
                out[i] = value
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _classify(self, batch: list[tuple[str, tuple]]) -> list[Scores | ApiError]:
        # One argument per request, (release id, item): the form Serve's batch types describe.
        return await self._per_release("classify", batch)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _embed(self, batch: list[tuple[str, tuple]]) -> list[EmbedResult | ApiError]:
        return await self._per_release("embed", batch)

    async def classify(self, release_id: str, image: np.ndarray, prompts: list[str], knob: Knob) -> Scores:
        return _answer(await self._classify((release_id, (image, prompts, knob))))

    async def embed(self, release_id: str, images: list[np.ndarray], texts: list[str],
                    knob: Knob) -> EmbedResult:
        return _answer(await self._embed((release_id, (images, texts, knob))))

    async def health(self) -> dict[str, Any]:
        return await self.handle.health.remote()


def _answer(value: Any) -> Any:
    if isinstance(value, ApiError):
        raise value
    return value
