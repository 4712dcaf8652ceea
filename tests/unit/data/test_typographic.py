"""The typographic builder on small labelled folders of rendered shapes."""
import json
from pathlib import Path

import numpy as np
import pytest

from po_cluster import cli
from po_cluster.config import ConfigError, parse_config
from po_cluster.data.pairs import DataError, load_preference_data
from po_cluster.data.typographic import TypographicConfig, build_typographic
from typo_helpers import CLASSES, built_rows, labelled_folder, row_image, tree_bytes


def _cfg(source, out, **extra) -> TypographicConfig:
    return TypographicConfig(source=str(source), out=str(out), image_size=64, workers=2, **extra)


def _pairs(out):
    return built_rows(out)[0]


def test_builder_writes_the_expected_records(tmp_path):
    source = labelled_folder(tmp_path / "src")
    summary = build_typographic(_cfg(source, tmp_path / "out", variants=2, seed=3))
    out = tmp_path / "out"
    assert summary.classes == tuple(sorted(CLASSES)) and summary.images == 8 and summary.pairs == 16
    pairs, regs = built_rows(out)
    assert len(pairs) == 16 and len(regs) == 8
    for pair in pairs:
        assert pair["chosen"] == f"a photo of a {pair['label']}."
        assert pair["rejected"] == f"a photo of a {pair['written']}."
        assert pair["label"] == pair["source"].split("/")[0]  # the class folder the image came from
        assert row_image(pair).size == (64, 64) and row_image(pair).format == "PNG"
    for reg in regs:
        assert reg["kind"] == "regularization" and reg["text"] == f"a photo of a {reg['label']}."
    # the k variants of one image carry k different wrong classes
    by_image = {}
    for pair in pairs:
        by_image.setdefault(pair["id"].split("-")[0], []).append(pair["written"])
    assert all(len(set(words)) == 2 for words in by_image.values())
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["candidates"] == [f"a photo of a {c}." for c in sorted(CLASSES)] and meta["image_size"] == 64
    assert [s["rows"] for s in meta["shards"]] == [24] and sorted(p.name for p in out.rglob("*")) == \
        ["dataset.json", "part-00000.parquet", "shards"]  # one object per shard, not one per image


def test_the_true_label_is_never_written_on_its_own_image(tmp_path):
    source = labelled_folder(tmp_path / "src", per_class=3)
    build_typographic(_cfg(source, tmp_path / "out", variants=3, seed=0))  # k = every other class
    pairs, regs = built_rows(tmp_path / "out")
    assert pairs and all(p["written"] != p["label"] for p in pairs)
    clean = {r["id"]: np.asarray(row_image(r)) for r in regs if r["written"] is None}
    # and something was drawn: the attacked copy differs from the clean one
    for p in (p for p in pairs if p["id"].split("-")[0] in clean):
        assert np.any(np.asarray(row_image(p)) != clean[p["id"].split("-")[0]])


def test_a_share_of_train_regularisation_images_carry_their_own_name(tmp_path):
    source = labelled_folder(tmp_path / "src", per_class=6)
    build_typographic(_cfg(source, tmp_path / "none", variants=1, seed=1, own_word=0.0))
    build_typographic(_cfg(source, tmp_path / "half", variants=1, seed=1, own_word=0.5))
    pairs0, regs0 = built_rows(tmp_path / "none")
    pairs, regs = built_rows(tmp_path / "half")
    assert all(r["written"] is None and r["image_name"].startswith("clean/") for r in regs0)
    own = [r for r in regs if r["written"] is not None]
    assert own and all(r["split"] == "train" for r in own)  # val and test keep clean images to score on
    assert len(own) < sum(r["split"] == "train" for r in regs)  # a share, not all
    clean0 = {r["id"]: np.asarray(row_image(r)) for r in regs0}
    for r in own:
        assert r["written"] == r["label"] and r["image_name"].startswith("own/") and r["font_px"] > 0
        assert r["text"] == f"a photo of a {r['label']}."
        assert np.any(np.asarray(row_image(r)) != clean0[r["id"]])  # the name is drawn on the clean image
    # the attacked copies do not depend on the share (their generator is their own)
    assert [row_image(p).tobytes() for p in pairs] == [row_image(p).tobytes() for p in pairs0]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    source = labelled_folder(tmp_path / "src")
    build_typographic(_cfg(source, tmp_path / "a", variants=2, seed=7))
    build_typographic(_cfg(source, tmp_path / "b", variants=2, seed=7).model_copy(update={"workers": 1}))
    build_typographic(_cfg(source, tmp_path / "c", variants=2, seed=8))
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")  # whatever the number of threads
    shard = "shards/part-00000.parquet"
    assert tree_bytes(tmp_path / "a")[shard] != tree_bytes(tmp_path / "c")[shard]
    build_typographic(_cfg(source, tmp_path / "d", variants=2, seed=7, rows_per_shard=5))
    assert [r["id"] for r in built_rows(tmp_path / "d")[0]] == [r["id"] for r in built_rows(tmp_path / "a")[0]]
    assert len(list((tmp_path / "d" / "shards").iterdir())) == 5  # 24 rows, 5 a shard


def test_built_dataset_loads_as_training_records(tmp_path):
    build_typographic(_cfg(labelled_folder(tmp_path / "src"), tmp_path / "out", variants=2))
    pref, reg = load_preference_data(str(tmp_path / "out"))
    assert pref.classnames == tuple(f"a photo of a {c}." for c in sorted(CLASSES))
    assert pref.images.shape == (16, 64, 64, 3) and reg.images.shape == (8, 64, 64, 3)
    assert np.all(pref.chosen != pref.rejected)
    # the clean image's label is its class: the same candidate as the chosen text of its pairs
    assert set(reg.labels.tolist()) == set(pref.chosen.tolist())


def test_manifests_and_fonts(tmp_path):
    source = labelled_folder(tmp_path / "src")
    rows = [(f"{c}/{i}.png", c) for c in CLASSES for i in range(2)]
    (tmp_path / "src" / "m.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (tmp_path / "src" / "m.jsonl").write_text("".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows))
    build_typographic(_cfg(source, tmp_path / "folder", seed=1))
    build_typographic(_cfg(source / "m.csv", tmp_path / "csv", seed=1))
    build_typographic(_cfg(source / "m.jsonl", tmp_path / "jsonl", seed=1))
    folder, csv_ = tree_bytes(tmp_path / "folder"), tree_bytes(tmp_path / "csv")
    assert {k: v for k, v in folder.items() if k != "dataset.json"} == \
        {k: v for k, v in csv_.items() if k != "dataset.json"}  # same images, same labels, same records
    assert tree_bytes(tmp_path / "csv")["shards/part-00000.parquet"] == \
        tree_bytes(tmp_path / "jsonl")["shards/part-00000.parquet"]
    import matplotlib  # ships DejaVu fonts: a real .ttf file without downloading one

    ttf = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf")
    build_typographic(_cfg(source, tmp_path / "ttf", seed=1, fonts=(ttf,)))
    pairs = _pairs(tmp_path / "ttf")
    assert {p["font"] for p in pairs} == {ttf}
    assert pairs[0]["image"] != _pairs(tmp_path / "folder")[0]["image"]
    with pytest.raises(ValueError, match="cannot load font"):
        _cfg(source, tmp_path / "x", fonts=(str(tmp_path / "missing.ttf"),))


def test_bad_input_is_named(tmp_path):
    source = labelled_folder(tmp_path / "src")
    with pytest.raises(DataError, match="folder not found"):
        build_typographic(_cfg(tmp_path / "nowhere", tmp_path / "out"))
    (source / "hexagon").mkdir()
    with pytest.raises(DataError, match="hexagon: class folder with no images"):
        build_typographic(_cfg(source, tmp_path / "out"))
    (source / "hexagon").rmdir()
    (source / "star" / "broken.png").write_bytes(b"not a png")  # skipped and named; the others are built
    summary = build_typographic(_cfg(source, tmp_path / "out"))
    assert summary.images == 8 and [(s.where, s.reason.split(" (")[0]) for s in summary.skipped] == \
        [(str(source / "star" / "broken.png"), "not a readable image")]
    (source / "star" / "broken.png").unlink()
    (tmp_path / "m.csv").write_text("path,label\nsrc/star/0.png,star\nsrc/star/1.png,\n")
    with pytest.raises(DataError, match=r"m.csv:3: label: Field required"):
        build_typographic(_cfg(tmp_path / "m.csv", tmp_path / "out"))
    (tmp_path / "m.jsonl").write_text('{"path": "src/star/0.png", "label": "star"}\n{"label": "circle"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: path: Field required"):
        build_typographic(_cfg(tmp_path / "m.jsonl", tmp_path / "out"))
    with pytest.raises(DataError, match="leave fewer than variants=4"):
        build_typographic(_cfg(source, tmp_path / "out", variants=4))
    with pytest.raises(ConfigError, match="prompt_template"):
        parse_config({"source": "a", "out": "b", "prompt_template": "no slot"}, "<t>", TypographicConfig)


def test_cli_builds_and_checks(tmp_path, capsys):
    source = labelled_folder(tmp_path / "src")
    out = tmp_path / "out"
    assert cli.main(["data", "typographic", str(source), "--out", str(out), "--variants", "2",
                     "--image-size", "64", "--seed", "5"]) == 0
    assert "wrote 16 preference pairs from 8 images of 4 classes" in capsys.readouterr().out
    assert cli.main(["data", "check", str(out)]) == 0
    out_text = capsys.readouterr().out  # 2 images a class: too few to hold any out
    assert "16 pairs (16 train, 0 val, 0 test), 8 regularisation images" in out_text
    assert "warning: no pairs in val or test" in out_text
    assert cli.main(["data", "typographic", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere: folder not found" in capsys.readouterr().err
    config = tmp_path / "typo.yaml"
    config.write_text(f"source: {source}\nout: {tmp_path / 'yaml'}\nimage_size: 64\nfill_colors: [red, '#00ff00']\n")
    assert cli.main(["data", "typographic", "--config", str(config), "--variants", "3"]) == 0
    assert {p["fill"] for p in _pairs(tmp_path / "yaml")} <= {"red", "#00ff00"}
    config.write_text(f"source: {source}\nout: {tmp_path / 'yaml'}\nfill_colors: [reddish]\n")
    assert cli.main(["data", "typographic", "--config", str(config)]) == 2
    assert "fill_colors" in capsys.readouterr().err
