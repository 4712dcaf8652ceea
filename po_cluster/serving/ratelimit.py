"""A token bucket per API key: `rate_per_s` requests a second on average, bursts of up to `burst`.

Keyed by the key's id (a digest prefix, never the key itself), or one shared anonymous
bucket when no keys are configured. Over the rate, a request is refused at once with a
429 naming the seconds until its next token, instead of queueing. Each gateway replica
holds its own buckets, so the cluster-wide rate is up to rate × gateway replicas.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from pydantic import Field

from po_cluster.config import Strict
from po_cluster.serving.limits import ApiError


class RateLimitConfig(Strict):
    rate_per_s: float | None = Field(None, gt=0, description="requests a second per key and gateway replica; "
                                                             "unset: no rate limit")
    burst: int = Field(32, ge=1, description="requests a key may send at once after being idle")
    max_keys: int = Field(10000, ge=1, description="buckets kept (least recently used dropped)")


class TokenBuckets:
    def __init__(self, limit: RateLimitConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.clock = limit, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key id → (tokens, when)

    def take(self, key_id: str) -> None:
        """One token of `key_id`'s bucket, or ApiError 429 with the wait until the next one."""
        rate = self.limit.rate_per_s
        if rate is None:
            return
        now = self.clock()
        tokens, when = self._buckets.pop(key_id, (float(self.limit.burst), now))
        tokens = min(float(self.limit.burst), tokens + (now - when) * rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            raise ApiError(429, "authorization", f"over the rate limit of {rate:g} requests/s "
                           f"(burst {self.limit.burst})", "rate_limited", retry_after_s=(1 - tokens) / rate)
        self._buckets[key_id] = (tokens - 1, now)
        while len(self._buckets) > self.limit.max_keys:
            self._buckets.popitem(last=False)
