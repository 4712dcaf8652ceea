"""What schemathesis is told beyond the OpenAPI document (loaded with SCHEMATHESIS_HOOKS by test_serving_schema).

1. How to make a value of the document's `image-base64` format: base64 of a small image file in an allowed
   format, sometimes as a data URL or with MIME line breaks. A regex cannot say "a PNG"; without this every
   generated image would be refused by the decoder.
   The `image-data-url` format (OpenAI's image_url content part) is the same, always as a data URL.
2. σ override indices below the served releases' d (SCHEMA_DIM), and `dimensions` equal to it. The document
   says both depend on the named release and cannot give a number that holds for every release; only valid
   (positive) cases are changed, negative ones still go out as generated.
"""
from __future__ import annotations

import base64
import io
import os

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = tuple(os.environ.get("SCHEMA_IMAGE_FORMATS", "PNG,JPEG,WEBP").split(","))
DIM = int(os.environ.get("SCHEMA_DIM", "0"))


@st.composite
def _image_file(draw: st.DrawFn) -> tuple[str, str]:
    """(format, base64 of a small image file in it, sometimes with MIME line breaks)."""
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    seed, fmt = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(FORMATS))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    data = base64.b64encode(buffer.getvalue()).decode()
    if draw(st.booleans()):
        data = "\r\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    return fmt, data


def _data_url(file: tuple[str, str]) -> str:
    return f"data:image/{file[0].lower()};base64,{file[1]}"


@st.composite
def _image_base64(draw: st.DrawFn) -> str:
    file = draw(_image_file())
    return _data_url(file) if draw(st.booleans()) else file[1]


schemathesis.openapi.format("image-base64", _image_base64())
schemathesis.openapi.format("image-data-url", _image_file().map(_data_url))


@schemathesis.hook
def map_case(context, case):  # noqa: ARG001 - the hook's signature
    meta = case.meta
    body = case.body
    if DIM and meta is not None and meta.generation.mode.is_positive and isinstance(body, dict):
        overrides = body.get("sigma_overrides")
        if isinstance(overrides, dict):
            body["sigma_overrides"] = {k: v for k, v in overrides.items() if int(k) < DIM}
        if isinstance(body.get("dimensions"), int | float) and not isinstance(body["dimensions"], bool):
            body["dimensions"] = DIM
    return case
