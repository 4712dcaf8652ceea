"""The artifact store on a local folder: releases published atomically, verified, cached."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from po_cluster import cli
from po_cluster.store.artifacts import LATEST, LocalStore, fetch_file, new_release_id, open_store, pull_release_uri
from po_cluster.store.location import StoreError
from po_cluster.store.manifest import verify_manifest, write_manifest

WEIGHTS = "model.safetensors"
CARD = "# test release\n\nA tiny random po-tiny-rn, for storage tests.\n"


@pytest.fixture()
def folder(release_template, tmp_path) -> Path:
    return Path(shutil.copytree(release_template, tmp_path / "release"))


@pytest.fixture()
def store(tmp_path) -> LocalStore:
    store = open_store(str(tmp_path / "store"))
    assert isinstance(store, LocalStore)
    return store


def test_round_trip_publish_list_show_pull_latest(store, folder, tmp_path):
    assert store.list_releases() == [] and store.latest() is None
    first = store.publish_release(folder)
    second = store.publish_release(folder, "r-custom.2")
    assert re.fullmatch(r"r-\d{8}-\d{6}-[0-9a-f]{6}", first)
    infos = store.list_releases()
    assert [i.release_id for i in infos] == [first, second] and [i.latest for i in infos] == [False, True]
    assert infos[0].files == 5 and infos[0].size == sum(p.stat().st_size for p in folder.iterdir()
                                                        if p.name != "manifest.json")
    assert store.latest() == second == store.resolve("latest") and store.resolve(first) == first
    shown = store.show_release(first)
    assert shown["metrics"] == {"clean": 0.9, "attacked": 0.7} and shown["model"]["architecture"] == "po-tiny-rn"
    assert set(shown["manifest"]["files"]) == {WEIGHTS, "model.json", "training.json", "metrics.json", "card.md"}
    pulled = store.pull_release("latest", cache_dir=tmp_path / "cache")
    verify_manifest(pulled)
    assert (pulled / "card.md").read_text() == (folder / "card.md").read_text()
    assert json.loads((store.root / LATEST).read_text()) == {"release_id": second}
    assert not (store.root / "pending").exists() or not any((store.root / "pending").iterdir())


def test_ids_are_never_reused(store, folder):
    store.publish_release(folder, "r-1")
    with pytest.raises(StoreError, match="r-1 already exists.*never reused"):
        store.publish_release(folder, "r-1")
    with pytest.raises(StoreError, match="invalid release id"):
        store.publish_release(folder, "../escape")
    with pytest.raises(StoreError, match="invalid release id"):
        store.publish_release(folder, "latest")
    assert len({new_release_id() for _ in range(50)}) == 50


def test_unverifiable_folder_is_refused(store, folder):
    (folder / "card.md").write_text("edited after the manifest was written\n")
    with pytest.raises(StoreError, match="refusing to publish.*card.md"):
        store.publish_release(folder, "r-bad")
    (folder / "manifest.json").unlink()
    with pytest.raises(StoreError, match="no manifest.json"):
        store.publish_release(folder, "r-bad")
    with pytest.raises(StoreError, match="no folder"):
        store.publish_release(folder / "absent", "r-bad")
    assert store.list_releases() == [] and store.list_keys("releases/") == []


def _fail_after(store, method: str, calls: int):
    real = getattr(store, method)
    seen = []

    def flaky(*args, **kwargs):
        if len(seen) >= calls:
            raise StoreError("simulated outage")
        seen.append(args)
        return real(*args, **kwargs)

    setattr(store, method, flaky)
    return lambda: setattr(store, method, real)


def test_interrupted_publish_is_invisible_and_a_rerun_completes_it(store, folder, tmp_path):
    restore = _fail_after(store, "put_file", 1)
    with pytest.raises(StoreError, match="simulated outage"):
        store.publish_release(folder, "r-half")
    restore()
    assert store.list_keys("releases/r-half/")  # one data file landed …
    assert store.list_releases() == [] and store.latest() is None  # … but no release exists
    with pytest.raises(StoreError, match="r-half.*incomplete.*manifest.json"):
        store.pull_release("r-half", cache_dir=tmp_path / "cache")
    other = Path(shutil.copytree(folder, tmp_path / "other"))
    (other / "card.md").write_text("different content\n")
    write_manifest(other)
    with pytest.raises(StoreError, match="half-published from different content"):
        store.publish_release(other, "r-half")
    assert store.publish_release(folder, "r-half") == "r-half"
    assert [i.release_id for i in store.list_releases()] == ["r-half"] and store.latest() == "r-half"
    store.pull_release("r-half", cache_dir=tmp_path / "cache")


def test_publish_cut_after_the_manifest_is_finished_by_a_rerun(store, folder):
    store.publish_release(folder, "r-old")
    real = store.put_bytes

    def no_pointer(data, key, if_absent=False):
        if key == LATEST:
            raise StoreError("simulated outage")
        return real(data, key, if_absent)

    store.put_bytes = no_pointer
    with pytest.raises(StoreError, match="simulated outage"):
        store.publish_release(folder, "r-new")
    store.put_bytes = real
    assert store.latest() == "r-old"  # the pointer never moved to a release it could not confirm
    assert store.publish_release(folder, "r-new") == "r-new" and store.latest() == "r-new"
    with pytest.raises(StoreError, match="never reused"):
        store.publish_release(folder, "r-new")


def test_changed_or_missing_bytes_are_refused_naming_the_file(store, folder, tmp_path):
    store.publish_release(folder, "r-1")
    weights = store.root / "releases" / "r-1" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"r-1: {WEIGHTS} differs from its sha256"):
        store.pull_release("r-1", cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache" / "releases").iterdir()]  # nothing half-downloaded stays
    (store.root / "releases" / "r-1" / "card.md").unlink()
    with pytest.raises(StoreError, match="card.md is listed in the manifest but missing"):
        store.pull_release("r-1", cache_dir=tmp_path / "cache")
    (store.root / "releases" / "r-1" / "metrics.json").write_text("{}")
    with pytest.raises(StoreError, match="metrics.json differs"):
        store.show_release("r-1")


def test_cached_copy_is_reused_without_downloading(store, folder, tmp_path):
    store.publish_release(folder, "r-1")
    first = store.pull_release("r-1", cache_dir=tmp_path / "cache")
    calls = []
    real = store.get_file
    store.get_file = lambda key, dest: (calls.append(key), real(key, dest))
    assert store.pull_release("r-1", cache_dir=tmp_path / "cache") == first and calls == []
    (first / "card.md").write_text("tampered cache\n")  # a damaged cache is fetched again, never used
    again = store.pull_release("r-1", cache_dir=tmp_path / "cache")
    assert again == first and (again / "card.md").read_text() == CARD and len(calls) == 5
    import hashlib

    assert first.name == hashlib.sha256((first / "manifest.json").read_bytes()).hexdigest()


def test_manifest_from_storage_cannot_write_outside_the_release(store, tmp_path):
    # The download folder is <cache>/releases/.r-evil-<random>/, so "../../escape.txt" would land in
    # <cache>/escape.txt; the store holds that key (at its root), so an unchecked name would be fetched.
    evil = {"files": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}}
    (store.root / "releases" / "r-evil").mkdir(parents=True)
    (store.root / "releases" / "r-evil" / "manifest.json").write_text(json.dumps(evil))
    (store.root / "escape.txt").write_bytes(b"x")
    with pytest.raises(StoreError, match="not a valid manifest"):
        store.pull_release("r-evil", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "escape.txt").exists()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("escape.txt")) == ["store/escape.txt"]


def test_unknown_release_and_empty_store(store, tmp_path):
    with pytest.raises(StoreError, match="no release has been published"):
        store.pull_release("latest", cache_dir=tmp_path / "cache")
    with pytest.raises(StoreError, match="no release r-nope in"):
        store.resolve("r-nope")
    with pytest.raises(StoreError, match="unsupported store"):
        open_store("gs://bucket/x")


def test_fetch_file_and_release_uri_locally(store, folder, tmp_path):
    assert fetch_file(str(folder / WEIGHTS)) == folder / WEIGHTS
    store.publish_release(folder, "r-1")
    pulled = pull_release_uri(f"{store.uri}/releases/latest", cache_dir=tmp_path / "cache")
    assert (pulled / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()


def test_cli_push_list_show_pull(store, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache lives under ~/.cache
    assert cli.main(["releases", "push", str(folder), "--id", "r-cli", "--store", store.uri]) == 0
    assert "published r-cli" in capsys.readouterr().out
    monkeypatch.setenv("PO_CLUSTER_STORE", store.uri)  # the default store of every command
    assert cli.main(["releases", "list"]) == 0
    assert re.search(r"r-cli .* 5 .*\(latest\)", capsys.readouterr().out)
    assert cli.main(["releases", "show", "latest", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"]["clean"] == 0.9 and shown["card"] == (folder / "card.md").read_text()
    assert cli.main(["releases", "show", "latest"]) == 0  # the card, then where it is
    out = capsys.readouterr().out
    assert out.startswith((folder / "card.md").read_text().rstrip()) and "release r-cli in " in out
    assert cli.main(["releases", "pull", "r-cli", "--to", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS).read_bytes() == (folder / WEIGHTS).read_bytes()
    assert (tmp_path / "home" / ".cache" / "po-cluster" / "releases").is_dir()


def test_cli_errors_are_one_line(store, folder, capsys):
    assert cli.main(["releases", "pull", "r-missing", "--store", store.uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no release r-missing" in err and "Traceback" not in err
    (folder / "manifest.json").unlink()
    assert cli.main(["releases", "push", str(folder), "--store", store.uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to publish" in err
