"""Labelled image sets, the typographic builder's input: a folder with one sub-folder per class, a
.jsonl / .csv manifest of (path, label), or webdataset shards (data.tar_shards), local or s3://.

A shard's sample is its image and its label: the `cls` member, else the `label` field of its `json`
member, else its `txt` member (img2dataset writes a caption there; a classification set its class).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from po_cluster.data.images import IMAGE_EXTENSIONS, is_image_name
from po_cluster.data.pairs import DataError, jsonl_objects, line_error, list_files, read_bytes
from po_cluster.data.tar_shards import (
    IMAGE_MEMBERS,
    Fault,
    Member,
    Sample,
    ShardError,
    ShardSet,
    folder_shards,
    image_extension,
    named_shards,
    read_member,
    walk,
)
from po_cluster.store.location import is_s3, join, parent, resolve


@dataclass(frozen=True)
class LabelledImage:
    location: str  # where to read it: the file, or the shard that holds it
    name: str  # its path relative to the source, for the records (`00000.tar/000000012.jpg` in a shard)
    label: str
    member: Member | None = None  # its place in the shard, when it is in one

    @property
    def where(self) -> str:
        """The image as an error names it."""
        return f"{self.location}/{self.member.name}" if self.member else self.location

    def read(self) -> bytes:
        if self.member is None:
            return read_bytes(self.location)
        try:
            return read_member(self.location, self.member)
        except ShardError as error:
            raise DataError(str(error)) from None


@dataclass
class LabelledSet:
    items: list[LabelledImage]  # sorted by (label, name)
    faults: list[Fault]  # samples left out, each named with the reason (a shard's missing label or image)


def display_name(raw: str) -> str:
    """Folder names use underscores for spaces (golden_retriever); prompts and written words do not."""
    return " ".join(raw.replace("_", " ").split())


def read_labelled(source: str) -> LabelledSet:
    """A labelled image set: a folder with one sub-folder per class, a .jsonl / .csv manifest, or shards."""
    labelled = _read_source(source)
    if not labelled.items:
        raise DataError(f"{source}: no images found" + "".join(f"; {f.where}: {f.reason}" for f in labelled.faults[:3]))
    labelled.items.sort(key=lambda item: (item.label, item.name))
    return labelled


def _read_source(source: str) -> LabelledSet:
    if source.lower().endswith((".jsonl", ".csv")):
        return LabelledSet(_read_manifest(source), [])
    shards = named_shards(source)
    if shards is not None:
        return _read_shards(shards)
    files = list_files(source)
    shards = folder_shards(source, files)
    return _read_shards(shards) if shards is not None else LabelledSet(_read_class_folders(source, files), [])


def sample_label(sample: Sample) -> str | None:
    """The sample's class as text (cls, else json's label, else txt); None when it has none readable."""
    members = sample.members
    try:
        if "cls" in members:
            text = members["cls"].decode("utf-8")
        elif "json" in members:
            value = json.loads(members["json"]).get("label")
            text = str(value) if isinstance(value, str | int) else ""
        else:
            text = members.get("txt", b"").decode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None  # AttributeError: a json member that is not an object
    return display_name(text) or None


def _read_shards(shards: ShardSet) -> LabelledSet:
    items, faults = [], []
    for name, sample in walk(shards):
        if isinstance(sample, Fault):
            faults.append(sample)
            continue
        extension, label = image_extension(sample), sample_label(sample)
        if extension is None:
            faults.append(Fault(f"{sample.shard}/{sample.key}", f"no image ({', '.join(IMAGE_MEMBERS)})"))
            continue
        member = sample.places[extension]
        if label is None:
            faults.append(Fault(f"{sample.shard}/{member.name}", "no label (cls, json with a label, or txt)"))
            continue
        items.append(LabelledImage(sample.shard, f"{name}/{member.name}", label, member))
    return LabelledSet(items, faults)


def _read_class_folders(root: str, files: list[str]) -> list[LabelledImage]:
    items = []
    for name in files:
        if not is_image_name(name):
            continue  # READMEs, .DS_Store, label files: not part of the set
        if "/" not in name:
            raise DataError(f"{join(root, name)}: image outside any class folder (expected {root}/<class>/<image>)")
        items.append(LabelledImage(join(root, name), name, display_name(name.split("/", 1)[0])))
    if not is_s3(root):  # S3 has no empty folders; on disk an empty class is a mistake worth naming
        with_images = {item.name.split("/", 1)[0] for item in items}
        for sub in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if sub.name not in with_images:
                raise DataError(f"{sub}: class folder with no images ({', '.join(IMAGE_EXTENSIONS)})")
    return items


class _ManifestLine(BaseModel):
    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1)
    label: str = Field(min_length=1)


def _manifest_rows(manifest: str) -> Iterator[tuple[int, object]]:
    text = read_bytes(manifest).decode("utf-8-sig")
    if manifest.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{manifest}:1: the CSV header must name the columns path and label")
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
        return
    yield from jsonl_objects(manifest, text)


def _read_manifest(manifest: str) -> list[LabelledImage]:
    base = parent(manifest)
    items = []
    for number, row in _manifest_rows(manifest):
        if not isinstance(row, dict):
            raise DataError(f"{manifest}:{number}: expected an object with path and label")
        try:
            line = _ManifestLine.model_validate(row)
        except ValidationError as error:
            raise line_error(f"{manifest}:{number}", error) from None
        items.append(LabelledImage(resolve(base, line.path), line.path, display_name(line.label)))
    return items
