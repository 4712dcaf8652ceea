"""The typo-shapes world written as a built dataset (Parquet shards), split as the world is.

A sweep on the world reads its sets from the renderer; a sweep on this dataset reads the same
images from shards, as it would a user's. The splits are the world's own: `train` holds the
preference records and regularisation images a run on the world trains on (data.n_pairs, n_reg,
own_word, seed), `val` the world's validation sets and `test` its fixed evaluation sets (their
clean and attacked kinds: the word-only and own-word kinds have no preference records), so a
release scores the same on the test split as on the world (the images are PNG, lossless, at the
world's size).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from po_cluster.config import DataConfig
from po_cluster.data import world
from po_cluster.data.pairs import DATASET_JSON
from po_cluster.data.records import ImageSet
from po_cluster.data.selection import evaluation_sets
from po_cluster.data.shards import FORMAT, FORMAT_VERSION, LIGHT_KEYS, ShardWriter, split_counts
from po_cluster.data.splits import Split
from po_cluster.store.location import join, remove, write_bytes


@dataclass(frozen=True)
class WorldDatasetSummary:
    out: str
    counts: dict[str, dict[str, int]]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(split: Split, name: str, images: ImageSet, kind: str) -> list[dict]:
    """One row per image: a pair (chosen = the drawn shape, rejected = the written word) or a
    regularisation image (text = its shape, whatever is written on it)."""
    out = []
    for i, (image, label, word) in enumerate(zip(images.images, images.labels, images.written, strict=True)):
        shape = world.SHAPES[int(label)]
        row = {"kind": kind, "id": f"{split}-{name}-{i:06d}", "split": split, "source": f"{split}-{name}-{i:06d}",
               "label": shape, "image_name": f"{split}/{name}/{i:06d}.png", "image": _png(image)}
        if kind == "pair":
            written = world.SHAPES[int(word)]
            row |= {"chosen": world.PROMPT_TEMPLATE.format(shape), "rejected": world.PROMPT_TEMPLATE.format(written),
                    "written": written}
        else:
            row["text"] = world.PROMPT_TEMPLATE.format(shape)
        out.append(row)
    return out


def _world_sets(n_pairs: int, n_reg: int, n_val: int, seed: int,
                own_word: float) -> list[tuple[Split, str, ImageSet, str]]:
    """The world's sets as (split, name, images, record kind), in the order they are written."""
    pref = world.preference_set(n_pairs, seed)
    attacked = ImageSet(pref.images, pref.chosen, pref.rejected, pref.classnames)
    val, test = world.validation_sets(n_val), evaluation_sets()
    reg = world.regularisation_set(n_reg, seed + 1, own_word)
    return [("train", "attacked", attacked, "pair"), ("train", "reg", reg, "regularization"),
            ("val", "attacked", val["attacked"], "pair"), ("val", "clean", val["clean"], "regularization"),
            ("test", "attacked", test["attacked"], "pair"), ("test", "clean", test["clean"], "regularization")]


def write_world_dataset(out: str, n_pairs: int = 4096, n_reg: int = 2048, n_val: int = 500, seed: int = 0,
                        rows_per_shard: int = 1024, own_word: float | None = None) -> WorldDatasetSummary:
    """Render the world's sets and write them as shards under `out`, dataset.json last. `own_word`:
    as data.own_word, whose default it takes when None."""
    own_word = DataConfig().own_word if own_word is None else own_word
    if min(n_pairs, n_reg, n_val, rows_per_shard) <= 0:
        raise ValueError("n_pairs, n_reg, n_val and rows_per_shard must be positive")
    if not 0 <= own_word <= 1:
        raise ValueError(f"own_word is a share of the regularisation images, in [0, 1]; got {own_word}")
    remove(join(out, DATASET_JSON))  # a rebuild in progress is not a complete dataset
    writer, light = ShardWriter(out, rows_per_shard), list[dict]()
    # One set at a time: the encoded images of the whole world are not held at once.
    for split, name, images, kind in _world_sets(n_pairs, n_reg, n_val, seed, own_word):
        rows = _rows(split, name, images, kind)
        writer.add(rows)
        light.extend({k: row.get(k) for k in LIGHT_KEYS} for row in rows)
    counts = split_counts(light)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "classes": list(world.SHAPES),
            "candidates": world.prompts(), "image_size": world.IMAGE_SIZE,
            "counts": {"pairs": sum(c["pairs"] for c in counts.values()), "splits": counts},
            "shards": [info.to_json() for info in writer.close()],
            "config": {"world": "typo_shapes", "n_pairs": n_pairs, "n_reg": n_reg, "n_val": n_val, "seed": seed,
                       "own_word": own_word}}
    write_bytes(join(out, DATASET_JSON), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return WorldDatasetSummary(out, counts)
