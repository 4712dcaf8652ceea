"""The embed job's inputs: (id, source_uri) of every image, from a folder, an S3 prefix or a
JSONL/Parquet manifest, sorted by id. Everything is read through po_cluster.store.location."""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path, PurePosixPath

import pyarrow as pa

from po_cluster.store import location
from po_cluster.store.location import ObjectMissing, StoreConfig, StoreError


class EmbedError(RuntimeError):
    """A job that cannot run as configured (bad input listing, foreign shards in the output); one line."""


def is_manifest(source: str) -> bool:
    return source.lower().endswith((".jsonl", ".parquet"))


def within(child: str, parent: str) -> bool:
    """Whether the location child is parent or inside it."""
    def normal(uri: str) -> str:
        return uri.rstrip("/") if location.is_s3(uri) else str(Path(uri).expanduser().absolute())

    return normal(child) == normal(parent) or normal(child).startswith(normal(parent) + "/")


def _hidden(relative: str) -> bool:
    # .DS_Store, editors' swap files, our own temporary files: never inputs.
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def _folder_inputs(root: str, settings: StoreConfig) -> list[tuple[str, str]]:
    """Every non-hidden file under a folder or S3 prefix: id = its path relative to the root."""
    base = root.rstrip("/") if location.is_s3(root) else str(Path(root).expanduser().absolute())
    try:
        names = location.list_files(base, settings)
    except ObjectMissing:
        if location.is_s3(root):
            return []  # an empty prefix: "no files", below
        raise EmbedError(f"input {root}: no such folder (or a manifest ending in .jsonl / .parquet)") from None
    return [(name, location.join(base, name)) for name in names if not _hidden(name)]


def _manifest_rows(manifest: str, settings: StoreConfig) -> list[dict]:
    data = location.read_bytes(manifest, settings)
    if manifest.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    rows = []
    for number, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise EmbedError(f"{manifest}:{number}: not valid JSON ({error.msg})") from None
    return rows


def _manifest_inputs(manifest: str, settings: StoreConfig) -> list[tuple[str, str]]:
    """Rows with `path` or `uri` (relative paths against the manifest's folder) and an optional `id`."""
    base, items = location.parent(manifest), []
    for number, row in enumerate(_manifest_rows(manifest, settings), start=1):
        source = (row.get("uri") or row.get("path")) if isinstance(row, dict) else None
        if not isinstance(source, str) or not source:
            raise EmbedError(f"{manifest}: row {number} has no path or uri")
        item_id = row.get("id")
        items.append((str(item_id) if item_id not in (None, "") else source, location.resolve(base, source)))
    return items


def list_inputs(source: str, settings: StoreConfig | None = None) -> pa.Table:
    """(id, source_uri) of every input, sorted by id; EmbedError on duplicate ids or nothing to do."""
    settings = settings or StoreConfig()
    try:
        items = (_manifest_inputs if is_manifest(source) else _folder_inputs)(source, settings)
    except StoreError as error:  # its message names what could not be read
        raise EmbedError(f"cannot read the input: {error}") from None
    except OSError as error:
        raise EmbedError(f"input {source}: cannot read: {error.strerror or error}") from None
    if not items:
        raise EmbedError(f"input {source}: no files")
    items.sort()
    for (a, _), (b, _) in itertools.pairwise(items):
        if a == b:
            raise EmbedError(f"input {source}: id {a!r} appears twice; ids must be unique")
    ids, uris = zip(*items, strict=True)
    return pa.table({"id": pa.array(ids, pa.string()), "source_uri": pa.array(uris, pa.string())})
