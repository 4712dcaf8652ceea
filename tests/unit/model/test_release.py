"""A release loaded at t (po_cluster/model/release.py): batched towers, W(t) cached per knob,
embeddings of many requests at once.

Every answer is checked against AlignedCLIP's own methods on the same inputs, one at a time.
"""
import numpy as np
import pytest
import torch

from po_cluster.config import ModelConfig
from po_cluster.data import world
from po_cluster.model.aligned import AlignedCLIP
from po_cluster.model.loading import load_clip
from po_cluster.model.release import Knob, ReleaseModel

PROMPTS = ["a photo of a circle.", "a photo of a star.", "a photo of a square.", "a photo of a cross."]


@pytest.fixture(scope="module")
def model() -> AlignedCLIP:
    """A tiny random model whose spectral layer is far from the identity."""
    torch.manual_seed(3)
    aligned = AlignedCLIP(load_clip(ModelConfig(pretrained=None, image_tower="frozen")), "frozen").eval()
    with torch.no_grad():
        aligned.spectral.skew.normal_(0, 0.3)
        aligned.spectral.log_sigma.normal_(0, 0.5)
    return aligned


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return world.image_set("attacked", 7, seed=11).images


def engine(model: AlignedCLIP, **kwargs) -> ReleaseModel:
    return ReleaseModel("r-test", model, {"prompt_template": "a photo of a {}."}, **kwargs)


@torch.no_grad()
def expected_image(model: AlignedCLIP, image: np.ndarray, knob: Knob) -> np.ndarray:
    return model.project(model.encode_image(model.pixels(image[None])), knob.t, knob.as_dict())[0].numpy()


@torch.no_grad()
def expected_text(model: AlignedCLIP, text: str, knob: Knob) -> np.ndarray:
    return model.project(model.encode_text(model.tokens([text])), knob.t, knob.as_dict())[0].numpy()


KNOBS = [Knob(1.0), Knob(0.0), Knob(0.5), Knob(2.5), Knob(1.0, ((3, 7.0), (10, 0.2))), Knob(0.0, ((0, 2.0),))]


def test_projection_per_knob_equals_the_model(model, images):
    release = engine(model)
    knobs = [KNOBS[i % len(KNOBS)] for i in range(len(images))]
    rows = release.project(release.image_features(list(images)), knobs).numpy()
    for image, knob, row in zip(images, knobs, rows, strict=True):
        np.testing.assert_allclose(row, expected_image(model, image, knob), atol=1e-5)


def test_t0_is_the_base_model_exactly(model, images):
    release = engine(model)
    features = release.image_features(list(images[:3]))
    assert release.projection(Knob(0.0)) is None
    assert torch.equal(release.project(features, [Knob(0.0)] * 3), torch.nn.functional.normalize(features, dim=-1))


def test_projection_cache_is_reused_and_bounded(model):
    release = engine(model, projection_cache_size=2)
    first = release.projection(Knob(0.5))
    assert release.projection(Knob(0.5)) is first  # computed once per knob
    release.projection(Knob(1.5))
    release.projection(Knob(2.5))  # evicts t = 0.5, the least recently used
    assert len(release._projections) == 2 and Knob(0.5) not in release._projections
    torch.testing.assert_close(release.projection(Knob(0.5)), first)


def test_override_index_out_of_range_is_refused(model):
    with pytest.raises(IndexError, match="out of range"):
        engine(model).projection(Knob(1.0, ((model.spectral.dim, 2.0),)))


def test_tower_passes_are_bounded_and_give_the_same_rows(model, images):
    whole = engine(model, max_forward=64)
    sliced = engine(model, max_forward=2)  # 7 images → passes of 2, 2, 2, 1
    knobs = [Knob(1.0)] * len(images)
    prompts = [PROMPTS] * len(images)
    whole_answers = whole.classify_many(list(images), prompts, knobs)
    for a, b in zip(whole_answers, sliced.classify_many(list(images), prompts, knobs), strict=True):
        np.testing.assert_allclose(a[0], b[0], atol=1e-4)
        np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    features, counts = sliced.text_features(PROMPTS + ["a photo of a ring."])
    assert features.shape == (5, model.spectral.dim) and len(counts) == 5


def test_embed_many_answers_each_request_as_alone(model, images):
    release = engine(model, max_forward=3)
    requests = [([images[0], images[1]], ["a photo of a star."], Knob(1.0)),
                ([], PROMPTS[:2], Knob(0.5)),
                ([images[2]], [], Knob(0.0)),
                ([images[3]], [PROMPTS[3], PROMPTS[0]], Knob(2.0, ((1, 3.0),)))]
    results = release.embed_many(requests)
    assert len(results) == len(requests)
    for (request_images, texts, knob), (image_rows, text_rows, tokens) in zip(requests, results, strict=True):
        assert len(image_rows) == len(request_images) and len(text_rows) == len(texts)
        for image, row in zip(request_images, image_rows, strict=True):
            np.testing.assert_allclose(row, expected_image(model, image, knob), atol=1e-5)
        for text, row in zip(texts, text_rows, strict=True):
            np.testing.assert_allclose(row, expected_text(model, text, knob), atol=1e-5)
        assert tokens == sum(int((model.tokens([text]) != 0).sum()) for text in texts)


def test_classify_many_mixed_knobs_equal_one_at_a_time(model, images):
    release = engine(model)
    knobs = KNOBS[:4]
    batch = release.classify_many(list(images[:4]), [PROMPTS] * 4, knobs)
    for image, knob, (logits, probabilities) in zip(images[:4], knobs, batch, strict=True):
        alone = release.classify_many([image], [PROMPTS], [knob])[0]
        np.testing.assert_allclose(logits, alone[0], atol=1e-4)
        np.testing.assert_allclose(probabilities, alone[1], atol=1e-5)
        f = torch.tensor(expected_image(model, image, knob))
        g = torch.stack([torch.tensor(expected_text(model, p, knob)) for p in PROMPTS])
        np.testing.assert_allclose(logits, (model.logit_scale * g @ f).numpy(), atol=1e-4)
