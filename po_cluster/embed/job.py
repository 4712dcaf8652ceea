"""Batch embedding of images with a release, on Ray Data.

    input (folder | JSONL/Parquet manifest | s3:// prefix)
      → sorted by id, cut into fixed-size shards (skip those already written)
      → CPU tasks: read, decode with the serving rules, to model input
      → actor pool: f(x) and W(t)·f re-normalised (the serving engine's math)
      → the driver writes each shard whole: <output>/errors/<name>, then <output>/embeddings/<name>

A shard's name is derived from (release id, t, shard index, digest of its ids
and sources); its embeddings file is written last and atomically (temporary file
renamed on a local disk; on S3 an object appears whole), so its presence means
the shard is complete and a re-run skips it. Reading the output back sorted by
id gives the same rows whether or not the job was interrupted, each id once.

Bad inputs (unreadable, not an image, a refused format, over the byte or pixel
limit, truncated) are rows of the errors file with a code and a reason; they
never stop the job. Nothing read from storage is unpickled: images go through
Pillow's allowed decoders, manifests are JSON or Parquet, weights safetensors.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from po_cluster.config import Strict
from po_cluster.data.pairs import is_s3
from po_cluster.serving.limits import ApiError, ImageFormat, Limits
from po_cluster.store.artifacts import StoreSettings

if TYPE_CHECKING:
    import ray.data

EMBEDDINGS, ERRORS = "embeddings", "errors"
_READ_THREADS = 8  # reads are I/O (S3 GETs); threads overlap them inside one decode task
_NAME = re.compile(r"^(?P<release>[A-Za-z0-9][A-Za-z0-9._-]*)_t(?P<t>[^_]+)_(?P<index>\d{6})-(?P<digest>[0-9a-f]{12})"
                   r"\.parquet$")
_SERVING = Limits()


class EmbedError(RuntimeError):
    """A job that cannot run as configured (bad input listing, foreign shards in the output); one line."""


# ---------------------------------------------------------------- config, validated once at the edge


class DecodeLimits(Strict):
    """What an image file may be; the defaults are the serving endpoint's, so both accept the same files."""

    max_image_bytes: int = Field(_SERVING.max_image_bytes, gt=0)
    max_image_pixels: int = Field(_SERVING.max_image_pixels, gt=0, description="width × height, before decoding")
    image_formats: tuple[ImageFormat, ...] = Field(_SERVING.image_formats, min_length=1)

    def serving(self) -> Limits:
        return Limits(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                      image_formats=self.image_formats)


class EmbedConfig(Strict):
    input: str = Field(min_length=1, description="folder, .jsonl/.parquet manifest (id, path or uri), or s3:// prefix")
    output: str = Field(min_length=1, description="folder or s3:// prefix for embeddings/ and errors/")
    store: str = Field(min_length=1, description="release store: folder or s3://bucket/prefix")
    release: str = Field("latest", description="release id, or latest (resolved once, at the start)")
    t: float = Field(1.0, description="σ_i ← σ_i^t, as the serving endpoint's t")
    shard_size: int = Field(1000, gt=0, description="images per output file and per decoding task; the unit a "
                            "re-run skips")
    batch_size: int = Field(64, gt=0, description="images per model call in an actor")
    decode_batch_size: int = Field(64, gt=0, description="images per decoding task call")
    concurrency: int = Field(1, gt=0, description="model actors")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model actor (its torch threads)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per model actor; None: 1 when the cluster has GPUs")
    decode_concurrency: int | None = Field(None, gt=0, description="decoding tasks at once; None: as CPUs allow")
    limits: DecodeLimits = DecodeLimits()
    store_settings: StoreSettings = StoreSettings()

    @field_validator("t")
    @classmethod
    def _finite(cls, t: float) -> float:
        if not math.isfinite(t):
            raise ValueError("t must be a finite number")
        return float(t)

    @model_validator(mode="after")
    def _output_outside_input(self) -> "EmbedConfig":
        # Shard files written inside an input folder would be inputs of the re-run, and change its shards.
        if not _is_manifest(self.input) and _within(self.output, self.input):
            raise ValueError(f"output {self.output} is inside the input folder {self.input}; write it elsewhere")
        return self


def _is_manifest(source: str) -> bool:
    return source.lower().endswith((".jsonl", ".parquet"))


def _within(child: str, parent: str) -> bool:
    def normal(uri: str) -> str:
        return uri.rstrip("/") if is_s3(uri) else str(Path(uri).expanduser().absolute())

    return normal(child) == normal(parent) or normal(child).startswith(normal(parent) + "/")


# ---------------------------------------------------------------- inputs: (id, source_uri), sorted by id


@lru_cache(maxsize=16)
def _bucket_store(bucket: str, settings: StoreSettings):  # -> S3Store; one per bucket and process
    from po_cluster.store.artifacts import open_store

    return open_store(f"s3://{bucket}", settings)


def read_source(location: str, settings: StoreSettings) -> bytes:
    """The bytes of a local file or an s3:// object; OSError / StoreError when unreadable."""
    if not is_s3(location):
        return Path(location).read_bytes()
    from po_cluster.store.artifacts import ObjectMissing, parse_s3_uri

    bucket, key = parse_s3_uri(location)
    data = _bucket_store(bucket, settings).get_bytes(key)
    if data is None:
        raise ObjectMissing(f"{location}: no such object")
    return data


def _hidden(relative: str) -> bool:
    # .DS_Store, editors' swap files, our own temporary files: never inputs.
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def _folder_inputs(root: str, settings: StoreSettings) -> list[tuple[str, str]]:
    """Every non-hidden file under a folder or S3 prefix: id = its path relative to the root."""
    if is_s3(root):
        from po_cluster.store.artifacts import open_store

        names = [key for key in open_store(root.rstrip("/"), settings).list_keys("") if not key.endswith("/")]
        base = root.rstrip("/")
        return [(name, f"{base}/{name}") for name in names if not _hidden(name)]
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise EmbedError(f"input {root}: no such folder (or a manifest ending in .jsonl / .parquet)")
    files = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    return [(name, str(path / name)) for name in files if not _hidden(name)]


def _manifest_rows(manifest: str, settings: StoreSettings) -> list[dict]:
    data = read_source(manifest, settings)
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


def _manifest_inputs(manifest: str, settings: StoreSettings) -> list[tuple[str, str]]:
    """Rows with `path` or `uri` (relative paths against the manifest's folder) and an optional `id`."""
    from po_cluster.data.pairs import parent, resolve

    base, items = parent(manifest), []
    for number, row in enumerate(_manifest_rows(manifest, settings), start=1):
        location = (row.get("uri") or row.get("path")) if isinstance(row, dict) else None
        if not isinstance(location, str) or not location:
            raise EmbedError(f"{manifest}: row {number} has no path or uri")
        item_id = row.get("id")
        items.append((str(item_id) if item_id not in (None, "") else location, resolve(base, location)))
    return items


def list_inputs(source: str, settings: StoreSettings | None = None) -> pa.Table:
    """(id, source_uri) of every input, sorted by id; EmbedError on duplicate ids or nothing to do."""
    settings = settings or StoreSettings()
    try:
        items = (_manifest_inputs if _is_manifest(source) else _folder_inputs)(source, settings)
    except OSError as error:
        raise EmbedError(f"input {source}: cannot read: {error}") from None
    if not items:
        raise EmbedError(f"input {source}: no files")
    items.sort()
    for (a, _), (b, _) in itertools.pairwise(items):
        if a == b:
            raise EmbedError(f"input {source}: id {a!r} appears twice; ids must be unique")
    ids, uris = zip(*items)
    return pa.table({"id": pa.array(ids, pa.string()), "source_uri": pa.array(uris, pa.string())})


# ---------------------------------------------------------------- shards: the unit of writing and resuming


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
    for item_id, uri in zip(items.column("id").to_pylist(), items.column("source_uri").to_pylist()):
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


# ---------------------------------------------------------------- decoding (CPU tasks)


@dataclass(frozen=True)
class Preprocess:
    """The model input conversion of a release (AlignedCLIP.pixels), as plain values for the CPU tasks."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class BadInput(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def decode_file(raw: bytes, limits: Limits) -> np.ndarray:
    """uint8 [H, W, 3] by the serving endpoint's own rules (limits.decode_image_bytes), or BadInput."""
    from po_cluster.serving.limits import decode_image_bytes

    try:
        return decode_image_bytes(raw, "image", limits)
    except ApiError as error:
        raise BadInput(error.code, error.message) from None


def _read(location: str, settings: StoreSettings, max_bytes: int) -> bytes | BadInput:
    from po_cluster.store.artifacts import StoreError

    try:
        if not is_s3(location) and Path(location).stat().st_size > max_bytes:
            return BadInput("image_too_large", f"the file is over the limit of {max_bytes} bytes")
        return read_source(location, settings)
    except (OSError, StoreError) as error:
        return BadInput("unreadable", f"cannot read {location}: {getattr(error, 'strerror', None) or error}")


def decode_batch(batch: dict[str, np.ndarray], preprocess: Preprocess, limits: DecodeLimits,
                 settings: StoreSettings) -> dict[str, np.ndarray]:
    """Inputs → model input [N, 3, S, S] float32; a bad row gets zeros, a code and a reason."""
    from po_cluster.model.loading import to_model_input

    rules, size = limits.serving(), preprocess.image_size
    uris = [str(u) for u in batch["source_uri"]]
    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(uris)))) as pool:
        raws = list(pool.map(lambda uri: _read(uri, settings, rules.max_image_bytes), uris))
    codes, reasons = [""] * len(uris), [""] * len(uris)
    by_shape: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for i, raw in enumerate(raws):
        try:
            if isinstance(raw, BadInput):
                raise raw
            image = decode_file(raw, rules)
            by_shape.setdefault(image.shape, []).append((i, image))
        except BadInput as bad:
            codes[i], reasons[i] = bad.code, bad.reason
    pixels = np.zeros((len(uris), 3, size, size), dtype=np.float32)
    for group in by_shape.values():  # one conversion per shape, as the serving engine's image_features
        rows = [i for i, _ in group]
        pixels[rows] = to_model_input(np.stack([image for _, image in group]), size, preprocess.mean,
                                      preprocess.std).numpy()
    return {"id": batch["id"], "source_uri": batch["source_uri"], "shard": batch["shard"], "pixels": pixels,
            "code": np.array(codes, dtype=object), "reason": np.array(reasons, dtype=object)}


# ---------------------------------------------------------------- the model (actor pool)


class Embedder:
    """One loaded release in an actor: the serving engine's ReleaseModel, its towers and projection."""

    def __init__(self, store: str, settings: StoreSettings, release_id: str, t: float, use_gpu: bool) -> None:
        import torch

        from po_cluster.serving.engine import Knob, ReleaseModel
        from po_cluster.store.artifacts import open_store

        folder = open_store(store, settings).pull_release(release_id)  # verified, cached by manifest hash
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.release = ReleaseModel.load(release_id, folder, device=device, verify=False)  # pulled: verified
        self.knob = Knob(t=t)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = batch["code"] == ""
        embedding = np.zeros((len(ok), self.release.dim), dtype=np.float32)
        if ok.any():
            with torch.no_grad():
                pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])).to(self.release.device)
                features = self.release.model.encode_image(pixels)  # = ReleaseModel.image_features after pixels
                embedding[ok] = self.release.project(features, [self.knob] * int(ok.sum())).numpy()
        return {key: batch[key] for key in ("id", "source_uri", "shard", "code", "reason")} | {"embedding": embedding}


def decode_task_memory(cfg: EmbedConfig, preprocess: Preprocess) -> int:
    """Bytes one decoding task may hold: its output batch (float32 model input, and Arrow's copy of it),
    the largest file it accepts (twice: its bytes and the decoder's buffer) and the largest image
    (RGB bytes, then to_model_input's float32 copy and its resized one).

    Reserving it also keeps decoding in its own tasks: Ray Data fuses a task map into the next actor map
    when their remote args are equal (1 CPU each on a CPU-only cluster), which would decode inside the
    model actors, serially with the model.
    """
    batch = cfg.decode_batch_size * 3 * preprocess.image_size ** 2 * 4 * 2
    return batch + 2 * cfg.limits.max_image_bytes + cfg.limits.max_image_pixels * 3 * (1 + 4 + 4)


def shard_block(shard: Shard) -> pa.Table:
    """A shard's inputs, each row with the shard's index (rows travel the pipeline with it)."""
    return shard.items.append_column("shard", pa.array(np.full(shard.items.num_rows, shard.index, np.int32)))


def build_dataset(shards: list[Shard], cfg: EmbedConfig, release_id: str, preprocess: Preprocess,
                  use_gpu: bool, runtime_env: dict[str, Any] | None = None) -> "ray.data.Dataset":
    """Inputs (with their shard index) → decoded on CPU tasks → embedded by the actor pool, in input order."""
    import ray.data

    # One block per shard: shards decode in parallel tasks, each in decode_batch_size batches. Finer blocks
    # would cost the driver a remote metadata call each (seconds per thousand) before anything runs.
    ds = ray.data.from_arrow([shard_block(shard) for shard in shards])
    ds = ds.map_batches(decode_batch, batch_size=cfg.decode_batch_size, batch_format="numpy", num_cpus=1,
                        memory=decode_task_memory(cfg, preprocess), runtime_env=runtime_env,
                        compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
                        fn_kwargs={"preprocess": preprocess, "limits": cfg.limits, "settings": cfg.store_settings})
    ds = ds.map_batches(Embedder, batch_size=cfg.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                        num_cpus=cfg.actor_num_cpus, num_gpus=(cfg.num_gpus or 1) if use_gpu else 0,
                        runtime_env=runtime_env,
                        fn_constructor_kwargs={"store": cfg.store, "settings": cfg.store_settings,
                                               "release_id": release_id, "t": cfg.t, "use_gpu": use_gpu})
    # Shards then finish in order, so the driver holds about one shard's rows at a time.
    ds.context.execution_options.preserve_order = True
    return ds


# ---------------------------------------------------------------- output: a folder or an S3 prefix


class OutputDir:
    """embeddings/ and errors/ under a folder or S3 prefix, through one pyarrow filesystem."""

    def __init__(self, uri: str, settings: StoreSettings | None = None) -> None:
        from pyarrow import fs

        self.uri = uri.rstrip("/")
        if is_s3(uri):
            from po_cluster.store.artifacts import pyarrow_fs

            self.fs, self.root = pyarrow_fs(self.uri, settings)
            self.local = False
        else:
            self.fs, self.root = fs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
            self.local = True

    def names(self, sub: str) -> set[str]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(f"{self.root}/{sub}", allow_not_found=True))
        # Hidden names are writes in progress (or left by a killed run), never finished shards.
        return {info.base_name for info in infos
                if info.type == fs.FileType.File and not info.base_name.startswith(".")}

    def write(self, sub: str, name: str, table: pa.Table) -> str:
        """Write a table so that the file appears whole or not at all; returns its URI."""
        import pyarrow.parquet as pq

        buffer = pa.BufferOutputStream()  # serialised first: a failed write never reaches the target
        pq.write_table(table, buffer)
        folder, final = f"{self.root}/{sub}", f"{self.root}/{sub}/{name}"
        target = f"{folder}/.{name}.{secrets.token_hex(4)}.tmp" if self.local else final
        if self.local:
            self.fs.create_dir(folder, recursive=True)
        with self.fs.open_output_stream(target) as out:  # S3: one object, visible once complete
            out.write(buffer.getvalue())
        if self.local:
            self.fs.move(target, final)  # rename: atomic on one filesystem
        return f"{self.uri}/{sub}/{name}"

    def rows(self, sub: str, name: str) -> int:
        import pyarrow.parquet as pq

        with self.fs.open_input_file(f"{self.root}/{sub}/{name}") as f:
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


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True)
class ShardReport:
    index: int
    total: int  # shards in the plan
    ok: int
    failed: int
    uri: str  # its embeddings file


@dataclass
class EmbedSummary:
    release_id: str
    t: float
    output: str
    shards: int
    shards_written: int = 0
    shards_skipped: int = 0
    ok: int = 0  # embedded by this run
    failed: int = 0  # refused by this run
    ok_total: int = 0  # in the output, skipped shards included
    failed_total: int = 0
    seconds: float = 0.0
    reports: list[ShardReport] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"embed: {self.ok} ok, {self.failed} failed in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s); {self.shards_written} shards written, "
                f"{self.shards_skipped} already done; output now holds {self.ok_total} embeddings and "
                f"{self.failed_total} errors (release {self.release_id}, t={self.t:g}) in {self.output}")


def _load_release(cfg: EmbedConfig) -> tuple[str, Preprocess]:
    """Resolve `latest` once (every actor then loads this id) and read the model's input conversion."""
    from po_cluster.model.checkpoint import load_checkpoint
    from po_cluster.store.artifacts import open_store

    store = open_store(cfg.store, cfg.store_settings)
    release_id = store.resolve(cfg.release)
    # Pulled (every file verified) and loaded here: a bad release fails before Ray starts anything.
    model, _ = load_checkpoint(store.pull_release(release_id), verify=False)
    return release_id, Preprocess(model.image_size, tuple(model.mean), tuple(model.std))


def _write_shard(output: OutputDir, shard: Shard, parts: list[dict[str, np.ndarray]], release_id: str,
                 t: float, total: int) -> ShardReport:
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    embeddings, errors = shard_tables(rows, release_id, t)
    output.write(ERRORS, shard.name, errors)  # first: a shard whose embeddings exist has its errors too
    uri = output.write(EMBEDDINGS, shard.name, embeddings)  # last: the shard's commit point
    return ShardReport(shard.index, total, embeddings.num_rows, errors.num_rows, uri)


def _collect(ds: "ray.data.Dataset", pending: list[Shard], output: OutputDir, summary: EmbedSummary,
             on_shard: Callable[[ShardReport], None] | None) -> None:
    """Gather the pipeline's rows by shard; write each shard as soon as all its rows are in."""
    by_index = {s.index: s for s in pending}
    parts: dict[int, list[dict[str, np.ndarray]]] = {}
    counts: dict[int, int] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for index in np.unique(batch["shard"]).tolist():
            mask = batch["shard"] == index
            parts.setdefault(index, []).append({key: value[mask] for key, value in batch.items()})
            counts[index] = counts.get(index, 0) + int(mask.sum())
            shard = by_index[index]
            if counts[index] == shard.items.num_rows:
                report = _write_shard(output, shard, parts.pop(index), summary.release_id, summary.t, summary.shards)
                summary.shards_written += 1
                summary.ok, summary.failed = summary.ok + report.ok, summary.failed + report.failed
                summary.reports.append(report)
                if on_shard:
                    on_shard(report)
    if parts:
        raise EmbedError(f"the pipeline ended with shards {sorted(parts)} incomplete")


def run_embed(cfg: EmbedConfig, on_shard: Callable[[ShardReport], None] | None = None,
              runtime_env: dict[str, Any] | None = None) -> EmbedSummary:
    """Embed every input not yet in the output; Ray must be initialised (the entry points connect).

    on_shard is called after each shard is written (the CLI's progress lines, the benchmark's clock).
    runtime_env goes to the tasks and actors (e.g. env vars a job's workers need).
    """
    import ray

    start = time.perf_counter()
    release_id, preprocess = _load_release(cfg)
    shards = plan_shards(list_inputs(cfg.input, cfg.store_settings), cfg.shard_size, release_id, cfg.t)
    output = OutputDir(cfg.output, cfg.store_settings)
    done = output.names(EMBEDDINGS)
    foreign = foreign_shards(done, shards, release_id, cfg.t)
    if foreign:
        raise EmbedError(f"{cfg.output} holds {len(foreign)} shard file(s) of release {release_id} at t={cfg.t:g} "
                         f"that this input does not produce (e.g. {foreign[0]}): another input or shard size; "
                         f"write to a new output")
    summary = EmbedSummary(release_id, cfg.t, output.uri, len(shards))
    pending = [s for s in shards if s.name not in done]
    output.remove_temporaries({s.name for s in pending})
    for shard in shards:
        if shard.name in done:
            summary.shards_skipped += 1
            summary.ok_total += output.rows(EMBEDDINGS, shard.name)
            summary.failed_total += output.rows(ERRORS, shard.name)
    if pending:
        use_gpu = cfg.num_gpus != 0 and (cfg.num_gpus or ray.cluster_resources().get("GPU", 0)) > 0
        ds = build_dataset(pending, cfg, release_id, preprocess, use_gpu, runtime_env)
        _collect(ds, pending, output, summary, on_shard)
    summary.ok_total += summary.ok
    summary.failed_total += summary.failed
    summary.seconds = time.perf_counter() - start
    return summary
