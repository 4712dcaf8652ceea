"""The one manifest module: written last, every file checked (missing, changed, extra), names from
storage refused when they could lead outside the folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from po_cluster.store.location import StoreError
from po_cluster.store.manifest import (
    MANIFEST,
    ManifestError,
    parse_manifest,
    sha256_bytes,
    sha256_file,
    verified_manifest,
    verify_manifest,
    write_manifest,
)


@pytest.fixture()
def folder(tmp_path) -> Path:
    (tmp_path / "ckpt" / "train").mkdir(parents=True)
    (tmp_path / "ckpt" / "model.json").write_text('{"architecture": "x"}\n')
    (tmp_path / "ckpt" / "train" / "state.bin").write_bytes(bytes(range(256)) * 5000)
    return tmp_path / "ckpt"


def test_written_last_and_verified(folder):
    written = write_manifest(folder)
    assert set(written["files"]) == {"model.json", "train/state.bin"}  # not itself, nested names posix
    assert written["files"]["train/state.bin"]["size"] == 256 * 5000
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "model.json", "train"]  # no temporary left
    assert verify_manifest(folder) == written
    data, entries = verified_manifest(folder)
    assert data == (folder / MANIFEST).read_bytes() and entries == written["files"]
    assert sha256_file(folder / "model.json") == sha256_bytes((folder / "model.json").read_bytes())


def test_each_problem_is_named(folder):
    write_manifest(folder)
    (folder / "notes.txt").write_text("added after the manifest\n")
    with pytest.raises(ManifestError, match="notes.txt is not listed in the manifest"):
        verify_manifest(folder)
    (folder / "notes.txt").unlink()
    state = bytearray((folder / "train" / "state.bin").read_bytes())
    state[1000] ^= 1
    (folder / "train" / "state.bin").write_bytes(bytes(state))
    with pytest.raises(ManifestError, match="train/state.bin does not match its sha256"):
        verify_manifest(folder)
    (folder / "train" / "state.bin").unlink()
    with pytest.raises(ManifestError, match="train/state.bin is listed in the manifest but missing"):
        verify_manifest(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match=f"{MANIFEST}: not a valid manifest"):
        verify_manifest(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ManifestError, match=f"no {MANIFEST}; the checkpoint is incomplete"):
        verify_manifest(folder)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "./a", "a//b", "a/", "a\\b", MANIFEST, ""])
def test_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(ManifestError, match="where: not a valid manifest"):
        parse_manifest(json.dumps({"files": {name: {"sha256": "0" * 64, "size": 1}}}).encode(), "where")


@pytest.mark.parametrize("entry", [{"sha256": "0" * 63, "size": 1}, {"sha256": "A" * 64, "size": 1},
                                   {"sha256": "0" * 64, "size": -1}, {"sha256": "0" * 64}, "text"])
def test_malformed_entries_are_refused(entry):
    with pytest.raises(ManifestError, match="not a valid manifest"):
        parse_manifest(json.dumps({"files": {"a.bin": entry}}).encode(), "where")
    for data in (b"[]", b'{"other": {}}', b"\xff\xfe"):
        with pytest.raises(ManifestError):
            parse_manifest(data, "where")
    assert parse_manifest(json.dumps({"files": {"sub/a.bin": {"sha256": "0" * 64, "size": 0}}}).encode(), "w")


def test_one_error_for_store_and_checkpoints():
    from po_cluster.model.checkpoint import CheckpointError

    assert CheckpointError is ManifestError and issubclass(ManifestError, StoreError)


def test_the_store_imports_no_model_code():
    # The store used to import checkpoint code (and torch) lazily: model → store → model was a cycle.
    code = ("import sys, po_cluster.store.artifacts, po_cluster.store.manifest, po_cluster.store.location; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('po_cluster.model')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
