"""The one way an image file becomes pixels: training data, evaluation sets, the typographic
builder, the serving endpoint and the embed job all go through these functions.

    bytes ──decode──▶ upright RGB image ──square──▶ size × size (resize the shorter side, centre crop)

Sharing them is the point: a phone photo carries its rotation in EXIF, and a reader
that skipped it would see the picture on its side while another saw it upright;
a reader with its own resize would feed the model slightly different pixels than
the one it was trained on. Pure functions of their arguments (Pillow and NumPy only,
no Ray, no torch); what they refuse is an `ImageRefused` whose `code` is stable
(the endpoint's error code) and whose message names the problem.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# CLIP preprocessing's filter; Pillow widens its support when it shrinks, so downscaling is antialiased.
RESAMPLE = Image.Resampling.BICUBIC
# Magic numbers, only to name a refused format in the message: asking Pillow to identify it
# would parse bytes that were refused.
_SIGNATURES = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"<svg", "SVG"),
               (b"<?xml", "SVG/XML"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"))
# Raised while reading pixels by truncated or corrupt files (Pillow has no single type for them).
_CORRUPT = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageRefused(ValueError):
    """Bytes that do not become pixels; `code` is one of empty_image, not_an_image,
    unsupported_image_format, image_too_many_pixels, corrupt_image."""

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


def square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bicubic) and centre-crop to size × size, as CLIP preprocessing does."""
    if size <= 0:
        raise ValueError(f"the square size must be a positive number of pixels, got {size}")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_pixels(image: Image.Image) -> np.ndarray:
    """An RGB image → uint8 [H, W, 3]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode} (decode converts to RGB)")
    return np.asarray(image, dtype=np.uint8)


def square_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [size, size, 3] by `square`: decoded arrays of any size get the pixels an
    image squared straight from its file gets."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {list(pixels.shape)}")
    if pixels.shape[:2] == (size, size):
        return pixels
    return to_pixels(square(Image.fromarray(np.ascontiguousarray(pixels)), size))


def decode_square(raw: bytes, size: int, formats: Sequence[str] | None = None,
                  max_pixels: int | None = None) -> np.ndarray:
    """Image file bytes → uint8 [size, size, 3]: decode, upright, RGB, square."""
    return to_pixels(square(decode(raw, formats, max_pixels), size))
