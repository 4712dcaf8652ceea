"""A Ray Train worker's stream of a sharded dataset's train split (po_cluster/train/stream.py says
what streaming changes): its shard of the trainer's Ray Data datasets, in batches, pass after pass."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from po_cluster.config import RunConfig
from po_cluster.data.pairs import DataError
from po_cluster.data.stream_rows import dataset_meta
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.train.stream import StreamSource, candidate_embeddings, primed


def ray_stream(name: str, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """This Ray Train worker's share of dataset `name`, in batches, pass after pass."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    for epoch in range(1 << 62):
        yielded = False
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch):
            yielded = True
            yield batch
        if not yielded:
            raise DataError(f"the {name} stream gave this worker fewer than {batch_size} rows in a pass: "
                            "lower the batch size or use fewer workers")


def worker_source(model: AlignedCLIP, cfg: RunConfig, template: str, rank: int, world_size: int,
                  text_emb: torch.Tensor | None = None) -> StreamSource:
    """A Ray Train worker's stream: its shard of the trainer's "pref" and "reg" datasets, this rank's
    share of each global batch (as in memory: rows rank, rank + world_size, …)."""
    meta = dataset_meta(str(cfg.data.dataset))
    classnames, own = candidate_embeddings(model, meta, template) if text_emb is None else \
        (tuple(meta["candidates"]), text_emb)
    t = cfg.training
    pref, reg = (len(range(rank, size, world_size)) for size in (t.batch_size, t.reg_batch_size))
    return StreamSource(model, classnames, own, primed(ray_stream("pref", pref, t.seed)),
                        primed(ray_stream("reg", reg, t.seed + 1)))
