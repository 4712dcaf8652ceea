"""The serving app end to end over HTTP: one local Ray + one Serve app (127.0.0.1, a free port) for the module.

Answers are checked against the same model run in-process; every kind of bad
request gets its 4xx naming the field; the playground works in headless Chromium.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from po_cluster.data import world
from serving_helpers import b64, bomb_png, encode, listener_process, listening_ports, request

pytestmark = pytest.mark.integration  # `served` starts (or joins) Ray itself, not through ray_cluster
ROOT = Path(__file__).resolve().parents[3]
KEY = "test-key-7f3a9c"
LABELS = list(world.SHAPES)
LIMITS = {"max_body_bytes": 1 << 20, "max_image_pixels": 1_000_000, "max_inputs": 8, "max_labels": 16,
          "max_text_chars": 200, "t_min": -2.0, "t_max": 4.0}


@dataclass
class Served:
    url: str
    store: Path
    cache: Path

    def post(self, path: str, body: dict | bytes, key: str | None = KEY, **kwargs) -> tuple[int, dict]:
        return request(self.url, "POST", path, body, key=key, **kwargs)

    def get(self, path: str, key: str | None = KEY) -> tuple[int, dict]:
        return request(self.url, "GET", path, key=key)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    from po_cluster.serving.local import publish_example_release, start_local

    root = tmp_path_factory.mktemp("serving")
    store, cache = root / "store", root / "cache"
    store_trained_release(store, root / "trained")
    publish_example_release(str(store), "r-other", str(root / "checkpoints"), seed=1)
    publish_example_release(str(store), "r-broken", str(root / "checkpoints"), seed=2)
    _flip_one_byte(store / "releases" / "r-broken")  # in storage after publishing: its pull is refused
    publish_example_release(str(store), "r-main", str(root / "checkpoints"), seed=0)  # published last: latest
    (root / "api-keys").write_text(f"{KEY}\nsecond-key\n")
    args = {"store": str(store), "store_settings": {"cache_dir": str(cache)}, "limits": LIMITS,
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005},
            "model": {"num_cpus": 1, "max_ongoing_requests": 32, "max_releases_per_replica": 2},
            "gateway": {"num_cpus": 0}, "auth": {"api_keys_file": str(root / "api-keys")}}
    server = start_local(args, num_cpus=2)  # joins this process's Ray if a fixture already started one
    yield Served(server.url, store, cache)
    server.stop()


def store_trained_release(store: Path, workdir: Path) -> None:
    """A release whose image tower really trained (full, 30 steps of DPO from the shipped base): enough
    to see the demo's attacked image as its shape at t = 1, while t = 0 is the base."""
    from po_cluster.config import RunConfig
    from po_cluster.store.artifacts import open_store
    from po_cluster.train.run import train
    from po_cluster.train.session import LocalSession

    cfg = RunConfig.model_validate({
        "name": "trained", "output_dir": str(workdir), "model": {"image_tower": "full"},
        "data": {"n_pairs": 512, "n_reg": 256, "n_val": 50},
        "loss": {"loss_type": "dpo", "beta": 1.0, "kl_weight": 0.3},
        "optimizer": {"lr": 2e-3, "spectral_lr": 5e-3, "warmup_steps": 5},
        "training": {"steps": 30, "batch_size": 64, "reg_batch_size": 64, "bma": False, "seed": 0}})
    open_store(str(store)).publish_release(train(cfg, LocalSession.for_run(cfg, world.validation_sets(50))).checkpoint,
                                           "r-trained")


def _flip_one_byte(folder: Path) -> None:
    weights = max((p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def release(served):
    """(id → AlignedCLIP) of the published releases, loaded in-process from the same store."""
    from po_cluster.model.checkpoint import load_checkpoint
    from po_cluster.store.artifacts import open_store

    store = open_store(str(served.store))
    return {rid: load_checkpoint(store.pull_release(rid, cache_dir=served.cache / "tests"))[0]
            for rid in ("r-main", "r-other", "r-trained")}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return world.image_set("attacked", 3, seed=123).images


@torch.no_grad()
def in_process(model, image: np.ndarray, t: float, overrides: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) over LABELS, in label order, computed without the server."""
    f = model.encode_image(model.pixels(image[None]), t)
    g = model.encode_text(model.tokens(world.prompts(tuple(LABELS))))
    logits = model.logit_scale * model.project(f, t, overrides) @ model.project(g, t, overrides).T
    return logits[0].numpy(), model.logprobs(f, g, t, overrides)[0].exp().numpy()


def in_label_order(answer: dict) -> tuple[np.ndarray, np.ndarray]:
    by_label = {s["label"]: s for s in answer["scores"]}
    return (np.array([by_label[x]["logit"] for x in LABELS]), np.array([by_label[x]["probability"] for x in LABELS]))


def classify(served: Served, image: np.ndarray, **knobs) -> dict:
    status, body = served.post("/v1/classify", {"image": b64(encode(image)), "labels": LABELS, **knobs})
    assert status == 200, body
    return body


# ---------------------------------------------------------------- answers equal the in-process model


def test_t0_scores_equal_the_base_model(served, images, base_model):
    for image in images:
        answer = classify(served, image, t=0)
        assert answer["model"] == "r-main" and answer["t"] == 0
        logits, probabilities = in_label_order(answer)
        base_logits, base_probabilities = in_process(base_model, image, 1.0)  # the shipped base: W = I
        np.testing.assert_allclose(probabilities, base_probabilities, atol=1e-5)
        np.testing.assert_allclose(logits, base_logits, atol=1e-5)
        assert [s["probability"] for s in answer["scores"]] == sorted(probabilities, reverse=True)  # best first


def test_t1_and_other_knobs_equal_the_release_in_process(served, images, release):
    model = release["r-main"]
    for image in images:
        for knobs in ({}, {"t": 1}, {"t": 2.5}, {"t": -0.5, "sigma_overrides": {"3": 0.25, "10": 4.0}}):
            answer = classify(served, image, **knobs)
            overrides = {int(k): v for k, v in knobs.get("sigma_overrides", {}).items()} or None
            logits, probabilities = in_label_order(answer)
            ref_logits, ref_probabilities = in_process(model, image, knobs.get("t", 1.0), overrides)
            np.testing.assert_allclose(probabilities, ref_probabilities, atol=1e-5)
            np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    # The knob matters: this release at t = 1 is not the base model.
    at0, at1 = (in_label_order(classify(served, images[0], t=t))[1] for t in (0, 1))
    assert np.abs(at0 - at1).max() > 1e-3


def test_the_demo_attacked_example_is_the_written_word_at_t0_and_the_shape_at_t1(served, release):
    from po_cluster.pipelines.demo import SHAPE, WORD, attacked_image

    image, tops = attacked_image(), {}
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        answer = classify(served, image, model="r-trained", t=t)
        tops[t] = answer["scores"][0]["label"]  # best first
        want = in_process(release["r-trained"], image, t)[1]  # θ(t) and W(t), computed in this process
        np.testing.assert_allclose(in_label_order(answer)[1], want, atol=1e-4)
    assert (tops[0.0], tops[1.0]) == (WORD, SHAPE), tops


@torch.no_grad()
def test_embeddings_equal_the_in_process_projection(served, images, release):
    import base64

    model = release["r-main"]
    text = "a photo of a star."
    for t in (1.0, 0.7):
        body = {"input": [text, {"type": "image", "image": b64(encode(images[0]))}], "t": t}
        status, answer = served.post("/v1/embeddings", body)
        assert status == 200, answer
        assert answer["object"] == "list" and answer["model"] == "r-main"
        assert [d["index"] for d in answer["data"]] == [0, 1]
        assert all(d["object"] == "embedding" for d in answer["data"])
        tokens = model.tokens([text])
        want_text = model.project(model.encode_text(tokens), t)[0].numpy()
        want_image = model.project(model.encode_image(model.pixels(images[0][None])), t)[0].numpy()
        np.testing.assert_allclose(answer["data"][0]["embedding"], want_text, atol=1e-5)
        np.testing.assert_allclose(answer["data"][1]["embedding"], want_image, atol=1e-5)
        assert answer["usage"] == {"prompt_tokens": int((tokens != 0).sum()), "total_tokens": int((tokens != 0).sum())}
    status, answer = served.post("/v1/embeddings", {"input": text, "encoding_format": "base64"})
    assert status == 200, answer
    vector = np.frombuffer(base64.b64decode(answer["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, model.project(model.encode_text(model.tokens([text])))[0].numpy(), atol=1e-5)


def test_release_chosen_per_request_multiplexed(served, images, release):
    answer = classify(served, images[1], model="r-other")
    assert answer["model"] == "r-other"
    np.testing.assert_allclose(in_label_order(answer)[1], in_process(release["r-other"], images[1], 1.0)[1],
                               atol=1e-5)
    status, health = served.get("/healthz", key=None)  # no key needed: it is the probe
    assert status == 200 and health["status"] == "ok"
    assert set(health["model"]["releases_loaded"]) <= {"r-main", "r-other"} and health["model"]["rss_bytes"] > 0


def test_models_list_and_openapi(served):
    status, listing = served.get("/v1/models")
    assert status == 200 and listing["object"] == "list"
    assert {(m["id"], m["latest"], m["object"], m["image_tower"]) for m in listing["data"]} == {
        ("r-main", True, "model", "frozen"), ("r-other", False, "model", "frozen"),
        ("r-broken", False, "model", "frozen"), ("r-trained", False, "model", "full")}
    sizes = {m["id"]: m["size_bytes"] for m in listing["data"]}
    assert sizes["r-trained"] > sizes["r-main"] > 0  # θ and θ_ref of the tower, against W alone
    status, openapi = served.get("/openapi.json", key=None)
    assert status == 200
    assert {"/v1/embeddings", "/v1/classify", "/v1/models", "/healthz"} <= set(openapi["paths"])
    assert "HTTPBearer" in openapi["components"]["securitySchemes"]
    _document_states_the_limits(openapi)


def _document_states_the_limits(openapi: dict) -> None:
    """This server's LIMITS are in its document, with the statuses each operation can answer."""
    schemas = openapi["components"]["schemas"]
    classify, embeddings = schemas["ClassifyRequest"]["properties"], schemas["EmbeddingsRequest"]["properties"]
    labels = classify["labels"]
    assert (labels["minItems"], labels["maxItems"], labels["uniqueItems"]) == (1, LIMITS["max_labels"], True)
    assert labels["items"]["maxLength"] == LIMITS["max_text_chars"] and "pattern" in labels["items"]
    assert (classify["t"]["minimum"], classify["t"]["maximum"]) == (LIMITS["t_min"], LIMITS["t_max"])
    assert '\\{\\}' in classify["prompt_template"]["anyOf"][0]["pattern"]
    assert classify["image"]["format"] == "image-base64" and "pattern" in classify["model"]
    sigma = classify["sigma_overrides"]["anyOf"][0]
    assert "propertyNames" in sigma and sigma["additionalProperties"]["exclusiveMinimum"] == 0
    text, items = embeddings["input"]["anyOf"]
    assert text["maxLength"] == LIMITS["max_text_chars"] and items["maxItems"] == LIMITS["max_inputs"]
    post = openapi["paths"]["/v1/classify"]["post"]["responses"]
    assert set(post) == {"200", "400", "401", "404", "413", "415", "422", "503"}  # no rate limit here: no 429
    assert "Retry-After" in post["503"]["headers"] and "WWW-Authenticate" in post["401"]["headers"]
    assert set(openapi["paths"]["/v1/models"]["get"]["responses"]) == {"200", "400", "401", "413", "503"}


# ---------------------------------------------------------------- bad requests: a 4xx naming the field


def _classify(**change) -> dict:
    body = {"image": b64(encode(world.image_set("clean", 1, seed=5).images[0])), "labels": LABELS[:3]}
    body.update(change)
    return {k: v for k, v in body.items() if v is not None}


def _gif() -> str:
    return b64(encode(world.image_set("clean", 1, seed=5).images[0], "GIF"))


BAD_REQUESTS = {
    # name: (path, body or raw bytes, extra request kwargs, status, param, code)
    "malformed_json": ("/v1/classify", b'{"image": "x", "labels": [', {}, 400, "body", "invalid_json"),
    "bad_base64": ("/v1/classify", _classify(image="!!!not*base64!!!"), {}, 422, "image", "invalid_base64"),
    "not_an_image": ("/v1/classify", _classify(image=b64(b"hello, I am text")), {}, 422, "image", "not_an_image"),
    "truncated_image": ("/v1/classify", _classify(image=b64(encode(np.zeros((64, 64, 3), np.uint8) + 7)[:60])), {},
                        422, "image", "corrupt_image"),
    "decompression_bomb": ("/v1/classify", _classify(image=b64(bomb_png())), {}, 413, "image",
                           "image_too_many_pixels"),
    "disallowed_format": ("/v1/classify", _classify(image=_gif()), {}, 415, "image", "unsupported_image_format"),
    "url_instead_of_image": ("/v1/classify", _classify(image="https://example.com/cat.png"), {}, 422, "image",
                             "url_not_allowed"),
    "non_image_data_url": ("/v1/classify", _classify(image="data:text/plain;base64,aGk="), {}, 422, "image",
                           "bad_data_url"),
    "body_too_large": ("/v1/classify", b"x" * (2 << 20), {}, 413, "body", "body_too_large"),
    "body_too_large_chunked": ("/v1/classify", b"x" * (2 << 20), {"chunked": True}, 413, "body", "body_too_large"),
    "too_many_labels": ("/v1/classify", _classify(labels=[f"label {i}" for i in range(17)]), {}, 422, "labels",
                        "too_long"),
    "blank_label": ("/v1/classify", _classify(labels=["circle", " \t"]), {}, 422, "labels.1", "empty_text"),
    "empty_labels": ("/v1/classify", _classify(labels=[]), {}, 422, "labels", "too_short"),
    "duplicate_labels": ("/v1/classify", _classify(labels=["circle", "circle"]), {}, 422, "labels",
                         "duplicate_label"),
    "bad_prompt_template": ("/v1/classify", _classify(prompt_template="no placeholder"), {}, 422, "prompt_template",
                            "bad_prompt_template"),
    "format_string_template": ("/v1/classify", _classify(prompt_template="{0.__class__} {} {}"), {}, 422,
                               "prompt_template", "bad_prompt_template"),
    "nan_t": ("/v1/classify", json.dumps(_classify()).replace("{", '{"t": NaN, ', 1).encode(), {}, 422, "t",
              "finite_number"),
    "infinite_t": ("/v1/classify", json.dumps(_classify()).replace("{", '{"t": 1e999, ', 1).encode(), {}, 422, "t",
                   "finite_number"),
    "t_out_of_range": ("/v1/classify", _classify(t=10), {}, 422, "t", "less_than_equal"),
    "t_not_a_number": ("/v1/classify", _classify(t="warm"), {}, 422, "t", "float_type"),
    "t_a_numeric_string": ("/v1/classify", _classify(t="0.5"), {}, 422, "t", "float_type"),  # JSON numbers only
    "sigma_index_out_of_range": ("/v1/classify", _classify(sigma_overrides={"64": 1.5}), {}, 422,
                                 "sigma_overrides.64", "sigma_index_out_of_range"),
    "sigma_value_not_positive": ("/v1/classify", _classify(sigma_overrides={"3": 0}), {}, 422, "sigma_overrides.3",
                                 "greater_than"),
    "sigma_index_not_an_int": ("/v1/classify", _classify(sigma_overrides={"x": 1}), {}, 422, "sigma_overrides.x",
                               "int_type"),
    "sigma_index_not_canonical": ("/v1/classify", _classify(sigma_overrides={"03": 1}), {}, 422,
                                  "sigma_overrides.03", "int_type"),
    "sigma_value_too_large": ("/v1/classify", _classify(sigma_overrides={"3": 1e5}), {}, 422, "sigma_overrides.3",
                              "less_than_equal"),
    "unknown_release": ("/v1/classify", _classify(model="r-does-not-exist"), {}, 404, "model", "unknown_release"),
    "invalid_release_id": ("/v1/classify", _classify(model="../../etc"), {}, 422, "model", "invalid_release_id"),
    "unknown_field": ("/v1/classify", _classify(temperature=0.5), {}, 422, "temperature", "extra_forbidden"),
    "missing_key": ("/v1/classify", _classify(), {"key": None}, 401, "authorization", "missing_api_key"),
    "wrong_key": ("/v1/classify", _classify(), {"key": "not-the-key"}, 401, "authorization", "invalid_api_key"),
    "text_too_long": ("/v1/embeddings", {"input": ["x" * 201]}, {}, 422, "input.0", "string_too_long"),
    "too_many_inputs": ("/v1/embeddings", {"input": ["a"] * 9}, {}, 422, "input", "too_long"),
    "empty_input": ("/v1/embeddings", {"input": []}, {}, 422, "input", "too_short"),
    "empty_string_input": ("/v1/embeddings", {"input": ""}, {}, 422, "input", "empty_text"),
    "blank_text_object": ("/v1/embeddings", {"input": [{"type": "text", "text": "\u3000"}]}, {}, 422,
                          "input.0.text", "empty_text"),
    "unknown_input_type": ("/v1/embeddings", {"input": [{"type": "audio", "audio": "x"}]}, {}, 422, "input.0",
                           "union_tag_invalid"),
    "url_in_embeddings": ("/v1/embeddings", {"input": [{"type": "image", "image": "http://10.0.0.1/x.png"}]}, {},
                          422, "input.0.image", "url_not_allowed"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_naming_the_field(served, name):
    path, body, extra, status, param, code = BAD_REQUESTS[name]
    got, answer = served.post(path, body, **{"key": KEY, **extra})
    assert got == status, answer
    error = answer["error"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["message"] and error["type"]


def test_good_request_after_the_bad_ones(served, images):
    assert len(BAD_REQUESTS) >= 15
    assert classify(served, images[0])["model"] == "r-main"
    status, health = served.get("/healthz", key=None)
    assert status == 200 and health["status"] == "ok"


# ---------------------------------------------------------------- concurrency: coalesced calls, fast ingress


def test_concurrent_requests_each_get_their_own_answer(served, images, release):
    """Requests that the gateway coalesces into shared model calls (several releases, knobs and kinds
    at once) each get the answer they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [("/v1/classify", {"image": b64(encode(images[i % 3])), "labels": LABELS[:3 + i % 5], "t": t,
                               "model": model})
             for i, (t, model) in enumerate([(t, m) for t in (0.0, 1.0, 0.5, 2.0) for m in ("r-main", "r-other")])]
    cases += [("/v1/embeddings", {"input": [f"a photo of a {LABELS[i]}.", {"type": "image", "image": b64(encode(
        images[i % 3]))}], "t": 0.25 * i, "model": ("r-main", "r-other")[i % 2]}) for i in range(6)]
    alone = [served.post(path, body) for path, body in cases]
    assert all(status == 200 for status, _ in alone), alone
    for _ in range(2):
        with ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(lambda case: served.post(*case), cases))
        for (path, body), (status, answer), (_, want) in zip(cases, together, alone, strict=True):
            assert status == 200, answer
            assert answer["model"] == body["model"]
            if path == "/v1/classify":
                assert [s["label"] for s in answer["scores"]] == [s["label"] for s in want["scores"]]
                np.testing.assert_allclose([s["probability"] for s in answer["scores"]],
                                           [s["probability"] for s in want["scores"]], atol=1e-5)
            else:
                assert answer["usage"] == want["usage"]
                np.testing.assert_allclose([d["embedding"] for d in answer["data"]],
                                           [d["embedding"] for d in want["data"]], atol=1e-5)


def test_a_broken_release_fails_only_its_own_requests(served, images):
    """A release whose file was changed in storage: its requests get a 503 naming it, while the requests
    sharing their gateway batches with them are answered."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{"image": b64(encode(images[i % 3])), "labels": LABELS, "model": ("r-broken", "r-main")[i % 2]}
              for i in range(12)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: served.post("/v1/classify", body), bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        if body["model"] == "r-broken":
            assert status == 503, answer
            assert (answer["error"]["param"], answer["error"]["code"]) == ("model", "release_unavailable")
            assert "r-broken" in answer["error"]["message"]
        else:
            assert status == 200 and answer["model"] == "r-main", answer
    assert classify(served, images[0])["model"] == "r-main"


def test_http_port_is_haproxy_in_front_of_the_gateway(served):
    """po-cluster's own Ray starts Serve's high-throughput ingress: the app's port is HAProxy's (not the
    Python proxy actor's), and the gateway replica serves HTTP itself on loopback."""
    from urllib.parse import urlsplit

    from po_cluster.serving.ingress import LOCAL_ENV, SERVE_ENV

    assert listener_process(urlsplit(served.url).port) == "haproxy"
    status, health = served.get("/healthz", key=None)
    assert status == 200
    gateway_ports = listening_ports(health["gateway"]["pid"])
    assert gateway_ports and all(host == "127.0.0.1" for host, _ in gateway_ports), gateway_ports
    # Serve's processes got the settings of a local Ray (the proxy's readiness timeout among them)
    raw = Path(f"/proc/{health['gateway']['pid']}/environ").read_bytes().split(b"\0")
    environ = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    assert {name: environ.get(name) for name in {**SERVE_ENV, **LOCAL_ENV}} == {**SERVE_ENV, **LOCAL_ENV}


# ---------------------------------------------------------------- the playground in headless Chromium


def _browser_or_skip() -> tuple[str, str]:
    node, chromium = shutil.which("node"), shutil.which("chromium") or "/usr/bin/chromium"
    modules = ROOT / "tests" / "browser" / "node_modules" / "playwright-core"
    missing = [what for what, ok in (("node", node), ("chromium", Path(chromium).exists()),
                                     ("tests/browser/node_modules (make browser-deps)", modules.is_dir())) if not ok]
    if missing:
        reason = f"playground browser test needs {', '.join(missing)}; run `make browser-deps`"
        if os.environ.get("CI"):
            pytest.fail(f"in CI: {reason}")
        pytest.skip(reason)
    return node, chromium


def test_playground_upload_slider_scores_change(served, tmp_path):
    """The demo's attacked image on the trained release: the slider from t = 1 to 0 changes the answer
    from the drawn shape to the written word."""
    from po_cluster.pipelines.demo import SHAPE, WORD, attacked_image

    node, chromium = _browser_or_skip()
    image = tmp_path / "attacked.png"
    image.write_bytes(encode(attacked_image()))
    script = ROOT / "tests" / "browser" / "playground.js"
    run = subprocess.run([node, str(script), served.url, KEY, str(image), chromium, "r-trained"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["t_before"] == "1" and result["t_after"] == "0" and not result["error"]
    before = {s["label"]: s["probability"] for s in result["before"]}
    after = {s["label"]: s["probability"] for s in result["after"]}
    assert set(before) == set(after) == set(LABELS)
    assert max(before, key=before.__getitem__) == SHAPE and max(after, key=after.__getitem__) == WORD
    assert "full" in result["release_option"]  # the list says what t moves
    api = in_label_order(classify(served, attacked_image(), model="r-trained", t=0))[1]  # the API's answer
    np.testing.assert_allclose([after[x] for x in LABELS], api, atol=1e-6)
    assert all(u.startswith(served.url) or u.startswith("data:") for u in result["requests"]), result["requests"]


# ---------------------------------------------------------------- make demo's helper


def test_serve_and_ask_answers_at_t0_and_t1(served, images, base_model, release):
    """The demo's helper, as a second app beside the module's one in the same Serve (then removed)."""
    from po_cluster.serving.local import serve_and_ask

    sized = {"store_settings": {"cache_dir": str(served.cache)}, "model": {"num_cpus": 0}, "gateway": {"num_cpus": 0}}
    answer = serve_and_ask(str(served.store), "r-main", images[2], LABELS, args=sized, name="demo-check",
                           route_prefix="/demo-check")
    assert answer["url"].endswith("/demo-check") and answer["release"] == "r-main"
    assert answer["t0"]["model"] == answer["t1"]["model"] == "r-main"
    np.testing.assert_allclose(in_label_order(answer["t0"])[1], in_process(base_model, images[2], 1.0)[1], atol=1e-5)
    np.testing.assert_allclose(in_label_order(answer["t1"])[1], in_process(release["r-main"], images[2], 1.0)[1],
                               atol=1e-5)
    assert classify(served, images[2])["model"] == "r-main"  # the module's app was left running
    assert request(served.url, "GET", "/demo-check/healthz")[0] == 404  # and the demo's app is gone
