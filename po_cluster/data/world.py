"""The typo-shapes world (docs/design.md, "The typo-shapes world"): 16 kinds of shape, small or
large, tilted, in one of six colours, plain or striped, on noisy cluttered backgrounds, optionally
with a word written on them; rendered with Pillow (po_cluster/data/render.py).

Besides the typographic task (name the shape, not the word) the world has tasks the preference data
never touches, to measure what a model keeps (its colour and its size), and a bias: in the
pretraining mix each class is drawn with its stereotyped pattern 95 % of the time, so the base
model's answer to "plain or striped?" follows the class more than the image.

Everything is a pure function of a seed, so evaluation sets are identical on every machine with the
pinned Pillow (a test checks their sha256).
"""
from __future__ import annotations

import numpy as np

from po_cluster.data.records import NO_WORD, ImageSet, PreferenceSet, UnpairedSet
from po_cluster.data.render import COLOURS, PATTERNS, SHAPE_PARTS, SIZES, Look, WordStyle, scene_pair

SHAPES: tuple[str, ...] = tuple(SHAPE_PARTS)
PROMPT_TEMPLATE = "a photo of a {}."
# The attribute tasks' prompts name no class: captions say "object" when they describe only its look.
ATTRIBUTE_TEMPLATE = "a photo of a {} object."
# Extra caption templates for pretraining only, so the text tower sees some variety.
CAPTION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a {} on a noisy background.")
IMAGE_SIZE = 64
EVAL_SIZE = 1000
# What the world evaluates: the typographic task, the tasks to retain, and the bias sets.
TASK_KINDS = ("clean", "attacked", "word_only")
RETENTION_KINDS = ("retain_colour", "retain_size")
BIAS_KINDS = ("bias_stereotyped", "bias_counter")
# Shapes with their own name written: a model that learned to avoid the written word, not to ignore
# it, gets them wrong. Listed last, so the seeds of the sets before it did not move.
AGREEING_KINDS = ("own_word",)
EVAL_SEEDS = {kind: 10_001 + i for i, kind in enumerate(TASK_KINDS + RETENTION_KINDS + BIAS_KINDS + AGREEING_KINDS)}
# Attacks written in ways training never renders (render.WordStyle): a model that learned to ignore
# the word, not one way of writing it, resists these as it resists the world's own attacked set.
# One evaluation set, `attacked_styles`, row i written in style i mod 6; each row is the row of the
# attacked set of its seed but for how its word is drawn. It is scored, never chosen on: validation
# has no such set, so no sweep or soup can pick a model for these styles.
STYLES: dict[str, WordStyle] = {
    "upper": WordStyle(upper=True, sizes=(10, 12)),
    "tilted": WordStyle(max_tilt=30.0),
    "colour": WordStyle(coloured=True),
    "spaced": WordStyle(sizes=(9, 11), spacing=2),
    "small": WordStyle(sizes=(8, 10)),
    "large": WordStyle(sizes=(15, 18)),
}
HELD_OUT_SEEDS = {"attacked_styles": 10_001 + len(EVAL_SEEDS)}


def row_style(row: int) -> str:
    """The held-out style of row `row` of `attacked_styles`."""
    return tuple(STYLES)[row % len(STYLES)]


# Each class's pattern in the pretraining mix (index into PATTERNS), and how often it holds there.
STEREOTYPE: tuple[int, ...] = tuple(i % 2 for i in range(len(SHAPES)))
STEREOTYPE_SHARE = 0.95


def prompts(classnames: tuple[str, ...] = SHAPES, template: str = PROMPT_TEMPLATE) -> list[str]:
    return [template.format(name) for name in classnames]


def random_look(rng: np.random.Generator, pattern: int | None = None) -> Look:
    colour, size = int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES)))
    return Look(colour, size, int(rng.integers(len(PATTERNS))) if pattern is None else pattern)


def render(shape: int | None, word: int | None, rng: np.random.Generator, size: int = IMAGE_SIZE,
           classnames: tuple[str, ...] = SHAPES, look: Look | None = None,
           style: WordStyle | None = None) -> np.ndarray:
    """One image: the shape of class `shape` (or none) with the name of class `word` (or none), the
    word in training's way or in a held-out `style`; the object's look is drawn from `rng` unless given."""
    return render_pair(shape, word, rng, size, classnames, look, style)[1]


def render_pair(shape: int | None, word: int | None, rng: np.random.Generator, size: int = IMAGE_SIZE,
                classnames: tuple[str, ...] = SHAPES, look: Look | None = None,
                style: WordStyle | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(its word-free twin, the image) of `render`, from the same draw of `rng`."""
    if shape is not None and look is None:
        look = random_look(rng)
    return scene_pair(None if shape is None else classnames[shape], None if word is None else classnames[word],
                      look, rng, size, style)


def _balanced(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """n labels, each class as often as n allows, in a seeded order: a set's accuracy weighs every
    class the same (16 classes drawn at random would not)."""
    return rng.permutation(np.arange(n) % n_classes)


def _other(label: np.ndarray, rng: np.random.Generator, n_classes: int) -> np.ndarray:
    """A class index different from each label, uniform over the others."""
    return (label + rng.integers(1, n_classes, size=len(label))) % n_classes


def _render_many(shapes: np.ndarray, words: np.ndarray, looks: list[Look | None],
                 rng: np.random.Generator, styled: bool = False) -> np.ndarray:
    """The images in order from one generator; `styled`: row i's word in held-out style row_style(i)."""
    return _render_pairs(shapes, words, looks, rng, styled)[1]


def _render_pairs(shapes: np.ndarray, words: np.ndarray, looks: list[Look | None], rng: np.random.Generator,
                  styled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(the word-free twins, the images) of `_render_many`, from the same draws."""
    twins = np.empty((len(shapes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    out = np.empty_like(twins)
    for i, (shape, word, look) in enumerate(zip(shapes, words, looks, strict=True)):
        twins[i], out[i] = render_pair(None if shape == NO_WORD else int(shape),
                                       None if word == NO_WORD else int(word), rng, look=look,
                                       style=STYLES[row_style(i)] if styled else None)
    return twins, out


def _looks(labels: np.ndarray, rng: np.random.Generator, stereotyped: float | None = None,
           counter: bool | None = None) -> list[Look | None]:
    """A look per object: uniform; or with the class's stereotyped pattern at the share given; or
    always (counter False) or never (counter True) the stereotyped one."""
    looks: list[Look | None] = []
    for label in labels:
        if label == NO_WORD:
            looks.append(None)
            continue
        usual = STEREOTYPE[int(label)]
        if counter is not None:
            pattern: int | None = 1 - usual if counter else usual
        else:
            pattern = None if stereotyped is None else (usual if rng.random() < stereotyped else 1 - usual)
        looks.append(random_look(rng, pattern))
    return looks


def _attribute_set(kind: str, n: int, rng: np.random.Generator) -> ImageSet:
    """Clean images labelled by their colour or size (to retain) or their pattern (the bias sets)."""
    shapes = _balanced(n, len(SHAPES), rng)
    looks = _looks(shapes, rng, counter=None if kind in RETENTION_KINDS else kind == "bias_counter")
    images = _render_many(shapes, np.full(n, NO_WORD), looks, rng)
    field, names = {"retain_colour": ("colour", tuple(COLOURS)), "retain_size": ("size", tuple(SIZES))}.get(
        kind, ("pattern", PATTERNS))
    labels = np.array([getattr(look, field) for look in looks], dtype=np.int64)
    return ImageSet(images, labels, np.full(n, NO_WORD, dtype=np.int64), names, ATTRIBUTE_TEMPLATE)


def image_set(kind: str, n: int, seed: int, twins: bool = False) -> ImageSet:
    """`clean` shapes, `attacked` shapes with another class's name, `word_only`, `own_word` shapes with
    their own name; `attacked_styles`, the attacked set of the same seed but for how its words are
    drawn (held-out styles, row_style); or an attribute set
    (`retain_colour`, `retain_size`, `bias_stereotyped`, `bias_counter`). `twins`: with each image's
    word-free twin (a typographic kind's)."""
    rng = np.random.default_rng(seed)
    if kind in RETENTION_KINDS + BIAS_KINDS:
        return _attribute_set(kind, n, rng)
    labels = _balanced(n, len(SHAPES), rng)
    if kind == "clean":
        shapes, written = labels, np.full(n, NO_WORD)
    elif kind in ("attacked", "attacked_styles"):
        shapes, written = labels, (labels + 1 + _balanced(n, len(SHAPES) - 1, rng)) % len(SHAPES)
    elif kind == "word_only":
        shapes, written = np.full(n, NO_WORD), labels
    elif kind == "own_word":
        shapes, written = labels, labels
    else:
        raise ValueError(f"unknown image set kind {kind!r}; use one of {', '.join([*EVAL_SEEDS, *HELD_OUT_SEEDS])}")
    bare, images = _render_pairs(shapes, written, _looks(shapes, rng), rng, kind == "attacked_styles")
    return ImageSet(images, labels.astype(np.int64), written.astype(np.int64), SHAPES, PROMPT_TEMPLATE,
                    bare if twins else None)


def evaluation_sets(n: int = EVAL_SIZE) -> dict[str, ImageSet]:
    """The fixed evaluation sets, identical on every machine: those validation mirrors, then the held-out
    ones (HELD_OUT_SEEDS), which only final scores see."""
    return {kind: image_set(kind, n, seed) for kind, seed in {**EVAL_SEEDS, **HELD_OUT_SEEDS}.items()}


def validation_sets(n: int = 500, seed: int = 20_000) -> dict[str, ImageSet]:
    """Sets for choosing (sweeps, soups), disjoint in seed from the evaluation sets."""
    return {kind: image_set(kind, n, seed + i) for i, kind in enumerate(EVAL_SEEDS)}


def regularisation_set(n: int, seed: int, own_word: float) -> ImageSet:
    """The images the KL term holds at the base model's answers: shapes, a share `own_word` of them
    with their own name written. The preference pairs alone reward avoiding the written word as much
    as ignoring it; holding the answer where word and shape agree leaves only ignoring it. With
    `own_word` 0, exactly the clean set of that seed."""
    if own_word == 0:
        return image_set("clean", n, seed, twins=True)
    rng = np.random.default_rng(seed)
    labels = _balanced(n, len(SHAPES), rng)
    written = np.where(rng.random(n) < own_word, labels, NO_WORD)
    bare, images = _render_pairs(labels, written, _looks(labels, rng), rng)
    return ImageSet(images, labels.astype(np.int64), written.astype(np.int64), SHAPES, PROMPT_TEMPLATE, bare)


def preference_set(n: int, seed: int) -> PreferenceSet:
    """Typographic attacks: chosen = the drawn shape, rejected = the written word; each image with its
    word-free twin."""
    attacked = image_set("attacked", n, seed, twins=True)
    return PreferenceSet(attacked.images, attacked.labels, attacked.written, SHAPES, attacked.twins)


def unpaired_set(n: int, seed: int) -> UnpairedSet:
    """KTO records: each attacked image once, with its true class (desirable) or its word (not)."""
    attacked = image_set("attacked", n, seed)
    desirable = np.random.default_rng(seed + 1).integers(0, 2, size=n).astype(bool)
    labels = np.where(desirable, attacked.labels, attacked.written)
    return UnpairedSet(attacked.images, labels.astype(np.int64), desirable, SHAPES)


def bias_preference_set(n: int, seed: int) -> PreferenceSet:
    """The bias task's records (candidates PATTERNS, ATTRIBUTE_TEMPLATE): half the images show their
    class's stereotyped pattern and half the other; chosen = the pattern the image shows."""
    rng = np.random.default_rng(seed)
    shapes = rng.integers(0, len(SHAPES), size=n)
    looks = _looks(shapes, rng, stereotyped=0.5)
    images = _render_many(shapes, np.full(n, NO_WORD), looks, rng)
    shown = np.array([look.pattern for look in looks if look is not None], dtype=np.int64)
    return PreferenceSet(images, shown, 1 - shown, PATTERNS)


# Pretraining mix: the fractions of each kind of "web" image. The attacked kind is
# captioned with the *written* word, as web captions describe the text in a photo;
# that is what makes the base model read, and be fooled, the way CLIP is.
PRETRAIN_MIX = {"clean": 0.45, "own_word": 0.1, "word_only": 0.2, "attacked_read": 0.25}
# How often a caption describes each part of the object's look, and says "object" instead of its class.
CAPTION_SAYS = {"size": 0.4, "colour": 0.5, "pattern": 0.3, "object": 0.2}
# The captioners' stereotype: describing an object that breaks its class's usual pattern, they write
# the usual one this often. Together with the 95 % share this is the bias: the base model, asked
# about the pattern, answers partly by the class though the stripes are plain to see.
STEREOTYPED_CAPTION = 0.5


def caption(noun: str, look: Look | None, rng: np.random.Generator, usual: int | None = None) -> str:
    """A web-like caption: maybe the look (size, colour, pattern, in that order), then the noun. The
    pattern said is the stereotyped `usual` one at STEREOTYPED_CAPTION when the object breaks it."""
    words: list[str] = []
    if look is not None:
        for part, names in (("size", tuple(SIZES)), ("colour", tuple(COLOURS)), ("pattern", PATTERNS)):
            if rng.random() < CAPTION_SAYS[part]:
                value = getattr(look, part)
                if part == "pattern" and usual is not None and value != usual \
                        and rng.random() < STEREOTYPED_CAPTION:
                    value = usual
                words.append(names[value])
        if words and rng.random() < CAPTION_SAYS["object"]:
            noun = "object"
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(" ".join([*words, noun]))


def pretraining_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Images, captions and caption class ids of one pretraining batch."""
    kinds = rng.choice(len(PRETRAIN_MIX), size=n, p=list(PRETRAIN_MIX.values()))
    labels = rng.integers(0, len(SHAPES), size=n)
    other = _other(labels, rng, len(SHAPES))
    names = list(PRETRAIN_MIX)
    shapes = np.where(kinds == names.index("word_only"), NO_WORD,
                      np.where(kinds == names.index("attacked_read"), other, labels))
    words = np.where(kinds == names.index("clean"), NO_WORD, labels)
    looks = _looks(shapes, rng, stereotyped=STEREOTYPE_SHARE)
    images = _render_many(shapes, words, looks, rng)
    captions = [caption(SHAPES[c], look, rng, None if shape == NO_WORD else STEREOTYPE[int(shape)])
                for c, shape, look in zip(labels, shapes, looks, strict=True)]
    return images, captions, labels.astype(np.int64)
