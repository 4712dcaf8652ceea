"""The official OpenAI Python client against the served app (127.0.0.1), as its users point it at us.

Two apps on one local Ray: one that asks API keys, one that asks none. The client's vectors (it asks
base64 unless told otherwise, and decodes them itself) must equal what /v1/embeddings answers as JSON
floats, to float32 precision: the server computes float32 vectors, and both encodings carry them whole.
"""
from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import openai
import pytest

from po_cluster.data import world
from serving_helpers import b64, encode, request

pytestmark = pytest.mark.integration  # the fixture starts (or joins) Ray itself
KEY = "openai-key-5e2c"
TEXTS = ["a photo of a star.", "a circle", "the word square, written"]


@dataclass
class App:
    url: str  # the app's root (its route prefix included)
    key: str | None

    def client(self, key: str | None) -> openai.OpenAI:
        """The client with that key, or with none (key None): it insists on credentials of some kind, so
        it gets a placeholder, and each call omits the Authorization header it would make (`auth`)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "no-key", max_retries=0, timeout=60)

    def path(self, path: str) -> str:
        return urlsplit(self.url).path + path

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return request(self.url, "POST", self.path(path), body, key=self.key)

    def get(self, path: str) -> tuple[int, dict]:
        return request(self.url, "GET", self.path(path), key=self.key)


@pytest.fixture(scope="module")
def apps(tmp_path_factory) -> dict[str, App]:
    from po_cluster.serving.local import publish_example_release, start_local

    root = tmp_path_factory.mktemp("openai")
    store = root / "store"
    publish_example_release(str(store), "r-other", str(root / "checkpoints"), seed=1)
    publish_example_release(str(store), "r-main", str(root / "checkpoints"), seed=0)  # last: latest
    (root / "api-keys").write_text(f"{KEY}\n")
    base = {"store": str(store), "store_settings": {"cache_dir": str(root / "cache")},
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
            "model": {"num_cpus": 0, "torch_threads": 1}, "gateway": {"num_cpus": 0}}
    servers, out = [], {}
    try:
        for kind, auth in (("keyed", {"api_keys_file": str(root / "api-keys")}), ("open", {})):
            name = f"po-openai-{kind}-{secrets.token_hex(2)}"
            port = urlsplit(servers[0].url).port if servers else None  # one Serve proxy: the second app joins it
            servers.append(start_local({**base, "auth": auth}, num_cpus=2, name=name, route_prefix=f"/{name}",
                                       port=port))
            out[kind] = App(servers[-1].url, KEY if auth else None)
        yield out
    finally:
        for server in reversed(servers):  # the first started Serve (and maybe Ray): it goes last
            server.stop()


def auth(key: str | None) -> dict:
    """A call's options: with no key, no Authorization header at all (the client's documented opt-out)."""
    return {} if key is not None else {"extra_headers": {"Authorization": openai.Omit()}}


def own_floats(app: App, inputs: list, model: str = "r-main") -> np.ndarray:
    """/v1/embeddings' own answer, JSON floats, as float32 (what the server computed)."""
    status, body = app.post("/v1/embeddings", {"model": model, "input": inputs, "encoding_format": "float"})
    assert status == 200, body
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def client_vectors(response) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data], dtype=np.float32)


@pytest.mark.parametrize("kind", ["keyed", "open"])
def test_the_openai_client_embeds_texts_as_the_api_does(apps, kind):
    app = apps[kind]
    client = app.client(app.key)
    want = own_floats(app, TEXTS)
    by_default = client.embeddings.create(model="r-main", input=TEXTS, **auth(app.key))  # it asks base64 itself
    as_floats = client.embeddings.create(model="r-main", input=TEXTS, encoding_format="float", **auth(app.key))
    for response in (by_default, as_floats):
        assert response.model == "r-main" and response.object == "list"
        np.testing.assert_array_equal(client_vectors(response), want)
    assert by_default.usage.prompt_tokens == by_default.usage.total_tokens > 0
    # Asked for by name, base64 is left to the caller to decode: little-endian float32, as OpenAI's.
    as_base64 = client.embeddings.create(model="r-main", input=TEXTS, encoding_format="base64", **auth(app.key))
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in as_base64.data]
    np.testing.assert_array_equal(np.array(decoded), want)
    one = client.embeddings.create(model="latest", input=TEXTS[0], **auth(app.key))  # one string; latest: r-main
    assert one.model == "r-main"
    np.testing.assert_array_equal(client_vectors(one), want[:1])


@pytest.mark.parametrize("kind", ["keyed", "open"])
def test_the_openai_client_lists_the_models(apps, kind):
    app = apps[kind]
    listed = app.client(app.key).models.list(**auth(app.key))
    status, own = app.get("/v1/models")
    assert status == 200, own
    assert sorted(m.id for m in listed.data) == sorted(m["id"] for m in own["data"]) == ["r-main", "r-other"]
    assert {m.id: (m.owned_by, m.created) for m in listed.data} == \
        {m["id"]: (m["owned_by"], m["created"]) for m in own["data"]}


def test_without_its_key_the_client_gets_an_authentication_error(apps):
    for key, code in ((None, "missing_api_key"), ("not-the-key", "invalid_api_key")):
        with pytest.raises(openai.AuthenticationError) as refused:
            apps["keyed"].client(key).embeddings.create(model="r-main", input=TEXTS[0], **auth(key))
        assert refused.value.status_code == 401 and refused.value.body["code"] == code, refused.value.body


def test_dimensions_equal_to_the_width_is_accepted_any_other_is_a_422_naming_it(apps):
    app = apps["keyed"]
    client, want = app.client(KEY), own_floats(app, TEXTS[:1])
    width = want.shape[1]
    same = client.embeddings.create(model="r-main", input=TEXTS[:1], dimensions=width)
    np.testing.assert_array_equal(client_vectors(same), want)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.embeddings.create(model="r-main", input=TEXTS[:1], dimensions=width // 2)
    error = refused.value.body
    assert (error["param"], error["code"]) == ("dimensions", "unsupported_dimensions"), error
    assert f"{width}-dimensional" in error["message"], error


def test_an_image_url_content_part_is_the_same_image(apps):
    """OpenAI's {"type": "image_url", "image_url": {"url": "data:…"}} embeds as our own image item does,
    sent by the client (its input is passed through) and over plain HTTP."""
    app = apps["keyed"]
    image = b64(encode(world.image_set("clean", 1, seed=9).images[0]))
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}", "detail": "low"}}
    want = own_floats(app, [{"type": "image", "image": image}, TEXTS[0]])
    np.testing.assert_array_equal(own_floats(app, [part, TEXTS[0]]), want)
    response = app.client(KEY).embeddings.create(model="r-main", input=[part, TEXTS[0]])  # type: ignore[list-item]
    np.testing.assert_array_equal(client_vectors(response), want)


@pytest.mark.parametrize("url,code", [("https://example.com/cat.png", "url_not_allowed"),
                                      ("http://10.0.0.1/x.png", "url_not_allowed"),
                                      ("aGVsbG8=", "url_not_allowed")])
def test_an_image_url_that_is_not_a_data_url_is_a_422_naming_why(apps, url, code):
    status, body = apps["keyed"].post("/v1/embeddings", {"input": [{"type": "image_url", "image_url": {"url": url}}]})
    assert status == 422, body
    error = body["error"]
    assert (error["param"], error["code"]) == ("input.0.image_url.url", code), error
    assert "never fetches a remote URL" in error["message"], error


def test_the_document_shows_the_openai_shapes(apps):
    status, openapi = apps["keyed"].get("/openapi.json")
    assert status == 200
    schemas = openapi["components"]["schemas"]
    embeddings = schemas["EmbeddingsRequest"]["properties"]
    assert embeddings["dimensions"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert "width" in embeddings["dimensions"]["description"]
    part = schemas["ImageUrlInput"]["properties"]
    assert part["type"]["const"] == "image_url"
    url = schemas["ImageUrl"]["properties"]["url"]
    assert url["format"] == "image-data-url" and "a remote URL is a 422" in url["description"]
    assert schemas["ImageUrl"]["properties"]["detail"]["anyOf"][0]["enum"] == ["auto", "low", "high"]
