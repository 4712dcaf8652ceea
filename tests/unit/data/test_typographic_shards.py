"""The typographic builder on webdataset shards: the same records as the same images in class folders."""
import json

import pytest

from po_cluster import cli
from po_cluster.data.pairs import DataError
from po_cluster.data.typographic import TypographicConfig, build_typographic
from typo_helpers import CLASSES, built_rows
from wds_helpers import shards_and_folder


def _cfg(source, out, **extra) -> TypographicConfig:
    return TypographicConfig(source=str(source), out=str(out), **({"image_size": 64, "variants": 2, "seed": 3,
                                                                    "workers": 2} | extra))


def _without_source(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "source"} for row in rows]


def test_shards_give_the_folders_records_and_name_the_bad_members(tmp_path):
    data = shards_and_folder(tmp_path)
    wds = tmp_path / "wds"
    folder = build_typographic(_cfg(data["folder"], tmp_path / "from-folder"))
    sharded = build_typographic(_cfg(f"{wds}/{{00000..00002}}.tar", tmp_path / "from-shards"))
    assert (sharded.images, sharded.pairs, sharded.classes) == (folder.images, folder.pairs, folder.classes) \
        == (13, 26, tuple(sorted(CLASSES)))
    for ours, theirs in zip(built_rows(tmp_path / "from-shards"), built_rows(tmp_path / "from-folder"), strict=True):
        assert _without_source(ours) == _without_source(theirs)  # same images, labels, splits, words and bytes
        assert [r["source"].split("/")[1] for r in ours] == [r["source"].split("/")[1] for r in theirs]
    assert {row["source"].split("/")[0] for row in built_rows(tmp_path / "from-shards")[0]} == \
        {"00000.tar", "00001.tar", "00002.tar"}  # a shard's image is named as the folder would name it
    bad = {"input": f"{wds}/00001.tar/000010002.png", "reason": "not a readable image"}
    assert [s.where for s in folder.skipped] == [str(data["folder"] / "star" / "000010002.png")]
    assert [(s.where, s.reason.split(" (")[0]) for s in sharded.skipped] == [
        (f"{wds}/00002.tar/000020002.png", "no label"), (bad["input"], bad["reason"])]
    meta = json.loads((tmp_path / "from-shards" / "dataset.json").read_text())
    assert [{"input": s["input"], "reason": s["reason"].split(" (")[0]} for s in meta["skipped"]][1] == bad
    assert meta["counts"]["images"] == 13


def test_a_folder_of_shards_and_one_shard_by_name(tmp_path, capsys):
    shards_and_folder(tmp_path)
    build_typographic(_cfg(f"{tmp_path}/wds/{{00000..00002}}.tar", tmp_path / "a"))
    assert cli.main(["data", "typographic", str(tmp_path / "wds"), "--out", str(tmp_path / "b"), "--variants", "2",
                     "--image-size", "64", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 26 preference pairs from 13 images of 4 classes" in printed
    assert f"skipped {tmp_path}/wds/00002.tar/000020002.png: no label" in printed
    assert f"skipped {tmp_path}/wds/00001.tar/000010002.png: not a readable image" in printed
    assert built_rows(tmp_path / "b") == built_rows(tmp_path / "a")
    one = build_typographic(_cfg(tmp_path / "wds" / "00000.tar", tmp_path / "c", variants=1))
    assert one.images == 5 and not one.skipped
    assert {row["source"].split("/")[0] for row in built_rows(tmp_path / "c")[1]} == {"00000.tar"}


def test_a_damaged_shard_keeps_what_came_before_and_the_other_shards(tmp_path):
    paths = shards_and_folder(tmp_path)["shards"]
    raw = paths[0].read_bytes()
    paths[0].write_bytes(raw[:len(raw) // 2])  # cut inside shard 0
    summary = build_typographic(_cfg(tmp_path / "wds", tmp_path / "out"))
    assert 8 <= summary.images < 13
    damaged = [s for s in summary.skipped if s.where.startswith(str(paths[0]))]
    assert damaged and "00000.tar" in damaged[-1].where
    with pytest.raises(DataError, match=r"missing.tar: .*No such file"):
        build_typographic(_cfg(tmp_path / "missing.tar", tmp_path / "none"))


def test_a_shard_that_fails_to_read_after_listing_stops_the_build_naming_it(tmp_path, monkeypatch):
    # Storage that fails mid-build is no bad image: skipping would drop data for a passing fault.
    from po_cluster.data import tar_shards

    shards_and_folder(tmp_path)

    def unreachable(location, member, settings=None):
        raise tar_shards.ShardError(f"{location}/{member.name}: cannot read (connection reset)")

    monkeypatch.setattr("po_cluster.data.labelled.read_member", unreachable)
    with pytest.raises(DataError, match=r"00000\.tar/\S+: cannot read \(connection reset\)"):
        build_typographic(_cfg(f"{tmp_path}/wds/{{00000..00002}}.tar", tmp_path / "out"))
    assert not (tmp_path / "out" / "dataset.json").exists()  # never a complete-looking partial dataset
