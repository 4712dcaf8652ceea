"""The typo-shapes world (docs/design.md, "The typo-shapes world"): coloured shapes on noisy backgrounds,
optionally with a word written on them, rendered with Pillow.

Everything is a pure function of a seed, so evaluation sets are identical on
every machine with the pinned Pillow (a test checks their sha256).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from po_cluster.data.records import NO_WORD, ImageSet, PreferenceSet, UnpairedSet

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
PROMPT_TEMPLATE = "a photo of a {}."
# Extra caption templates for pretraining only, so the text tower sees some variety.
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a {} on a noisy background.")
IMAGE_SIZE = 64
EVAL_SEEDS = {"clean": 10_001, "attacked": 10_002, "word_only": 10_003}
EVAL_SIZE = 1000

_PALETTE = np.array(
    [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
     (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 190), (0, 128, 128)],
    dtype=np.int64,
)


def prompts(classnames: tuple[str, ...] = SHAPES, template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(name) for name in classnames]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: no font file to ship or find, same glyphs everywhere.
    return ImageFont.load_default(size=size)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0.0, 28.0, size=(size, size, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _polygon(cx: float, cy: float, r: float, sides: int, phase: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * i / sides),
             cy + r * math.sin(phase + 2 * math.pi * i / sides)) for i in range(sides)]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.42
        angle = -math.pi / 2 + math.pi * i / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, int(r * 0.35)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.1), fill=fill)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _draw_word(draw: ImageDraw.ImageDraw, word: str, rng: np.random.Generator, size: int) -> None:
    font = _font(int(rng.integers(11, 14)))
    # Pillow types boxes as float; a font's boxes are whole pixels.
    left, top, right, bottom = (int(edge) for edge in draw.textbbox((0, 0), word, font=font, stroke_width=1))
    width, height = right - left, bottom - top
    x = int(rng.integers(1, max(2, size - width - 1))) - left
    y = int(rng.integers(1, max(2, size - height - 1))) - top
    light = bool(rng.integers(0, 2))
    fill, outline = ((255, 255, 255), (0, 0, 0)) if light else ((0, 0, 0), (255, 255, 255))
    draw.text((x, y), word, font=font, fill=fill, stroke_width=1, stroke_fill=outline)


def render(shape: int | None, word: int | None, rng: np.random.Generator,
           size: int = IMAGE_SIZE, classnames: tuple[str, ...] = SHAPES) -> np.ndarray:
    """One image: the shape of class `shape` (or none) with the name of class `word` (or none)."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    if shape is not None:
        r = size * float(rng.uniform(0.2, 0.32))
        cx, cy = (float(rng.uniform(r + 2, size - r - 2)) for _ in range(2))
        colour = tuple(int(c) for c in _PALETTE[rng.integers(0, len(_PALETTE))])
        _draw_shape(draw, classnames[shape], cx, cy, r, colour)
    if word is not None:
        _draw_word(draw, classnames[word], rng, size)
    return np.array(image, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays


def _other(label: np.ndarray, rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """A class index different from each label, uniform over the others."""
    return (label + rng.integers(1, n_classes, size=len(label))) % n_classes


def _render_many(shapes: np.ndarray, words: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((len(shapes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (shape, word) in enumerate(zip(shapes, words, strict=True)):
        out[i] = render(None if shape == NO_WORD else int(shape), None if word == NO_WORD else int(word), rng)
    return out


def image_set(kind: str, n: int, seed: int) -> ImageSet:
    """`clean` shapes, `attacked` shapes with another class's name, or `word_only`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), size=n)
    if kind == "clean":
        shapes, written = labels, np.full(n, NO_WORD)
    elif kind == "attacked":
        shapes, written = labels, _other(labels, rng, len(SHAPES))
    elif kind == "word_only":
        shapes, written = np.full(n, NO_WORD), labels
    else:
        raise ValueError(f"unknown image set kind {kind!r}; use clean, attacked or word_only")
    return ImageSet(_render_many(shapes, written, rng), labels.astype(np.int64), written.astype(np.int64), SHAPES)


def evaluation_sets(n: int = EVAL_SIZE) -> dict[str, ImageSet]:
    """The fixed evaluation sets, identical on every machine."""
    return {kind: image_set(kind, n, seed) for kind, seed in EVAL_SEEDS.items()}


def validation_sets(n: int = 500, seed: int = 20_000) -> dict[str, ImageSet]:
    """Sets for choosing (sweeps, soups), disjoint in seed from the evaluation sets."""
    return {kind: image_set(kind, n, seed + i) for i, kind in enumerate(EVAL_SEEDS)}


def preference_set(n: int, seed: int) -> PreferenceSet:
    """Typographic attacks: chosen = the drawn shape, rejected = the written word."""
    attacked = image_set("attacked", n, seed)
    return PreferenceSet(attacked.images, attacked.labels, attacked.written, SHAPES)


def unpaired_set(n: int, seed: int) -> UnpairedSet:
    """KTO records: each attacked image once, with its true class (desirable) or its word (not)."""
    attacked = image_set("attacked", n, seed)
    desirable = np.random.default_rng(seed + 1).integers(0, 2, size=n).astype(bool)
    labels = np.where(desirable, attacked.labels, attacked.written)
    return UnpairedSet(attacked.images, labels.astype(np.int64), desirable, SHAPES)


# Pretraining mix: the fractions of each kind of "web" image. The attacked kind is
# captioned with the *written* word, as web captions describe the text in a photo;
# that is what makes the base model read, and be fooled, the way CLIP is.
PRETRAIN_MIX = {"clean": 0.35, "own_word": 0.15, "word_only": 0.25, "attacked_read": 0.25}


def pretraining_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Images, captions and caption class ids of one pretraining batch."""
    kinds = rng.choice(len(PRETRAIN_MIX), size=n, p=list(PRETRAIN_MIX.values()))
    labels = rng.integers(0, len(SHAPES), size=n)
    other = _other(labels, rng, len(SHAPES))
    names = list(PRETRAIN_MIX)
    shapes = np.where(np.isin(kinds, [names.index("word_only")]), NO_WORD,
                      np.where(kinds == names.index("attacked_read"), other, labels))
    words = np.where(kinds == names.index("clean"), NO_WORD, labels)
    images = _render_many(shapes, words, rng)
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=n)
    captions = [CAPTION_TEMPLATES[t].format(SHAPES[c]) for t, c in zip(templates, labels, strict=True)]
    return images, captions, labels.astype(np.int64)
