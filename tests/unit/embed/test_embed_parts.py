"""The batch-embedding job's pure parts, without Ray: inputs, shards, decoding, output files."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from po_cluster.config import ConfigError, parse_config
from po_cluster.data.images import Geometry, ImageLimitsConfig
from po_cluster.embed.decode import BadInput, Preprocess, decode_batch, decode_file
from po_cluster.embed.inputs import EmbedError, list_inputs
from po_cluster.embed.job import EmbedConfig
from po_cluster.embed.shards import EMBEDDINGS, ERRORS, OutputDir, foreign_shards, plan_shards, shard_tables, t_tag


def _png(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def test_config_is_validated_at_the_edge():
    cfg = parse_config({"input": "in", "output": "out", "store": "s"}, model=EmbedConfig)
    assert parse_config({"input": "in/list.jsonl", "output": "in/out", "store": "s"}, model=EmbedConfig)
    assert parse_config({"input": "s3://b/in", "output": "s3://b/input-embeddings", "store": "s"}, model=EmbedConfig)
    assert (cfg.release, cfg.t, cfg.shard_size, cfg.concurrency) == ("latest", 1.0, 1000, 1)
    assert cfg.limits.image_formats == ("PNG", "JPEG", "WEBP")  # the endpoint's defaults
    for bad in ({"t": float("nan")}, {"shard_size": 0}, {"batch_size": -1}, {"limits": {"image_formats": ["PDF"]}},
                {"surprise": 1}, {"output": "in/embeddings"}, {"output": "./in"}):
        with pytest.raises(ConfigError):
            parse_config({"input": "in", "output": "out", "store": "s", **bad}, model=EmbedConfig)


def test_folder_inputs_sorted_by_relative_path_hidden_files_skipped(tmp_path):
    for name in ("b/2.png", "a.png", "b/1.jpg", ".DS_Store", ".cache/x.png", "b/.x.png.1234.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list_inputs(str(tmp_path))
    assert items.column("id").to_pylist() == ["a.png", "b/1.jpg", "b/2.png"]
    assert items.column("source_uri").to_pylist() == [str(tmp_path / n) for n in ("a.png", "b/1.jpg", "b/2.png")]


def test_manifests_jsonl_and_parquet(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "z", "path": "img/1.png"}\n\n{"uri": "/abs/2.png"}\n')
    items = list_inputs(str(tmp_path / "m.jsonl"))
    assert items.to_pylist() == [{"id": "/abs/2.png", "source_uri": "/abs/2.png"},
                                 {"id": "z", "source_uri": str(tmp_path / "img/1.png")}]
    pq.write_table(pa.table({"id": [3, 1], "path": ["c.png", "a.png"]}), tmp_path / "m.parquet")
    assert list_inputs(str(tmp_path / "m.parquet")).column("id").to_pylist() == ["1", "3"]
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "path": "1.png"}\n{"id": "a", "path": "2.png"}\n')
    with pytest.raises(EmbedError, match="'a' appears twice"):
        list_inputs(str(tmp_path / "dup.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(EmbedError, match="row 1 has no path or uri"):
        list_inputs(str(tmp_path / "bad.jsonl"))
    with pytest.raises(EmbedError, match="no such folder"):
        list_inputs(str(tmp_path / "missing"))


def test_shards_are_deterministic_and_named_by_release_t_and_content():
    items = pa.table({"id": [f"{i:03d}" for i in range(10)], "source_uri": [f"/x/{i}" for i in range(10)]})
    shards = plan_shards(items, 4, "r-1", 0.5)
    assert [s.items.num_rows for s in shards] == [4, 4, 2] and [s.index for s in shards] == [0, 1, 2]
    assert shards == plan_shards(items, 4, "r-1", 0.5)
    assert shards[0].name.startswith("r-1_t0.5_000000-") and shards[0].name.endswith(".parquet")
    assert plan_shards(items, 4, "r-1", 0.5000001)[0].name != shards[0].name
    assert t_tag(1.0) == "1.0" and t_tag(-0.25) == "-0.25"
    changed = items.set_column(1, "source_uri", pa.array([f"/y/{i}" for i in range(10)]))
    other = plan_shards(changed, 4, "r-1", 0.5)
    existing = {s.name for s in shards} | {"r-2_t0.5_000000-0123456789ab.parquet", "notes.txt"}
    assert foreign_shards(existing, other, "r-1", 0.5) == sorted(s.name for s in shards)
    assert foreign_shards(existing, shards, "r-1", 0.5) == []  # other releases and files are not ours


def _bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("data, code", [
    (b"", "empty_image"), (b"plain text", "not_an_image"), (_png(_image(0))[:300], "corrupt_image"),
    (_png(_image(0), "GIF"), "unsupported_image_format"), (_png(_image(0), "TIFF"), "unsupported_image_format"),
    (_bomb(30000, 30000), "image_too_many_pixels"), (b"\x89PNG" + b"\0" * 5000, "image_too_large"),
])
def test_bad_files_get_the_endpoint_codes(data, code):
    limits = ImageLimitsConfig(max_image_bytes=4000)
    with pytest.raises(BadInput) as raised:
        decode_file(data, limits)
    assert raised.value.code == code and raised.value.reason


def test_decode_batch_keeps_every_row_and_matches_the_model_input(tmp_path):
    from po_cluster.model.loading import to_model_input

    image = _image(1, 24)
    (tmp_path / "ok.png").write_bytes(_png(image))
    (tmp_path / "bad.png").write_bytes(b"nope")
    preprocess = Preprocess(Geometry(16), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    batch = {"id": np.array(["ok", "bad", "gone"], dtype=object), "shard": np.array([0, 0, 1], dtype=np.int32),
             "source_uri": np.array([str(tmp_path / n) for n in ("ok.png", "bad.png", "gone.png")], dtype=object)}
    out = decode_batch(batch, preprocess, ImageLimitsConfig(), EmbedConfig.model_fields["store_settings"].default)
    assert out["code"].tolist() == ["", "not_an_image", "unreadable"] and out["pixels"].shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(out["pixels"][0], to_model_input(image[None], preprocess)[0].numpy())
    assert not out["pixels"][1:].any() and "No such file" in out["reason"][2]


def test_shard_tables_sorted_with_the_schema():
    rows = {"id": np.array(["b", "a", "c"], dtype=object), "source_uri": np.array(["/b", "/a", "/c"], dtype=object),
            "code": np.array(["", "", "corrupt_image"], dtype=object),
            "reason": np.array(["", "", "truncated"], dtype=object),
            "embedding": np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)}
    embeddings, errors = shard_tables(rows, "r-1", 2.0)
    assert embeddings.to_pylist() == [
        {"id": "a", "source_uri": "/a", "embedding": [0.0, 1.0], "release_id": "r-1", "t": 2.0, "embed_dim": 2},
        {"id": "b", "source_uri": "/b", "embedding": [1.0, 0.0], "release_id": "r-1", "t": 2.0, "embed_dim": 2}]
    assert errors.to_pylist() == [{"id": "c", "source_uri": "/c", "code": "corrupt_image", "reason": "truncated"}]
    empty, _ = shard_tables({k: v[2:] for k, v in rows.items()}, "r-1", 2.0)
    assert empty.num_rows == 0 and empty.schema == embeddings.schema


def test_output_files_appear_whole_and_leftovers_are_cleaned(tmp_path):
    output = OutputDir(str(tmp_path / "out"))
    table = pa.table({"id": ["a"]})
    uri = output.write(EMBEDDINGS, "s.parquet", table)
    assert uri == f"{tmp_path}/out/embeddings/s.parquet" and output.names(EMBEDDINGS) == {"s.parquet"}
    assert output.rows(EMBEDDINGS, "s.parquet") == 1 and output.names(ERRORS) == set()
    leftover = tmp_path / "out" / EMBEDDINGS / ".t.parquet.0a1b2c3d.tmp"  # a killed run's write
    leftover.write_bytes(b"partial")
    assert output.names(EMBEDDINGS) == {"s.parquet"}  # never taken for a finished shard
    output.remove_temporaries({"other.parquet"})
    assert leftover.exists()  # not one of this job's shards: left alone
    output.remove_temporaries({"t.parquet"})
    assert not leftover.exists()


def test_shard_inputs_are_named_as_the_folders_files_and_decode_to_the_same_pixels(tmp_path):
    from wds_helpers import shards_and_folder, write_shards

    data = shards_and_folder(tmp_path)
    write_shards(tmp_path / "extra", [[{"__key__": "caption-only", "txt": "a cat"},
                                       {"__key__": "big", "png": b"\x89PNG" + b"\0" * 200_000}]])
    wds = tmp_path / "wds"
    items = list_inputs(f"{wds}/{{00000..00002}}.tar")
    assert items.equals(list_inputs(str(wds))) and items.num_rows == 15  # a pattern, or the folder of shards
    ids = items.column("id").to_pylist()
    assert ids[:2] == ["00000.tar/000000000.png", "00000.tar/000000001.png"] and ids[-1] == "00002.tar/000020004.png"
    assert items.column("source_uri").to_pylist()[7] == f"{wds}/00001.tar/000010002.png"
    assert set(items.column("code").to_pylist()) == {""}  # the unlabelled image is an input: labels are optional
    preprocess = Preprocess(Geometry(16), (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    limits = ImageLimitsConfig(max_image_bytes=100_000)

    def decode(table: pa.Table) -> dict:
        batch = {name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names}
        return decode_batch(batch | {"shard": np.zeros(table.num_rows, np.int32)}, preprocess, limits,
                            EmbedConfig.model_fields["store_settings"].default)

    ours = decode(items)
    files = {f"{p.relative_to(data['folder']).parts[1]}": p for p in data["folder"].rglob("*.png")}
    folder_rows = pa.table({"id": list(files), "source_uri": [str(p) for p in files.values()]})
    theirs = decode(folder_rows)
    by_name = {name: i for i, name in enumerate(files)}
    for i, item_id in enumerate(ids):
        name = item_id.split("/")[1]
        if name in by_name:  # all but the unlabelled image, which the folder lacks
            np.testing.assert_array_equal(ours["pixels"][i], theirs["pixels"][by_name[name]])
            assert ours["code"][i] == theirs["code"][by_name[name]]
    assert ours["code"][7] == "not_an_image" and "00001.tar/000010002.png" in ours["source_uri"][7]
    assert ours["pixels"][[i for i in range(15) if i != 7]].any(axis=(1, 2, 3)).all()
    extra = decode(list_inputs(str(tmp_path / "extra" / "00000.tar")))
    assert extra["id"].tolist() == ["00000.tar/big.png", "00000.tar/caption-only"]
    assert extra["code"].tolist() == ["image_too_large", "not_an_image"] and "only txt" in extra["reason"][1]


def test_a_damaged_shard_is_an_error_row_after_the_samples_before_the_damage(tmp_path):
    from wds_helpers import shards_and_folder

    paths = shards_and_folder(tmp_path)["shards"]
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[:len(raw) // 2])
    items = list_inputs(str(tmp_path / "wds"))
    rows = items.to_pylist()
    damaged = [r for r in rows if r["code"]]
    assert [(r["id"], r["source_uri"], r["code"]) for r in damaged] == [("00002.tar", str(paths[2]), "unreadable")]
    assert str(paths[2]) in damaged[0]["reason"] and "not a readable tar stream" in damaged[0]["reason"]
    assert 10 < len(rows) - 1 < 15  # shards 0 and 1 whole, shard 2 up to the damage
