"""The typographic builder: any labelled image set → preference data (docs/design.md, "Preference data").

Each image gets `variants` attacked copies, each with the name of a different,
randomly chosen *other* class written on it; the record prefers the true class's
prompt over the written one's, and the clean image goes to the regularisation
set (in the train split a share `own_word` of them with their own class name
written, so that the KL term holds the answer where word and image agree).
Every random choice comes from a generator seeded by (seed, image index), so a
build is a pure function of its inputs and config, whatever the order or
parallelism in which images are processed.

Output (a local folder or an s3:// prefix), the records of docs/records.md in Parquet shards:
    shards/part-<n>.parquet   (rows: a clean image's regularisation record, then its attacked copies'
                               preference pairs; each with its split, provenance and PNG bytes)
    dataset.json   (classes, candidates, counts per split, the shards with their sha256, config, and
                    the inputs skipped with the reason; written last: it marks a complete build)

A bad input (an image that does not decode, a shard's sample without a label or image, a damaged
shard) is skipped and named in `skipped`: one bad image among millions does not cost the build, and
the images already written stay.

Splits are made by source image, stratified by class (po_cluster.data.splits): the clean copy and
every attacked copy of one image share its split.
"""
from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont
from pydantic import Field, field_validator, model_validator

from po_cluster.config import ModelConfig, Strict
from po_cluster.data import pairs as io_
from po_cluster.data.images import Geometry, Interpolation, ResizeMode
from po_cluster.data.labelled import LabelledImage, read_labelled
from po_cluster.data.pairs import DataError
from po_cluster.data.shards import FORMAT, FORMAT_VERSION, LIGHT_KEYS, ShardWriter, split_counts
from po_cluster.data.splits import DEFAULT_FRACTIONS, Split, assign_splits, check_fractions
from po_cluster.data.tar_shards import Fault
from po_cluster.store.location import join, remove, write_bytes

MIN_FONT_PX = 8  # below this the bundled font's glyphs stop being legible
MARGIN = 0.03  # keep the text this fraction of the side away from the border

Fraction = Annotated[float, Field(gt=0, le=1)]


class TypographicConfig(Strict):
    source: str = Field(description="class folders (<root>/<class>/<image>), a .jsonl/.csv manifest (path,label), "
                        "or webdataset shards (a folder of .tar, one .tar, or a brace pattern {00000..00009}.tar)")
    out: str = Field(description="output folder or s3:// prefix")
    variants: int = Field(1, gt=0, description="attacked copies per image, each with a different wrong class")
    seed: int = 0
    image_size: int = Field(224, ge=32, description="images are fitted to this square *before* writing, so the "
                            "model's crop keeps the text")
    resize_mode: ResizeMode = Field("shortest", description="how they are fitted, as open_clip's preprocessing "
                                    "(shortest: shorter side and centre crop; longest: padded; squash)")
    interpolation: Interpolation = "bicubic"
    fill_color: int = Field(0, ge=0, le=255, description="grey level of `longest`'s padding")
    model: ModelConfig | None = Field(None, description="the model the dataset is for (a run's `model` section): "
                                      "its open_clip preprocessing fits the images, instead of image_size, "
                                      "resize_mode, interpolation and fill_color; no weights are read")
    prompt_template: str = "a photo of a {}."
    fonts: tuple[str, ...] = Field((), description=".ttf/.otf paths; empty: Pillow's bundled font")
    font_size: tuple[Fraction, Fraction] = Field((0.08, 0.18), description="text height range, fraction of side")
    fill_colors: tuple[str, ...] = ("white", "black", "red", "yellow", "blue", "lime")
    outline_colors: tuple[str, ...] = ("black", "white")
    splits: tuple[float, float, float] = Field(DEFAULT_FRACTIONS, description="train, val, test fractions of "
                                              "the source images (per class; every copy of an image in one split)")
    own_word: float = Field(0.25, ge=0, le=1, description="share of the train split's regularisation images that "
                            "get their own class name written (docs/design.md, 'Ignoring the word, not avoiding "
                            "it'); val and test keep them clean")
    rows_per_shard: int = Field(1024, gt=0, description="records (clean and attacked images) per Parquet shard")
    workers: int = Field(4, gt=0, description="images processed at once (threads)")

    @field_validator("splits")
    @classmethod
    def _fractions(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_fractions(value)

    @field_validator("prompt_template")
    @classmethod
    def _one_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError("must contain exactly one {} for the class name")
        return value

    @field_validator("fill_colors", "outline_colors")
    @classmethod
    def _colours(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError("needs at least one colour")
        for value in values:
            ImageColor.getrgb(value)  # raises ValueError naming the colour
        return values

    @field_validator("fonts")
    @classmethod
    def _fonts_load(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for path in values:
            try:
                ImageFont.truetype(path, 12)
            except OSError as error:
                raise ValueError(f"cannot load font {path}: {error}") from None
        return values

    @model_validator(mode="after")
    def _size_range(self) -> TypographicConfig:
        if self.font_size[0] > self.font_size[1]:
            raise ValueError(f"font_size range {self.font_size} is reversed")
        given = sorted(self.model_fields_set & {"image_size", "resize_mode", "interpolation", "fill_color"})
        if self.model is not None and given:
            raise ValueError(f"model {self.model.name!r} decides {', '.join(given)}: give either")
        return self

    def geometry(self) -> Geometry:
        """How the written images are fitted: the model's own preprocessing when a model is named."""
        if self.model is None:
            return Geometry(self.image_size, self.resize_mode, self.interpolation, self.fill_color)
        from po_cluster.model.loading import ModelLoadError, resolve_preprocess

        try:
            return resolve_preprocess(self.model.name, self.model.pretrained, self.model.preprocess).geometry
        except ModelLoadError as error:
            raise DataError(str(error)) from None


_thread = threading.local()


def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont:
    """A font per (file, size), cached per thread: a FreeType face must not be shared across threads."""
    cache = _thread.__dict__.setdefault("fonts", {})
    if (path, size) not in cache:
        cache[path, size] = ImageFont.load_default(size=size) if path is None else ImageFont.truetype(path, size)
    return cache[path, size]


def _fit_font(draw: ImageDraw.ImageDraw, word: str, path: str | None, size: int, stroke: int,
              room: int) -> tuple[ImageFont.FreeTypeFont, tuple[float, float, float, float]]:
    """The font at `size`, shrunk until the word fits in `room` pixels (long class names)."""
    while True:
        font = _font(path, size)
        box = draw.textbbox((0, 0), word, font=font, stroke_width=stroke)
        if box[2] - box[0] <= room or size <= MIN_FONT_PX:
            return font, box
        size = max(MIN_FONT_PX, int(size * 0.85))


def write_word(image: Image.Image, word: str, rng: np.random.Generator, cfg: TypographicConfig) -> dict:
    """Draw `word` on the square image in place; returns what was drawn (for the record)."""
    side = image.width
    fonts: tuple[str | None, ...] = cfg.fonts or (None,)
    # Every draw happens, in this order, whatever its outcome: the stream stays aligned across images.
    path = fonts[int(rng.integers(len(fonts)))]
    size = max(MIN_FONT_PX, round(float(rng.uniform(*cfg.font_size)) * side))
    fill = cfg.fill_colors[int(rng.integers(len(cfg.fill_colors)))]
    # An outline of the fill's own colour would be invisible; pick among the others when there are any.
    outlines = [c for c in cfg.outline_colors if ImageColor.getrgb(c) != ImageColor.getrgb(fill)] \
        or list(cfg.outline_colors)
    outline = outlines[int(rng.integers(len(outlines)))]
    fx, fy = float(rng.random()), float(rng.random())
    draw = ImageDraw.Draw(image)
    stroke = max(1, round(size * 0.08))
    margin = round(side * MARGIN)
    font, (left, top, right, bottom) = _fit_font(draw, word, path, size, stroke, side - 2 * margin)
    x = margin + fx * max(0, side - 2 * margin - (right - left))
    y = margin + fy * max(0, side - 2 * margin - (bottom - top))
    draw.text((round(x) - left, round(y) - top), word, font=font, fill=fill, stroke_width=stroke, stroke_fill=outline)
    return {"font": path or "pillow-default", "font_px": font.size, "fill": fill, "outline": outline}


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _regularisation_row(index: int, item: LabelledImage, split: Split, clean: Image.Image, chosen: str,
                        cfg: TypographicConfig) -> dict:
    """The image's regularisation record: clean, or (a share `own_word` of the train split) with its own
    class name written. Its own generator, so the attacked copies are the same whatever the share."""
    row = {"kind": "regularization", "id": f"{index:06d}", "image_name": f"clean/{index:06d}.png", "image": None,
           "text": chosen, "label": item.label, "source": item.name, "split": split}
    rng = np.random.default_rng([cfg.seed, index, 1])
    if split != "train" or not rng.random() < cfg.own_word:
        return row | {"image": _png(clean)}
    own = clean.copy()
    drawn = write_word(own, item.label, rng, cfg)
    return row | {"image_name": f"own/{index:06d}.png", "image": _png(own), "written": item.label, **drawn}


def _build_one(index: int, item: LabelledImage, data: bytes, split: Split, classes: tuple[str, ...],
               cfg: TypographicConfig, geometry: Geometry) -> list[dict]:
    """The regularisation copy and the attacked copies of one image as shard rows (the first first),
    PNG-encoded."""
    rng = np.random.default_rng([cfg.seed, index])
    clean = geometry.fit(io_.decode_image(data, item.where))
    true = classes.index(item.label)
    others = np.array([c for c in range(len(classes)) if c != true])  # never the image's own class
    written = rng.choice(others, size=cfg.variants, replace=False)
    chosen = cfg.prompt_template.format(item.label)
    rows = [_regularisation_row(index, item, split, clean, chosen, cfg)]
    for variant, word_class in enumerate(written):
        attacked = clean.copy()
        word = classes[int(word_class)]
        drawn = write_word(attacked, word, rng, cfg)
        name = f"{index:06d}-{variant}"
        rows.append({"kind": "pair", "id": name, "image_name": f"attacked/{name}.png", "image": _png(attacked),
                     "chosen": chosen, "rejected": cfg.prompt_template.format(word), "label": item.label,
                     "written": word, "source": item.name, "split": split, **drawn})
    return rows


def _build_or_skip(index: int, item: LabelledImage, split: Split, classes: tuple[str, ...],
                   cfg: TypographicConfig, geometry: Geometry) -> list[dict] | Fault:
    # A read that fails (storage down, a shard cut after it was listed) stops the build, naming the
    # image: skipping it would drop data for a passing fault. Bytes that are no image are skipped.
    data = item.read()
    try:
        return _build_one(index, item, data, split, classes, cfg, geometry)
    except DataError as error:  # its message names the image
        return Fault(item.where, str(error).removeprefix(f"{item.where}: "))


@dataclass
class BuildSummary:
    out: str
    classes: tuple[str, ...]
    images: int
    pairs: int
    skipped: list[Fault]


def build_typographic(cfg: TypographicConfig) -> BuildSummary:
    """Read the labelled set, write attacked and clean images and their records, then dataset.json."""
    geometry = cfg.geometry()
    labelled = read_labelled(cfg.source)
    items, skipped = labelled.items, list(labelled.faults)
    classes = tuple(sorted({item.label for item in items}))
    if len(classes) <= cfg.variants:
        raise DataError(f"{cfg.source}: {len(classes)} classes ({', '.join(classes)}) leave fewer than "
                        f"variants={cfg.variants} other classes to write on each image")
    meta_location = join(cfg.out, io_.DATASET_JSON)
    remove(meta_location)  # a rebuild in progress is not a complete dataset
    splits = assign_splits([item.label for item in items], cfg.splits, cfg.seed)
    writer, light, images = ShardWriter(cfg.out, cfg.rows_per_shard), list[dict](), 0
    with ThreadPoolExecutor(cfg.workers) as pool:
        # In chunks: a build holds one chunk's encoded images, whatever the dataset's size.
        for start in range(0, len(items), cfg.workers * 16):
            chunk = range(start, min(start + cfg.workers * 16, len(items)))
            for rows in pool.map(lambda i: _build_or_skip(i, items[i], splits[i], classes, cfg, geometry), chunk):
                if isinstance(rows, Fault):
                    skipped.append(rows)
                    continue
                writer.add(rows)
                images += 1
                light.extend({k: row.get(k) for k in LIGHT_KEYS} for row in rows)
    if not images:
        raise DataError(f"{cfg.source}: no image could be read; the first: {skipped[0].where}: {skipped[0].reason}")
    shards = writer.close()
    counts = split_counts(light)
    pairs = sum(c["pairs"] for c in counts.values())
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "classes": list(classes),
            "candidates": [cfg.prompt_template.format(c) for c in classes], "image_size": geometry.size,
            "preprocess": geometry.to_json(),  # how the stored images were fitted (pairs.stored_geometry)
            "counts": {"images": images, "pairs": pairs, "splits": counts},
            "skipped": [{"input": fault.where, "reason": fault.reason} for fault in skipped],
            "shards": [info.to_json() for info in shards],
            "config": cfg.model_dump(mode="json", exclude={"out", "workers"})}
    write_bytes(meta_location, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return BuildSummary(cfg.out, classes, images, pairs, skipped)
