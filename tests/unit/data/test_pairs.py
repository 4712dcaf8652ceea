"""JSONL preference pairs (docs/records.md) → the trainer's records, and the config that points at them."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from po_cluster.config import load_config, parse_config
from po_cluster.data.images import Geometry
from po_cluster.data.pairs import DataError, candidate_texts, load_preference_data, read_dataset
from po_cluster.data.records import NO_WORD
from po_cluster.data.selection import build_records, prompt_template

ROOT = Path(__file__).resolve().parents[3]
MAN, WOMAN = "a photo of a man", "a photo of a woman"


def _images(folder: Path, sizes) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(folder / f"{i}.jpg")
        names.append(f"images/{i}.jpg")
    return names


def _write(path: Path, rows) -> Path:
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in rows))
    return path


def test_hand_written_pairs_load_with_distinct_texts_as_candidates(tmp_path):
    names = _images(tmp_path / "images", [(120, 80), (64, 200), (300, 300)])
    path = _write(tmp_path / "pairs.jsonl", [
        {"image": names[0], "chosen": WOMAN, "rejected": MAN, "id": "a"},
        "",  # blank lines are allowed
        {"image": names[1], "chosen": MAN, "rejected": WOMAN},
        {"image": str(tmp_path / names[2]), "chosen": WOMAN, "rejected": "a photo of a child"},
    ])
    pref, reg = load_preference_data(str(path), Geometry(32))
    assert pref.classnames == ("a photo of a child", MAN, WOMAN)  # sorted distinct texts
    assert pref.images.shape == (3, 32, 32, 3) and pref.images.dtype == np.uint8
    assert pref.chosen.tolist() == [2, 1, 2] and pref.rejected.tolist() == [1, 2, 0]
    # no regularisation lines: the pair images are the clean set, labelled with the chosen text
    assert np.array_equal(reg.images, pref.images) and reg.labels.tolist() == [2, 1, 2]


def test_regularisation_lines_and_caps(tmp_path):
    names = _images(tmp_path / "images", [(40, 40)] * 6)
    rows = [{"image": n, "chosen": MAN if i % 2 else WOMAN, "rejected": WOMAN if i % 2 else MAN}
            for i, n in enumerate(names[:4])]
    rows += [{"kind": "regularization", "image": names[4]},
             {"kind": "regularization", "image": names[5], "text": MAN}]
    path = _write(tmp_path / "pairs.jsonl", rows)
    pref, reg = load_preference_data(str(path), Geometry(16))
    assert len(pref) == 4 and reg.labels.tolist() == [NO_WORD, 0]  # MAN sorts first
    small, small_reg = load_preference_data(str(path), Geometry(16), n_pairs=2, n_reg=1, seed=3)
    again, _ = load_preference_data(str(path), Geometry(16), n_pairs=2, n_reg=1, seed=3)
    assert len(small) == 2 and len(small_reg) == 1 and np.array_equal(small.images, again.images)


@pytest.mark.parametrize("line, message", [
    ('{"image": "images/0.jpg", "chosen": "a"}', r"pairs.jsonl:2: rejected: Field required"),
    ('{"image": "", "chosen": "a", "rejected": "b"}', r"pairs.jsonl:2: image: String should have at least 1"),
    ('{"image": "images/0.jpg", "chosen": "a", "rejected": "a"}', r"pairs.jsonl:2: chosen and rejected are the same"),
    ('{"image": "images/0.jpg", "chosen": "a", "rejected": "b"', r"pairs.jsonl:2: not valid JSON"),
    ('["images/0.jpg", "a", "b"]', r"pairs.jsonl:2: expected a JSON object"),
    ('{"kind": "regularization"}', r"pairs.jsonl:2: image: Field required"),
])
def test_bad_lines_are_named_by_file_and_line(tmp_path, line, message):
    names = _images(tmp_path / "images", [(20, 20)])
    path = _write(tmp_path / "pairs.jsonl", [{"image": names[0], "chosen": MAN, "rejected": WOMAN}, line])
    with pytest.raises(DataError, match=message):
        read_dataset(str(path))


def test_missing_and_unreadable_images_are_named(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"image": "images/none.jpg", "chosen": MAN, "rejected": WOMAN}])
    with pytest.raises(DataError, match=r"images/none.jpg: file not found"):
        load_preference_data(str(path))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "none.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"images/none.jpg: not a readable image"):
        load_preference_data(str(path))
    with pytest.raises(DataError, match="not a built dataset"):
        read_dataset(str(tmp_path))


def test_data_config_dispatches_to_the_dataset(tmp_path):
    names = _images(tmp_path / "images", [(50, 70)] * 4)
    rows = [{"image": n, "chosen": MAN if i % 2 else WOMAN, "rejected": WOMAN if i % 2 else MAN,
             "split": "train" if i < 3 else "val"} for i, n in enumerate(names)]
    path = _write(tmp_path / "pairs.jsonl", rows)
    cfg = parse_config({"data": {"dataset": str(path), "n_pairs": 4, "n_reg": 4},
                        "training": {"batch_size": 2}})
    pref, reg = build_records(cfg.data)  # the train split: the val line is held out
    assert len(pref) == 3 and pref.classnames == (MAN, WOMAN) and prompt_template(cfg.data).format(MAN) == MAN
    world_cfg = parse_config({}).data
    assert world_cfg.dataset is None and prompt_template(world_cfg) == "a photo of a {}."
    assert len(build_records(world_cfg.model_copy(update={"n_pairs": 4, "n_reg": 4}))[0]) == 4


def test_example_configs_load():
    for name in ("vit-b-32-typographic", "vit-b-32-spectral", "gender-bias"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.model.name.startswith("ViT-B-32") and cfg.model.pretrained == "openai"
        assert cfg.data.dataset
    assert load_config(ROOT / "configs" / "vit-b-32-spectral.yaml").model.image_tower == "frozen"
    assert load_config(ROOT / "configs" / "vit-b-32-typographic.yaml").model.image_tower == "full"


def test_candidate_texts_keep_the_builders_order():
    from po_cluster.data.pairs import PairLine, RecordFiles

    files = RecordFiles([PairLine(image="x", chosen="b", rejected="z")], [], {"candidates": ["b", "a"]})
    assert candidate_texts(files) == ("b", "a", "z")
