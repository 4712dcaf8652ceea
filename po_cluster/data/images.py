"""The one way an image file becomes pixels: training data, evaluation sets, the typographic
builder, the serving endpoint and the embed job all go through these functions.

    bytes ──decode──▶ upright RGB image ──Geometry.fit──▶ size × size (the model's own resize and crop)

Sharing them is the point: a phone photo carries its rotation in EXIF, and a reader
that skipped it would see the picture on its side while another saw it upright;
a reader with its own resize would feed the model slightly different pixels than
the one it was trained on. The resize and crop are the model's: open_clip's evaluation
transform of that model (its `PreprocessCfg`: size, resize mode, interpolation, fill),
reproduced here pixel for pixel, so what a po-cluster model sees is what open_clip would
feed it. Pure functions of their arguments (Pillow and NumPy only, no Ray, no torch);
what they refuse is an `ImageRefused` whose `code` is stable (the endpoint's error code)
and whose message names the problem.

What an untrusted image file may be (bytes, pixels, formats) is one config here,
`ImageLimitsConfig`, checked by `decode_limited`: the serving endpoint maps its
refusals to HTTP statuses, the embed job to rows with a code, and both accept the
same files because both hold the same limits.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from po_cluster.config import Strict

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
ResizeMode = Literal["shortest", "longest", "squash"]
Interpolation = Literal["bicubic", "bilinear"]
# open_clip's resize filters (through torchvision, which hands PIL images to Pillow's resize); Pillow
# widens its support when it shrinks, so downscaling is antialiased.
_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# open_clip's defaults (its PreprocessCfg and constants.OPENAI_DATASET_*): a model without preprocessing
# of its own is fed these, by open_clip and so by us.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Magic numbers, only to name a refused format in the message: asking Pillow to identify it
# would parse bytes that were refused.
_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"<svg", "SVG"),
               (b"<?xml", "SVG/XML"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"))
# Raised while reading pixels by truncated or corrupt files (Pillow has no single type for them).
_CORRUPT = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


ImageFormat = Literal["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]


class ImageLimitsConfig(Strict):
    """What an untrusted image file may be: the endpoint's and the embed job's limits (the serving
    limits extend this config, so a YAML `limits:` section keeps these keys at its top level)."""

    max_image_bytes: int = Field(8 << 20, gt=0, description="one image file, decoded from base64")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="width × height, checked before decoding")
    image_formats: tuple[ImageFormat, ...] = Field(("PNG", "JPEG", "WEBP"), min_length=1)


class ImageRefused(ValueError):
    """Bytes that do not become pixels; `code` is one of empty_image, not_an_image,
    unsupported_image_format, image_too_large, image_too_many_pixels, corrupt_image."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def is_image_name(name: str) -> bool:
    """A file name an image folder's listing counts as an image (hidden files are not)."""
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def sniff_format(raw: bytes) -> str | None:
    """The format the first bytes announce, from magic numbers alone; None if none is known."""
    head = raw[:16].lstrip()
    if head[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def _unreadable(raw: bytes, formats: Sequence[str] | None) -> ImageRefused:
    if formats is None:
        return ImageRefused("not_an_image", "not a readable image (unknown format or not an image)")
    allowed = ", ".join(formats)
    found = sniff_format(raw)
    if found and found not in formats:
        return ImageRefused("unsupported_image_format", f"image format {found} is not allowed; allowed: {allowed}")
    return ImageRefused("not_an_image", f"not a readable image (allowed formats: {allowed})")


def open_image(raw: bytes, formats: Sequence[str] | None = None, max_pixels: int | None = None) -> Image.Image:
    """The file's header, pixels not yet decoded: only the decoders of `formats` (None: any Pillow
    knows) see the bytes, and more than `max_pixels` (None: Pillow's own bomb guard) is refused here."""
    if not raw:
        raise ImageRefused("empty_image", "the image is empty")
    try:
        image = Image.open(io.BytesIO(raw), formats=None if formats is None else list(formats))
    except Image.DecompressionBombError:
        limit = max_pixels or Image.MAX_IMAGE_PIXELS
        raise ImageRefused("image_too_many_pixels", f"the image has more than {limit} pixels") from None
    except (UnidentifiedImageError, *_CORRUPT):
        raise _unreadable(raw, formats) from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:  # a decompression bomb stops here, undecoded
        raise ImageRefused("image_too_many_pixels", f"the image is {width}×{height} = {width * height} pixels, "
                                                    f"over the limit of {max_pixels}")
    return image


def upright_rgb(image: Image.Image) -> Image.Image:
    """Decode the pixels, apply the EXIF orientation (1..8; other values and broken EXIF leave the
    image as stored) and convert to RGB with Pillow's conversion: palette → its colours, RGBA/LA
    → alpha dropped, grey → three equal channels, CMYK → RGB, 16-bit and 32-bit → clipped to 0..255."""
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else image.convert("RGB")
    except _CORRUPT:
        raise ImageRefused("corrupt_image", f"the {image.format} image is truncated or corrupt") from None


def decode(raw: bytes, formats: Sequence[str] | None = None, max_pixels: int | None = None) -> Image.Image:
    """Image file bytes → upright RGB image (`open_image`, then `upright_rgb`)."""
    return upright_rgb(open_image(raw, formats, max_pixels))


def decode_limited(raw: bytes, limits: ImageLimitsConfig) -> np.ndarray:
    """Untrusted image file bytes → upright uint8 [H, W, 3], or `ImageRefused`: the byte count is checked
    before anything is parsed, the format and the pixel count before the pixels are decoded."""
    if len(raw) > limits.max_image_bytes:
        raise ImageRefused("image_too_large",
                           f"the image has {len(raw)} bytes, over the limit of {limits.max_image_bytes}")
    return to_pixels(decode(raw, limits.image_formats, limits.max_image_pixels))


@dataclass(frozen=True)
class Geometry:
    """How an image of any size becomes the model's size × size pixels: open_clip's evaluation transform
    (open_clip.transform.image_transform, is_train=False) up to its conversion to a tensor.

    - shortest: the shorter side becomes `size`, the longer size·long/short truncated (torchvision's
      Resize of one number), then the centre size × size;
    - longest: both sides divided by the larger of side/size and rounded (open_clip's ResizeKeepRatio,
      longest=1), then padded with `fill_color` to size × size, centred (its CenterCropOrPad);
    - squash: resized to size × size, the aspect ratio not kept (SigLIP's).

    A centre crop starts at round((side − size) / 2), Python's rounding, as torchvision's; an image
    already of the target size is not resampled (torchvision returns it as it is).
    """

    size: int
    resize_mode: ResizeMode = "shortest"
    interpolation: Interpolation = "bicubic"
    fill_color: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise ValueError(f"the image size must be a positive number of pixels, got {self.size!r}")
        if self.resize_mode not in get_args(ResizeMode):
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {', '.join(get_args(ResizeMode))}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(_FILTERS)}")
        if not isinstance(self.fill_color, int) or not 0 <= self.fill_color <= 255:
            raise ValueError(f"fill_color must be a grey level 0..255, got {self.fill_color!r}")

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize, before the crop or pad."""
        size = self.size
        if self.resize_mode == "squash":
            return size, size
        if self.resize_mode == "shortest":
            return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        ratio = max(height / size, width / size)
        return round(width / ratio), round(height / ratio)

    def fit(self, image: Image.Image) -> Image.Image:
        """An RGB image of any size → size × size."""
        target = self.resized(*image.size)
        if target != image.size:
            image = image.resize(target, _FILTERS[self.interpolation])
        width, height = image.size
        size = self.size
        if width < size or height < size:  # only `longest` leaves a side short: pad it, centred
            left, top = max(0, size - width) // 2, max(0, size - height) // 2
            padded = Image.new(image.mode, (max(width, size), max(height, size)), (self.fill_color,) * 3)
            padded.paste(image, (left, top))
            image, (width, height) = padded, padded.size
        if (width, height) == (size, size):
            return image
        left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        return image.crop((left, top, left + size, top + size))

    def fit_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] → uint8 [size, size, 3] by `fit`: decoded arrays of any size get the pixels an
        image fitted straight from its file gets."""
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
        if pixels.shape[:2] == (self.size, self.size):
            return pixels
        return to_pixels(self.fit(Image.fromarray(np.ascontiguousarray(pixels))))

    def to_json(self) -> dict:
        return {"size": self.size, "resize_mode": self.resize_mode, "interpolation": self.interpolation,
                "fill_color": self.fill_color}


def _triple(value: object, name: str) -> tuple[float, float, float]:
    values = (value,) * 3 if isinstance(value, int | float) else tuple(value)  # type: ignore[arg-type]
    if len(values) != 3 or not all(isinstance(v, int | float) for v in values):
        raise ValueError(f"{name} must be one number or three (R, G, B), got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class Preprocess:
    """A model's whole input conversion: the geometry, then (x / 255 − mean) / std per channel, as
    open_clip's ToTensor and Normalize compute it."""

    geometry: Geometry
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, Geometry):  # a bare size would fail far away, at the first image
            raise TypeError(f"geometry must be a Geometry, got {type(self.geometry).__name__}")
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    @property
    def size(self) -> int:
        return self.geometry.size

    def to_open_clip(self) -> dict:
        """The keys of open_clip's PreprocessCfg (what an open_clip_config.json's preprocess_cfg holds)."""
        return {**self.geometry.to_json(), "mode": "RGB", "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_open_clip(cls, cfg: Mapping) -> Preprocess:
        """From open_clip's PreprocessCfg keys (a model's `visual.preprocess_cfg`, a tag's or a saved one).
        open_clip evaluates `random` interpolation as bicubic; a non-square size is refused by name."""
        size = cfg.get("size", 224)
        if isinstance(size, list | tuple):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"input size {list(size)} is not square: po-cluster feeds square images only")
            size = size[0]
        if cfg.get("mode", "RGB") != "RGB":
            raise ValueError(f"image mode {cfg.get('mode')!r}: open_clip models take RGB")
        # open_clip's evaluation transform takes bilinear as asked and anything else as bicubic ('random' is a
        # training setting); a value it does not know is refused here rather than read as bicubic.
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in ("bicubic", "bilinear", "random"):
            raise ValueError(f"interpolation {interpolation!r} is not one of bicubic, bilinear")
        geometry = Geometry(int(size), cfg.get("resize_mode") or "shortest",
                            "bilinear" if interpolation == "bilinear" else "bicubic", int(cfg.get("fill_color") or 0))
        return cls(geometry, cfg.get("mean") or OPENAI_MEAN, cfg.get("std") or OPENAI_STD)


def to_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image → uint8 [H, W, 3]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode} (decode converts to RGB)")
    return np.asarray(image, dtype=np.uint8)


def decode_fit(raw: bytes, geometry: Geometry, formats: Sequence[str] | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes → uint8 [size, size, 3]: decode, upright, RGB, fit."""
    return to_pixels(geometry.fit(decode(raw, formats, max_pixels)))
