"""The typographic builder, the pairs loader and attack sets with s3:// in and out (moto's server, see conftest)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from po_cluster.data.images import Geometry
from po_cluster.data.pairs import DataError, load_preference_data
from po_cluster.data.typographic import TypographicConfig, build_typographic
from po_cluster.evaluate.attack_sets import read_attack_set
from typo_helpers import built_rows, labelled_folder, tree_bytes


@pytest.fixture()
def s3(moto_s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)  # boto3's own resolution, as in production
    return moto_s3.client(), bucket


def _upload(client, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_build_from_s3_to_s3_equals_the_local_build(s3, tmp_path):
    client, bucket = s3
    source = labelled_folder(tmp_path / "src")
    _upload(client, bucket, source, "raw/train")
    cfg = dict(variants=2, seed=4, image_size=64, workers=4)
    build_typographic(TypographicConfig(source=str(source), out=str(tmp_path / "local"), **cfg))
    build_typographic(TypographicConfig(source=f"s3://{bucket}/raw/train", out=f"s3://{bucket}/ds", **cfg))
    local = tree_bytes(tmp_path / "local")
    remote = {o["Key"][len("ds/"):]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
              for o in client.list_objects_v2(Bucket=bucket, Prefix="ds/")["Contents"]}
    assert set(remote) == set(local)
    assert all(remote[k] == local[k] for k in local if k != "dataset.json")  # config.source differs
    pref, reg = load_preference_data(f"s3://{bucket}/ds")
    local_pref, _ = load_preference_data(str(tmp_path / "local"))
    assert np.array_equal(pref.images, local_pref.images) and len(reg) == 8


def test_s3_errors_name_the_object(s3, tmp_path):
    client, bucket = s3
    with pytest.raises(DataError, match=f"s3://{bucket}/nothing: no objects"):
        build_typographic(TypographicConfig(source=f"s3://{bucket}/nothing", out=str(tmp_path / "o")))
    client.put_object(Bucket=bucket, Key="pairs.jsonl",
                      Body=b'{"image": "missing.png", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=f"s3://{bucket}/missing.png: no such object"):
        load_preference_data(f"s3://{bucket}/pairs.jsonl")


def test_attack_set_from_s3(s3, tmp_path):
    client, bucket = s3
    (tmp_path / "rta").mkdir()
    for name in ("label=dog_text=cat.png", "label=cat_text=dog.png"):
        Image.new("RGB", (20, 30), (10, 20, 30)).save(tmp_path / "rta" / name)
    _upload(client, bucket, tmp_path / "rta", "sets/rta100")
    attack_set = read_attack_set(f"s3://{bucket}/sets/rta100", Geometry(16))
    assert attack_set.images.classnames == ("cat", "dog") and attack_set.images.images.shape == (2, 16, 16, 3)


def test_build_from_s3_shards_equals_the_local_shards_build(s3, tmp_path):
    from wds_helpers import shards_and_folder

    client, bucket = s3
    shards_and_folder(tmp_path)
    _upload(client, bucket, tmp_path / "wds", "wds")
    cfg = dict(variants=2, seed=4, image_size=64, workers=2)
    local = build_typographic(TypographicConfig(source=str(tmp_path / "wds"), out=str(tmp_path / "local"), **cfg))
    remote = build_typographic(TypographicConfig(source=f"s3://{bucket}/wds/{{00000..00002}}.tar",
                                                 out=str(tmp_path / "remote"), **cfg))
    assert built_rows(tmp_path / "remote") == built_rows(tmp_path / "local") and remote.images == local.images == 13
    assert [s.where for s in remote.skipped] == [f"s3://{bucket}/wds/00002.tar/000020002.png",
                                                 f"s3://{bucket}/wds/00001.tar/000010002.png"]
    by_prefix = build_typographic(TypographicConfig(source=f"s3://{bucket}/wds/", out=str(tmp_path / "p"), **cfg))
    assert by_prefix.images == 13 and built_rows(tmp_path / "p") == built_rows(tmp_path / "local")
