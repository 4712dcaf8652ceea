"""The gateway's view of the release store: which releases exist, and what each one is.

A release id names one content forever (po_cluster.store.artifacts), so what we learn about an
id is cached for good; only the `latest` pointer and the list of releases can
change, and they are re-read after `ttl_s`. Calls block (S3): run them off the
event loop.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard, TypeVar

from pydantic import TypeAdapter, ValidationError

from po_cluster.config import ImageTowerMode, image_tower_label
from po_cluster.serving.limits import ApiError
from po_cluster.store.artifacts import MANIFEST, RELEASES, ArtifactStore, ReleaseInfo, StoreError, check_release_id

T = TypeVar("T")


@dataclass(frozen=True)
class ReleaseMeta:
    release_id: str
    embed_dim: int
    prompt_template: str
    classnames: tuple[str, ...]
    image_tower: str = "frozen"  # what t moves besides W: "frozen" (W only), "full", "last_blocks:k"


def image_tower_name(mode: object) -> str:
    """model.json's image_tower as its label (frozen, full, last_blocks:k, lora:r8a16); "unknown" when
    it is none of them."""
    try:
        return image_tower_label(TypeAdapter(ImageTowerMode).validate_python(mode or "frozen"))
    except ValidationError:
        return "unknown"


class ReleaseCatalog:
    def __init__(self, store: ArtifactStore, ttl_s: float = 5.0, max_cached: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.ttl_s, self.max_cached, self.clock = store, ttl_s, max_cached, clock
        self._metas: OrderedDict[str, ReleaseMeta] = OrderedDict()
        self._latest: tuple[float, str] | None = None
        self._listing: tuple[float, list[ReleaseInfo]] | None = None
        self._lock = threading.Lock()  # called from worker threads

    def _unavailable(self, error: StoreError) -> ApiError:
        return ApiError(503, None, f"the release store is unavailable: {error}", "store_unavailable")

    def _fresh(self, entry: tuple[float, T] | None, now: float) -> TypeGuard[tuple[float, T]]:
        return entry is not None and now - entry[0] < self.ttl_s

    def _within_ttl(self, slot: str, read: Callable[[], T]) -> T:
        """The value kept in `slot` while younger than ttl_s, else read() again (a StoreError is a 503)."""
        now = self.clock()
        with self._lock:
            entry = getattr(self, slot)
            if self._fresh(entry, now):
                return entry[1]
        try:
            value = read()
        except StoreError as error:
            raise self._unavailable(error) from None
        with self._lock:
            setattr(self, slot, (now, value))
        return value

    def latest_id(self) -> str:
        return self._within_ttl("_latest", self._read_latest)

    def _read_latest(self) -> str:
        found = self.store.latest()
        if found is None:  # not kept: the first release is seen as soon as it is published
            raise ApiError(404, "model", f"no release has been published to {self.store.uri} yet",
                           "no_release")
        return found

    def cached(self, name: str) -> ReleaseMeta | None:
        """What resolve(name) would answer without asking the store, or None (then call resolve)."""
        with self._lock:
            if name == "latest":
                if not self._fresh(self._latest, self.clock()):
                    return None
                name = self._latest[1]
            meta = self._metas.get(name)
            if meta is not None:
                self._metas.move_to_end(name)
            return meta

    def resolve(self, name: str) -> ReleaseMeta:
        """The release a request names ("latest" or an id); 404 ApiError when there is none."""
        release_id = self.latest_id() if name == "latest" else name
        with self._lock:
            if release_id in self._metas:
                self._metas.move_to_end(release_id)
                return self._metas[release_id]
        meta = self._fetch(release_id)
        with self._lock:
            self._metas[release_id] = meta
            while len(self._metas) > self.max_cached:
                self._metas.popitem(last=False)
        return meta

    def _fetch(self, release_id: str) -> ReleaseMeta:
        try:
            check_release_id(release_id)
        except StoreError:
            raise ApiError(404, "model", f"no release {release_id!r}: not a valid release id", "unknown_release") \
                from None
        try:
            shown = self.store.show_release(release_id)
        except StoreError as error:
            try:  # absent (404) or an outage (503)? Ask the one question that tells them apart.
                present = self.store.exists(f"{RELEASES}/{release_id}/{MANIFEST}")
            except StoreError:
                raise self._unavailable(error) from None
            if not present:
                raise ApiError(404, "model", f"no release {release_id!r} in the store", "unknown_release") \
                    from None
            raise self._unavailable(error) from None
        model = shown.get("model") or {}
        return ReleaseMeta(release_id, int(model.get("embed_dim", 0)), str(model.get("prompt_template") or "{}"),
                           tuple(model.get("classnames") or ()), image_tower_name(model.get("image_tower")))

    def releases(self) -> list[ReleaseInfo]:
        return self._within_ttl("_listing", self.store.list_releases)
