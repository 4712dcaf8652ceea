"""Labelled image sets, the typographic builder's input: a folder with one sub-folder per class, or a
.jsonl / .csv manifest of (path, label), local or s3://."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from po_cluster.data.images import IMAGE_EXTENSIONS, is_image_name
from po_cluster.data.pairs import DataError, jsonl_objects, line_error, list_files, read_bytes
from po_cluster.store.location import is_s3, join, parent, resolve


@dataclass(frozen=True)
class LabelledImage:
    location: str  # where to read it
    name: str  # its path relative to the source, for the records
    label: str


def display_name(raw: str) -> str:
    """Folder names use underscores for spaces (golden_retriever); prompts and written words do not."""
    return " ".join(raw.replace("_", " ").split())


def read_labelled(source: str) -> list[LabelledImage]:
    """A labelled image set: a folder with one sub-folder per class, or a .jsonl / .csv manifest."""
    items = _read_manifest(source) if source.lower().endswith((".jsonl", ".csv")) else _read_class_folders(source)
    if not items:
        raise DataError(f"{source}: no images found")
    return sorted(items, key=lambda item: (item.label, item.name))


def _read_class_folders(root: str) -> list[LabelledImage]:
    files = list_files(root)
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
