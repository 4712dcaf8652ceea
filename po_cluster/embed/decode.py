"""The embed job's decoding (CPU tasks): read each input (a file, or a tar shard's member at its
place), decode it by the image path's limits (data.images, the serving endpoint's too), convert it
to the release's model input. A bad input is a row with a code and a reason, never an exception
that stops the job."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from po_cluster.data import images
from po_cluster.data.images import (  # Preprocess: the release's (AlignedCLIP.preprocess), for CPU tasks
    ImageLimitsConfig,
    Preprocess,
)
from po_cluster.data.tar_shards import Member, ShardError, read_member
from po_cluster.store import location
from po_cluster.store.location import StoreConfig, StoreError

_READ_THREADS = 8  # reads are I/O (S3 GETs); threads overlap them inside one decode task


class BadInput(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def decode_file(raw: bytes, limits: ImageLimitsConfig) -> np.ndarray:
    """uint8 [H, W, 3] by the image path's limits (data.images.decode_limited), or BadInput with its code."""
    try:
        return images.decode_limited(raw, limits)
    except images.ImageRefused as refused:
        raise BadInput(refused.code, refused.message) from None


def _read(source: str, settings: StoreConfig, max_bytes: int) -> bytes | BadInput:
    try:
        # Local files are measured before they are read: an oversized one costs no memory.
        if not location.is_s3(source) and Path(source).stat().st_size > max_bytes:
            return BadInput("image_too_large", f"the file is over the limit of {max_bytes} bytes")
        return location.read_bytes(source, settings)
    except (OSError, StoreError) as error:
        return BadInput("unreadable", f"cannot read {source}: {getattr(error, 'strerror', None) or error}")


def _read_member(tar: str, member: Member, settings: StoreConfig, max_bytes: int) -> bytes | BadInput:
    if member.size > max_bytes:  # its size is in the listing: an oversized one is never read
        return BadInput("image_too_large", f"the member is over the limit of {max_bytes} bytes")
    try:
        return read_member(tar, member, settings)
    except ShardError as error:
        return BadInput("unreadable", str(error))


def _reader(batch: dict[str, np.ndarray], settings: StoreConfig, max_bytes: int) -> Callable[[int], bytes | BadInput]:
    """Row i's bytes: its file, or its member's place in a tar shard; a shard's row the listing already
    refused (no image, a damaged shard) keeps that error."""
    if "tar" not in batch:
        return lambda i: _read(str(batch["source_uri"][i]), settings, max_bytes)

    def read(i: int) -> bytes | BadInput:
        if batch["code"][i]:
            return BadInput(str(batch["code"][i]), str(batch["reason"][i]))
        tar = str(batch["tar"][i])
        name = str(batch["source_uri"][i])[len(tar) + 1:]  # source_uri is <tar>/<member>
        return _read_member(tar, Member(name, int(batch["offset"][i]), int(batch["size"][i])), settings, max_bytes)

    return read


def decode_batch(batch: dict[str, np.ndarray], preprocess: Preprocess, limits: ImageLimitsConfig,
                 settings: StoreConfig) -> dict[str, np.ndarray]:
    """Inputs → model input [N, 3, S, S] float32; a bad row gets zeros, a code and a reason."""
    from po_cluster.model.loading import to_model_input

    size = preprocess.size
    uris = [str(u) for u in batch["source_uri"]]
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(uris)))) as pool:
        raws = list(pool.map(_reader(batch, settings, limits.max_image_bytes), range(len(uris))))
    codes, reasons = [""] * len(uris), [""] * len(uris)
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, raw in enumerate(raws):
        try:
            if isinstance(raw, BadInput):
                raise raw
            image = decode_file(raw, limits)
            by_shape.setdefault(image.shape, []).append((i, image))
        except BadInput as bad:
            codes[i], reasons[i] = bad.code, bad.reason
    pixels = np.zeros((len(uris), 3, size, size), dtype=np.float32)
    for group in by_shape.values():  # one conversion per shape, as ReleaseModel.image_features
        rows = [i for i, _ in group]
        pixels[rows] = to_model_input(np.stack([image for _, image in group]), preprocess).numpy()
    return {"id": batch["id"], "source_uri": batch["source_uri"], "shard": batch["shard"], "pixels": pixels,
            "code": np.array(codes, dtype=object), "reason": np.array(reasons, dtype=object)}
