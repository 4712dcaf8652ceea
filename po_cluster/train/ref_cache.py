"""π_ref for a streamed dataset, computed once per (dataset, starting model) and kept beside its shards.

π_ref never changes during a run, nor between the trials of a sweep: every trial starts from the same
model and reads the same rows. In memory a run computes it once per record before its first step. A
streaming run cannot hold it for a dataset it does not hold, and computing it per batch costs a
trained tower one more forward per step (benchmarks/stream_ref_bench.py measures it), pass after
pass and trial after trial. So before the first run on a
dataset, one pass of the starting model over the train split writes each row's log π_ref into
`<dataset>/ref/<key>/` (po_cluster/data/ref_files.py); every later run and trial with the same key
finds it there, and the stream hands it to the step with the row, as TRL's
`precompute_ref_log_probs` does for language models.

The key covers dataset.json (so every shard's sha256, the candidates and the image size), the
architecture, the weights (the shipped file's or a weights file's content tag; an open_clip tag by
name) and the prompt template. A dataset folder that cannot be written keeps streaming: π_ref is
then computed per batch, as the log says.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from po_cluster.config import SHIPPED_BASE, RunConfig
from po_cluster.data import world
from po_cluster.data.pairs import DATASET_JSON, dataset_geometry, read_bytes
from po_cluster.data.ref_files import REF_DIR, read_ref_manifest, ref_file, write_ref_file, write_ref_manifest
from po_cluster.data.stream_rows import dataset_meta, shard_rows, stream_kind
from po_cluster.evaluate.metrics import embed_images, embed_prompts
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import SHIPPED_BASE_DIR, WEIGHTS_FILE, is_weights_file
from po_cluster.store.location import join, stat
from po_cluster.store.settings import StoreError

log = logging.getLogger(__name__)
KEY_VERSION = 2  # bump when what the cache holds, or how it is computed, changes (2: f(x) beside log π_ref)


def weights_identity(pretrained: str | None) -> str:
    """What changes when the starting weights do: a file's content tag (mtime and size, or the ETag),
    an open_clip tag's name."""
    if pretrained is None or not is_weights_file(pretrained):
        return f"tag:{pretrained}"
    if pretrained == SHIPPED_BASE:
        return "file:" + stat(str(SHIPPED_BASE_DIR / WEIGHTS_FILE)).tag
    return "file:" + stat(pretrained if pretrained.startswith("s3://") else str(Path(pretrained).expanduser())).tag


def cache_key(run: RunConfig, template: str) -> str:
    """The cache's name under <dataset>/ref/: one per dataset content, starting model and prompts."""
    location = str(run.data.dataset)
    parts = {"version": KEY_VERSION, "dataset": hashlib.sha256(read_bytes(join(location, DATASET_JSON))).hexdigest(),
             "model": run.model.name, "weights": weights_identity(run.model.pretrained), "template": template}
    if run.model.preprocess is not None:  # otherwise the name and weights' tag decide the preprocessing
        parts["preprocess"] = run.model.model_dump(mode="json")["preprocess"]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_location(run: RunConfig, key: str) -> str:
    return join(str(run.data.dataset), REF_DIR, key)


def find_ref_cache(run: RunConfig, template: str) -> tuple[str, dict | None]:
    """The cache's key, and its manifest when a complete cache of that key is there."""
    key = cache_key(run, template)
    return key, read_ref_manifest(cache_location(run, key), key)


def stream_kinds(meta: dict) -> tuple[str, ...]:
    """The kinds of row the two streams read: pairs, and the clean stream's (the pairs again when the
    dataset has no regularisation rows, so one file serves both)."""
    return tuple(dict.fromkeys(("pair", stream_kind(meta))))


@torch.no_grad()
def compute_ref_cache(model: AlignedCLIP, run: RunConfig, template: str, key: str) -> dict:
    """One pass of `model` at t = 0 (the starting model) over the train split, shard by shard, each
    file written as its shard is done; ref.json last. Returns the manifest (with its location)."""
    location, meta = str(run.data.dataset), dataset_meta(str(run.data.dataset))
    geometry = dataset_geometry(meta, model.preprocess.geometry, location)
    device = next(model.parameters()).device
    text_emb = embed_prompts(model, world.prompts(tuple(meta["candidates"]), template)).to(device)
    out, files = cache_location(run, key), {}
    for number in range(len(meta["shards"])):
        for kind in stream_kinds(meta):
            rows = shard_rows(location, meta, number, kind, kind != "pair", geometry)
            # a shard may hold none of a kind
            emb = torch.empty((0, text_emb.shape[1]), device=device)
            logps = torch.empty((0, len(meta["candidates"])), device=device)
            if len(rows["image"]):
                emb = embed_images(model, rows["image"], t=0.0).to(device)
                logps = model.logprobs(emb, text_emb, t=0.0)
            files[ref_file(kind, number)] = write_ref_file(out, kind, number, logps.float().cpu().numpy(),
                                                           emb.float().cpu().numpy())
    return write_ref_manifest(out, key, files)


def ref_cache(model: AlignedCLIP, run: RunConfig, template: str) -> dict | None:
    """The cache of `run`'s dataset and starting model (`model`, not yet trained): found, or computed
    now. None, with a warning, when it cannot be written: the run then computes π_ref per batch."""
    key, found = find_ref_cache(run, template)
    if found is not None:
        return found
    try:
        return compute_ref_cache(model, run, template, key)
    except (StoreError, OSError) as error:
        log.warning("cannot write the π_ref cache under %s (%s): π_ref is computed per batch instead",
                    cache_location(run, key), error)
        return None
