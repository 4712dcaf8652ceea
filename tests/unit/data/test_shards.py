"""Datasets as Parquet shards: what the builder and `data ingest` write, and what readers refuse."""
import json

import numpy as np
import pytest
from PIL import Image

from po_cluster import cli
from po_cluster.data.images import Geometry
from po_cluster.data.ingest import ingest_records
from po_cluster.data.pairs import DataError, load_preference_data, read_dataset
from po_cluster.data.typographic import TypographicConfig, build_typographic
from typo_helpers import built_rows, labelled_folder, row_image

MAN, WOMAN = "a photo of a man", "a photo of a woman"


def _hand_written(root):
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.new("RGB", (50 + i, 40), (20 * i, 90, 200)).save(root / "images" / f"{i}.jpg", quality=90)
        rows.append({"image": f"images/{i}.jpg", "chosen": MAN if i % 2 else WOMAN,
                     "rejected": WOMAN if i % 2 else MAN, "source": f"person-{i // 2}"})
    rows += [{"kind": "regularization", "image": "images/0.jpg", "text": WOMAN, "source": "person-0"},
             {"kind": "regularization", "image": "images/1.jpg", "split": "test"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def test_ingested_records_load_as_the_jsonl_does(tmp_path):
    jsonl = _hand_written(tmp_path / "raw")
    summary = ingest_records(str(jsonl), str(tmp_path / "ds"), rows_per_shard=5)
    assert (summary.pairs, summary.regularization) == (12, 2)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert [s["rows"] for s in meta["shards"]] == [5, 5, 4] and meta["candidates"] == [MAN, WOMAN]
    pairs, regs = built_rows(tmp_path / "ds")
    assert {row_image(p).format for p in pairs} == {"JPEG"}  # the bytes as they were, not re-encoded
    for split in (None, "train"):
        a_pref, a_reg = load_preference_data(str(jsonl), Geometry(32), split=split)
        b_pref, b_reg = load_preference_data(str(tmp_path / "ds"), Geometry(32), split=split)
        assert np.array_equal(a_pref.images, b_pref.images) and np.array_equal(a_reg.images, b_reg.images)
        assert a_pref.chosen.tolist() == b_pref.chosen.tolist() and a_reg.labels.tolist() == b_reg.labels.tolist()
    splits = {r.source: r.split for r in read_dataset(str(jsonl)).pairs if r.model_extra}
    assert {p["source"]: p["split"] for p in pairs} == splits  # ingest keeps the file's splits
    assert regs[1]["split"] == "test"


def test_changed_missing_and_malformed_shards_are_refused_by_name(tmp_path):
    build_typographic(TypographicConfig(source=str(labelled_folder(tmp_path / "src")), out=str(tmp_path / "ds"),
                                        image_size=32, rows_per_shard=10))
    shard = tmp_path / "ds" / "shards" / "part-00001.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(DataError, match=r"part-00001.parquet: sha256 differs from dataset.json"):
        read_dataset(str(tmp_path / "ds"))
    shard.unlink()
    with pytest.raises(DataError, match=r"part-00001.parquet: file not found"):
        read_dataset(str(tmp_path / "ds"))
    shard.write_bytes(original)
    meta_file = tmp_path / "ds" / "dataset.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "shards": [{"path": "shards/part-00000.parquet"}]}))
    with pytest.raises(DataError, match="lacks path, rows or sha256"):
        read_dataset(str(tmp_path / "ds"))
    meta_file.write_text(json.dumps({**meta, "shards": {}}))
    with pytest.raises(DataError, match="'shards' must be a non-empty list"):
        read_dataset(str(tmp_path / "ds"))


def test_ingest_refuses_an_image_that_does_not_decode_and_leaves_no_dataset(tmp_path):
    jsonl = _hand_written(tmp_path / "raw")
    (tmp_path / "raw" / "images" / "7.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match=r"images/7.jpg: not a readable image"):
        ingest_records(str(jsonl), str(tmp_path / "ds"))
    assert not (tmp_path / "ds" / "dataset.json").exists()


def test_cli_ingests_and_checks(tmp_path, capsys):
    jsonl = _hand_written(tmp_path / "raw")
    assert cli.main(["data", "ingest", str(jsonl), "--out", str(tmp_path / "ds")]) == 0
    assert "wrote 12 preference pairs (" in capsys.readouterr().out
    assert cli.main(["data", "check", str(tmp_path / "ds")]) == 0
    assert "12 pairs (" in capsys.readouterr().out
    assert cli.main(["data", "ingest", str(tmp_path / "nowhere.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "nowhere.jsonl: file not found" in capsys.readouterr().err


@pytest.mark.slow  # the fixed evaluation sets in full, twice: `make test` runs it, `make unit` does not
def test_the_world_as_a_dataset_scores_as_the_world(tmp_path, capsys):
    from po_cluster.config import SHIPPED_BASE
    from po_cluster.data.selection import build_records
    from po_cluster.evaluate.targets import evaluate_target

    out = tmp_path / "world"
    assert cli.main(["data", "world", "--out", str(out), "--n-pairs", "64", "--n-reg", "32", "--n-val", "20",
                     "--seed", "3", "--rows-per-shard", "500"]) == 0
    assert "wrote the typo-shapes world's preference pairs (64 train, 20 val, " in capsys.readouterr().out
    from po_cluster.config import parse_config

    on_world = parse_config({"data": {"n_pairs": 64, "n_reg": 32, "seed": 3}}).data
    on_disk = parse_config({"data": {"n_pairs": 64, "n_reg": 32, "seed": 3, "dataset": str(out)}}).data
    (w_pref, w_reg), (d_pref, d_reg) = build_records(on_world), build_records(on_disk)
    assert np.array_equal(w_pref.images, d_pref.images) and np.array_equal(w_reg.images, d_reg.images)
    assert w_pref.chosen.tolist() == d_pref.chosen.tolist() and w_pref.rejected.tolist() == d_pref.rejected.tolist()
    world_scores = evaluate_target(SHIPPED_BASE, t=1.0, ts=False)["at_t"]
    dataset_scores = evaluate_target(SHIPPED_BASE, t=1.0, ts=False, dataset=str(out), split="test")["at_t"]
    for key in ("clean", "attacked", "attack_success", "kl"):
        assert dataset_scores[key] == pytest.approx(world_scores[key], abs=1e-6), key
    assert "word_only" not in dataset_scores
