"""What every storage module shares: how to reach S3, and the errors storage raises."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from po_cluster.config import Strict

MiB = 1 << 20


class StoreError(RuntimeError):
    """A storage operation failed; the message says what and why, on one line."""


class ObjectMissing(StoreError):
    """Nothing exists at the location (callers may turn it into a message of their own)."""


class StoreConfig(Strict):
    """How to reach S3 (a config's `store_settings:`). Credentials are never here: they come from the
    standard AWS chain."""

    endpoint_url: str | None = None  # None: boto3's own resolution (AWS_ENDPOINT_URL[_S3], config, AWS)
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / profile config
    profile: str | None = None  # None: AWS_PROFILE or the default profile
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1)  # retries in botocore's "standard" mode, first try included
    multipart_threshold: int = Field(64 * MiB, ge=1)
    multipart_chunksize: int = Field(16 * MiB, ge=5 * MiB)  # S3's minimum part size is 5 MiB
    max_concurrency: int = Field(8, ge=1)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    cache_dir: Path | None = None  # None: ~/.cache/po-cluster

    def cache_root(self, override: str | Path | None = None) -> Path:
        """Where pulled releases and fetched objects are cached: override, else cache_dir, else ~/.cache."""
        return Path(override or self.cache_dir or Path.home() / ".cache" / "po-cluster").expanduser()
