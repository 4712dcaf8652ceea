"""Zero-shot classification benchmarks in the layouts users keep them, local or s3://, read for
clip_benchmark's protocol (its class names and prompt templates; prompt ensembles averaged).

- class sub-folders: `<root>/<class>/<image>`, labels in the sorted order of the folders (as
  torchvision's ImageFolder numbers them), class names the folder names (underscores as spaces);
- webdataset shards as clip_benchmark's builder writes them: `<root>/<split>/nshards.txt`,
  `<root>/<split>/0.tar …`, each sample an image (`webp`, `png`, `jpg` or `jpeg`) and its label (`cls`).

Either may carry clip_benchmark's `classnames.txt` (one per label) and
`zeroshot_classification_templates.txt` (`{c}` for the class name); where they do not, the class
names and templates come from clip_benchmark's own lists for the benchmark's name (its `en_*.json`),
and templates fall back to its ImageNet ones, as clip_benchmark does. Images go through the one image
path (EXIF orientation, RGB, the model's geometry).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

from po_cluster.data.images import Geometry, is_image_name
from po_cluster.data.labelled import display_name
from po_cluster.data.pairs import DataError, decode_image, list_files, read_bytes
from po_cluster.data.records import NO_WORD, ImageSet
from po_cluster.data.tar_shards import IMAGE_MEMBERS, ShardError, image_extension, iter_samples
from po_cluster.store.location import exists, join

CLASSNAMES_TXT = "classnames.txt"
TEMPLATES_TXT = "zeroshot_classification_templates.txt"
NSHARDS_TXT = "nshards.txt"
DEFAULT_TEMPLATES_OF = "imagenet1k"  # clip_benchmark's fallback for a dataset without templates of its own


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's name (its metric is `retain_<name>`), where it is, how it is laid out, its classes
    and prompt templates."""

    name: str
    location: str
    layout: str  # "folders" or "webdataset"
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    split: str = "test"


def parse_spec(text: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` → (name, location); a path's name is its last part, less clip_benchmark's
    `wds_` prefix (its published shards are wds_<dataset>)."""
    name, eq, location = text.partition("=")
    if not eq or "/" in name or ":" in name:
        location = text
        name = PurePosixPath(text.rstrip("/")).name.removeprefix("wds_")
    if not name or not location:
        raise DataError(f"--benchmark {text!r}: expected PATH or NAME=PATH (a folder, local or s3://)")
    return name, location


def _clip_benchmark_list(filename: str, name: str) -> list[str] | None:
    """clip_benchmark's own list for dataset `name` from its packaged `filename`, None if it has none."""
    from importlib import resources

    try:
        lists = json.loads(resources.files("clip_benchmark.datasets").joinpath(filename).read_text())
    except ModuleNotFoundError:
        raise DataError("clip_benchmark is not installed: its class names and templates are the benchmark "
                        "protocol (make install installs it)") from None
    value = lists.get(name)
    return list(value) if isinstance(value, list) else None


def _lines(location: str) -> list[str] | None:
    if not exists(location):
        return None
    return [line.strip() for line in read_bytes(location).decode("utf-8-sig").splitlines() if line.strip()]


def _layout(location: str, split: str) -> str:
    if exists(join(location, split, NSHARDS_TXT)):
        return "webdataset"
    return "folders"


def _folder_items(location: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folders in label order, [(file relative to location, label)]) of a class-folder benchmark."""
    files = [name for name in list_files(location) if is_image_name(name) and "/" in name]
    folders = sorted({name.split("/", 1)[0] for name in files})
    if not folders:
        raise DataError(f"{location}: no images in class folders (<root>/<class>/<image>) and no "
                        f"<root>/<split>/{NSHARDS_TXT} of webdataset shards")
    index = {folder: i for i, folder in enumerate(folders)}
    return folders, sorted((name, index[name.split("/", 1)[0]]) for name in files)


def open_benchmark(spec: str, split: str = "test") -> Benchmark:
    """The benchmark `spec` names (parse_spec), its layout, class names and templates resolved."""
    name, location = parse_spec(spec)
    layout = _layout(location, split)
    classnames = _lines(join(location, CLASSNAMES_TXT))
    if classnames is None and layout == "folders":
        classnames = [display_name(folder) for folder in _folder_items(location)[0]]
    classnames = classnames or _clip_benchmark_list("en_classnames.json", name)
    if not classnames:
        raise DataError(f"{location}: no {CLASSNAMES_TXT}, and clip_benchmark has no class names for {name!r}")
    templates = _lines(join(location, TEMPLATES_TXT)) or _clip_benchmark_list(
        "en_zeroshot_classification_templates.json", name) or _clip_benchmark_list(
        "en_zeroshot_classification_templates.json", DEFAULT_TEMPLATES_OF)
    bad = [t for t in templates or () if "{c}" not in t]
    if not templates or bad:
        raise DataError(f"{join(location, TEMPLATES_TXT)}: templates must each hold {{c}} for the class name: {bad}")
    return Benchmark(name, location, layout, tuple(classnames), tuple(templates), split)


@dataclass(frozen=True)
class Example:
    key: str  # the file's path, or the shard and sample key
    label: int
    data: bytes | None = None  # the encoded image when it is at hand (a shard's)
    file: str | None = None  # else where to read it


def _shard_examples(bench: Benchmark, wanted: set[str] | None) -> Iterator[Example]:
    shards_dir = join(bench.location, bench.split)
    try:
        count = int(read_bytes(join(shards_dir, NSHARDS_TXT)).decode().strip())
    except ValueError:
        raise DataError(f"{join(shards_dir, NSHARDS_TXT)}: not a number of shards") from None
    for number in range(count):
        shard = join(shards_dir, f"{number}.tar")
        try:
            for sample in iter_samples(shard):
                key = f"{number}/{sample.key}"
                if wanted is not None and key not in wanted:
                    continue
                extension = image_extension(sample)
                image = sample.members[extension] if extension else None
                label = sample.members.get("cls")
                if image is None or label is None:
                    missing = "an image (" + ", ".join(IMAGE_MEMBERS) + ")" if image is None else "its label (cls)"
                    raise DataError(f"{shard}: sample {sample.key} has no {missing}")
                yield Example(key, _label(label, f"{shard}: sample {sample.key}", len(bench.classnames)), image)
        except ShardError as error:
            raise DataError(str(error)) from None


def _label(raw: bytes, where: str, classes: int) -> int:
    try:
        label = int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{where}: label {raw[:20]!r} is not a class index") from None
    if not 0 <= label < classes:
        raise DataError(f"{where}: label {label} is not one of the {classes} classes")
    return label


def examples(bench: Benchmark, wanted: set[str] | None = None) -> Iterator[Example]:
    """The benchmark's examples in order (only the keys in `wanted`, when given; others are not decoded)."""
    if bench.layout == "webdataset":
        yield from _shard_examples(bench, wanted)
        return
    folders, items = _folder_items(bench.location)
    if len(folders) != len(bench.classnames):
        raise DataError(f"{bench.location}: {len(folders)} class folders but {len(bench.classnames)} class names")
    for name, label in items:
        if wanted is None or name in wanted:
            yield Example(name, label, file=join(bench.location, name))


def keys_and_labels(bench: Benchmark) -> list[tuple[str, int]]:
    """Every example's key and label: a listing for folders, one pass over the shards for webdataset."""
    if bench.layout == "folders":
        return _folder_items(bench.location)[1]
    return [(example.key, example.label) for example in _shard_examples(bench, None)]


def batches(bench: Benchmark, geometry: Geometry, wanted: set[str] | None = None,
            size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images [n, S, S, 3] fitted by `geometry`, labels [n]) in batches of at most `size`."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for example in examples(bench, wanted):
        where = example.file or join(bench.location, bench.split, example.key)
        data = example.data if example.data is not None else read_bytes(str(example.file))
        images.append(np.asarray(geometry.fit(decode_image(data, where)), dtype=np.uint8))
        labels.append(example.label)
        if len(images) == size:
            yield np.stack(images), np.array(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.array(labels, dtype=np.int64)


def as_image_set(bench: Benchmark, geometry: Geometry, wanted: set[str] | None = None) -> ImageSet:
    """The benchmark's examples (those in `wanted`) in memory, as an evaluation set with its templates."""
    parts = list(batches(bench, geometry, wanted))
    if not parts:
        raise DataError(f"{bench.location}: no examples" + (" selected" if wanted is not None else ""))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSet(images, labels, np.full(len(labels), NO_WORD), bench.classnames, templates=bench.templates)


def split_keys(keys: list[str], val: int, test: int | None, seed: int) -> tuple[set[str], set[str]]:
    """A seeded validation subset of `val` keys and the test keys (the others, at most `test`), chosen
    by a hash of each key: the same examples whatever order a listing gives them in."""
    ranked = sorted(keys, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).digest())
    rest = ranked[val:]
    return set(ranked[:val]), set(rest if test is None else rest[:test])
