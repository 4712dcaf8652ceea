"""The FastAPI application: routes, the error shape, the request guard, the playground page.

Built per gateway replica by `make_api(service)` (Serve's late-bound ingress), so
the limits and keys of that replica's args are in the middleware. Every error,
FastAPI's own included, leaves as `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from po_cluster.serving.gateway import GatewayService
from po_cluster.serving.limits import ApiError, RequestGuard
from po_cluster.serving.observe import REQUEST_ID, AccessLog
from po_cluster.serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorResponse,
    Health,
    ModelList,
    request_models,
)

log = logging.getLogger("po_cluster.serving")
PLAYGROUND = Path(__file__).with_name("playground.html")
# Documents the scheme in the OpenAPI document only; RequestGuard does the checking, before any parsing.
_bearer = HTTPBearer(auto_error=False, description="an API key, when the server is configured with keys")
_WHY = {400: "the body is not JSON, or Content-Length is not a number", 401: "API key missing or not valid",
        404: "no such release", 413: "body, image bytes or image pixels over the limit (the connection is closed)",
        415: "image format not allowed", 422: "a field breaks a rule (error.param names it)",
        429: "over the API key's rate", 503: "no model replica can answer now, or a release cannot be loaded"}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer",
                                                                                            "minimum": 1}}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    413: {"Connection": {"description": "close", "schema": {"type": "string"}}},
    429: _RETRY_AFTER, 503: _RETRY_AFTER}
_PAGE_HEADERS = {"content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
                 "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; form-action 'none'"}


def _param(loc: tuple) -> str:
    """A pydantic error location as a field path: ('body', 'input', 'list[…]', 0, 'tagged-union[…]', 'image',
    'image') → 'input.0.image'. Union branches and tags are pydantic's, not the request's."""
    parts, skip_tag = [], False
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if skip_tag:
            skip_tag = False
            continue
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "function-after")):
            skip_tag = part.startswith("tagged-union")
            continue
        parts.append(str(part))
    return ".".join(parts) or "body"


_BRANCH_MISMATCH = ("string_type", "list_type", "dict_type", "model_attributes_type")


def _precision(error: dict) -> tuple[int, bool]:
    """Of a union's errors, the one that says most: the deepest field, then not "wrong branch of the union"."""
    return len(_param(tuple(error.get("loc", ()))).split(".")), error.get("type") not in _BRANCH_MISMATCH


def _validation_error(error: RequestValidationError) -> ApiError:
    errors = list(error.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        return ApiError(400, "body", f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(),
                        "invalid_json")
    first = max(errors, key=_precision)
    param = _param(tuple(first.get("loc", ())))
    message = f"{param}: {first.get('msg', 'invalid')}"
    if param.startswith("input.") and first.get("type") in _BRANCH_MISMATCH:
        message = (f"{param}: an input item is a string (a text), {{\"type\": \"text\", \"text\": …}}, "
                   f"{{\"type\": \"image\", \"image\": <base64>}} or "
                   f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/…;base64,…\"}}}}")
    return ApiError(422, param, message, str(first.get("type", "invalid")))


def _json_error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers() or None)


def _handlers(app: FastAPI, echo_request_id: bool) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _json_error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _json_error(_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        answer = _json_error(ApiError(error.status_code, None, str(error.detail), f"http_{error.status_code}"))
        answer.headers.update(error.headers or {})  # a 405's Allow, Starlette's
        return answer

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # a bug of ours: the client gets no traceback
        # This handler runs outside every middleware of ours: the id comes from the state AccessLog left.
        request_id = getattr(request.state, "request_id", None)
        headers = {REQUEST_ID: request_id} if echo_request_id and request_id else None
        return JSONResponse(ApiError(500, None, "internal error", "internal_error").body(), status_code=500,
                            headers=headers)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers an operation really gives, each with its headers."""
    return {code: {"model": ErrorResponse, "description": _WHY[code], "headers": _HEADERS.get(code, {})}
            for code in sorted(codes)}


def make_api(service: GatewayService, echo_request_id: bool = True) -> FastAPI:
    """The app; `echo_request_id=False` in Serve, whose own middleware returns the x-request-id (observe.py)."""
    app = FastAPI(title="po-cluster serving", version="1", description=(
        "Aligned CLIP (adjustable σ) embeddings and zero-shot classification. Every call takes t "
        "(0 = the starting model, 1 = the release, every trained weight on the path between) and optional "
        "σ overrides. A method a path does not serve is a 405 with Allow."))
    app.add_middleware(RequestGuard, max_bytes=service.limits.max_body_bytes, check_key=service.check_key)
    _handlers(app, echo_request_id)
    # Every path's body is read by the guard (400, 413); keys (401) and rates (429) only where configured:
    # a status or scheme the server cannot give would be a false promise.
    guarded = (400, 413) + ((401,) if service.keys.enabled else ()) + \
        ((429,) if service.args.rate_limit.rate_per_s is not None else ())
    security: dict[str, Any] = {"dependencies": [Security(_bearer)] if service.keys.enabled else []}
    # This server's limits as the request bodies' constraints: what /openapi.json says is what is validated.
    requests = request_models(service.limits)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"), headers=_PAGE_HEADERS)

    @app.get("/healthz", response_model=Health, responses=_errors(400, 413, 503))
    async def healthz() -> Health:
        return await service.health()

    @app.get("/v1/models", response_model=ModelList, responses=_errors(*guarded, 503), **security)
    async def models() -> ModelList:
        return await service.models()

    async def embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        return await service.embeddings(body)

    async def classify(body: ClassifyRequest) -> ClassifyResponse:
        return await service.classify(body)

    # FastAPI reads the body's model from the annotation: this app's classes, bound before registering.
    embeddings.__annotations__["body"], classify.__annotations__["body"] = requests.embeddings, requests.classify
    for path, endpoint, response in (("/v1/embeddings", embeddings, EmbeddingsResponse),
                                     ("/v1/classify", classify, ClassifyResponse)):
        app.post(path, response_model=response, responses=_errors(*guarded, 404, 415, 422, 503),
                 **security)(endpoint)
    # Added last, so outermost: it sees the guard's refusals too. Routes as labels, never raw paths.
    app.add_middleware(AccessLog, routes=[getattr(route, "path", "") for route in app.routes],
                       echo=echo_request_id)
    return app
