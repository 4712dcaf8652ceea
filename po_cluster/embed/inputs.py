"""The embed job's inputs: (id, source_uri) of every image, from a folder, an S3 prefix, a
JSONL/Parquet manifest or webdataset shards (data.tar_shards), sorted by id. Everything is read
through po_cluster.store.location.

A shard's image is named as the same file in a folder would be: its id `00000.tar/000000012.jpg`
(the shard relative to the folder named, then the member), its source_uri the shard's location and
the member. Its row also carries where the member's bytes are (tar, offset, size), so decoding reads
just them; a sample without an image, or a damaged shard, is a row with its error code and reason
already set. Label members (cls, json, txt) are not read: embedding needs only the image."""
from __future__ import annotations

import io
import itertools
import json
from pathlib import Path, PurePosixPath

import pyarrow as pa

from po_cluster.data.tar_shards import Fault, ShardSet, folder_shards, image_extension, named_shards, walk
from po_cluster.store import location
from po_cluster.store.location import ObjectMissing, StoreConfig, StoreError


class EmbedError(RuntimeError):
    """A job that cannot run as configured (bad input listing, foreign shards in the output); one line."""


INPUT_SCHEMA = pa.schema([("id", pa.string()), ("source_uri", pa.string()),  # a file's, a manifest row's
                          ("tar", pa.string()), ("offset", pa.int64()), ("size", pa.int64()),  # and a shard's
                          ("code", pa.string()), ("reason", pa.string())])


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


def _listing(root: str, settings: StoreConfig) -> tuple[str, list[str]]:
    """(the folder or S3 prefix as a location, every file under it relative to it)."""
    base = root.rstrip("/") if location.is_s3(root) else str(Path(root).expanduser().absolute())
    try:
        return base, location.list_files(base, settings)
    except ObjectMissing:
        if location.is_s3(root):
            return base, []  # an empty prefix: "no files", below
        raise EmbedError(f"input {root}: no such folder (or a manifest ending in .jsonl / .parquet)") from None


def _shard_inputs(shards: ShardSet, settings: StoreConfig) -> list[tuple]:
    """(id, source_uri, tar, offset, size, code, reason) of every sample of the shards."""
    rows: list[tuple] = []
    for name, sample in walk(shards, settings, max_member_bytes=0):  # places only: nothing is read twice
        if isinstance(sample, Fault):
            rows.append((name, sample.where, "", 0, 0, "unreadable", sample.reason))
            continue
        extension = image_extension(sample)
        if extension is None:
            reason = f"the sample has no image member, only {', '.join(sorted(sample.places)) or 'nothing'}"
            rows.append((f"{name}/{sample.key}", f"{sample.shard}/{sample.key}", "", 0, 0, "not_an_image", reason))
            continue
        member = sample.places[extension]
        rows.append((f"{name}/{member.name}", f"{sample.shard}/{member.name}", sample.shard, member.offset,
                     member.size, "", ""))
    return rows


def _source_inputs(source: str, settings: StoreConfig) -> list[tuple]:
    if is_manifest(source):
        return _manifest_inputs(source, settings)
    shards = named_shards(source)
    if shards is None:
        base, names = _listing(source, settings)
        shards = folder_shards(base, names)
        if shards is None:
            # Every non-hidden file under a folder or S3 prefix: id = its path relative to the root.
            return [(name, location.join(base, name)) for name in names if not _hidden(name)]
    return _shard_inputs(shards, settings)


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
    """(id, source_uri) of every input, sorted by id, and for shards where each image is (tar, offset,
    size) and the listing's error (code, reason); EmbedError on duplicate ids or nothing to do."""
    settings = settings or StoreConfig()
    try:
        items = _source_inputs(source, settings)
    except StoreError as error:  # its message names what could not be read
        raise EmbedError(f"cannot read the input: {error}") from None
    except OSError as error:
        raise EmbedError(f"input {source}: cannot read: {error.strerror or error}") from None
    if not items:
        raise EmbedError(f"input {source}: no files")
    items.sort()
    for a, b in itertools.pairwise(item[0] for item in items):
        if a == b:
            raise EmbedError(f"input {source}: id {a!r} appears twice; ids must be unique")
    columns = list(zip(*items, strict=True))
    # A folder's and a manifest's rows are the schema's first two columns, a shard's all of them.
    return pa.table({f.name: pa.array(values, f.type) for f, values in zip(INPUT_SCHEMA, columns, strict=False)})
