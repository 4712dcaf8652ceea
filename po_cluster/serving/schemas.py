"""HTTP request and response models of the serving API (they make the OpenAPI document).

Embeddings follow the OpenAI shape. How a request tells texts from images: an
`input` item is either a plain string (a text) or an object with a `type`:
`{"type": "text", "text": "…"}`, `{"type": "image", "image": "<base64>"}`, where the
image is base64 of the file bytes (PNG, JPEG or WebP by default) or a
`data:image/…;base64,…` URL, or OpenAI's content part
`{"type": "image_url", "image_url": {"url": "data:image/…;base64,…"}}`, whose url must be
a data URL. Nothing else is an image: an `http(s)://` URL is refused (the server never
fetches anything a request names).

`dimensions` (which OpenAI clients may send) is accepted when it equals the release's
embedding width, and changes nothing then; any other value is a 422 naming that width.
Shortening is not offered: CLIP embeddings are not trained so that a prefix of one keeps
its meaning (as Matryoshka-trained ones are), so a truncated vector would silently score
worse.

The request classes here are the types the gateway works with; what a server
validates, and documents, is `request_models(limits)`: the same classes with that
server's limits as field constraints, so the OpenAPI document states every rule
the validation applies (lengths, counts, ranges, patterns, distinct labels).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model
from pydantic_core import PydanticCustomError

from po_cluster.config import Strict
from po_cluster.serving.limits import LimitsConfig

# JSON Schema patterns (searched, not anchored, as JSON Schema does), and the validation uses the same ones.
# Not blank: a character that no regex engine counts as white space. Spelt out, since \S differs between
# Python (which counts \x1c-\x1f), Rust and ECMA-262 (\ufeff, and not \x85).
NON_BLANK = r"[^\t\n\x0b\x0c\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
# "{}" exactly once: what may stand around it is any text in which no "{" is followed by "}".
_NO_PLACEHOLDER = r"(?:[^{]|\{+[^{}])*\{*"
ONE_PLACEHOLDER = rf"^{_NO_PLACEHOLDER}\{{\}}{_NO_PLACEHOLDER}$"
# A release id (the store's rule: letters, digits, ".", "_", "-", no "..", ≤ 128) or "latest".
RELEASE_NAME = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
SIGMA_INDEX = r"^(?:0|[1-9][0-9]*)$"
# A format of our own: base64 of an image file (MIME line breaks allowed), or the same as a lower-case
# data:image/<type>;base64, URL. No pattern: none can say "a PNG", and the decoder is what checks it.
IMAGE_FORMAT = "image-base64"
# OpenAI's image_url content part: only a data URL of an image (the server fetches nothing), the same
# base64 after it. Its own format, for document readers and fuzzers: always a data URL. The validation
# checks DATA_URL; the document gives the format, not the pattern, since no pattern can say "an image
# file" and a value made to the pattern alone (a fuzzer's) is no image.
DATA_URL = r"^data:image/[A-Za-z0-9.+-]+;base64,"
IMAGE_DATA_URL_FORMAT = "image-data-url"
URL_NOT_FETCHED = ("only a data:image/<type>;base64,… URL is accepted: the server never fetches a remote URL; "
                   "send the image's bytes in a data URL")


class StrictRequest(Strict):
    # The configs' base (unknown fields refused by name: a misspelt knob must not be silently ignored;
    # frozen), and stricter: a number is a JSON number, not a string that parses as one, as the document
    # says (a config stays lax, as YAML writes some numbers as strings). Python's regex engine: the one
    # the document's readers (and schema-driven fuzzers) use for the same patterns.
    model_config = ConfigDict(strict=True, regex_engine="python-re")


def _matching(pattern: str, code: str, message: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.search(value):
            raise PydanticCustomError(code, message)
        return value

    return AfterValidator(check)


def _index(value: object) -> object:
    """A JSON object key "12" → 12; anything else is left to fail as not an integer."""
    return int(value) if isinstance(value, str) and re.fullmatch(SIGMA_INDEX, value) else value


def _integral(value: object) -> object:
    """A JSON number with no fraction (64.0) is an integer, as JSON Schema's "integer" says; strict mode
    alone would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _distinct(labels: list[str]) -> list[str]:
    first: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in first:
            raise PydanticCustomError("duplicate_label", f"labels.{i} repeats labels.{first[label]} "
                                      f"({label!r}); labels must be distinct")
        first[label] = i
    return labels


def _text(limits: LimitsConfig, what: str) -> Any:
    return Annotated[str, Field(max_length=limits.max_text_chars, json_schema_extra={"pattern": NON_BLANK}),
                     _matching(NON_BLANK, "empty_text", f"the {what} is empty")]


def _image(limits: LimitsConfig) -> Any:
    formats = "/".join(limits.image_formats)
    return Annotated[str, Field(
        json_schema_extra={"format": IMAGE_FORMAT},
        description=f"base64 of a {formats} file (at most {limits.max_image_bytes} bytes and "
                    f"{limits.max_image_pixels} pixels, else 413; another format: 415), or a "
                    "data:image/…;base64,… URL; checked by decoding it")]


def _data_url(limits: LimitsConfig) -> Any:
    formats = "/".join(limits.image_formats)
    return Annotated[str, Field(
        json_schema_extra={"format": IMAGE_DATA_URL_FORMAT},
        description=f"data:image/<type>;base64, and a {formats} file (at most {limits.max_image_bytes} bytes and "
                    f"{limits.max_image_pixels} pixels, else 413; another format: 415); a remote URL is a 422"),
        _matching(DATA_URL, "url_not_allowed", URL_NOT_FETCHED)]


SigmaIndex = Annotated[int, BeforeValidator(_index), Field(ge=0)]
ReleaseName = Annotated[str, Field(min_length=1, max_length=128, json_schema_extra={"pattern": RELEASE_NAME},
                                   description='a release id, or "latest"'),
                        _matching(RELEASE_NAME, "invalid_release_id",
                                  "not a release id: letters, digits, '.', '_' and '-', no '..'")]


class Knobs(StrictRequest):
    """What every call takes: the release, t, and σ overrides."""

    model: ReleaseName = Field("latest", description='release id, or "latest" (the store\'s latest pointer)')
    t: float = Field(1.0, allow_inf_nan=False,
                     description="the knob: 0 is the starting model, 1 the release, between a path, >1 "
                     "amplifies (trained tower weights θ_ref + t·(θ − θ_ref), σ_i^t)")
    sigma_overrides: dict[SigmaIndex, float] | None = Field(
        None, description="index → σ value, applied after t; indices 0..d-1 of the release's spectral layer "
                          "(d differs per release: a larger index is a 422)")


class TextInput(StrictRequest):
    type: Literal["text"]
    text: str


class ImageInput(StrictRequest):
    type: Literal["image"]
    image: str = Field(description="base64 of a PNG/JPEG/WebP file, or a data:image/…;base64,… URL")


class ImageUrl(StrictRequest):
    url: str = Field(description="a data:image/…;base64,… URL (a remote URL is refused: nothing is fetched)")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="accepted for OpenAI compatibility, ignored: every image is seen at the model's size")


class ImageUrlInput(StrictRequest):
    """OpenAI's image content part."""

    type: Literal["image_url"]
    image_url: ImageUrl


InputObject = Annotated[TextInput | ImageInput | ImageUrlInput, Field(discriminator="type")]
InputItem = str | InputObject


class EmbeddingsRequest(Knobs):
    input: str | list[InputItem] = Field(
        description='a text, or a list of texts (strings or {"type":"text"}) and images ({"type":"image"}, or '
                    'OpenAI\'s {"type":"image_url","image_url":{"url":"data:…"}})')
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a JSON list; base64: little-endian float32 bytes (as OpenAI clients ask)")
    dimensions: Annotated[int, Field(ge=1), BeforeValidator(_integral)] | None = Field(
        None, description="accepted when it equals the release's embedding width (GET /v1/models lists the "
                                "releases; the width is d of sigma_overrides); any other value is a 422: CLIP "
                                "embeddings are not trained to be shortened")
    user: str | None = Field(None, max_length=256, description="accepted for OpenAI compatibility, ignored")


class ClassifyRequest(Knobs):
    image: str = Field(description="base64 of a PNG/JPEG/WebP file, or a data:image/…;base64,… URL")
    labels: list[str] = Field(min_length=1, description="candidate labels, distinct")
    prompt_template: str | None = Field(
        None, description='contains "{}" once, replaced by each label; default: the release\'s template')


@dataclass(frozen=True)
class RequestModels:
    embeddings: type[EmbeddingsRequest]
    classify: type[ClassifyRequest]


@lru_cache(maxsize=8)
def request_models(limits: LimitsConfig) -> RequestModels:
    """The request classes with `limits` as their fields' constraints (subclasses of the ones above, under
    the same names: the OpenAPI document is the server's own)."""
    text = _text(limits, "text")
    t = Annotated[float, Field(ge=limits.t_min, le=limits.t_max, allow_inf_nan=False)]
    sigma = Annotated[float, Field(gt=0, le=limits.max_sigma, allow_inf_nan=False,
                                   description="a value of σ_i (not of log σ_i)")]
    knobs: dict[str, Any] = {
        "t": (t, Knobs.model_fields["t"]),
        "sigma_overrides": (Annotated[dict[SigmaIndex, sigma], Field(
            json_schema_extra={"propertyNames": {"pattern": SIGMA_INDEX}})] | None,
            Knobs.model_fields["sigma_overrides"])}
    text_input = create_model("TextInput", __base__=TextInput, text=(text, ...))
    image_input = create_model("ImageInput", __base__=ImageInput, image=(_image(limits), ...))
    image_url = create_model("ImageUrl", __base__=ImageUrl, url=(_data_url(limits), ...))
    image_url_input = create_model("ImageUrlInput", __base__=ImageUrlInput, image_url=(image_url, ...))
    item: Any = text | Annotated[text_input | image_input | image_url_input, Field(discriminator="type")]
    items: Any = Annotated[list[item], Field(min_length=1, max_length=limits.max_inputs)]
    embeddings = create_model("EmbeddingsRequest", __base__=EmbeddingsRequest, **knobs,
                              input=(text | items, EmbeddingsRequest.model_fields["input"]))
    label: Any = _text(limits, "label")
    labels: Any = Annotated[list[label], Field(
        min_length=1, max_length=limits.max_labels, json_schema_extra={"uniqueItems": True}),
        AfterValidator(_distinct)]
    template = Annotated[str, Field(max_length=limits.max_text_chars, json_schema_extra={
        "pattern": ONE_PLACEHOLDER}), _matching(ONE_PLACEHOLDER, "bad_prompt_template",
                                               'the prompt template must contain "{}" exactly once, e.g. '
                                               '"a photo of a {}."')]
    classify = create_model(
        "ClassifyRequest", __base__=ClassifyRequest, **knobs, image=(_image(limits), ...),
        labels=(labels, Field(description="candidate labels, distinct")),
        prompt_template=(template | None, ClassifyRequest.model_fields["prompt_template"]))
    return RequestModels(cast(type[EmbeddingsRequest], embeddings), cast(type[ClassifyRequest], classify))


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the texts (images count 0)")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str = Field(description="the release id that answered")
    usage: Usage


class Score(BaseModel):
    label: str
    index: int = Field(description="position of the label in the request")
    probability: float
    logit: float = Field(description="s·⟨W(t)f(x), W(t)g(y)⟩ after re-normalising")


class ClassifyResponse(BaseModel):
    object: Literal["classification"] = "classification"
    model: str
    t: float
    prompt_template: str
    scores: list[Score] = Field(description="best first")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="unix time of the release's manifest")
    owned_by: str = "po-cluster"
    latest: bool
    image_tower: str = Field(description="what t moves besides W's σ: frozen (only W), full, last_blocks:k or lora:… "
                             "(those image-tower weights, θ_ref + t·(θ − θ_ref))")
    size_bytes: int = Field(description="bytes of the release's files in the store")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, …")
    param: str | None = Field(description="the request field at fault, e.g. t, labels, input.2.image")
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ProcessInfo(BaseModel):
    pid: int
    rss_bytes: int
    releases_loaded: list[str] | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    default_release: str
    gateway: ProcessInfo
    model: ProcessInfo
