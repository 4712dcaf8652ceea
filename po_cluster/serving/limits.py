"""The limits a request is held to, and the one error type that turns a broken rule into a 4xx.

The limits on fields (lengths, counts, ranges) are constraints of the request models that
`schemas.request_models(limits)` builds from them; here are the checks a schema cannot
express: the body's size, image files, σ indices against the release. Each check raises
`ApiError(status, param, message, code)`; the HTTP layer writes it as
`{"error": {"message", "type", "param", "code"}}`, `param` naming the field.
Status codes: 400 unreadable body, 401 key, 404 release, 413 too large,
415 image format, 422 anything else about a field, 429 over the key's rate,
503 no replica can take it now (both with Retry-After).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from po_cluster.data import images
from po_cluster.data.images import ImageLimitsConfig

_URL = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]*://")
# Lower case, as browsers write it and as the OpenAPI document's pattern says (it cannot say "any case").
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,")
# The image path's refusals that are not 422: too many bytes or pixels (413), a format not allowed (415).
_REFUSED_STATUS = {"image_too_large": 413, "image_too_many_pixels": 413, "unsupported_image_format": 415}


class LimitsConfig(ImageLimitsConfig):
    """Every request limit; those on an image file are data.images' (the fields it inherits)."""

    max_body_bytes: int = Field(16 << 20, gt=0, description="request body, whatever Content-Length says")
    max_inputs: int = Field(64, gt=0, description="items in one embeddings request")
    max_labels: int = Field(64, gt=0, description="candidate labels in one classify request")
    max_text_chars: int = Field(1000, gt=0, description="one text, label or prompt template")
    t_min: float = Field(-2.0, allow_inf_nan=False)
    t_max: float = Field(4.0, allow_inf_nan=False)
    max_sigma: float = Field(1e4, gt=0, allow_inf_nan=False, description="largest σ override value")

    @model_validator(mode="after")
    def _t_range(self) -> LimitsConfig:
        if not self.t_min <= 0 < 1 <= self.t_max:
            raise ValueError("t_min ≤ 0 and t_max ≥ 1 are required (t = 0 and t = 1 must be servable)")
        return self


class ApiError(Exception):
    """A request that breaks a rule: HTTP status, the field at fault, and a one-line reason."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, param: str | None, message: str, code: str,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.message, self.code = status, param, message, code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        """The HTTP headers the status asks for: the scheme of a 401, when to come back after a 429/503."""
        out = {"www-authenticate": "Bearer"} if self.status == 401 else {}
        if self.retry_after_s is not None:  # whole seconds (RFC 9110), at least 1
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return out

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- knobs and texts


def check_overrides(overrides: dict[int, float] | None, dim: int) -> tuple[tuple[int, float], ...]:
    """σ overrides as a sorted tuple (hashable: requests with equal knobs share one projection). Their
    values were checked with the request (schemas.request_models); the index range is the release's."""
    checked = []
    for index, value in sorted((overrides or {}).items()):
        if not 0 <= index < dim:
            raise ApiError(422, f"sigma_overrides.{index}", f"σ override index {index} is out of range "
                           f"0..{dim - 1} for this release", "sigma_index_out_of_range")
        checked.append((int(index), float(value)))
    return tuple(checked)


def fill_template(template: str, label: str) -> str:
    # replace, not str.format: a template from a request must not reach format's attribute lookups.
    return template.replace("{}", label, 1)


# ---------------------------------------------------------------- images


def _base64_bytes(value: str, param: str, limits: LimitsConfig) -> bytes:
    if _URL.match(value):
        raise ApiError(422, param, "URLs are not fetched: send the image bytes as base64 or a data:image/… URL",
                       "url_not_allowed")
    text = _DATA_URL.sub("", value, count=1)
    if text.startswith("data:"):
        raise ApiError(422, param, "only data:image/<type>;base64,… data URLs are accepted", "bad_data_url")
    text = text.replace("\r", "").replace("\n", "")  # MIME-style line breaks are fine; nothing else but base64
    if len(text) > 4 * math.ceil(limits.max_image_bytes / 3):  # refuse before decoding anything
        raise ApiError(413, param, f"the image is over the limit of {limits.max_image_bytes} bytes",
                       "image_too_large")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, param, "the image is not valid base64", "invalid_base64") from None
    return raw


def decode_image(value: str, param: str, limits: LimitsConfig) -> np.ndarray:
    """base64 (or a data URL) of an allowed image file → uint8 [H, W, 3], its size checked before decoding."""
    return decode_image_bytes(_base64_bytes(value, param, limits), param, limits)


def decode_image_bytes(raw: bytes, param: str, limits: LimitsConfig) -> np.ndarray:
    """The bytes of an allowed image file → upright uint8 [H, W, 3] by the training data's own decoder
    (data.images.decode_limited: limits, EXIF orientation, RGB conversion); its refusals become ApiErrors."""
    try:
        return images.decode_limited(raw, limits)
    except images.ImageRefused as refused:
        raise ApiError(_REFUSED_STATUS.get(refused.code, 422), param, refused.message, refused.code) from None


# ---------------------------------------------------------------- request body

# A request refused for its rate (429) whose body is declared at most this long has the body read and
# dropped, so that its connection (HAProxy's, in Serve) can carry the next request: reading a small body
# costs the gateway less CPU than the new connection that closing forces (docs/results.md, "a 429 that
# keeps its connection"). A longer or chunked body is not read, and the connection is closed.
KEEP_ALIVE_DRAIN_BYTES = 64 * 1024


class RequestGuard:
    """ASGI middleware, before any parsing: the API key (401) and its rate (429), then the body size (413).

    The key comes first so that nothing of an unauthenticated request is parsed. The
    body is read here, counted, and replayed to the app: a chunked upload or a
    Content-Length that lies cannot get more than max_bytes into memory.
    """

    def __init__(self, app: Any, max_bytes: int, check_key: Callable[[str | None], None] | None = None,
                 protected: str = "/v1/") -> None:
        self.app, self.max_bytes, self.check_key, self.protected = app, max_bytes, check_key, protected

    async def _refuse(self, send: Any, error: ApiError, drained: bool = False) -> None:
        body = json.dumps(error.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(name.encode(), value.encode()) for name, value in error.headers().items()]
        if error.status != 401 and not drained:  # the rest of the body is unread: the connection cannot go on
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        try:
            if self.check_key and app_path(scope).startswith(self.protected):
                authorization = headers.get(b"authorization")
                self.check_key(authorization.decode("latin-1") if authorization is not None else None)
            body = await self._read_body(headers.get(b"content-length"), receive)
        except ApiError as error:
            return await self._refuse(send, error, await self._drained(error, headers.get(b"content-length"), receive))
        if body is None:  # the client went away
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _drained(self, error: ApiError, declared: bytes | None, receive: Any) -> bool:
        """Whether a refused request's body has been read to its end (KEEP_ALIVE_DRAIN_BYTES): only for a 429."""
        if error.status != 429 or declared is None or not declared.strip().isdigit() or \
                int(declared) > min(KEEP_ALIVE_DRAIN_BYTES, self.max_bytes):
            return False
        try:
            return await self._read_body(declared, receive) is not None
        except ApiError:  # the body broke the size rules after all: close
            return False

    async def _read_body(self, declared: bytes | None, receive: Any) -> bytes | None:
        too_big = ApiError(413, "body", f"the request body is over the limit of {self.max_bytes} bytes",
                           "body_too_large")
        if declared is not None and not declared.strip().isdigit():
            raise ApiError(400, "body", "the Content-Length header is not a number", "bad_content_length")
        # Declared too big: still read (and drop) up to the limit before answering, so that a client
        # sending a little over the limit gets its 413 rather than a connection reset by unread bytes.
        declared_too_big = declared is not None and int(declared) > self.max_bytes
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise too_big
            if not declared_too_big:
                chunks.append(chunk)
            more = message.get("more_body", False)
        if declared_too_big:
            raise too_big
        return b"".join(chunks)


def app_path(scope: dict) -> str:
    """The request's path inside the app: Serve gives the full path with the route prefix as root_path, so
    under a prefix other than "/" the raw path would not start with /v1/ (and keys would not be asked)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")  # a root of "/" is no prefix
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; psutil is not a dependency)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
