"""Records written by hand (docs/records.md) → a built dataset of Parquet shards.

A JSONL file names one image file per record; on S3 every reader of every trial would
GET each one. Ingesting reads each image once, checks that it decodes, and writes the
records with their encoded bytes (unchanged: a JPEG stays the JPEG it was) into shards,
with `dataset.json` last. Splits are the records' own, or from a hash of their source
(po_cluster.data.splits), so an ingested dataset splits as its JSONL file does.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from po_cluster.data import images
from po_cluster.data.pairs import DATASET_JSON, DataError, PairLine, RegLine, candidate_texts, read_bytes, read_dataset
from po_cluster.data.shards import FORMAT, FORMAT_VERSION, LIGHT_KEYS, ShardWriter, split_counts
from po_cluster.store.location import join, remove, write_bytes

_EXTRA = ("label", "written", "source", "font", "font_px", "fill", "outline")


@dataclass(frozen=True)
class IngestSummary:
    out: str
    pairs: int
    regularization: int
    counts: dict[str, dict[str, int]]


def _row(record: PairLine | RegLine) -> dict:
    """A record as a shard row, its image read and checked to decode (named when it does not)."""
    data = read_bytes(record.image)
    try:
        images.decode(data)
    except images.ImageRefused as refused:
        raise DataError(f"{record.image}: {refused.message}") from None
    extra = record.model_extra or {}
    row = {"kind": record.kind, "id": record.id, "split": record.split, "image_name": record.image, "image": data,
           **{k: extra.get(k) for k in _EXTRA}}
    if isinstance(record, PairLine):
        return row | {"chosen": record.chosen, "rejected": record.rejected}
    return row | {"text": record.text}


def ingest_records(source: str, out: str, rows_per_shard: int = 1024, workers: int = 8) -> IngestSummary:
    """Write `source` (a JSONL records file, or a dataset built before shards) as shards under `out`."""
    if rows_per_shard <= 0 or workers <= 0:
        raise ValueError(f"rows_per_shard ({rows_per_shard}) and workers ({workers}) must be positive")
    files = read_dataset(source)
    records: list[PairLine | RegLine] = [*files.pairs, *files.regs]
    remove(join(out, DATASET_JSON))  # a rebuild in progress is not a complete dataset
    writer, light = ShardWriter(out, rows_per_shard), list[dict]()
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(records), rows_per_shard):  # one shard's images in memory at a time
            rows = list(pool.map(_row, records[start:start + rows_per_shard]))
            writer.add(rows)
            light.extend({k: row.get(k) for k in LIGHT_KEYS} for row in rows)
    shards = writer.close()
    counts = split_counts(light)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "candidates": list(candidate_texts(files)),
            "counts": {"pairs": len(files.pairs), "regularization": len(files.regs), "splits": counts},
            "shards": [info.to_json() for info in shards], "ingested_from": source}
    if "image_size" in files.meta:
        meta["image_size"] = files.meta["image_size"]
    write_bytes(join(out, DATASET_JSON), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return IngestSummary(out, len(files.pairs), len(files.regs), counts)
