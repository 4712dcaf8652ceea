"""Locations on a local disk: atomic writes, recursive sorted listings, names; and the S3 side's
client reuse and error messages (no server needed for those)."""
from __future__ import annotations

from pathlib import Path

import pytest

from po_cluster.store import location, s3
from po_cluster.store.location import ObjectMissing, StoreConfig, StoreError


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _half_then_full_disk(monkeypatch):
    """Every write stores half its bytes, then fails as a full disk does."""
    def failing(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing)


def _rename_refused(monkeypatch):
    def failing(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(location.os, "replace", failing)


@pytest.mark.parametrize("failure", [_half_then_full_disk, _rename_refused])
def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch, failure):
    target = tmp_path / "data" / "pairs.jsonl"
    location.write_bytes(str(target), b"old content\n")
    failure(monkeypatch)
    with pytest.raises(StoreError, match=f"cannot write {target}: "):
        location.write_bytes(str(target), b"new content that is longer\n")
    with pytest.raises(StoreError, match="cannot write"):
        location.write_bytes(str(tmp_path / "data" / "fresh.json"), b"{}")
    monkeypatch.undo()
    assert _tree(tmp_path) == {"data/pairs.jsonl": b"old content\n"}  # no temporary, no half file


def test_write_replaces_whole_and_if_absent_refuses_an_existing_file(tmp_path):
    target = str(tmp_path / "a" / "b" / "x.bin")
    location.write_bytes(target, b"1")
    location.write_bytes(target, b"22")
    assert location.read_bytes(target) == b"22"
    location.write_bytes(str(tmp_path / "claim"), b"first", if_absent=True)
    with pytest.raises(StoreError, match="claim: it already exists"):
        location.write_bytes(str(tmp_path / "claim"), b"second", if_absent=True)
    assert _tree(tmp_path) == {"a/b/x.bin": b"22", "claim": b"first"}


def test_list_files_is_recursive_sorted_and_skips_writes_in_progress(tmp_path):
    for name in ("b/2.png", "a.txt", "b/1/deep.jpg", "B.md", ".hidden", "b/.x.png.0a1b2c3d.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert location.list_files(str(tmp_path)) == [".hidden", "B.md", "a.txt", "b/1/deep.jpg", "b/2.png"]
    assert location.list_files(str(tmp_path / "b")) == ["1/deep.jpg", "2.png"]
    assert location.list_files(str(tmp_path / "empty")) == []
    with pytest.raises(ObjectMissing, match="absent: folder not found"):
        location.list_files(str(tmp_path / "absent"))
    assert location.list_folders(str(tmp_path)) == ["b", "empty"] and location.list_folders(str(tmp_path / "x")) == []


def test_reading_missing_things_and_other_schemes(tmp_path):
    with pytest.raises(ObjectMissing, match="nope.png: file not found"):
        location.read_bytes(str(tmp_path / "nope.png"))
    with pytest.raises(ObjectMissing, match="file not found"):
        location.stat(str(tmp_path / "nope.png"))
    assert not location.exists(str(tmp_path / "nope.png")) and not location.exists(str(tmp_path))
    location.remove(str(tmp_path / "nope.png"))  # removing what is not there is not an error
    with pytest.raises(StoreError, match="unsupported location gs://b/k"):
        location.read_bytes("gs://b/k")
    (tmp_path / "f").write_bytes(b"abc")
    data, modified = location.read_object(f"file://{tmp_path}/f")
    assert data == b"abc" and modified.tzinfo is not None
    before = location.stat(str(tmp_path / "f"))
    (tmp_path / "f").write_bytes(b"abcd")
    assert before.size == 3 and location.stat(str(tmp_path / "f")).tag != before.tag


def test_names_join_parent_and_resolve():
    assert location.join("s3://b/p/", "x", "y.png") == "s3://b/p/x/y.png"
    assert location.join("/data", "x", "y.png") == "/data/x/y.png"
    assert location.parent("s3://b/p/m.jsonl") == "s3://b/p" and location.parent("/d/m.jsonl") == "/d"
    assert location.resolve("/d", "img/1.png") == "/d/img/1.png"
    assert location.resolve("s3://b/p", "img/1.png") == "s3://b/p/img/1.png"
    assert location.resolve("/d", "/abs/1.png") == "/abs/1.png" and location.resolve("/d", "s3://o/k") == "s3://o/k"
    # Not refused, today as before: a records file may point at images beside its own folder.
    assert location.resolve("/d/sets", "../images/1.png") == "/d/sets/../images/1.png"
    assert location.parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("s3://", "/local"):
        with pytest.raises(StoreError):
            location.parse_s3_uri(bad)


def test_folders_upload_and_download_and_names_cannot_escape(tmp_path, monkeypatch):
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "a.json").write_bytes(b"{}")
    (tmp_path / "src" / "sub" / "b.bin").write_bytes(b"\0\1")
    location.upload(tmp_path / "src", str(tmp_path / "copy"))
    location.download_folder(str(tmp_path / "copy"), tmp_path / "back")
    assert _tree(tmp_path / "back") == _tree(tmp_path / "src") == {"a.json": b"{}", "sub/b.bin": b"\0\1"}
    monkeypatch.setattr(location, "list_files", lambda root, settings=None: ["../outside.txt"])
    with pytest.raises(StoreError, match="refusing a name that leads outside"):
        location.download_folder(str(tmp_path / "copy"), tmp_path / "evil")
    assert not (tmp_path / "outside.txt").exists()


@pytest.fixture()
def aws_dummy(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/c",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)


def test_one_client_per_settings_and_environment(aws_dummy, monkeypatch):
    settings = StoreConfig(endpoint_url="http://127.0.0.1:9")
    client = location.s3_client(settings)
    assert location.s3_client(StoreConfig(endpoint_url="http://127.0.0.1:9")) is client
    assert location.s3_client(StoreConfig(endpoint_url="http://127.0.0.1:10")) is not client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")  # a client keeps its credentials: a new one for new keys
    assert location.s3_client(settings) is not client


def test_s3_errors_are_one_line_and_name_the_reason():
    from botocore.exceptions import ClientError

    def raised(code: str, missing: str | None = None) -> StoreError:
        with pytest.raises(StoreError) as caught, s3.s3_errors("cannot read s3://b/k", "http://endpoint", missing):
            raise ClientError({"Error": {"Code": code, "Message": "m"}}, "GetObject")
        return caught.value

    assert str(raised("NoSuchBucket")) == "cannot read s3://b/k: the bucket does not exist (endpoint http://endpoint)"
    assert "access denied" in str(raised("AccessDenied"))
    missing = raised("NoSuchKey", "s3://b/k: no such object")
    assert isinstance(missing, ObjectMissing) and str(missing) == "s3://b/k: no such object"
    assert not isinstance(raised("NoSuchKey"), ObjectMissing) and "not found" in str(raised("NoSuchKey"))


def test_a_local_experiment_reads_and_writes_in_its_folder(tmp_path):
    from po_cluster.config import SweepConfig
    from po_cluster.sweep.experiment import open_experiment

    experiment = open_experiment(SweepConfig(name="exp", storage_path=str(tmp_path / "sweeps")))
    assert experiment.is_local and experiment.uri == str(tmp_path / "sweeps" / "exp") == experiment.path
    assert experiment.write_json("r.json", {"a": 1}) == str(tmp_path / "sweeps" / "exp" / "r.json")
    assert experiment.exists("r.json") and experiment.read_json("r.json") == {"a": 1}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("x")
    experiment.upload(tmp_path / "report", "report")
    assert (tmp_path / "sweeps" / "exp" / "report" / "index.html").read_text() == "x"
    assert experiment.fetch(experiment.file("report"), tmp_path / "unused") == Path(experiment.file("report"))
    with pytest.raises(ValueError, match="use a local folder or s3://"):
        open_experiment(SweepConfig(storage_path="gs://bucket/sweeps"))
