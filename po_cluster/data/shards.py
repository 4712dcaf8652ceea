"""Parquet shards: how a built dataset stores its records and their encoded images.

A dataset of a hundred thousand images kept as one file per image costs one GET per image
per reader on S3; kept as shards of a few hundred megabytes it costs a handful. Each shard
is one Parquet file of RECORD_SCHEMA rows: a preference pair or a regularisation image,
its split, provenance, and the image's encoded bytes (PNG, JPEG: as built or ingested,
decoded only when read for training). `dataset.json`, written after every shard, lists
them with their row counts and sha256, so a reader refuses a shard that changed or is
missing rather than train on part of a dataset.

Reads and writes go through po_cluster.store.location (local or s3://, atomic puts).
"""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from po_cluster.store.location import join, read_bytes, write_bytes

FORMAT = "po-cluster.preference-dataset"  # dataset.json's "format"
FORMAT_VERSION = 3  # 2: records carry their split; 3: records and images in Parquet shards
SHARDS_DIR = "shards"
LIGHT_KEYS = ("kind", "split", "source", "image_name", "id")  # what split_counts reads of a row
RECORD_SCHEMA = pa.schema([
    ("id", pa.string()), ("kind", pa.string()), ("split", pa.string()), ("source", pa.string()),
    ("label", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()), ("text", pa.string()),
    ("written", pa.string()), ("image_name", pa.string()), ("image", pa.binary()),
    ("font", pa.string()), ("font_px", pa.int32()), ("fill", pa.string()), ("outline", pa.string()),
])


class ShardError(ValueError):
    """A shard that is missing, changed since its build, or not of the record schema."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset's root
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


def shard_name(number: int) -> str:
    return f"{SHARDS_DIR}/part-{number:05d}.parquet"


def write_shard(root: str, number: int, rows: list[dict]) -> ShardInfo:
    """Rows (dicts of RECORD_SCHEMA's columns; absent ones null) as one Parquet shard under `root`."""
    table = pa.Table.from_pylist([{name: row.get(name) for name in RECORD_SCHEMA.names} for row in rows],
                                 schema=RECORD_SCHEMA)
    buffer = io.BytesIO()
    # Images are already compressed: Parquet's own compression would only cost time on them.
    pq.write_table(table, buffer, compression={name: "NONE" if name == "image" else "zstd"
                                               for name in RECORD_SCHEMA.names})
    data = buffer.getvalue()
    path = shard_name(number)
    write_bytes(join(root, path), data)
    return ShardInfo(path, len(rows), len(data), hashlib.sha256(data).hexdigest())


def read_shard(root: str, info: dict) -> list[dict]:
    """One shard's rows, checked against what dataset.json says of it."""
    try:
        path, rows, digest = str(info["path"]), int(info["rows"]), str(info["sha256"])
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{root}: a shard entry of dataset.json lacks path, rows or sha256: {info!r}") from None
    location = join(root, path)
    data = read_bytes(location)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ShardError(f"{location}: sha256 differs from dataset.json's (changed or rewritten after the build)")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as error:
        raise ShardError(f"{location}: not a readable Parquet file ({error})") from None
    missing = set(RECORD_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ShardError(f"{location}: missing columns {sorted(missing)}")
    if table.num_rows != rows:
        raise ShardError(f"{location}: {table.num_rows} rows, dataset.json says {rows}")
    return table.select(RECORD_SCHEMA.names).to_pylist()


def read_shards(root: str, shards: Iterable[dict]) -> list[dict]:
    return [row for info in shards for row in read_shard(root, info)]


def split_counts(rows: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per split, the source images and the pairs among `rows`: what dataset.json states."""
    counts: dict[str, dict[str, int]] = {name: {"images": 0, "pairs": 0} for name in ("train", "val", "test")}
    sources: dict[str, set[str]] = {name: set() for name in counts}
    for row in rows:
        split = row.get("split") or "train"
        sources[split].add(str(row.get("source") or row.get("image_name") or row.get("id")))
        counts[split]["pairs"] += row.get("kind") != "regularization"
    for name, seen in sources.items():
        counts[name]["images"] = len(seen)
    return counts


class ShardWriter:
    """Rows in, shards of at most `rows_per_shard` out, numbered in order; `infos` lists them.
    Only one shard's rows are held at a time, so a build's memory does not grow with the dataset."""

    def __init__(self, root: str, rows_per_shard: int) -> None:
        self.root, self.rows_per_shard = root, rows_per_shard
        self.infos: list[ShardInfo] = []
        self._pending: list[dict] = []

    def add(self, rows: Iterable[dict]) -> None:
        self._pending.extend(rows)
        while len(self._pending) >= self.rows_per_shard:
            self._flush(self._pending[:self.rows_per_shard])
            self._pending = self._pending[self.rows_per_shard:]

    def close(self) -> list[ShardInfo]:
        if self._pending:
            self._flush(self._pending)
            self._pending = []
        return self.infos

    def _flush(self, rows: list[dict]) -> None:
        self.infos.append(write_shard(self.root, len(self.infos), rows))
