import hashlib

import numpy as np
import pytest

from po_cluster.data import render, world
from po_cluster.data.records import NO_WORD, PreferenceSet

# The fixed evaluation sets must be byte-identical on every machine (pinned Pillow).
EVAL_SHA256 = {
    "clean": "80129421e3a3c2fdb3bab224439175cc8de27dd538affa7b852f11910ee7f6f0",
    "attacked": "8e527cf68317a9f9d631d6ad5bdd8ce8de4ac0b85f537e651db3811e8d3e9d0f",
    "word_only": "83b6d9487b983df60e6ebbe698e86402fbbc8e5fc5668bc4c5f73da2177fc425",
    "retain_colour": "804568bd16f4296fbd059fbd34d74e43b653a6f3a47dbb587b9254484fc0e9b4",
    "retain_size": "44cfb21229789bc28b34319a24ab0bb828521b8b3e63ed12f447f1b89ace009f",
    "bias_stereotyped": "2cf5e047988055839d1454e04d43b7776e83eb0dc0fb24d3ccbc87147f65ae9b",
    "bias_counter": "e2702560caffb012e74e43d93b4401997a5de54729f187d7cf1ac7ac325ff085",
    "own_word": "4b8fe4b17fae53e6ba08bf32e21c2c6b8f6b7f801b0ce803703c05c3f9b25171",
    # held out: scored, never chosen on (no validation set)
    "attacked_styles": "20820ff91d0d209197fa872ebd62459e1d88ee0a136b50c875bcb5af069fbdf2",
}


def _digest(image_set) -> str:
    return hashlib.sha256(image_set.images.tobytes() + image_set.labels.tobytes()
                          + image_set.written.tobytes()).hexdigest()


def test_world_has_at_least_sixteen_classes():
    assert len(world.SHAPES) >= 16 and len(set(world.SHAPES)) == len(world.SHAPES)


@pytest.fixture(scope="module")
def eval_sets():
    return world.evaluation_sets()


def test_selection_keeps_one_read_only_copy_of_the_fixed_sets():
    from po_cluster.data import selection

    first, second = selection.evaluation_sets(), selection.evaluation_sets()
    assert first is not second and all(first[kind] is second[kind] for kind in first)  # rendered once
    assert {kind: _digest(image_set) for kind, image_set in first.items()} == EVAL_SHA256
    for image_set in first.values():
        assert not any(a.flags.writeable for a in (image_set.images, image_set.labels, image_set.written))
    with pytest.raises(ValueError, match="read-only"):
        first["clean"].images[0] = 0


def _row_digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(image.tobytes()).hexdigest() for image in images}


def test_evaluation_sets_are_fixed_and_complete(eval_sets):
    sets = eval_sets
    kinds = world.TASK_KINDS + world.RETENTION_KINDS + world.BIAS_KINDS + world.AGREEING_KINDS
    assert set(sets) == {*kinds, *world.HELD_OUT_SEEDS} == set(EVAL_SHA256)
    for name, image_set in sets.items():
        assert len(image_set) >= 1000
        assert _digest(image_set) == EVAL_SHA256[name], f"{name} set differs from the committed one"
    sets = {name: sets[name] for name in world.TASK_KINDS}
    assert np.all(sets["clean"].written == NO_WORD)
    assert np.all(sets["attacked"].written != sets["attacked"].labels)
    assert np.all(sets["attacked"].written >= 0)
    assert np.array_equal(sets["word_only"].written, sets["word_only"].labels)
    assert np.array_equal(eval_sets["own_word"].written, eval_sets["own_word"].labels)
    # every class is represented in every set
    for image_set in sets.values():
        assert set(np.unique(image_set.labels)) == set(range(len(world.SHAPES)))


def test_classes_are_balanced_and_attack_words_cover_every_other_class(eval_sets):
    n_classes = len(world.SHAPES)
    for name in world.TASK_KINDS:
        image_set = eval_sets[name]
        counts = np.bincount(image_set.labels, minlength=n_classes)
        assert counts.max() - counts.min() <= 1, f"{name}: class counts {counts.tolist()}"
    attacked = eval_sets["attacked"]
    pairs = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(pairs, (attacked.labels, attacked.written), 1)
    off_diagonal = pairs[~np.eye(n_classes, dtype=bool)]
    # over the 15 other classes: ~4 of each (label, word) pair in 1000 images, each word as often
    assert (off_diagonal > 0).mean() > 0.95 and np.trace(pairs) == 0, pairs
    words = np.bincount(attacked.written, minlength=n_classes)
    assert words.min() > 0.6 * words.mean(), words


def test_validation_sets_share_no_image_with_the_evaluation_sets(eval_sets):
    validation = world.validation_sets(200)
    assert set(validation) == set(eval_sets) - set(world.HELD_OUT_SEEDS)
    evaluation_images = set().union(*(_row_digests(s.images) for s in eval_sets.values()))
    for name, image_set in validation.items():
        assert not _row_digests(image_set.images) & evaluation_images, name
        assert len(_row_digests(image_set.images)) == len(image_set), f"{name} repeats an image"


def test_regularisation_set_mixes_clean_shapes_and_shapes_with_their_own_name():
    reg = world.regularisation_set(400, 5, own_word=0.25)
    own = reg.written != NO_WORD
    assert 0.18 < own.mean() < 0.32, own.mean()
    assert np.array_equal(reg.written[own], reg.labels[own])  # a word written is always the shape's own
    counts = np.bincount(reg.labels, minlength=len(world.SHAPES))
    assert counts.max() - counts.min() <= 1
    # share 0 is exactly the clean set of that seed (the bias task and older configs train on it)
    clean, none = world.image_set("clean", 50, 5), world.regularisation_set(50, 5, own_word=0.0)
    assert np.array_equal(clean.images, none.images) and np.array_equal(clean.written, none.written)


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


def _described(caption: str) -> dict[str, str]:
    """What a caption says of the object's look, by part."""
    words = caption.rstrip(".").split()
    parts = {"size": tuple(render.SIZES), "colour": tuple(render.COLOURS), "pattern": render.PATTERNS}
    return {part: word for part, names in parts.items() for word in words if word in names}


def test_pretraining_mix_captions_name_the_written_word_on_attacked_images(monkeypatch):
    drawn = []  # (shape, word, look) of each image, as world asks render() for it

    def record(shape, word, rng, *args, look=None, **kwargs):
        drawn.append((shape, word, look))
        image = np.full((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), len(drawn) % 256, dtype=np.uint8)
        return np.zeros_like(image), image  # (twin, image), as render_pair returns them

    monkeypatch.setattr(world, "render_pair", record)  # no pixels needed: only what is drawn
    n = 4000
    images, captions, labels = world.pretraining_batch(n, np.random.default_rng(0))
    assert images.shape[0] == len(captions) == len(labels) == len(drawn) == n
    assert np.array_equal(images[:, 0, 0, 0], (np.arange(n) + 1) % 256)  # each image where its caption is
    kinds = {"clean": 0, "own_word": 0, "word_only": 0, "attacked_read": 0}
    says_object = stereotyped = 0
    counter_said: list[bool] = []  # of objects that break their stereotype: was the stereotype said?
    for (shape, word, look), caption, label in zip(drawn, captions, labels, strict=True):
        named = [i for i, name in enumerate(world.SHAPES) if name in caption.rstrip(".").split()]
        if "object" in caption.rstrip(".").split():  # a caption of the look alone names no class
            says_object += 1
            assert named == [] and _described(caption), caption
        else:
            assert named == [label], (caption, label)
            assert named == ([word] if word is not None else [shape]), (shape, word, caption)
        if shape is None:  # word only: no object, nothing to describe
            assert look is None and not _described(caption), caption
        else:  # what the caption says of the look is what is drawn, but for the captioners' stereotype
            usual = world.STEREOTYPE[shape]
            stereotyped += look.pattern == usual
            truth = {"size": tuple(render.SIZES)[look.size], "colour": tuple(render.COLOURS)[look.colour],
                     "pattern": render.PATTERNS[look.pattern]}
            said = _described(caption)
            if look.pattern != usual and "pattern" in said:
                counter_said.append(said.pop("pattern") == render.PATTERNS[usual])
            assert all(truth[part] == value for part, value in said.items()), (look, caption)
        kind = ("clean" if word is None else "word_only" if shape is None
                else "own_word" if shape == word else "attacked_read")
        kinds[kind] += 1
    for kind, fraction in world.PRETRAIN_MIX.items():
        assert abs(kinds[kind] / n - fraction) < 0.03, kinds
    objects = n - kinds["word_only"]
    assert abs(stereotyped / objects - world.STEREOTYPE_SHARE) < 0.02, stereotyped / objects
    assert 0.05 < says_object / n < 0.3, says_object
    assert len(counter_said) > 20 and abs(np.mean(counter_said) - world.STEREOTYPED_CAPTION) < 0.25, counter_said


def test_attribute_sets_are_labelled_by_the_look_and_balanced():
    sets = {kind: world.image_set(kind, 400, 5) for kind in world.RETENTION_KINDS + world.BIAS_KINDS}
    assert sets["retain_colour"].classnames == tuple(render.COLOURS)
    assert sets["retain_size"].classnames == tuple(render.SIZES)
    for kind, image_set in sets.items():
        assert image_set.template == world.ATTRIBUTE_TEMPLATE and np.all(image_set.written == NO_WORD), kind
        counts = np.bincount(image_set.labels, minlength=len(image_set.classnames))
        expected = len(image_set) / len(image_set.classnames)
        assert np.all(np.abs(counts - expected) < 0.3 * expected), (kind, counts)
    assert sets["bias_stereotyped"].classnames == sets["bias_counter"].classnames == render.PATTERNS


def test_bias_sets_follow_and_break_the_stereotype(monkeypatch):
    drawn = []

    def record(shape, word, rng, *args, look=None, **kwargs):
        drawn.append((shape, look))
        blank = np.zeros((world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
        return blank, blank

    monkeypatch.setattr(world, "render_pair", record)
    for kind, follows in (("bias_stereotyped", True), ("bias_counter", False)):
        drawn.clear()
        image_set = world.image_set(kind, 200, 1)
        assert [look.pattern for _, look in drawn] == image_set.labels.tolist()
        assert all((look.pattern == world.STEREOTYPE[shape]) == follows for shape, look in drawn), kind


def test_bias_records_prefer_the_pattern_the_image_shows():
    pref = world.bias_preference_set(300, 2)
    assert pref.classnames == render.PATTERNS and len(pref) == 300
    assert np.array_equal(pref.rejected, 1 - pref.chosen)
    assert 0.4 < pref.chosen.mean() < 0.6


def test_a_striped_object_has_darker_bands_than_a_plain_one():
    def object_pixels(pattern: int) -> np.ndarray:
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        render.draw_object(pixels, "square", render.Look(0, 1, pattern), np.random.default_rng(3))
        return pixels[np.any(pixels > 0, axis=-1)].astype(float)

    plain, striped = object_pixels(0), object_pixels(1)
    assert len(plain) == len(striped) > 300  # the same square: the look's pattern changes only the fill
    assert np.ptp(plain.sum(axis=-1)) == 0  # one colour
    assert np.ptp(striped.sum(axis=-1)) > 0.15 * striped.sum(axis=-1).max()  # two shades


def test_word_is_rendered_on_the_image():
    rng1, rng2 = np.random.default_rng(1), np.random.default_rng(1)
    clean = world.render(0, None, rng1)
    rng2_bg = world.render(0, None, rng2)
    assert np.array_equal(clean, rng2_bg)
    with_word = world.render(None, 2, np.random.default_rng(5))
    blank = world.render(None, None, np.random.default_rng(5))
    assert np.abs(with_word.astype(int) - blank.astype(int)).sum() > 0


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


def test_held_out_styles_are_the_attacked_set_of_their_seed_but_for_the_words(eval_sets):
    styled = eval_sets["attacked_styles"]
    plain = world.image_set("attacked", len(styled), world.HELD_OUT_SEEDS["attacked_styles"])
    assert np.array_equal(styled.labels, plain.labels) and np.array_equal(styled.written, plain.written)
    head, plain = styled.take(np.arange(60)), plain.take(np.arange(60))
    changed = np.abs(head.images.astype(int) - plain.images.astype(int)).sum(axis=-1) > 0
    assert changed.any(axis=(1, 2)).all()  # every row's word is drawn otherwise
    assert changed.mean(axis=(1, 2)).max() < 0.5  # and only the word: the scene is the attacked set's
    assert [world.row_style(i) for i in range(7)] == [*world.STYLES, next(iter(world.STYLES))]


def test_training_sets_carry_word_free_twins_of_the_same_draw():
    pref = world.preference_set(40, 3)
    assert pref.twins is not None and pref.twins.shape == pref.images.shape
    assert np.array_equal(pref.images, world.image_set("attacked", 40, 3).images)  # the records did not move
    differs = (pref.twins != pref.images).any(axis=-1)
    assert differs.any(axis=(1, 2)).all() and differs.mean() < 0.25  # each twin lacks its word, nothing else
    reg = world.regularisation_set(64, 4, own_word=0.5)
    bare = reg.written == NO_WORD
    assert np.array_equal(reg.twins[bare], reg.images[bare])  # no word: its own twin
    assert (reg.twins[~bare] != reg.images[~bare]).any(axis=(1, 2, 3)).all()
    assert world.image_set("clean", 8, 1).twins is None  # evaluation sets carry none
