"""Batch embedding of images with a release, on Ray Data.

    input (folder | JSONL/Parquet manifest | s3:// prefix | webdataset tar shards)
      → sorted by id, cut into fixed-size shards (skip those already written)
      → CPU tasks: read, decode with the serving rules, to model input
      → actor pool: f(x) and W(t)·f re-normalised (model.release, as serving)
      → the driver writes each shard whole: <output>/errors/<name>, then <output>/embeddings/<name>

A shard's name is derived from (release id, t, shard index, digest of its ids
and sources); its embeddings file is written last and atomically (temporary file
renamed on a local disk; on S3 an object appears whole), so its presence means
the shard is complete and a re-run skips it. Reading the output back sorted by
id gives the same rows whether or not the job was interrupted, each id once.

Inputs are listed in po_cluster.embed.inputs, decoded in po_cluster.embed.decode,
and planned, named and written in po_cluster.embed.shards; this module is the
pipeline and its driver.

Bad inputs (unreadable, not an image, a refused format, over the byte or pixel
limit, truncated) are rows of the errors file with a code and a reason; they
never stop the job. Nothing read from storage is unpickled: images go through
Pillow's allowed decoders, manifests are JSON or Parquet, weights safetensors.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from po_cluster.config import Strict
from po_cluster.data.images import ImageLimitsConfig
from po_cluster.embed.decode import Preprocess, decode_batch
from po_cluster.embed.inputs import EmbedError, is_manifest, list_inputs, within
from po_cluster.embed.shards import EMBEDDINGS, ERRORS, OutputDir, Shard, foreign_shards, plan_shards, shard_tables
from po_cluster.store.location import StoreConfig

if TYPE_CHECKING:
    import ray.data

# ---------------------------------------------------------------- config, validated once at the edge


class EmbedConfig(Strict):
    input: str = Field(min_length=1, description="folder, .jsonl/.parquet manifest (id, path or uri), s3:// prefix, "
                       "or webdataset shards (a folder of .tar, one .tar, or a pattern {00000..00009}.tar)")
    output: str = Field(min_length=1, description="folder or s3:// prefix for embeddings/ and errors/")
    store: str = Field(min_length=1, description="release store: folder or s3://bucket/prefix")
    release: str = Field("latest", description="release id, or latest (resolved once, at the start)")
    t: float = Field(1.0, description="the knob, as the serving endpoints' t: 0 the starting model, 1 the release")
    shard_size: int = Field(1000, gt=0, description="images per output file and per decoding task; the unit a "
                            "re-run skips")
    batch_size: int = Field(64, gt=0, description="images per model call in an actor")
    decode_batch_size: int = Field(64, gt=0, description="images per decoding task call")
    concurrency: int = Field(1, gt=0, description="model actors")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model actor (its torch threads)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per model actor; None: 1 when the cluster has GPUs")
    decode_concurrency: int | None = Field(None, gt=0, description="decoding tasks at once; None: as CPUs allow")
    limits: ImageLimitsConfig = ImageLimitsConfig()
    store_settings: StoreConfig = StoreConfig()

    @field_validator("t")
    @classmethod
    def _finite(cls, t: float) -> float:
        if not math.isfinite(t):
            raise ValueError("t must be a finite number")
        return float(t)

    @model_validator(mode="after")
    def _output_outside_input(self) -> EmbedConfig:
        # Shard files written inside an input folder would be inputs of the re-run, and change its shards.
        if not is_manifest(self.input) and within(self.output, self.input):
            raise ValueError(f"output {self.output} is inside the input folder {self.input}; write it elsewhere")
        return self


# ---------------------------------------------------------------- the model (actor pool)


class Embedder:
    """One loaded release in an actor: model.release's ReleaseModel, its towers and projection."""

    def __init__(self, store: str, settings: StoreConfig, release_id: str, t: float, use_gpu: bool) -> None:
        import torch

        from po_cluster.model.release import Knob, ReleaseModel
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
                knobs = [self.knob] * int(ok.sum())
                features = self.release.pixel_features(pixels, [knob.t for knob in knobs])
                embedding[ok] = self.release.project(features, knobs).numpy()
        return {key: batch[key] for key in ("id", "source_uri", "shard", "code", "reason")} | {"embedding": embedding}


def decode_task_memory(cfg: EmbedConfig, preprocess: Preprocess) -> int:
    """Bytes one decoding task may hold: its output batch (float32 model input, and Arrow's copy of it),
    the largest file it accepts (twice: its bytes and the decoder's buffer) and the largest image
    (RGB bytes, then to_model_input's float32 copy and its resized one).

    Reserving it also keeps decoding in its own tasks: Ray Data fuses a task map into the next actor map
    when their remote args are equal (1 CPU each on a CPU-only cluster), which would decode inside the
    model actors, serially with the model.
    """
    batch = cfg.decode_batch_size * 3 * preprocess.size ** 2 * 4 * 2
    return batch + 2 * cfg.limits.max_image_bytes + cfg.limits.max_image_pixels * 3 * (1 + 4 + 4)


def shard_block(shard: Shard) -> pa.Table:
    """A shard's inputs, each row with the shard's index (rows travel the pipeline with it)."""
    return shard.items.append_column("shard", pa.array(np.full(shard.items.num_rows, shard.index, np.int32)))


def build_dataset(shards: list[Shard], cfg: EmbedConfig, release_id: str, preprocess: Preprocess,
                  use_gpu: bool, runtime_env: dict[str, Any] | None = None) -> ray.data.Dataset:
    """Inputs (with their shard index) → decoded on CPU tasks → embedded by the actor pool, in input order."""
    import ray.data

    # One block per shard: shards decode in parallel tasks, each in decode_batch_size batches. Finer blocks
    # would cost the driver a remote metadata call each (seconds per thousand) before anything runs.
    ds: ray.data.Dataset = ray.data.from_arrow([shard_block(shard) for shard in shards])
    # Ray types a map's function as taking the batch alone, though it passes fn_kwargs too.
    ds = ds.map_batches(decode_batch,  # type: ignore[arg-type]
                        batch_size=cfg.decode_batch_size, batch_format="numpy", num_cpus=1,
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
    return release_id, model.preprocess


def _write_shard(output: OutputDir, shard: Shard, parts: list[dict[str, np.ndarray]], release_id: str,
                 t: float, total: int) -> ShardReport:
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    embeddings, errors = shard_tables(rows, release_id, t)
    output.write(ERRORS, shard.name, errors)  # first: a shard whose embeddings exist has its errors too
    uri = output.write(EMBEDDINGS, shard.name, embeddings)  # last: the shard's commit point
    return ShardReport(shard.index, total, embeddings.num_rows, errors.num_rows, uri)


def _collect(ds: ray.data.Dataset, pending: list[Shard], output: OutputDir, summary: EmbedSummary,
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
