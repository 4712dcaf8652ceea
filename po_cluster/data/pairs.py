"""Preference data from files: JSONL pairs (docs/records.md), built datasets,
labelled image folders and manifests, local or s3://.

Everything read here is data (JSON, CSV, images); nothing is unpickled. Images
of any size are decoded (EXIF orientation applied) and fitted to the model's square
by its own preprocessing (`Geometry`, open_clip's resize and crop of that model) as
they are read, by po_cluster.data.images, so the records hold uint8 HxWx3 arrays of
one shape. The model-side conversion (`to_model_input`) and the serving endpoint use
the same functions, so a file gets the same pixels here as when it is served.

A dataset fitted when it was built (the typographic builder's) records how (dataset.json's
"preprocess") and is read for a model of that geometry only: fitting its squares again
would feed the model other pixels than open_clip's transform of the sources gives.

Files are read through po_cluster.store.location (S3 endpoint, region and
credentials from boto3's own chain, e.g. AWS_ENDPOINT_URL).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from po_cluster.data import images
from po_cluster.data.images import Geometry
from po_cluster.data.records import NO_WORD, ImageSet, PreferenceSet
from po_cluster.data.shards import ShardError, read_shard
from po_cluster.data.splits import SPLITS, Split, hashed_split
from po_cluster.store import location as store_location
from po_cluster.store.location import StoreError, exists, join, parent, resolve

DEFAULT_IMAGE_SIZE = 224  # ViT-B-32's input: a dataset of source images read with no model named
DATASET_JSON = "dataset.json"  # written last by the builder: its presence means complete
PAIRS_JSONL = "pairs.jsonl"
REG_JSONL = "regularization.jsonl"
TEXT_TEMPLATE = "{}"  # records carry whole prompts, so the candidate texts are used as they are
_READ_WORKERS = 8  # image reads are I/O (S3) or C decoding; threads overlap them


class DataError(ValueError):
    """Input data that cannot be used; the message names the file (and line) and the problem."""


# ---------------------------------------------------------------- locations: a local path or s3://bucket/key
# Reads go through po_cluster.store.location; what cannot be read is a DataError naming it.


@contextmanager
def _data_errors() -> Iterator[None]:
    try:
        yield
    except StoreError as error:
        raise DataError(str(error)) from None


def read_bytes(location: str) -> bytes:
    """The bytes of a data file or object; DataError when it is missing or unreadable."""
    with _data_errors():
        return store_location.read_bytes(location)


def list_files(root: str) -> list[str]:
    """Every file under a folder or S3 prefix, recursively, relative to it, sorted; DataError when there is none."""
    with _data_errors():
        return store_location.list_files(root)


# ---------------------------------------------------------------- images: data.images, with the source named


def decode_image(data: bytes, source: str) -> Image.Image:
    """RGB, EXIF orientation applied (phone photos), or a DataError naming the source."""
    try:
        return images.decode(data)
    except images.ImageRefused as refused:
        raise DataError(f"{source}: {refused.message}") from None


def load_image(location: str, geometry: Geometry, data: bytes | None = None) -> np.ndarray:
    """uint8 [size, size, 3]: decoded and fitted as served images are (data.images). `data`: the
    encoded bytes when they are at hand (a shard's), else read from `location`."""
    encoded = read_bytes(location) if data is None else data
    return np.asarray(geometry.fit(decode_image(encoded, location)), dtype=np.uint8)


def load_images(locations: list[str], geometry: Geometry, data: list[bytes | None] | None = None) -> np.ndarray:
    """uint8 [N, size, size, 3], in the order given."""
    out = np.empty((len(locations), geometry.size, geometry.size, 3), dtype=np.uint8)
    encoded = data if data is not None else [None] * len(locations)
    with ThreadPoolExecutor(_READ_WORKERS) as pool:
        for i, array in enumerate(pool.map(lambda job: load_image(job[0], geometry, job[1]),
                                           zip(locations, encoded, strict=True))):
            out[i] = array
    return out


# ---------------------------------------------------------------- JSON lines


def line_error(where: str, error: ValidationError) -> DataError:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'line'}: {e['msg']}" for e in error.errors())
    return DataError(f"{where}: {problems}")


def jsonl_objects(source: str, text: str) -> Iterator[tuple[int, object]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}:{number}: not valid JSON ({error.msg})") from None


# ---------------------------------------------------------------- preference records (docs/records.md)


class PairLine(BaseModel):
    """One preference record: the image, the text to prefer, the text to avoid."""

    model_config = ConfigDict(extra="allow")  # builders add provenance (label, written, source)
    kind: Literal["pair"] = "pair"
    image: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    id: str | None = None
    split: Split | None = None  # None in the file: from a hash of its source (po_cluster.data.splits)
    _data: bytes | None = PrivateAttr(None)  # the encoded image, when a shard holds it


class RegLine(BaseModel):
    """One clean regularisation image; `text`, when given, is its correct candidate."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["regularization"]
    image: str = Field(min_length=1)
    text: str | None = Field(None, min_length=1)
    id: str | None = None
    split: Split | None = None
    _data: bytes | None = PrivateAttr(None)


def parse_record(row: object, where: str) -> PairLine | RegLine:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object like {{\"image\": …, \"chosen\": …, \"rejected\": …}}")
    try:
        if row.get("kind", "pair") == "regularization":
            return RegLine.model_validate(row)
        record = PairLine.model_validate(row)
    except ValidationError as error:
        raise line_error(where, error) from None
    if record.chosen == record.rejected:
        raise DataError(f"{where}: chosen and rejected are the same text {record.chosen!r}")
    return record


def read_records(jsonl: str) -> tuple[list[PairLine], list[RegLine]]:
    """Parse a JSONL records file; image paths come back resolved against the file's folder."""
    base = parent(jsonl)
    pairs: list[PairLine] = []
    regs: list[RegLine] = []
    text = read_bytes(jsonl).decode("utf-8-sig")
    for number, row in jsonl_objects(jsonl, text):
        record = parse_record(row, f"{jsonl}:{number}")
        # A record's split follows its source image; the key is the path as written, the same anywhere.
        split = record.split or hashed_split(str((record.model_extra or {}).get("source") or record.image))
        record = record.model_copy(update={"image": resolve(base, record.image), "split": split})
        if isinstance(record, PairLine):
            pairs.append(record)
        else:
            regs.append(record)
    return pairs, regs


@dataclass(frozen=True)
class RecordFiles:
    """What a dataset location holds: records, and the builder's metadata when it wrote them."""

    pairs: list[PairLine]
    regs: list[RegLine]
    meta: dict


def _shard_records(location: str, shards: object, split: Split | None) -> tuple[list[PairLine], list[RegLine]]:
    """A sharded dataset's rows (of one split, or all) as records, each holding its encoded image.
    Shards are read one at a time: what is held is one shard and the rows kept."""
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{join(location, DATASET_JSON)}: 'shards' must be a non-empty list")
    try:
        with _data_errors():
            rows = [row for info in shards for row in read_shard(location, info)
                    if split is None or row.get("split") in (split, None)]
    except ShardError as error:
        raise DataError(str(error)) from None
    pairs: list[PairLine] = []
    regs: list[RegLine] = []
    for number, row in enumerate(rows):
        data = row.pop("image")
        where = join(location, str(row.get("image_name") or f"row {number}"))
        record = parse_record({k: v for k, v in row.items() if v is not None} | {"image": where}, where)
        if record.split is None:
            record = record.model_copy(update={"split": hashed_split(str(row.get("source") or where))})
        record._data = data
        if isinstance(record, PairLine):
            pairs.append(record)
        else:
            regs.append(record)
    return pairs, regs


def _read_built(location: str, split: Split | None) -> tuple[list[PairLine], list[RegLine], dict]:
    """A built dataset folder: dataset.json, then its Parquet shards (or, from format version 2 and
    before, pairs.jsonl and regularization.jsonl beside image files)."""
    meta_location = join(location, DATASET_JSON)
    if not exists(meta_location):
        raise DataError(f"{location}: not a built dataset (no {DATASET_JSON}; an interrupted build writes none)"
                        " and not a .jsonl records file")
    try:
        meta = json.loads(read_bytes(meta_location))
    except json.JSONDecodeError as error:
        raise DataError(f"{meta_location}: not valid JSON ({error.msg})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_location}: expected a JSON object")
    if "shards" in meta:
        return (*_shard_records(location, meta["shards"], split), meta)
    pairs, regs = read_records(join(location, PAIRS_JSONL))
    if exists(join(location, REG_JSONL)):
        more_pairs, more_regs = read_records(join(location, REG_JSONL))
        pairs, regs = pairs + more_pairs, regs + more_regs
    return pairs, regs, meta


def read_dataset(location: str, split: Split | None = None) -> RecordFiles:
    """A JSONL records file, or a built dataset (local folder or s3:// prefix with a dataset.json);
    with `split`, that split's records only (a sharded dataset keeps no other rows as it reads)."""
    if location.lower().endswith(".jsonl"):
        pairs, regs = read_records(location)
        meta: dict = {}
    else:
        pairs, regs, meta = _read_built(location, split)
    if split is not None:
        return select_split(RecordFiles(pairs, regs, meta), split, location)
    if not pairs:
        raise DataError(f"{location}: no preference pairs")
    return RecordFiles(pairs, regs, meta)


def candidate_texts(files: RecordFiles) -> tuple[str, ...]:
    """The candidate set: the builder's list when there is one, else every distinct text, sorted."""
    texts = {text for p in files.pairs for text in (p.chosen, p.rejected)}
    texts |= {r.text for r in files.regs if r.text is not None}
    listed = tuple(files.meta.get("candidates", ()))
    return listed + tuple(sorted(texts - set(listed)))


def _subset(n: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """All rows, or a seeded subset of `cap` rows in file order."""
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=cap, replace=False))


def select_split(files: RecordFiles, split: Split, location: str) -> RecordFiles:
    """The records of one split; DataError when that split has no pairs."""
    chosen = RecordFiles([p for p in files.pairs if p.split == split], [r for r in files.regs if r.split == split],
                         files.meta)
    if not chosen.pairs:
        stated = files.meta.get("counts", {}).get("splits") if isinstance(files.meta.get("counts"), dict) else None
        counts = ", ".join(f"{stated[s]['pairs']} {s}" if isinstance(stated, dict) and s in stated
                           else f"{sum(p.split == s for p in files.pairs)} {s}" for s in SPLITS)
        raise DataError(f"{location}: no preference pairs in the {split} split (pairs per split: {counts}); "
                        "a dataset needs source images in every split it is trained, chosen or scored on")
    return chosen


def stored_geometry(meta: dict) -> Geometry | None:
    """How a dataset's stored images were fitted, when they were (None: they are source images, to fit
    when read: the world's renders, ingested files). A typographic build from before datasets recorded
    it fitted the shorter side to its image_size, bicubic."""
    recorded = meta.get("preprocess")
    if isinstance(recorded, dict):
        try:
            return Geometry(**recorded)
        except (TypeError, ValueError) as error:
            raise DataError(f"{DATASET_JSON}: preprocess {recorded!r} is not usable: {error}") from None
    config = meta.get("config")
    if isinstance(config, dict) and "variants" in config and "image_size" in meta:
        return Geometry(int(meta["image_size"]))
    return None


def _describe(geometry: Geometry) -> str:
    return f"{geometry.size} px ({geometry.resize_mode}, {geometry.interpolation})"


def dataset_geometry(meta: dict, wanted: Geometry | None, location: str) -> Geometry:
    """The geometry a dataset's images are read with for a model fitting them by `wanted` (None: no model,
    the dataset's own). DataError when its images were fitted otherwise: the fix is to rebuild it."""
    stored = stored_geometry(meta)
    if wanted is None:
        return stored or Geometry(int(meta.get("image_size", DEFAULT_IMAGE_SIZE)))
    if stored is not None and stored != wanted:
        raise DataError(f"{location}: its images were fitted to {_describe(stored)} when it was built; the "
                        f"model takes {_describe(wanted)}: rebuild it for this model (po-cluster data typographic "
                        "--model NAME [--pretrained TAG]), so it trains on the pixels it was pretrained on")
    return wanted


def load_preference_data(location: str, geometry: Geometry | None = None, n_pairs: int | None = None,
                         n_reg: int | None = None, seed: int = 0,
                         split: Split | None = None) -> tuple[PreferenceSet, ImageSet]:
    """The trainer's records from a JSONL file or a built dataset: one split's, or all for None.

    Class indices point into the candidate texts of the whole dataset (`TEXT_TEMPLATE` turns them
    into prompts), so every split shares them. Without regularisation lines, the pair images serve
    as the clean set.
    """
    files = read_dataset(location, split)
    # A built dataset lists every candidate; a JSONL file's come from all its records, whatever the split.
    texts = candidate_texts(files if "candidates" in files.meta or split is None else read_dataset(location))
    geometry = dataset_geometry(files.meta, geometry, location)
    index = {text: i for i, text in enumerate(texts)}
    rng = np.random.default_rng(seed)
    pairs = [files.pairs[i] for i in _subset(len(files.pairs), n_pairs, rng)]
    pref = PreferenceSet(load_images([p.image for p in pairs], geometry, [p._data for p in pairs]),
                         np.array([index[p.chosen] for p in pairs], dtype=np.int64),
                         np.array([index[p.rejected] for p in pairs], dtype=np.int64), texts)
    if files.regs:
        regs = [files.regs[i] for i in _subset(len(files.regs), n_reg, rng)]
        labels = np.array([index[r.text] if r.text is not None else NO_WORD for r in regs], dtype=np.int64)
        reg = ImageSet(load_images([r.image for r in regs], geometry, [r._data for r in regs]), labels,
                       np.full(len(regs), NO_WORD), texts)
    else:
        keep = _subset(len(pref), n_reg, rng)
        reg = ImageSet(pref.images[keep], pref.chosen[keep], np.full(len(keep), NO_WORD), texts)
    return pref, reg


def dataset_eval_sets(location: str, split: Split, geometry: Geometry | None = None) -> dict[str, ImageSet]:
    """A dataset split as evaluation sets: "attacked" (each pair's image, scored against its chosen
    text, `attack_success` = the rejected one) and "clean" (the split's regularisation images that
    name their text; without any, the pair images labelled with their chosen text)."""
    pref, reg = load_preference_data(location, geometry, split=split)
    labelled = reg.labels != NO_WORD
    clean = reg.take(np.flatnonzero(labelled)) if labelled.any() else \
        ImageSet(pref.images, pref.chosen, np.full(len(pref), NO_WORD), pref.classnames)
    return {"clean": clean, "attacked": ImageSet(pref.images, pref.chosen, pref.rejected, pref.classnames)}
