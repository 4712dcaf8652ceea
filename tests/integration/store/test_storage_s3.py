"""Releases in S3, against moto's server on 127.0.0.1 over HTTP (see conftest.py): atomic
publishing through an outage, verification naming the file, clear errors, plain objects."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess

import pytest

from po_cluster import cli
from po_cluster.store.artifacts import S3Store, fetch_file, open_store
from po_cluster.store.location import StoreConfig, StoreError, pyarrow_fs

WEIGHTS = "model.safetensors"


def fast(endpoint_url: str | None, **extra) -> StoreConfig:
    """Short timeouts and few retries: an outage must fail the test in well under a second."""
    return StoreConfig(endpoint_url=endpoint_url, connect_timeout=1, read_timeout=5, max_attempts=2, **extra)


@pytest.fixture()
def store(moto_s3, bucket, tmp_path) -> S3Store:
    return open_store(f"s3://{bucket}/team/artifacts", fast(moto_s3.endpoint_url, cache_dir=tmp_path / "cache"))


def test_round_trip_publish_list_show_pull_latest(store, release_folder, moto_s3, bucket):
    from po_cluster.store.manifest import verify_manifest

    assert store.list_releases() == [] and store.latest() is None
    first = store.publish_release(release_folder)
    second = store.publish_release(release_folder, "r-second")
    assert [(i.release_id, i.latest, i.files) for i in store.list_releases()] == [(first, False, 5),
                                                                                 ("r-second", True, 5)]
    assert store.latest() == second == store.resolve("latest")
    shown = store.show_release(first)
    assert shown["metrics"] == {"clean": 0.9, "attacked": 0.7} and shown["store"] == f"s3://{bucket}/team/artifacts"
    pulled = store.pull_release(first)
    verify_manifest(pulled)
    assert (pulled / WEIGHTS).read_bytes() == (release_folder / WEIGHTS).read_bytes()
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"team/artifacts/releases/{first}/manifest.json" in keys and "team/artifacts/releases/latest.json" in keys
    assert not any("/pending/" in k for k in keys)  # claims are removed once published


def test_large_files_go_multipart(moto_s3, bucket, release_folder, tmp_path):
    settings = fast(moto_s3.endpoint_url, multipart_threshold=1024, multipart_chunksize=8 << 20)
    store = open_store(f"s3://{bucket}", settings)
    store.publish_release(release_folder, "r-multi")
    head = moto_s3.client().head_object(Bucket=bucket, Key=f"releases/r-multi/{WEIGHTS}")
    assert head["ETag"].strip('"').endswith("-3")  # 18 MB in 8 MiB parts: a 3-part upload
    pulled = store.pull_release("r-multi", cache_dir=tmp_path / "cache")  # ranged GETs on the way back
    assert (pulled / WEIGHTS).read_bytes() == (release_folder / WEIGHTS).read_bytes()


def test_server_stopped_mid_publish_leaves_no_release_and_a_rerun_publishes(store, moto_s3, release_folder):
    real_put_file, uploaded = store.put_file, []

    def put_then_outage(path, key):
        real_put_file(path, key)
        uploaded.append(key)
        moto_s3.stop()  # deterministic: the outage starts right after the first data file landed

    store.put_file = put_then_outage
    with pytest.raises(StoreError, match=r"cannot upload .* cannot reach the S3 endpoint http://127\.0\.0\.1"):
        store.publish_release(release_folder, "r-outage")
    store.put_file = real_put_file
    assert len(uploaded) == 1 and not moto_s3.is_up()
    # moto keeps its state in this process, so the restarted server still has the bucket
    # and the one object that landed: exactly what a real S3 would hold after the outage.
    moto_s3.start()
    assert store.list_keys("releases/r-outage/") == uploaded and store.exists("pending/r-outage.json")
    assert store.list_releases() == [] and store.latest() is None
    with pytest.raises(StoreError, match="r-outage .*incomplete.*manifest.json is missing"):
        store.pull_release("r-outage")
    assert store.publish_release(release_folder, "r-outage") == "r-outage"
    assert [i.release_id for i in store.list_releases()] == ["r-outage"] and store.latest() == "r-outage"
    assert (store.pull_release("latest") / WEIGHTS).read_bytes() == (release_folder / WEIGHTS).read_bytes()


def test_one_changed_byte_in_the_bucket_is_refused_naming_the_file(store, moto_s3, bucket, release_folder, tmp_path):
    store.publish_release(release_folder, "r-1")
    client, key = moto_s3.client(), f"team/artifacts/releases/r-1/{WEIGHTS}"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[1000] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    with pytest.raises(StoreError, match=f"release r-1: {WEIGHTS} differs from its sha256/size in the manifest"):
        store.pull_release("r-1", cache_dir=tmp_path / "fresh")
    client.delete_object(Bucket=bucket, Key="team/artifacts/releases/r-1/manifest.json")
    with pytest.raises(StoreError, match="r-1 .*incomplete.*manifest.json is missing"):
        store.pull_release("r-1", cache_dir=tmp_path / "fresh")


def _cli_one_line_error(capsys, argv: list[str], expected: str) -> None:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and expected in captured.err, captured.err
    assert "Traceback" not in captured.err and "botocore" not in captured.err


def test_missing_credentials_is_a_clear_error(moto_s3, bucket, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no usable AWS credentials"):
        open_store(f"s3://{bucket}", fast(moto_s3.endpoint_url)).list_releases()
    with pytest.raises(StoreError, match="no usable AWS credentials"):
        pyarrow_fs(f"s3://{bucket}", fast(moto_s3.endpoint_url))
    _cli_one_line_error(capsys, ["releases", "list", "--store", f"s3://{bucket}",
                                 "--endpoint-url", moto_s3.endpoint_url], "no usable AWS credentials")


def test_missing_bucket_is_a_clear_error(moto_s3, release_folder, capsys):
    store = open_store("s3://po-no-such-bucket/x", fast(moto_s3.endpoint_url))
    for action in (store.list_releases, lambda: store.pull_release("latest"),
                   lambda: store.publish_release(release_folder, "r-1")):
        with pytest.raises(StoreError, match="po-no-such-bucket.*the bucket does not exist"):
            action()
    with pytest.raises(StoreError, match="the bucket does not exist"):
        fetch_file("s3://po-no-such-bucket/w.safetensors", settings=fast(moto_s3.endpoint_url))
    _cli_one_line_error(capsys, ["releases", "push", str(release_folder), "--store", "s3://po-no-such-bucket",
                                 "--endpoint-url", moto_s3.endpoint_url], "the bucket does not exist")


def test_unreachable_endpoint_is_a_clear_error(moto_s3, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint {dead}"):
        open_store("s3://any-bucket", fast(dead)).latest()
    _cli_one_line_error(capsys, ["releases", "list", "--store", "s3://any-bucket", "--endpoint-url", dead],
                        "cannot reach the S3 endpoint")


def test_loading_a_release_never_unpickles(store, release_folder, monkeypatch):
    import torch

    from po_cluster.model.checkpoint import load_checkpoint

    store.publish_release(release_folder, "r-1")

    def forbidden(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    model, description = load_checkpoint(store.pull_release("latest"))
    assert description["architecture"] == "po-tiny-rn" and model is not None


@pytest.mark.skipif(shutil.which("aws") is None, reason="the aws CLI is not installed")
def test_the_aws_cli_lists_and_downloads_a_release(store, moto_s3, bucket, release_folder, tmp_path):
    from po_cluster.store.manifest import verify_manifest

    store.publish_release(release_folder, "r-plain")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "dummy", "AWS_SECRET_ACCESS_KEY": "dummy"}
    prefix = f"s3://{bucket}/team/artifacts/releases/r-plain/"
    aws = ["aws", "--endpoint-url", moto_s3.endpoint_url, "s3"]
    listed = subprocess.run(aws + ["ls", prefix, "--recursive"], env=env, capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert all(name in listed for name in (WEIGHTS, "card.md", "manifest.json"))
    subprocess.run(aws + ["cp", prefix, str(tmp_path / "by-aws"), "--recursive", "--only-show-errors"], env=env,
                   capture_output=True, timeout=60, check=True)
    assert verify_manifest(tmp_path / "by-aws")["files"][WEIGHTS]["size"] == (release_folder / WEIGHTS).stat().st_size


def test_environment_endpoint_pyarrow_and_fetch_file(moto_s3, bucket, release_folder, monkeypatch, tmp_path):
    from po_cluster.config import ModelConfig
    from po_cluster.model.loading import SHIPPED_BASE_DIR, WEIGHTS_FILE, load_clip

    # No endpoint in the settings: boto3 takes AWS_ENDPOINT_URL itself, and pyarrow gets the same one.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)
    store = open_store(f"s3://{bucket}/sweeps", StoreConfig(cache_dir=tmp_path / "cache"))
    store.publish_release(release_folder, "r-env")
    fs, path = pyarrow_fs(f"s3://{bucket}/sweeps")
    assert path == f"{bucket}/sweeps"
    with fs.open_input_stream(f"{path}/releases/r-env/manifest.json") as f:
        assert WEIGHTS in json.loads(f.read())["files"]
    with fs.open_output_stream(f"{path}/ray/trial-0/state.json") as f:
        f.write(b'{"step": 3}')
    assert store.get_bytes("ray/trial-0/state.json") == b'{"step": 3}'
    # s3:// weights for model loading: cached by key + ETag, so a second load downloads nothing.
    moto_s3.client().upload_file(str(SHIPPED_BASE_DIR / WEIGHTS_FILE), bucket, f"weights/{WEIGHTS_FILE}")
    uri = f"s3://{bucket}/weights/{WEIGHTS_FILE}"
    loaded = load_clip(ModelConfig(pretrained=uri, cache_dir=str(tmp_path / "weights-cache")))
    assert loaded.name == "po-tiny-rn"
    cached = fetch_file(uri, tmp_path / "weights-cache")
    mtime = cached.stat().st_mtime_ns
    assert fetch_file(uri, tmp_path / "weights-cache") == cached and cached.stat().st_mtime_ns == mtime
    with pytest.raises(StoreError, match="no such object"):
        fetch_file(f"s3://{bucket}/weights/absent.safetensors", tmp_path / "weights-cache")


def test_experiment_files_go_through_the_location_layer(moto_s3, bucket, monkeypatch, tmp_path):
    from po_cluster.config import SweepConfig
    from po_cluster.sweep.experiment import open_experiment

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint_url)  # as a sweep's driver gets it
    experiment = open_experiment(SweepConfig(name="exp", storage_path=f"s3://{bucket}/sweeps/"))
    assert (experiment.uri, experiment.path) == (f"s3://{bucket}/sweeps/exp", f"{bucket}/sweeps/exp")
    assert not experiment.is_local and not experiment.exists("results.json")
    assert experiment.write_json("results.json", {"trials": [1]}) == f"s3://{bucket}/sweeps/exp/results.json"
    assert experiment.exists("results.json") and experiment.read_json("results.json") == {"trials": [1]}
    (tmp_path / "report" / "img").mkdir(parents=True)
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    (tmp_path / "report" / "img" / "a.png").write_bytes(b"png")
    experiment.upload(tmp_path / "report", "report")
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket, Prefix="sweeps/exp/")["Contents"]}
    assert keys == {"sweeps/exp/results.json", "sweeps/exp/report/report.html", "sweeps/exp/report/img/a.png"}
    # A trial checkpoint path as Ray reports it: the filesystem's "bucket/key", no scheme.
    local = experiment.fetch(experiment.file("report"), tmp_path / "fetched")
    assert (local / "img" / "a.png").read_bytes() == b"png" and (local / "report.html").is_file()
