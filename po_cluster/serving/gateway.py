"""What the HTTP ingress does with a request, without Ray: check it, resolve the release, ask the model.

`ModelClient` is how the gateway reaches the model: in Serve, a deployment handle
with `multiplexed_model_id=<release id>` (app.py); anything with the same three
coroutines works (a test double, an in-process engine).
"""
from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from po_cluster.model.release import Knob
from po_cluster.serving.args import ServeConfig
from po_cluster.serving.auth import ApiKeys
from po_cluster.serving.catalog import ReleaseCatalog, ReleaseMeta
from po_cluster.serving.limits import (
    ApiError,
    check_overrides,
    decode_image,
    fill_template,
    rss_bytes,
)
from po_cluster.serving.observe import current, record_decode_failure, record_t
from po_cluster.serving.ratelimit import TokenBuckets
from po_cluster.serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Health,
    ImageInput,
    ImageUrlInput,
    Knobs,
    ModelCard,
    ModelList,
    ProcessInfo,
    Score,
    Usage,
)
from po_cluster.store.artifacts import open_store

INLINE_DECODE_CHARS = 64 << 10  # base64 characters of an image decoded on the event loop itself


class ModelClient(Protocol):
    async def classify(self, release_id: str, image: np.ndarray, prompts: list[str],
                       knob: Knob) -> tuple[list[float], list[float]]: ...

    async def embed(self, release_id: str, images: list[np.ndarray], texts: list[str],
                    knob: Knob) -> tuple[list[np.ndarray], list[np.ndarray], int]: ...

    async def health(self) -> dict: ...


def _vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what OpenAI clients ask by default: little-endian float32
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return [float(x) for x in vector]


class GatewayService:
    def __init__(self, args: ServeConfig, model: ModelClient, environ: Mapping[str, str] | None = None) -> None:
        self.model, self.environ = model, environ
        self.catalog = ReleaseCatalog(open_store(args.store, args.store_settings), args.latest_ttl_s)
        self.configure(args)

    def configure(self, args: ServeConfig) -> None:
        """Take new settings in place (Serve's reconfigure): limits, keys, rate, default release, the latest
        pointer's TTL. The store stays the one opened at the start: a new store is a new replica. A new
        rate limit starts with full buckets; requests already in flight finish under the old settings."""
        from PIL import Image

        before = getattr(self, "args", args)
        if (args.store, args.store_settings) != (before.store, before.store_settings):
            raise ValueError("the store cannot change in place: it is an app arg (new replicas)")
        # Pillow's own bomb guard at our limit too (it raises above twice this), should a path skip ours.
        Image.MAX_IMAGE_PIXELS = args.limits.max_image_pixels
        keys, buckets = ApiKeys(args.auth, self.environ), TokenBuckets(args.rate_limit)
        self.args, self.limits, self.keys, self.buckets = args, args.limits, keys, buckets
        self.catalog.ttl_s = args.latest_ttl_s

    def check_key(self, authorization: str | None) -> None:
        """The key (401), then its rate (429): both before anything of the request is read."""
        record = current()
        try:
            key_id = self.keys.check(authorization)
        except ApiError:
            if record is not None:
                record.key_id = "rejected"
            raise
        if record is not None:
            record.key_id = key_id
        self.buckets.take(key_id)

    async def _knob(self, request: Knobs) -> tuple[ReleaseMeta, Knob]:
        name = self.args.default_release if request.model == "latest" else request.model
        record = current()
        if record is not None:
            record.t = float(request.t)
        # The store is asked (off the event loop) only when the cache cannot answer.
        meta = self.catalog.cached(name)
        if meta is None:
            meta = await asyncio.to_thread(self.catalog.resolve, name)
        if record is not None:  # only an id that resolved: a label never holds what a client made up
            record.release = meta.release_id
            record_t(record.route, float(request.t))
        return meta, Knob(float(request.t), check_overrides(request.sigma_overrides, meta.embed_dim))

    async def _image(self, value: str, param: str) -> np.ndarray:
        try:
            if len(value) <= INLINE_DECODE_CHARS:  # small: a thread hop would cost more than the decode
                return decode_image(value, param, self.limits)
            return await asyncio.to_thread(decode_image, value, param, self.limits)
        except ApiError as error:
            record_decode_failure(error.code)
            raise

    async def classify(self, request: ClassifyRequest) -> ClassifyResponse:
        labels = request.labels
        meta, knob = await self._knob(request)
        template = request.prompt_template or meta.prompt_template
        image = await self._image(request.image, "image")
        logits, probabilities = await self.model.classify(
            meta.release_id, image, [fill_template(template, label) for label in labels], knob)
        order = sorted(range(len(labels)), key=lambda i: -logits[i])
        return ClassifyResponse(model=meta.release_id, t=knob.t, prompt_template=template, scores=[
            Score(label=labels[i], index=i, probability=probabilities[i], logit=logits[i]) for i in order])

    @staticmethod
    def _split_inputs(request: EmbeddingsRequest) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
        """(index, text) pairs and (index, base64 or data URL, its field) triples (the texts were checked
        with the request); images are decoded later."""
        items = [request.input] if isinstance(request.input, str) else request.input
        texts, images = [], []
        for i, item in enumerate(items):
            if isinstance(item, ImageInput):
                images.append((i, item.image, f"input.{i}.image"))
            elif isinstance(item, ImageUrlInput):  # its url is a data URL: the request model checked it
                images.append((i, item.image_url.url, f"input.{i}.image_url.url"))
            else:
                texts.append((i, item if isinstance(item, str) else item.text))
        return texts, images

    async def embeddings(self, request: EmbeddingsRequest) -> EmbeddingsResponse:
        texts, encoded = self._split_inputs(request)
        meta, knob = await self._knob(request)
        if request.dimensions is not None and request.dimensions != meta.embed_dim:
            raise ApiError(422, "dimensions", f"dimensions {request.dimensions} is not offered: release "
                           f"{meta.release_id} gives {meta.embed_dim}-dimensional embeddings, and CLIP embeddings "
                           f"are not trained to be shortened; leave dimensions out or ask {meta.embed_dim}",
                           "unsupported_dimensions")
        images = [await self._image(data, param) for _, data, param in encoded]
        image_vectors, text_vectors, tokens = await self.model.embed(
            meta.release_id, images, [text for _, text in texts], knob)
        vectors = (dict(zip([i for i, _, _ in encoded], image_vectors, strict=True))
                   | dict(zip([i for i, _ in texts], text_vectors, strict=True)))
        data = [Embedding(index=i, embedding=_vector(vectors[i], request.encoding_format)) for i in sorted(vectors)]
        return EmbeddingsResponse(data=data, model=meta.release_id,
                                  usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    async def models(self) -> ModelList:
        releases = await asyncio.to_thread(self.catalog.releases)
        modes = [await asyncio.to_thread(self._image_tower, r.release_id) for r in releases]
        return ModelList(data=[ModelCard(id=r.release_id, created=int(r.created.timestamp()) if r.created else 0,
                                         latest=r.latest, image_tower=mode, size_bytes=r.size)
                               for r, mode in zip(releases, modes, strict=True)])

    def _image_tower(self, release_id: str) -> str:
        # Each id's model.json is read once and cached for good (an id names one content). A release
        # removed since the listing, or with an unreadable model.json, is still listed, as "unknown".
        try:
            return self.catalog.resolve(release_id).image_tower
        except ApiError:
            return "unknown"

    async def health(self) -> Health:
        try:
            model: dict[str, Any] = await asyncio.wait_for(self.model.health(), timeout=10)
        except Exception as error:  # any failure of the model side is "not ready", never a crash
            raise ApiError(503, None, f"the model deployment is not answering: {type(error).__name__}",
                           "model_unavailable") from None
        return Health(default_release=self.args.default_release,
                      gateway=ProcessInfo(pid=os.getpid(), rss_bytes=rss_bytes()), model=ProcessInfo(**model))
