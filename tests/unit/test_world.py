import hashlib

import numpy as np
import pytest

from po_cluster.data import world
from po_cluster.data.records import NO_WORD, PreferenceSet

# The fixed evaluation sets must be byte-identical on every machine (pinned Pillow).
EVAL_SHA256 = {
    "clean": "c83049dbe68f8c7efd84fc1da2361aa305a740f7c4654963444dab0efa4cd729",
    "attacked": "6a0f1fbdd8e0b854412ff81e3664d0ef6c2eb2a0f533a1f238320792cfa7e818",
    "word_only": "c4c3ed04788ed3c0b6ea4b52242123bae4655332eb82b0befc561eea4e7a5b6f",
}


def _digest(image_set) -> str:
    return hashlib.sha256(image_set.images.tobytes() + image_set.labels.tobytes()
                          + image_set.written.tobytes()).hexdigest()


def test_world_has_at_least_eight_classes():
    assert len(world.SHAPES) >= 8 and len(set(world.SHAPES)) == len(world.SHAPES)


def test_evaluation_sets_are_fixed_and_complete():
    sets = world.evaluation_sets()
    assert set(sets) == {"clean", "attacked", "word_only"}
    for name, image_set in sets.items():
        assert len(image_set) >= 1000
        assert _digest(image_set) == EVAL_SHA256[name], f"{name} set differs from the committed one"
    assert np.all(sets["clean"].written == NO_WORD)
    assert np.all(sets["attacked"].written != sets["attacked"].labels)
    assert np.all(sets["attacked"].written >= 0)
    assert np.array_equal(sets["word_only"].written, sets["word_only"].labels)
    # every class is represented in every set
    for image_set in sets.values():
        assert set(np.unique(image_set.labels)) == set(range(len(world.SHAPES)))


def test_generators_are_deterministic_and_seed_dependent():
    a, b, c = world.preference_set(64, 3), world.preference_set(64, 3), world.preference_set(64, 4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.chosen, b.chosen)
    assert not np.array_equal(a.images, c.images)


def test_preference_records_prefer_the_drawn_shape_over_the_written_word():
    pref = world.preference_set(200, 0)
    assert isinstance(pref, PreferenceSet)
    assert np.all(pref.chosen != pref.rejected)
    assert pref.images.shape == (200, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)


def test_unpaired_records_mix_desirable_and_undesirable():
    unpaired = world.unpaired_set(200, 0)
    attacked = world.image_set("attacked", 200, 0)
    assert 0 < unpaired.desirable.mean() < 1
    expected = np.where(unpaired.desirable, attacked.labels, attacked.written)
    assert np.array_equal(unpaired.labels, expected)


def test_pretraining_mix_captions_name_the_written_word_on_attacked_images():
    rng = np.random.default_rng(0)
    images, captions, labels = world.pretraining_batch(256, rng)
    assert images.shape[0] == len(captions) == len(labels) == 256
    for caption, label in zip(captions, labels):
        assert world.SHAPES[label] in caption


def test_word_is_rendered_on_the_image():
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(1)
    clean = world.render(0, None, rng1)
    rng2_bg = world.render(0, None, rng2)
    assert np.array_equal(clean, rng2_bg)
    with_word = world.render(None, 2, np.random.default_rng(5))
    blank = world._background(np.random.default_rng(5), world.IMAGE_SIZE)
    assert np.abs(with_word.astype(int) - np.asarray(blank).astype(int)).sum() > 0


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown image set kind"):
        world.image_set("sideways", 3, 0)
