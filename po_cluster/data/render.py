"""Drawing one typo-shapes scene with Pillow: a shape (tilted, small or large, coloured, plain or
striped) on a noisy, cluttered background, optionally with a word written on it.

Every random draw comes from the generator passed in, in a fixed order, so a scene is a pure
function of the generator's state (and the pinned Pillow).
"""
from __future__ import annotations

import colorsys
import copy
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Points = list[tuple[float, float]]

# The object's colours, named for the colour task; far apart so the task is about naming, not seeing.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 215, 35), "purple": (145, 45, 185), "orange": (245, 135, 25),
}
# Radius as a share of the image side, per size.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.21), "large": (0.25, 0.31)}
PATTERNS: tuple[str, ...] = ("plain", "striped")
MAX_TILT = 0.45  # radians either way: tilted, not turned into another shape (a square is no diamond)
STRIPE_SHADE = 0.65  # the stripes' darkness: visible at 64 px, so that a model can learn to see them


@dataclass(frozen=True)
class Look:
    """How the object looks, apart from its class: indices into COLOURS, SIZES and PATTERNS."""

    colour: int
    size: int
    pattern: int


def _regular(sides: int, phase: float = -math.pi / 2, radius: float = 1.0) -> Points:
    return [(radius * math.cos(phase + 2 * math.pi * i / sides), radius * math.sin(phase + 2 * math.pi * i / sides))
            for i in range(sides)]


def _ellipse(rx: float, ry: float, cx: float = 0.0, cy: float = 0.0, n: int = 40) -> Points:
    return [(cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _star() -> Points:
    return [((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + math.pi * i / 5),
             (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + math.pi * i / 5)) for i in range(10)]


def _heart() -> Points:
    points = [(16 * math.sin(a) ** 3, -(13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)))
              for a in (2 * math.pi * i / 48 for i in range(48))]
    return [(x / 16.5, (y + 2.5) / 16.5) for x, y in points]


# Each shape is a list of (polygon in unit coordinates, ink): ink 0 cuts a hole in what came before.
SHAPE_PARTS: dict[str, list[tuple[Points, int]]] = {
    "circle": [(_ellipse(1, 1), 255)],
    "square": [(_regular(4, math.pi / 4, 1.2), 255)],
    "triangle": [(_regular(3, -math.pi / 2, 1.15), 255)],
    "diamond": [([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], 255)],
    "star": [(_star(), 255)],
    "cross": [([(-1, -.33), (-.33, -.33), (-.33, -1), (.33, -1), (.33, -.33), (1, -.33), (1, .33), (.33, .33),
                (.33, 1), (-.33, 1), (-.33, .33), (-1, .33)], 255)],
    "ring": [(_ellipse(1, 1), 255), (_ellipse(0.55, 0.55), 0)],
    "hexagon": [(_regular(6, 0.0), 255)],
    "pentagon": [(_regular(5), 255)],
    "crescent": [(_ellipse(1, 1), 255), (_ellipse(0.85, 0.85, 0.45, -0.1), 0)],
    "heart": [(_heart(), 255)],
    "arrow": [([(-1, -.3), (.15, -.3), (.15, -.75), (1, 0), (.15, .75), (.15, .3), (-1, .3)], 255)],
    "oval": [(_ellipse(1, 0.5), 255)],
    "kite": [([(0, -1), (0.6, -0.35), (0, 1), (-0.6, -0.35)], 255)],
    "bowtie": [([(-1, -.7), (0, 0), (-1, .7)], 255), ([(1, -.7), (0, 0), (1, .7)], 255)],
    "house": [([(-.75, 1), (-.75, -.1), (0, -1), (.75, -.1), (.75, 1)], 255)],
}


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: no font file to ship or find, same glyphs everywhere.
    return ImageFont.load_default(size=size)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(60, 190, size=3)
    noise = rng.normal(0.0, 22.0, size=(size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """Thin random strokes: things in the scene that are no shape and no word."""
    for _ in range(count):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, size=4))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line((x0, y0, x1, y1), fill=colour, width=1)


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for points, ink in SHAPE_PARTS[shape]:
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points], fill=ink)
    return np.asarray(layer) > 127


def _paint(pixels: np.ndarray, mask: np.ndarray, colour: np.ndarray, striped: bool, rng: np.random.Generator) -> None:
    """Fill the mask with the colour, blended a little toward the background (lower contrast), and
    darker bands across it when striped."""
    mix = float(rng.uniform(0.0, 0.25))
    fill = (1 - mix) * colour + mix * pixels[mask].mean(axis=0) if mask.any() else colour
    phase, angle = float(rng.uniform(0, 4)), float(rng.uniform(0, math.pi))
    if striped:
        ys, xs = np.nonzero(mask)
        dark = ((xs * math.cos(angle) + ys * math.sin(angle) + phase) // 2) % 2 == 0
        shades = np.where(dark[:, None], fill * STRIPE_SHADE, fill)
        pixels[ys, xs] = np.clip(shades, 0, 255).astype(np.uint8)
    else:
        pixels[mask] = np.clip(fill, 0, 255).astype(np.uint8)


def draw_word(image: Image.Image, word: str, rng: np.random.Generator) -> None:
    draw = ImageDraw.Draw(image)
    face = font(int(rng.integers(11, 14)))
    # Pillow types boxes as float; a font's boxes are whole pixels.
    left, top, right, bottom = (int(edge) for edge in draw.textbbox((0, 0), word, font=face, stroke_width=1))
    width, height = right - left, bottom - top
    x = int(rng.integers(1, max(2, image.width - width - 1))) - left
    y = int(rng.integers(1, max(2, image.height - height - 1))) - top
    light = bool(rng.integers(0, 2))
    fill, outline = ((255, 255, 255), (0, 0, 0)) if light else ((0, 0, 0), (255, 255, 255))
    draw.text((x, y), word, font=face, fill=fill, stroke_width=1, stroke_fill=outline)


@dataclass(frozen=True)
class WordStyle:
    """How a held-out evaluation set writes its word, apart from training's one way (draw_word:
    lower case, font size 11 to 13, level, black on white or white on black). Each field changes one
    thing a model could have learned to read in that way only: the case, the font size (drawn from
    [low, high)), the space between letters, a tilt, and a saturated colour with a darker outline
    instead of black and white."""

    upper: bool = False
    sizes: tuple[int, int] = (11, 14)
    spacing: int = 0  # extra pixels after each letter
    max_tilt: float = 0.0  # degrees either way
    coloured: bool = False


def _letters(draw: ImageDraw.ImageDraw, word: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont,
             spacing: int, origin: tuple[int, int], fill: tuple[int, int, int],
             outline: tuple[int, int, int]) -> None:
    """The word one letter at a time, each `spacing` pixels further than the font places it."""
    x, y = origin
    for i, letter in enumerate(word):
        advance = int(draw.textlength(word[:i], font=face))  # the font's own kerning up to this letter
        draw.text((x + advance + i * spacing, y), letter, font=face, fill=fill, stroke_width=1, stroke_fill=outline)


def _ink(rng: np.random.Generator, coloured: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(fill, outline): training's black on white or white on black, or a saturated colour of any hue
    outlined in the same hue, darker."""
    if not coloured:
        light = bool(rng.integers(0, 2))
        return ((255, 255, 255), (0, 0, 0)) if light else ((0, 0, 0), (255, 255, 255))
    hue = float(rng.uniform(0.0, 1.0))
    bright = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 1.0, 1.0))
    dark = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 1.0, 0.35))
    return (bright[0], bright[1], bright[2]), (dark[0], dark[1], dark[2])


def draw_styled_word(image: Image.Image, word: str, rng: np.random.Generator, style: WordStyle) -> None:
    """The word in a held-out style: drawn on a transparent layer, tilted, and laid anywhere it fits
    (off the edge where it cannot, as draw_word does)."""
    text = word.upper() if style.upper else word
    face = font(int(rng.integers(*style.sizes)))
    fill, outline = _ink(rng, style.coloured)
    probe = ImageDraw.Draw(image)
    left, top, right, bottom = (int(edge) for edge in probe.textbbox((0, 0), text, font=face, stroke_width=1))
    width = right - left + style.spacing * (len(text) - 1) + 2
    layer = Image.new("RGBA", (width, bottom - top + 2), (0, 0, 0, 0))
    _letters(ImageDraw.Draw(layer), text, face, style.spacing, (1 - left, 1 - top), fill, outline)
    if style.max_tilt:
        angle = float(rng.uniform(-style.max_tilt, style.max_tilt))
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    x = int(rng.integers(0, max(1, image.width - layer.width + 1)))
    y = int(rng.integers(0, max(1, image.height - layer.height + 1)))
    image.paste(layer, (x, y), layer)


def draw_object(pixels: np.ndarray, shape: str, look: Look, rng: np.random.Generator) -> None:
    """The object, in place: its size, tilted, placed anywhere it fits, in its colour and pattern."""
    size = pixels.shape[0]
    low, high = SIZES[list(SIZES)[look.size]]
    r = size * float(rng.uniform(low, high))
    cx, cy = (float(rng.uniform(r + 1, size - r - 1)) for _ in range(2))
    angle = float(rng.uniform(-MAX_TILT, MAX_TILT))
    colour = np.array(list(COLOURS.values())[look.colour], dtype=np.float64)
    _paint(pixels, _mask(shape, cx, cy, r, angle, size), colour, bool(look.pattern), rng)


def scene(shape: str | None, word: str | None, look: Look | None, rng: np.random.Generator, size: int,
          style: WordStyle | None = None) -> np.ndarray:
    """Background, clutter behind, the object, maybe one stroke in front (occlusion), then the word:
    in training's way, or in `style` (a held-out set's)."""
    return scene_pair(shape, word, look, rng, size, style)[1]


def scene_pair(shape: str | None, word: str | None, look: Look | None, rng: np.random.Generator, size: int,
               style: WordStyle | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the scene without its word, the scene): one draw of the generator, so the second is exactly
    `scene`'s image and the first the same picture before the word was written on it."""
    image = Image.fromarray(background(rng, size), "RGB")
    _clutter(ImageDraw.Draw(image), rng, size, int(rng.integers(1, 4)))
    pixels = np.array(image, dtype=np.uint8)
    if shape is not None and look is not None:
        draw_object(pixels, shape, look, rng)
    image = Image.fromarray(pixels, "RGB")
    if rng.random() < 0.3:
        _clutter(ImageDraw.Draw(image), rng, size, 1)
    bare = np.array(image, dtype=np.uint8)
    if word is not None and style is not None:
        # The style draws from a copy of the generator; the generator itself moves on as training's
        # word would move it (drawn on a scratch image), so every later scene of a styled set is the
        # training-style set's: a styled set and the attacked set of one seed differ in their words only.
        own = copy.deepcopy(rng)
        draw_word(Image.new("RGB", image.size), word, rng)
        draw_styled_word(image, word, own, style)
    elif word is not None:
        draw_word(image, word, rng)
    return bare, np.array(image, dtype=np.uint8)  # writable copies: torch warns on read-only arrays
