"""Serving without Ray: image decoding and its limits, knob checks, API keys, the request guard, the args and
serve/config.yaml. (End to end over HTTP: tests/integration/serving/test_serving.py.)"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from po_cluster.serving.args import ServeConfig
from po_cluster.serving.auth import ApiKeys, AuthConfig
from po_cluster.serving.limits import (
    ApiError,
    LimitsConfig,
    RequestGuard,
    check_overrides,
    decode_image,
    fill_template,
)
from po_cluster.serving.ratelimit import RateLimitConfig, TokenBuckets

ROOT = Path(__file__).resolve().parents[3]
LIMITS = LimitsConfig(max_image_pixels=10_000, max_image_bytes=50_000)


def _file(image: np.ndarray, fmt: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def _refused(value: str, limits: LimitsConfig = LIMITS) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(value, "image", limits)
    assert caught.value.param == "image"
    return caught.value


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)


def test_allowed_formats_decode_png_exactly(image):
    assert np.array_equal(decode_image(_file(image, "PNG"), "image", LIMITS), image)
    for fmt in ("JPEG", "WEBP"):
        assert decode_image(_file(image, fmt), "image", LIMITS).shape == (40, 30, 3)
    data = _file(image, "PNG")
    wrapped = "data:image/png;base64," + "\n".join(data[i:i + 76] for i in range(0, len(data), 76))
    assert np.array_equal(decode_image(wrapped, "image", LIMITS), image)  # data URL, MIME line breaks


def test_refusals_name_the_reason(image):
    assert _refused(_file(image, "GIF")).status == 415
    assert _refused(_file(image, "BMP")).code == "unsupported_image_format"
    assert _refused("https://example.com/x.png").code == "url_not_allowed"
    assert _refused("file:///etc/passwd").code == "url_not_allowed"
    assert _refused("%%%").code == "invalid_base64"
    assert _refused(base64.b64encode(b"plain text").decode()).code == "not_an_image"
    assert _refused("A" * 80_000).status == 413  # too many bytes: refused before decoding
    big = np.zeros((200, 200, 3), np.uint8)
    assert _refused(_file(big, "PNG")).code == "image_too_many_pixels"
    assert _refused(_file(image, "PNG"), LimitsConfig(image_formats=("JPEG",))).status == 415


def test_a_decompression_bomb_is_refused_from_its_header():
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)  # 30 GB of pixels, announced
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) \
        + chunk(b"IEND", b"")
    error = _refused(base64.b64encode(png).decode(), LimitsConfig())
    assert (error.status, error.code) == (413, "image_too_many_pixels")


def test_sigma_index_range_is_the_release_s():
    assert check_overrides({5: 2.0, 1: 0.5}, 8) == ((1, 0.5), (5, 2.0))
    for overrides, param in (({8: 1.0}, "sigma_overrides.8"), ({-1: 1.0}, "sigma_overrides.-1")):
        with pytest.raises(ApiError) as caught:
            check_overrides(overrides, 8)
        assert caught.value.param == param and caught.value.status == 422
    assert fill_template("a {0.__class__} {}", "cat") == "a {0.__class__} cat"  # never str.format


def test_api_keys_from_env_and_rotating_file(tmp_path):
    assert not ApiKeys(AuthConfig(), {}).enabled
    ApiKeys(AuthConfig(), {}).check(None)  # no source: no key asked
    keys = ApiKeys(AuthConfig(api_keys_env="KEYS"), {"KEYS": "one, two"})
    keys.check("Bearer two")
    for header, code in ((None, "missing_api_key"), ("Basic two", "missing_api_key"), ("Bearer three",
                                                                                        "invalid_api_key")):
        with pytest.raises(ApiError) as caught:
            keys.check(header)
        assert (caught.value.status, caught.value.code) == (401, code)
    with pytest.raises(ValueError, match="KEYS"):
        ApiKeys(AuthConfig(api_keys_env="KEYS"), {})  # named but empty: refuse to run open
    with pytest.raises(ValueError, match="secret file"):
        ApiKeys(AuthConfig(api_keys_file=str(tmp_path / "absent")), {})
    secret = tmp_path / "keys"
    secret.write_text("old-key\n")
    keys = ApiKeys(AuthConfig(api_keys_file=str(secret)), {})
    keys.check("Bearer old-key")
    secret.write_text("new-key-after-rotation\n")
    keys.check("Bearer new-key-after-rotation")
    with pytest.raises(ApiError):
        keys.check("Bearer old-key")


def _through_guard(body_parts: list[bytes], headers: dict[bytes, bytes], max_bytes: int = 100) -> tuple[int, dict]:
    seen = {}

    async def app(scope, receive, send):
        message = await receive()
        seen["body"] = message["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    messages = [{"type": "http.request", "body": part, "more_body": i < len(body_parts) - 1}
                for i, part in enumerate(body_parts)]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/classify", "headers": list(headers.items())}
    asyncio.run(RequestGuard(app, max_bytes)(scope, receive, send))
    body = json.loads(sent[1]["body"]) if sent[1]["body"] != b"{}" else {"passed": seen["body"]}
    return sent[0]["status"], body


def test_request_guard_counts_declared_and_received_bytes():
    assert _through_guard([b"a" * 60, b"b" * 40], {}) == (200, {"passed": b"a" * 60 + b"b" * 40})
    status, body = _through_guard([b"a" * 60, b"b" * 41], {})  # chunked past the limit
    assert status == 413 and body["error"]["param"] == "body"
    assert _through_guard([b"a"], {b"content-length": b"101"})[0] == 413
    assert _through_guard([b"a" * 200], {b"content-length": b"10"})[0] == 413  # a lying Content-Length
    assert _through_guard([b"a"], {b"content-length": b"ten"})[0] == 400


def test_serve_args_are_validated_at_the_edge():
    args = ServeConfig.model_validate({"store": "/tmp/store"})
    assert args.default_release == "latest" and args.batching.max_batch_size == 16
    for bad, field in (({"store": "/s", "batching": {"max_batch_size": 0}}, "max_batch_size"),
                       ({"store": "/s", "limits": {"t_min": 0.5}}, "t_min"),
                       ({"store": "/s", "default_release": "../x"}, "default_release"),
                       ({"store": "/s", "model": {"max_ongoing_requests": 4}}, "max_ongoing_requests"),
                       ({"store": "/s", "limts": {}}, "limts"),
                       ({}, "store")):
        with pytest.raises(ValidationError, match=field):
            ServeConfig.model_validate(bad)


def test_serve_config_yaml_is_a_serve_deploy_config_whose_args_build_the_app():
    from ray.serve.schema import ServeDeploySchema

    from po_cluster.serving.app import build_app
    from po_cluster.serving.args import check_application

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app_config = schema.applications[0]
    assert app_config.import_path == "po_cluster.serving.app:build_app"
    assert set(app_config.args) <= {"store", "store_settings", "model"}, "args: only what needs new replicas"
    check_application(config["applications"][0])
    names = {d.name for d in app_config.deployments}
    assert names == {"Gateway", "AlignedModel"} and all(d.user_config for d in app_config.deployments)
    application = build_app(app_config.args)  # binds the deployments; needs no cluster
    assert type(application).__name__ == "Application"


def _application(**change) -> dict:
    app = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"][0]
    entries = {d["name"]: d for d in app["deployments"]}
    for where, value in change.items():
        section, _, rest = where.partition("__")
        node = app["args"] if section == "args" else entries[section]
        *parents, last = rest.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return app


@pytest.mark.parametrize("where,value,named", [
    ("args__store", 3, "args.store"),
    ("args__stor", "/s", "args.stor"),
    ("args__model__max_releases_per_replica", 0, "args.model.max_releases_per_replica"),
    ("Gateway__user_config__limits__t_min", 0.5, "deployments[Gateway].user_config.limits"),
    ("Gateway__user_config__default_release", "../x", "deployments[Gateway].user_config.default_release"),
    ("Gateway__user_config__rate_limit__rate_per_s", -1, "deployments[Gateway].user_config.rate_limit.rate_per_s"),
    ("Gateway__user_config__limts", {}, "deployments[Gateway].user_config.limts"),
    ("AlignedModel__user_config__max_batch_size", 0, "deployments[AlignedModel].user_config.max_batch_size"),
    ("AlignedModel__max_ongoing_requests", 4, "deployments[AlignedModel].max_ongoing_requests"),
    ("AlignedModel__num_replicas", "two", "num_replicas"),
])
def test_every_section_of_a_serve_config_is_checked_naming_the_field(where, value, named):
    from po_cluster.config import ConfigError
    from po_cluster.serving.args import check_application

    with pytest.raises(ConfigError, match=re.escape(named)):
        check_application(_application(**{where: value}))


def test_serve_args_split_into_the_options_and_user_configs_a_config_states():
    """One ServeConfig document (po-cluster serve, start_local) makes the same sections as serve/config.yaml."""
    from po_cluster.serving.args import check_application

    args = ServeConfig.model_validate({"store": "/s", "default_release": "r-1", "rate_limit": {"rate_per_s": 5},
                                     "model": {"num_replicas": 2, "max_replicas_per_node": 1, "num_cpus": 2},
                                     "gateway": {"num_replicas": 2}})
    app = {"name": "a", "import_path": "po_cluster.serving.app:build_app", "args": args.app_args(),
           "deployments": args.deployments()}
    assert check_application(app).store == "/s"
    gateway, model = app["deployments"]
    settings = gateway["user_config"]
    assert settings["default_release"] == "r-1" and settings["rate_limit"]["rate_per_s"] == 5
    assert (model["num_replicas"], model["max_replicas_per_node"], model["ray_actor_options"]["num_cpus"]) == (2, 1, 2)
    assert model["user_config"]["max_batch_size"] == gateway["user_config"]["batching"]["max_batch_size"]


def test_refusals_carry_their_headers():
    assert ApiError(401, "authorization", "no", "missing_api_key").headers() == {"www-authenticate": "Bearer"}
    assert ApiError(429, None, "slow down", "rate_limited", retry_after_s=0.2).headers() == {"retry-after": "1"}
    assert ApiError(503, None, "later", "overloaded", retry_after_s=2.5).headers() == {"retry-after": "3"}
    assert ApiError(422, "t", "bad", "t_out_of_range").headers() == {}


def test_token_bucket_per_key_id_refuses_with_the_wait():
    now = [0.0]
    buckets = TokenBuckets(RateLimitConfig(rate_per_s=2, burst=3), clock=lambda: now[0])
    for _ in range(3):
        buckets.take("a")
    with pytest.raises(ApiError) as caught:
        buckets.take("a")
    assert caught.value.status == 429 and caught.value.headers()["retry-after"] == "1"
    assert caught.value.retry_after_s == pytest.approx(0.5)
    buckets.take("b")  # another key has its own bucket
    now[0] = 0.5  # one token back after 1/rate s
    buckets.take("a")
    with pytest.raises(ApiError):
        buckets.take("a")
    unlimited = TokenBuckets(RateLimitConfig())
    for _ in range(1000):
        unlimited.take("anonymous")


def test_key_id_is_a_digest_not_the_key(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text("key-one\nkey-two\n")
    keys = ApiKeys(AuthConfig(api_keys_file=str(secret)))
    one, two = keys.check("Bearer key-one"), keys.check("Bearer key-two")
    assert one != two and "key-one" not in one and len(one) == 16
    assert ApiKeys(AuthConfig()).check(None) == "anonymous"


def test_rate_limited_request_is_refused_before_its_body_is_read():
    buckets = TokenBuckets(RateLimitConfig(rate_per_s=1, burst=1))
    sent: list[dict] = []

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        raise AssertionError("the body must not be read")

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, 100, check_key=lambda header: buckets.take("anonymous"))
    buckets.take("anonymous")
    scope = {"type": "http", "path": "/v1/classify", "headers": []}
    asyncio.run(guard(scope, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 429 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"


def _refused_for_rate(declared: bytes | None, chunks: list[bytes]) -> tuple[dict, list[bytes]]:
    """The 429 of a request over its rate whose body is `chunks`, and what of the body the guard read."""
    buckets = TokenBuckets(RateLimitConfig(rate_per_s=1, burst=1))
    buckets.take("anonymous")
    sent: list[dict] = []
    pending, read = list(chunks), []

    async def app(scope, receive, send):
        raise AssertionError("the app must not run")

    async def receive():
        chunk = pending.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, 100, check_key=lambda header: buckets.take("anonymous"))
    scope = {"type": "http", "path": "/v1/classify", "headers": [(b"content-length", declared)] if declared else []}
    asyncio.run(guard(scope, receive, send))
    return sent[0], read


def test_rate_limited_small_body_is_read_and_the_connection_kept():
    start, read = _refused_for_rate(b"30", [b"a" * 10, b"b" * 20])
    headers = dict(start["headers"])
    assert start["status"] == 429 and headers[b"retry-after"] == b"1" and b"connection" not in headers
    assert read == [b"a" * 10, b"b" * 20]  # to its end: the next request on the connection starts clean
    # Declared over the bound (here the guard's max_bytes, 100), or not declared: not read, closed.
    for declared in (b"200", None):
        start, read = _refused_for_rate(declared, [b"a" * 200])
        assert start["status"] == 429 and dict(start["headers"])[b"connection"] == b"close" and read == []
    # A body longer than it said: read up to the limit, then the connection is closed.
    start, read = _refused_for_rate(b"30", [b"a" * 90, b"a" * 90])
    assert dict(start["headers"])[b"connection"] == b"close"


def test_shipped_configs_run_two_of_each_and_drain():
    app = yaml.safe_load((ROOT / "serve/config.yaml").read_text())["applications"][0]
    entries = {d["name"]: d for d in app["deployments"]}
    model, gateway = entries["AlignedModel"], entries["Gateway"]
    assert model.get("autoscaling_config", {}).get("min_replicas", model.get("num_replicas", 1)) >= 2
    assert gateway["num_replicas"] >= 2 and model["max_replicas_per_node"] == 1
    assert model["graceful_shutdown_timeout_s"] > 0 and gateway["graceful_shutdown_timeout_s"] > 0
    assert gateway["user_config"]["rate_limit"]["rate_per_s"] is not None
