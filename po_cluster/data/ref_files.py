"""The files of a π_ref cache: log π_ref(y|x) and the starting tower's f(x) of every train-split row
of a sharded dataset, one Parquet file per (shard, kind of row), listed with their sha256 and rows
in `ref.json`, written last. What computes them (the starting model, once per dataset and model) is
po_cluster/train/ref_cache.py; this module only writes and reads them, without torch, so that Ray
Data's read tasks can attach each row's π_ref and f(x) to the row as they decode its shard.

A file's rows are the shard's rows of that kind in the train split, in shard order: the order in
which `stream_rows.decode_rows` keeps them. The cache's key covers dataset.json (and so every
shard's sha256), so a cache found under its key was computed from exactly these shards.
"""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from po_cluster.data.pairs import DataError, read_bytes
from po_cluster.store.location import join, write_bytes

REF_DIR = "ref"  # under the dataset's root: ref/<key>/
REF_MANIFEST = "ref.json"
REF_FORMAT = "po-cluster.ref-logps"


def ref_file(kind: str, number: int) -> str:
    return f"{kind}-{number:05d}.parquet"


def _fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def write_ref_file(location: str, kind: str, number: int, logps: np.ndarray, emb: np.ndarray) -> dict:
    """`logps` [rows, classes] and `emb` [rows, dim] (f(x) at t = 0), float32, as one file of the
    cache at `location`; its manifest entry."""
    rows, classes = logps.shape
    table = pa.table({"logp": _fixed_size_list(logps), "emb": _fixed_size_list(emb)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    data = buffer.getvalue()
    write_bytes(join(location, ref_file(kind, number)), data)
    return {"rows": rows, "classes": classes, "sha256": hashlib.sha256(data).hexdigest()}


def write_ref_manifest(location: str, key: str, files: dict[str, dict]) -> dict:
    """ref.json, written after every file: a cache without it is incomplete and is computed again."""
    manifest = {"format": REF_FORMAT, "key": key, "files": files}
    write_bytes(join(location, REF_MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode())
    return {**manifest, "location": location}


def read_ref_manifest(location: str, key: str) -> dict | None:
    """The cache at `location` when it is complete and of `key`, else None (to be computed)."""
    try:
        manifest = json.loads(read_bytes(join(location, REF_MANIFEST)))
    except (DataError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != REF_FORMAT or manifest.get("key") != key \
            or not isinstance(manifest.get("files"), dict):
        return None
    return {**manifest, "location": location}


def read_ref_rows(ref: dict, kind: str, number: int, rows: int) -> dict[str, np.ndarray]:
    """"ref_logps" [rows, classes] and "ref_emb" [rows, dim] of shard `number`'s train rows of `kind`,
    checked against ref.json (sha256, rows): a file that changed, or that does not match the shard,
    fails the run naming it."""
    name = ref_file(kind, number)
    location = join(ref["location"], name)
    entry = ref["files"].get(name)
    if not isinstance(entry, dict):
        raise DataError(f"{location}: not listed in the π_ref cache's {REF_MANIFEST}")
    data = read_bytes(location)
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise DataError(f"{location}: sha256 differs from {REF_MANIFEST}'s (changed after it was computed); "
                        f"delete {ref['location']} to compute the cache again")
    try:
        table = pq.read_table(io.BytesIO(data))
        column, emb = table.column("logp").combine_chunks(), table.column("emb").combine_chunks()
    except (pa.ArrowException, OSError, KeyError) as error:
        raise DataError(f"{location}: not a π_ref cache file ({error})") from None
    if len(column) != rows or entry.get("rows") != rows:
        raise DataError(f"{location}: {len(column)} rows, the shard has {rows} {kind} rows in its train split")
    classes = column.type.list_size
    if entry.get("classes") != classes:
        raise DataError(f"{location}: {classes} classes per row, {REF_MANIFEST} says {entry.get('classes')}")
    return {"ref_logps": column.values.to_numpy(zero_copy_only=False).reshape(rows, classes),
            "ref_emb": emb.values.to_numpy(zero_copy_only=False).reshape(rows, emb.type.list_size)}
