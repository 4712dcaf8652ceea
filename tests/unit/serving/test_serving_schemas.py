"""The request models that make the OpenAPI document: each declared pattern is the rule the validation
applies (checked on generated strings), and a server's limits are its models' constraints."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from po_cluster.serving.limits import LimitsConfig
from po_cluster.serving.schemas import NON_BLANK, ONE_PLACEHOLDER, RELEASE_NAME, SIGMA_INDEX, request_models
from po_cluster.store.artifacts import StoreError, check_release_id

LIMITS = LimitsConfig(max_inputs=3, max_labels=4, max_text_chars=20, t_min=-1, t_max=2, max_sigma=10)
MODELS = request_models(LIMITS)


def _errors(model, body: dict) -> list[tuple[str, tuple, str]]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [(e["type"], e["loc"], e["msg"]) for e in caught.value.errors()]


@settings(max_examples=400)
@given(st.text(alphabet="{}a \n", max_size=12))
def test_template_pattern_is_exactly_one_placeholder(text):
    assert bool(re.search(ONE_PLACEHOLDER, text)) == (text.count("{}") == 1)


@settings(max_examples=300)
@given(st.text(max_size=6) | st.text(alphabet=" \t\x1c\x85\u3000\ufeffa", max_size=4))
def test_non_blank_pattern_is_not_only_white_space(text):
    # Python's white space, and ECMA-262's U+FEFF: a text of nothing else is blank for every regex engine.
    assert bool(re.search(NON_BLANK, text)) == any(not c.isspace() and c != "\ufeff" for c in text)


@settings(max_examples=400)
@given(st.text(alphabet="ab9._-/", min_size=1, max_size=8) | st.sampled_from(["..", "a..b", ".a", "a.", "-"]))
def test_release_pattern_is_the_store_s_rule(name):
    try:
        check_release_id(name)
        store_ok = True
    except StoreError:
        store_ok = False
    assert bool(re.search(RELEASE_NAME, name)) == store_ok


def test_sigma_index_keys_are_canonical_integers():
    assert [bool(re.search(SIGMA_INDEX, k)) for k in ("0", "12", "01", "-1", " 1", "١")] == [True, True] + [False] * 4
    ok = MODELS.classify.model_validate({"image": "x", "labels": ["a"], "sigma_overrides": {"3": 2.5}})
    assert ok.sigma_overrides == {3: 2.5}
    assert _errors(MODELS.classify, {"image": "x", "labels": ["a"], "sigma_overrides": {"01": 1, "2": 11}}) == [
        ("int_type", ("sigma_overrides", "01", "[key]"), "Input should be a valid integer"),
        ("less_than_equal", ("sigma_overrides", "2"), "Input should be less than or equal to 10")]


def test_limits_are_the_models_constraints():
    body = {"image": "x", "labels": ["a", "b", "a"], "t": 2.5, "prompt_template": "{} and {}"}
    assert {(kind, loc) for kind, loc, _ in _errors(MODELS.classify, body)} == {
        ("duplicate_label", ("labels",)), ("less_than_equal", ("t",)), ("bad_prompt_template", ("prompt_template",))}
    assert _errors(MODELS.classify, {"image": "x", "labels": ["a"] * 5})[0][0] == "too_long"
    assert _errors(MODELS.classify, {"image": "x", "labels": ["a"], "t": "1"})[0][0] == "float_type"
    assert MODELS.classify.model_validate({"image": "x", "labels": ["a", "b"], "t": 2}).t == 2
    schema = MODELS.embeddings.model_json_schema()
    text, items = schema["properties"]["input"]["anyOf"]
    assert (text["maxLength"], text["pattern"], items["maxItems"], items["minItems"]) == (20, NON_BLANK, 3, 1)
    assert request_models(LimitsConfig(max_inputs=5)).embeddings.model_json_schema()["properties"]["input"][
        "anyOf"][1]["maxItems"] == 5  # another server's limits, another document


def test_empty_and_blank_texts_are_refused_as_the_document_says():
    for body in ({"input": ""}, {"input": [" "]}, {"input": [{"type": "text", "text": "\u3000"}]}):
        assert "empty_text" in {kind for kind, _, _ in _errors(MODELS.embeddings, body)}
    assert MODELS.embeddings.model_validate({"input": [" a "]}).input == [" a "]


def _document(tmp_path, **args) -> dict:
    from po_cluster.serving.api import make_api
    from po_cluster.serving.args import ServeConfig
    from po_cluster.serving.gateway import GatewayService

    # The document is built from the args alone: no model is ever asked (None where the handle would be).
    return make_api(GatewayService(ServeConfig(store=str(tmp_path), **args), None)).openapi()


def test_statuses_and_security_only_where_configured(tmp_path, monkeypatch):
    plain = _document(tmp_path)
    assert "securitySchemes" not in plain.get("components", {})
    assert set(plain["paths"]["/v1/classify"]["post"]["responses"]) == {"200", "400", "404", "413", "415", "422",
                                                                        "503"}
    monkeypatch.setenv("SCHEMA_TEST_KEYS", "k1")
    keyed = _document(tmp_path, auth={"api_keys_env": "SCHEMA_TEST_KEYS"}, rate_limit={"rate_per_s": 5})
    responses = keyed["paths"]["/v1/embeddings"]["post"]["responses"]
    assert {"401", "429"} <= set(responses) and "Retry-After" in responses["429"]["headers"]
    assert keyed["paths"]["/v1/models"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "401" not in keyed["paths"]["/healthz"]["get"]["responses"]  # the probe needs no key


def test_an_image_url_part_takes_a_data_url_only():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}
    body = MODELS.embeddings.model_validate({"input": [image, "a text"]})
    assert body.input[0].image_url.url.startswith("data:image/png;base64,")
    for url in ("https://example.com/cat.png", "iVBORw0KGgo=", "data:text/plain;base64,aGk="):
        part = {"type": "image_url", "image_url": {"url": url}}
        [(loc, message)] = [(loc, m) for code, loc, m in _errors(MODELS.embeddings, {"input": [part]})
                            if code == "url_not_allowed"]  # the union's other branches (a string) fail too
        assert loc[-2:] == ("image_url", "url") and "never fetches a remote URL" in message
    extra = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "y": 1}}
    assert "extra_forbidden" in {code for code, _, _ in _errors(MODELS.embeddings, {"input": [extra]})}


def test_dimensions_is_a_positive_integer_and_an_integral_number_is_one():
    assert MODELS.embeddings.model_validate({"input": "a", "dimensions": 64.0}).dimensions == 64
    assert MODELS.embeddings.model_validate({"input": "a"}).dimensions is None
    for bad, code in ((0, "greater_than_equal"), (64.5, "int_type"), ("64", "int_type"), (True, "int_type")):
        assert _errors(MODELS.embeddings, {"input": "a", "dimensions": bad})[0][0] == code, bad
