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


@pytest.fixture(scope="module")
def eval_sets():
    return world.evaluation_sets()


def _row_digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in images}


def test_evaluation_sets_are_fixed_and_complete(eval_sets):
    sets = eval_sets
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


def test_classes_are_balanced_and_attack_words_cover_every_other_class(eval_sets):
    n_classes = len(world.SHAPES)
    for name, image_set in eval_sets.items():
        counts = np.bincount(image_set.labels, minlength=n_classes)
        expected = len(image_set) / n_classes
        assert np.all(np.abs(counts - expected) < 0.3 * expected), f"{name}: class counts {counts.tolist()}"
    attacked = eval_sets["attacked"]
    pairs = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(pairs, (attacked.labels, attacked.written), 1)
    off_diagonal = pairs[~np.eye(n_classes, dtype=bool)]
    # uniform over the 7 other classes: ~18 of each (label, word) pair in 1000 images
    assert off_diagonal.min() >= 5 and np.trace(pairs) == 0, pairs


def test_validation_sets_share_no_image_with_the_evaluation_sets(eval_sets):
    validation = world.validation_sets(200)
    assert set(validation) == set(eval_sets)
    evaluation_images = set().union(*(_row_digests(s.images) for s in eval_sets.values()))
    for name, image_set in validation.items():
        assert not _row_digests(image_set.images) & evaluation_images, name
        assert len(_row_digests(image_set.images)) == len(image_set), f"{name} repeats an image"


def test_sets_depend_on_their_seed_only():
    first = world.image_set("attacked", 40, 7)
    np.random.seed(123)  # the global generator and other renders in between change nothing
    world.image_set("word_only", 5, 8)
    again = world.image_set("attacked", 40, 7)
    for field in ("images", "labels", "written"):
        assert np.array_equal(getattr(first, field), getattr(again, field)), field
    images, captions, labels = world.pretraining_batch(32, np.random.default_rng(3))
    images2, captions2, labels2 = world.pretraining_batch(32, np.random.default_rng(3))
    assert np.array_equal(images, images2) and captions == captions2 and np.array_equal(labels, labels2)


def test_generators_are_deterministic_and_seed_dependent():
    a, b, c = world.preference_set(64, 3), world.preference_set(64, 3), world.preference_set(64, 4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.chosen, b.chosen)
    assert not np.array_equal(a.images, c.images)


def test_preference_records_prefer_the_drawn_shape_over_the_written_word():
    pref = world.preference_set(200, 0)
    attacked = world.image_set("attacked", 200, 0)
    assert isinstance(pref, PreferenceSet)
    # the attacked images themselves: chosen = the class of the drawn shape, rejected = the word written on it
    assert np.array_equal(pref.images, attacked.images)
    assert np.array_equal(pref.chosen, attacked.labels) and np.array_equal(pref.rejected, attacked.written)
    assert pref.images.shape == (200, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)


def test_unpaired_records_mix_desirable_and_undesirable():
    unpaired = world.unpaired_set(200, 0)
    attacked = world.image_set("attacked", 200, 0)
    assert 0 < unpaired.desirable.mean() < 1
    expected = np.where(unpaired.desirable, attacked.labels, attacked.written)
    assert np.array_equal(unpaired.labels, expected)


def test_pretraining_mix_captions_name_the_written_word_on_attacked_images(monkeypatch):
    drawn = []  # (shape, word) of each image, as world asks render() for it

    def record(shape, word, rng, *args, **kwargs):
        drawn.append((shape, word))
        return np.full((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), len(drawn) % 256, dtype=np.uint8)

    monkeypatch.setattr(world, "render", record)  # no pixels needed: only what is drawn
    n = 4000
    images, captions, labels = world.pretraining_batch(n, np.random.default_rng(0))
    assert images.shape[0] == len(captions) == len(labels) == len(drawn) == n
    assert np.array_equal(images[:, 0, 0, 0], (np.arange(n) + 1) % 256)  # each image where its caption is
    kinds = {"clean": 0, "own_word": 0, "word_only": 0, "attacked_read": 0}
    for (shape, word), caption, label in zip(drawn, captions, labels, strict=True):
        named = [i for i, name in enumerate(world.SHAPES) if name in caption.rstrip(".").split()]
        assert named == [label], (caption, label)
        if word is not None:  # a word on the image: the caption names the word, whatever is drawn
            assert named == [word], (shape, word, caption)
        else:  # no word: the caption names the drawn shape
            assert named == [shape], (shape, word, caption)
        kind = ("clean" if word is None else "word_only" if shape is None
                else "own_word" if shape == word else "attacked_read")
        kinds[kind] += 1
    for kind, fraction in world.PRETRAIN_MIX.items():
        assert abs(kinds[kind] / n - fraction) < 0.03, kinds


def test_word_is_rendered_on_the_image():
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(1)
    clean = world.render(0, None, rng1)
    rng2_bg = world.render(0, None, rng2)
    assert np.array_equal(clean, rng2_bg)
    with_word = world.render(None, 2, np.random.default_rng(5))
    blank = world._background(np.random.default_rng(5), world.IMAGE_SIZE)
    assert np.abs(with_word.astype(int) - np.asarray(blank).astype(int)).sum() > 0


@pytest.mark.parametrize("word", range(len(world.SHAPES)))
def test_the_word_is_what_an_attacked_image_adds_to_the_clean_render(word):
    shape = (word + 3) % len(world.SHAPES)
    clean = world.render(shape, None, np.random.default_rng(40 + word)).astype(int)
    attacked = world.render(shape, word, np.random.default_rng(40 + word)).astype(int)
    changed = np.any(attacked != clean, axis=-1)
    rows, cols = np.nonzero(changed)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    # one line of text (11-13 px font, 1 px stroke) covering a visible share of the image
    assert 100 < changed.sum() < 0.25 * changed.size, changed.sum()
    assert height <= 17 and width > 1.5 * height, (height, width)
    # written in black on white or white on black (fill and stroke)
    ink = attacked[changed]
    assert np.any(np.all(ink == 0, axis=-1)) and np.any(np.all(ink == 255, axis=-1))


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown image set kind"):
        world.image_set("sideways", 3, 0)
