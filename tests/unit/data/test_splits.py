"""Train / val / test splits by source image: in the builder's records, for hand-written files, and
as the sets a run trains on, is chosen on and is scored on."""
import json
from collections import Counter

import numpy as np
import pytest

from po_cluster.config import parse_config
from po_cluster.data.pairs import DataError, dataset_eval_sets, load_preference_data, read_dataset
from po_cluster.data.selection import build_records, held_out_sets
from po_cluster.data.splits import assign_splits, check_fractions, hashed_split
from po_cluster.data.typographic import TypographicConfig, build_typographic
from typo_helpers import CLASSES, built_rows, labelled_folder


def test_assign_splits_is_stratified_seeded_and_keeps_a_training_image():
    labels = [c for c in CLASSES for _ in range(10)]
    splits = assign_splits(labels, (0.8, 0.1, 0.1), seed=4)
    assert splits == assign_splits(labels, (0.8, 0.1, 0.1), seed=4)
    assert splits != assign_splits(labels, (0.8, 0.1, 0.1), seed=5)
    for name in CLASSES:  # every class in every split, 8 / 1 / 1 of its 10 images
        assert Counter(s for s, label in zip(splits, labels, strict=True) if label == name) == \
            {"train": 8, "val": 1, "test": 1}
    assert assign_splits(["a", "a", "b"], (0.5, 0.25, 0.25)) .count("train") >= 2  # one each class
    assert assign_splits(["a"] * 3, (0.2, 0.4, 0.4)).count("train") == 1


@pytest.mark.parametrize("bad, message", [((0.5, 0.5), "three fractions"), ((0.0, 0.5, 0.5), "train must be"),
                                          ((0.8, 0.3, 0.1), "sum to 1.2"), ((1.2, -0.1, -0.1), "train must be")])
def test_bad_fractions_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        check_fractions(bad)
    if len(bad) == 3:
        with pytest.raises(ValueError, match="splits"):
            TypographicConfig(source="x", out="y", splits=bad)


def test_hashed_split_depends_on_the_key_alone():
    keys = [f"images/{i}.jpg" for i in range(2000)]
    splits = [hashed_split(k) for k in keys]
    assert splits == [hashed_split(k) for k in keys]
    counts = Counter(splits)
    assert 0.75 < counts["train"] / 2000 < 0.85 and counts["val"] > 120 and counts["test"] > 120


def test_no_source_image_crosses_splits_in_a_build(tmp_path):
    source = labelled_folder(tmp_path / "src", per_class=10)
    build_typographic(TypographicConfig(source=str(source), out=str(tmp_path / "out"), variants=3, seed=2,
                                        image_size=48, workers=2))
    pairs, regs = built_rows(tmp_path / "out")
    rows = pairs + regs
    by_source: dict[str, set[str]] = {}
    for row in rows:
        by_source.setdefault(row["source"], set()).add(row["split"])
    assert len(by_source) == 40 and all(len(s) == 1 for s in by_source.values())
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["counts"]["splits"] == {"train": {"images": 32, "pairs": 96}, "val": {"images": 4, "pairs": 12},
                                        "test": {"images": 4, "pairs": 12}}
    # what training, choosing and scoring read: three disjoint sets of images
    train, _ = load_preference_data(str(tmp_path / "out"), split="train")
    val, test = (dataset_eval_sets(str(tmp_path / "out"), s) for s in ("val", "test"))
    assert len(train) == 96 and len(val["attacked"]) == 12 and len(test["clean"]) == 4
    seen = {img.tobytes() for img in train.images}
    assert not seen & {img.tobytes() for img in test["attacked"].images}
    assert np.array_equal(test["attacked"].written != test["attacked"].labels, np.ones(12, dtype=bool))


def test_run_configs_train_on_train_and_hold_out_val_and_test(tmp_path):
    source = labelled_folder(tmp_path / "src", per_class=10)
    build_typographic(TypographicConfig(source=str(source), out=str(tmp_path / "out"), seed=1, image_size=48))
    cfg = parse_config({"data": {"dataset": str(tmp_path / "out"), "n_pairs": 1000, "n_reg": 1000, "n_val": 2}})
    pref, reg = build_records(cfg.data)
    assert len(pref) == 32 and len(reg) == 32
    val = held_out_sets(cfg.data, "val")
    assert {name: len(s) for name, s in val.items()} == {"clean": 2, "attacked": 2}  # n_val caps val
    assert len(held_out_sets(cfg.data, "test")["attacked"]) == 4  # test is never capped


def test_a_split_without_pairs_is_refused_by_name(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    rows = [{"image": "a.png", "chosen": "x", "rejected": "y", "split": "train"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"no preference pairs in the test split \(pairs per split: 1 train"):
        dataset_eval_sets(str(tmp_path / "pairs.jsonl"), "test")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({**rows[0], "split": "holdout"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: split: Input should be 'train', 'val' or 'test'"):
        read_dataset(str(tmp_path / "pairs.jsonl"))
