"""The embed job's output: shards (the unit of writing and resuming), their names and tables,
and the output folder or S3 prefix they are written to.

A shard's name is derived from (release id, t, shard index, digest of its ids and
sources); each of its files is written whole or not at all (po_cluster.store.location:
a temporary file renamed on a local disk, one PUT on S3), so a re-run can trust
what it finds and skip it.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from po_cluster.store import location
from po_cluster.store.location import ObjectMissing, StoreConfig

EMBEDDINGS, ERRORS = "embeddings", "errors"
_NAME = re.compile(r"^(?P<release>[A-Za-z0-9][A-Za-z0-9._-]*)_t(?P<t>[^_]+)_(?P<index>\d{6})-(?P<digest>[0-9a-f]{12})"
                   r"\.parquet$")


@dataclass(frozen=True)
class Shard:
    index: int
    name: str  # the file name of both its embeddings and errors
    items: pa.Table  # id, source_uri: its inputs, sorted by id


def t_tag(t: float) -> str:
    """repr of the float: exact (0.1234567 and 0.123457 do not collide) and file-name safe."""
    return repr(float(t))


def shard_name(release_id: str, t: float, index: int, items: pa.Table) -> str:
    # The digest ties the name to the shard's content: a changed input cannot pass for a finished shard.
    digest = hashlib.sha256()
    for item_id, uri in zip(items.column("id").to_pylist(), items.column("source_uri").to_pylist(), strict=True):
        digest.update(f"{item_id}\0{uri}\n".encode())
    return f"{release_id}_t{t_tag(t)}_{index:06d}-{digest.hexdigest()[:12]}.parquet"


def plan_shards(items: pa.Table, shard_size: int, release_id: str, t: float) -> list[Shard]:
    """Consecutive runs of `shard_size` sorted inputs: the same input always gives the same shards."""
    shards = []
    for index, start in enumerate(range(0, items.num_rows, shard_size)):
        part = items.slice(start, shard_size)
        shards.append(Shard(index, shard_name(release_id, t, index, part), part))
    return shards


def foreign_shards(existing: set[str], shards: list[Shard], release_id: str, t: float) -> list[str]:
    """Files of this (release, t) in the output that this plan does not name: another input or shard size."""
    planned = {s.name for s in shards}
    found = (_NAME.match(name) for name in existing)
    return sorted(m.group(0) for m in found if m and m.group("release") == release_id
                  and m.group("t") == t_tag(t) and m.group(0) not in planned)


# ---------------------------------------------------------------- output: a folder or an S3 prefix


class OutputDir:
    """embeddings/ and errors/ under a folder or S3 prefix."""

    def __init__(self, uri: str, settings: StoreConfig | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.local = not location.is_s3(uri)
        self.root = str(Path(uri).expanduser().absolute()) if self.local else self.uri
        self.settings = settings or StoreConfig()
        self._arrow: tuple[Any, str] | None = None  # (pyarrow filesystem, root on it), made when first needed

    def names(self, sub: str) -> set[str]:
        """The finished files of embeddings/ or errors/."""
        try:
            names = location.list_files(location.join(self.root, sub), self.settings)
        except ObjectMissing:
            return set()
        # Hidden names are writes in progress (or left by a killed run), never finished shards.
        return {name for name in names if "/" not in name and not name.startswith(".")}

    def write(self, sub: str, name: str, table: pa.Table) -> str:
        """Write a table so that the file appears whole or not at all; returns its URI."""
        import pyarrow.parquet as pq

        buffer = pa.BufferOutputStream()  # serialised first: a failed write never reaches the target
        pq.write_table(table, buffer)
        location.write_bytes(location.join(self.root, sub, name), buffer.getvalue().to_pybytes(), self.settings)
        return f"{self.uri}/{sub}/{name}"

    def rows(self, sub: str, name: str) -> int:
        import pyarrow.parquet as pq

        if self._arrow is None:  # pyarrow seeks to the footer: a skipped shard costs two small reads
            self._arrow = location.pyarrow_fs(self.root, self.settings)
        filesystem, root = self._arrow
        with filesystem.open_input_file(f"{root}/{sub}/{name}") as f:
            return pq.ParquetFile(f).metadata.num_rows  # the footer only

    def remove_temporaries(self, names: set[str]) -> None:
        """Left over by a killed run (local disk only: S3 keeps no partial objects)."""
        if not self.local:
            return
        for sub in (EMBEDDINGS, ERRORS):
            folder = Path(self.root) / sub
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                if path.name[1:].rsplit(".", 2)[0] in names:
                    path.unlink(missing_ok=True)


EMBEDDING_SCHEMA = pa.schema([("id", pa.string()), ("source_uri", pa.string()), ("embedding", pa.list_(pa.float32())),
                              ("release_id", pa.string()), ("t", pa.float64()), ("embed_dim", pa.int32())])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source_uri", pa.string()), ("code", pa.string()),
                          ("reason", pa.string())])


def shard_tables(rows: dict[str, np.ndarray], release_id: str, t: float) -> tuple[pa.Table, pa.Table]:
    """(embeddings, errors) of one shard's rows, each sorted by id."""
    order = np.argsort(rows["id"].astype(str), kind="stable")
    ids, uris = rows["id"][order].astype(str), rows["source_uri"][order].astype(str)
    bad = rows["code"][order] != ""
    good = ~bad
    vectors = np.ascontiguousarray(rows["embedding"][order][good], dtype=np.float32)
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    embeddings = pa.table({"id": ids[good].tolist(), "source_uri": uris[good].tolist(),
                           "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
                           "release_id": [release_id] * n, "t": [float(t)] * n, "embed_dim": [dim] * n},
                          schema=EMBEDDING_SCHEMA)
    errors = pa.table({"id": ids[bad].tolist(), "source_uri": uris[bad].tolist(),
                       "code": rows["code"][order][bad].astype(str).tolist(),
                       "reason": rows["reason"][order][bad].astype(str).tolist()}, schema=ERROR_SCHEMA)
    return embeddings, errors
