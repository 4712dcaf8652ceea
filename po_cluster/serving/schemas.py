"""HTTP request and response models of the serving API (they make the OpenAPI document).

Embeddings follow the OpenAI shape. How a request tells texts from images: an
`input` item is either a plain string (a text) or an object with a `type`:
`{"type": "text", "text": "…"}` or `{"type": "image", "image": "<base64>"}`,
where the image is base64 of the file bytes (PNG, JPEG or WebP by default) or
a `data:image/…;base64,…` URL. Nothing else is an image: an `http(s)://` URL is
refused (the server never fetches anything a request names).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]
SigmaValue = Annotated[float, Field(gt=0, allow_inf_nan=False, description="a value of σ_i (not of log σ_i)")]
ReleaseName = Annotated[str, Field(min_length=1, max_length=200, description='a release id, or "latest"')]


class Strict(BaseModel):
    # Unknown fields are refused by name: a misspelt knob must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class Knobs(Strict):
    """What every call takes: the release, t, and σ overrides."""

    model: ReleaseName = Field("latest", description='release id, or "latest" (the store\'s latest pointer)')
    t: Finite = Field(1.0, description="the knob: 0 is the starting model, 1 the release, "
                    "between a path, >1 amplifies (trained tower weights θ_ref + t·(θ − θ_ref), σ_i^t)")
    sigma_overrides: dict[int, SigmaValue] | None = Field(
        None, description="index → σ value, applied after t; indices 0..d-1 of the release's spectral layer")


class TextInput(Strict):
    type: Literal["text"]
    text: str


class ImageInput(Strict):
    type: Literal["image"]
    image: str = Field(description="base64 of a PNG/JPEG/WebP file, or a data:image/…;base64,… URL")


InputObject = Annotated[TextInput | ImageInput, Field(discriminator="type")]
InputItem = str | InputObject


class EmbeddingsRequest(Knobs):
    input: str | list[InputItem] = Field(
        description='a text, or a list of texts (strings or {"type":"text"}) and images ({"type":"image"})')
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: a JSON list; base64: little-endian float32 bytes (as OpenAI clients ask)")
    user: str | None = Field(None, max_length=256, description="accepted for OpenAI compatibility, ignored")


class ClassifyRequest(Knobs):
    image: str = Field(description="base64 of a PNG/JPEG/WebP file, or a data:image/…;base64,… URL")
    labels: list[str] = Field(min_length=1, description="candidate labels, distinct")
    prompt_template: str | None = Field(
        None, description='contains "{}" once, replaced by each label; default: the release\'s template')


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
    image_tower: str = Field(description="what t moves besides W's σ: frozen (only W), full or last_blocks:k "
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
