"""Streaming a sharded dataset's train split into training (`data.streaming: true`).

In memory, a run decodes every record before its first step and computes π_ref once per
record. A dataset of a hundred thousand images does not fit that way in every worker of
every trial, so a streaming run reads the Parquet shards as it trains: in a single process from the
shards one at a time (here), in a Ray Train worker from Ray Data (po_cluster/cluster/stream.py:
read and decoded in Ray's CPU tasks, split across the workers, shuffled within a bounded buffer).
Memory is bounded by blocks and batches, not by the dataset.

What streaming changes:
- π_ref comes with each row from the dataset's π_ref cache, computed once per dataset and starting
  model (po_cluster/train/ref_cache.py). Where that cache cannot be written, it is computed per
  batch from the same images: the tower's f(x) at t = 0 (θ_ref, a copy made once; for LoRA the
  adapters at zero) under no_grad, one more forward per step for a trained tower. The cache also
  holds each row's f(x) at t = 0, which is a frozen tower's input: with it, a frozen tower's
  stream runs no image tower at all, and its read tasks decode no image.
- A batch is the next one of the stream, not a function of (seed, step): a run resumed after a
  worker crash restarts its stream at a new pass, so its batches, and so its weights, differ from
  those of the run that did not crash. The steps, optimizer state and schedule resume exactly.
- Each shard is checked against dataset.json (sha256, rows, columns) as it is read, in the
  Ray Data task or the single process: a changed shard fails the run, naming it.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from po_cluster.config import RunConfig
from po_cluster.data import world
from po_cluster.data.pairs import dataset_geometry
from po_cluster.data.stream_rows import dataset_meta, local_stream, needs_pixels
from po_cluster.evaluate.metrics import embed_prompts
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.train.batch import Batch
from po_cluster.train.ref_cache import ref_cache


def primed(stream: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """`stream` with its first batch already read. The sources are built in the worker's data_prep
    phase, so the pipeline's start-up (Ray Data's executor, its first read and decode tasks) is
    counted there, as decoding in memory is, and not as the first training step."""
    first = next(stream)
    return itertools.chain([first], stream)


class StreamSource:
    """fit's batch source over two streams of decoded rows: pixels to the device, π_ref as the rows
    carry it (the π_ref cache) or else from the same images at t = 0 (θ_ref's tower, copied once),
    and for a frozen tower its f(x) as the input."""

    def __init__(self, model: AlignedCLIP, classnames: tuple[str, ...], text_emb: torch.Tensor,
                 pref: Iterator[dict[str, np.ndarray]], reg: Iterator[dict[str, np.ndarray]]) -> None:
        self.model, self.classnames, self.pref, self.reg = model, classnames, pref, reg
        self.device = next(model.parameters()).device
        self.text_emb = text_emb.to(self.device)
        self.reg_text_emb: torch.Tensor | None = None  # a dataset's regularisation images share the pairs' candidates
        self.ref_tower = model.tower_at(0.0)  # the tower itself when nothing moves with t but adapters

    @torch.no_grad()
    def _inputs_and_ref(self, rows: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's input (pixels, or a frozen tower's f(x)) and log π_ref: the row's own from the
        π_ref cache when the stream carries them, else from θ_ref's tower at t = 0, here."""
        frozen = self.model.image_tower_frozen
        if "ref_logps" in rows:
            ref = torch.as_tensor(rows["ref_logps"], device=self.device)
            if frozen:  # the tower never moves: its f(x) is the cache's
                return torch.as_tensor(rows["ref_emb"], device=self.device), ref
            return self.model.pixels(rows["image"], self.device), ref
        pixels = self.model.pixels(rows["image"], self.device)
        ref_emb = self.model.encode_image(pixels, 0.0, tower=self.ref_tower)  # a frozen tower's input, too
        return (ref_emb if frozen else pixels), self.model.logprobs(ref_emb, self.text_emb, t=0.0)

    def __call__(self, step: int) -> Batch:
        pref, reg = next(self.pref), next(self.reg)
        pref_inputs, ref_pref = self._inputs_and_ref(pref)
        reg_inputs, ref_reg = self._inputs_and_ref(reg)
        return Batch(pref_inputs, torch.as_tensor(pref["chosen"], device=self.device),
                     torch.as_tensor(pref["rejected"], device=self.device), ref_pref, reg_inputs, ref_reg)


def candidate_embeddings(model: AlignedCLIP, meta: dict, template: str) -> tuple[tuple[str, ...], torch.Tensor]:
    classnames = tuple(meta["candidates"])
    return classnames, embed_prompts(model, world.prompts(classnames, template))


def local_source(model: AlignedCLIP, cfg: RunConfig, template: str) -> StreamSource:
    """The single-process stream of `cfg.data.dataset`'s train split (no Ray)."""
    location, t = str(cfg.data.dataset), cfg.training
    meta = dataset_meta(location)
    classnames, text_emb = candidate_embeddings(model, meta, template)
    geometry = dataset_geometry(meta, model.preprocess.geometry, location)
    ref = ref_cache(model, cfg, template)  # before training: model is θ_ref
    pixels = needs_pixels(model.image_tower, ref)
    return StreamSource(model, classnames, text_emb,
                        primed(local_stream(location, meta, False, t.batch_size, t.seed, geometry, ref, pixels)),
                        primed(local_stream(location, meta, True, t.reg_batch_size, t.seed + 1, geometry, ref,
                                            pixels)))
