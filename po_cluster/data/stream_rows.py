"""Reading a sharded dataset's train split as a stream of decoded rows: what Ray Data's tasks run
(and the single-process stream), kept free of torch and the model so that those tasks import little.
The training side (π_ref per batch, batches to the device) is po_cluster/train/stream.py.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from po_cluster.data.images import Geometry
from po_cluster.data.pairs import DATASET_JSON, DataError, load_image, read_bytes
from po_cluster.data.records import NO_WORD
from po_cluster.data.ref_files import read_ref_rows
from po_cluster.data.shards import RECORD_SCHEMA, read_shard
from po_cluster.store.location import join


def dataset_meta(location: str) -> dict:
    """dataset.json of a sharded dataset; DataError for anything a stream cannot read."""
    try:
        meta = json.loads(read_bytes(join(location, DATASET_JSON)))
    except json.JSONDecodeError as error:
        raise DataError(f"{join(location, DATASET_JSON)}: not valid JSON ({error.msg})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list) or not meta["shards"]:
        raise DataError(f"{location}: streaming needs a dataset of Parquet shards (po-cluster data typographic, "
                        "ingest or world); this one has none")
    if not meta.get("candidates"):
        raise DataError(f"{join(location, DATASET_JSON)}: no candidates listed")
    return meta


def stream_kind(meta: dict) -> str:
    """What the clean stream reads: the train split's regularisation rows, or (a dataset with none)
    its pairs, labelled with their chosen text, as in memory."""
    counts = meta.get("counts")
    return "pair" if isinstance(counts, dict) and counts.get("regularization") == 0 else "regularization"


def decode_rows(batch: dict[str, Any], kind: str, reg: bool, geometry: Geometry, candidates: list[str],
                split: str = "train", pixels: bool = True) -> dict[str, np.ndarray]:
    """Shard rows → this stream's rows: uint8 images [n, size, size, 3] fitted by `geometry` (the one image path)
    (none with `pixels` False), and class indices into the candidates. Rows of other splits and kinds
    are dropped here."""
    index = {text: i for i, text in enumerate(candidates)}
    keep = [i for i, (k, s) in enumerate(zip(batch["kind"], batch["split"], strict=True))
            if k == kind and (s or "train") == split]
    rows: dict[str, np.ndarray]
    if reg:
        texts = batch["text"] if kind == "regularization" else batch["chosen"]
        rows = {"label": np.array([index.get(texts[i], NO_WORD) if texts[i] else NO_WORD for i in keep],
                                  dtype=np.int64)}
    else:
        rows = {"chosen": np.array([index[batch["chosen"][i]] for i in keep], dtype=np.int64),
                "rejected": np.array([index[batch["rejected"][i]] for i in keep], dtype=np.int64)}
    if pixels:
        images = np.empty((len(keep), geometry.size, geometry.size, 3), dtype=np.uint8)
        for row, i in enumerate(keep):
            images[row] = load_image(str(batch["image_name"][i]), geometry, batch["image"][i])
        rows["image"] = images
    return rows


def needs_pixels(image_tower: object, ref: dict | None) -> bool:
    """Whether a stream's rows carry decoded images: not for a frozen tower with a π_ref cache, whose
    input is the cache's f(x)."""
    return ref is None or image_tower != "frozen"


def row_count(rows: dict[str, np.ndarray]) -> int:
    return len(next(iter(rows.values())))


def shard_rows(location: str, meta: dict, number: int, kind: str, reg: bool, geometry: Geometry,
               ref: dict | None = None, pixels: bool = True) -> dict[str, np.ndarray]:
    """Shard `number` of the dataset, read through the store and checked against dataset.json (its
    sha256 and rows), as this stream's decoded rows of the train split; with `ref` (a π_ref cache's
    manifest, po_cluster/data/ref_files.py) each row also carries its log π_ref ("ref_logps") and
    the starting tower's f(x) ("ref_emb"). `pixels` False (a frozen tower, whose input is that f(x))
    decodes no image: it needs `ref`."""
    if not pixels and ref is None:
        raise ValueError("rows without pixels need a π_ref cache: its f(x) is the only image input left")
    rows = read_shard(location, meta["shards"][number])
    columns = {name: [row[name] for row in rows] for name in RECORD_SCHEMA.names}
    decoded = decode_rows(columns, kind, reg, geometry, meta["candidates"], pixels=pixels)
    if ref is not None:
        decoded |= read_ref_rows(ref, kind, number, row_count(decoded))
    return decoded


def local_stream(location: str, meta: dict, reg: bool, batch_size: int, seed: int,
                 geometry: Geometry, ref: dict | None = None,
                 pixels: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the train split without Ray, forever: each pass visits the shards in a seeded
    order, one at a time, its rows shuffled within the shard."""
    kind = stream_kind(meta) if reg else "pair"
    for epoch in range(1 << 62):
        rng = np.random.default_rng([seed, epoch])
        pending: list[dict[str, np.ndarray]] = []
        yielded = False
        for number in rng.permutation(len(meta["shards"])):
            decoded = shard_rows(location, meta, int(number), kind, reg, geometry, ref, pixels)
            order = rng.permutation(row_count(decoded))
            pending.append({name: values[order] for name, values in decoded.items()})
            while sum(row_count(p) for p in pending) >= batch_size:
                joined = {name: np.concatenate([p[name] for p in pending]) for name in pending[0]}
                yield {name: values[:batch_size] for name, values in joined.items()}
                pending, yielded = [{name: values[batch_size:] for name, values in joined.items()}], True
        if not yielded:
            raise DataError(f"{location}: the train split holds fewer than {batch_size} {kind} rows: "
                            "lower the batch size")


MAX_PASSES = 10_000


def passes_needed(meta: dict, stream: str, steps: int, batch: int) -> int:
    """Passes over the train split a run of `steps` batches reads from one stream, plus one (each pass
    drops a worker's last partial batch), as dataset.json's counts tell; 1 when they do not."""
    train = meta.get("counts", {}).get("splits", {}).get("train", {}) if isinstance(meta.get("counts"), dict) else {}
    rows = train.get("pairs" if stream == "pref" else "images") if isinstance(train, dict) else None
    if not isinstance(rows, int) or rows <= 0:
        return 1
    return min(math.ceil(steps * batch / rows) + 1, MAX_PASSES)


def read_numbered_shards(batch: dict[str, np.ndarray], location: str, meta: dict, kind: str, reg: bool,
                         geometry: Geometry, ref: dict | None = None, pixels: bool = True) -> dict[str, np.ndarray]:
    """What a Ray Data task runs: the shards numbered in `batch["shard"]`, as decoded rows."""
    parts = [shard_rows(location, meta, int(number), kind, reg, geometry, ref, pixels) for number in batch["shard"]]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def ray_datasets(location: str, meta: dict, geometry: Geometry, cpus: float = 1.0, passes: dict[str, int] | None = None,
                 seed: int = 0, ref: dict | None = None, pixels: bool = True) -> dict[str, Any]:
    """The two Ray Data datasets a TorchTrainer splits across its workers (datasets=…): the train
    split's pairs and its clean images. Each is one map over the shards' numbers, `passes[name]`
    passes of them in a seeded order per pass, each shard read through the store (S3 included) and
    checked against dataset.json, then decoded (with its rows' π_ref from `ref`, a π_ref cache, and
    without images when `pixels` is False), in Ray's CPU tasks. One map rather than a read
    per pass chained with Dataset.union, which took several times as long to its first batch
    (docs/results.md has the timings)."""
    import ray.data

    out: dict[str, Any] = {}
    for number, (name, kind, reg) in enumerate((("pref", "pair", False), ("reg", stream_kind(meta), True))):
        rng = np.random.default_rng([seed, number])
        numbers = [int(n) for _ in range((passes or {}).get(name, 1)) for n in rng.permutation(len(meta["shards"]))]
        read = functools.partial(read_numbered_shards, location=location, meta=meta, kind=kind, reg=reg,
                                 geometry=geometry, ref=ref, pixels=pixels)
        out[name] = ray.data.from_items([{"shard": n} for n in numbers]) \
            .map_batches(read, batch_size=1, batch_format="numpy", num_cpus=cpus)
    return out

