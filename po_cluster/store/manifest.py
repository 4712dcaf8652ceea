"""Manifests: the sha256 and size of every file of a folder, in `manifest.json`, written last.

A checkpoint folder or a release is complete if and only if its manifest exists,
and usable only while every file matches it: none missing, none changed, none
added. Both the checkpoint loader and the artifact store check folders here and
raise the same ManifestError. A manifest read from storage decides where files
are written, so its names are checked before anything is (no absolute paths,
no `..`). Plain JSON: nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from po_cluster.store.location import write_bytes
from po_cluster.store.settings import StoreError

MANIFEST = "manifest.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(StoreError):
    """A checkpoint or release that must not be loaded or published; the message names the file."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_matches(path: Path, entry: dict) -> bool:
    """Whether a local file has the size and sha256 of its manifest entry (the size first: it costs nothing)."""
    return path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def _folder_files(folder: Path) -> list[str]:
    """Every file of the folder, as manifest names, but the manifest itself."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def write_manifest(folder: Path) -> dict:
    """sha256 and size of every file in the folder; written last (atomically), so its presence means complete."""
    folder = Path(folder)
    manifest = {"files": {name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
                          for name in _folder_files(folder)}}
    write_bytes(str(folder / MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _safe_name(name: Any) -> bool:
    # Relative, no "..", and in the one spelling a folder listing gives ("a/b", never "./a" or "a//b"),
    # so that a listed name and the file it names are always the same.
    if not isinstance(name, str) or not name or "\\" in name or name == MANIFEST:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and path.as_posix() == name


def parse_manifest(data: bytes, where: str) -> dict[str, dict]:
    """The `files` table of a manifest, every entry checked; ManifestError naming `where` if anything is off."""
    try:
        entries = json.loads(data)["files"]
        valid = isinstance(entries, dict) and all(
            _safe_name(name) and isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and _SHA256.match(e["sha256"]) and isinstance(e.get("size"), int) and e["size"] >= 0
            for name, e in entries.items())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ManifestError(f"{where}: not a valid manifest")
    return entries


def verified_manifest(folder: Path) -> tuple[bytes, dict[str, dict]]:
    """The manifest bytes and files table of a folder whose files are exactly those it lists, unchanged.

    ManifestError naming the first problem: no manifest, an invalid one, or a file missing, changed or extra."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST}; the checkpoint is incomplete and will not be loaded")
    data = path.read_bytes()
    entries = parse_manifest(data, str(path))
    for name, entry in sorted(entries.items()):
        file = folder / name
        if not file.is_file():
            raise ManifestError(f"{folder}: {name} is listed in the manifest but missing")
        if not file_matches(file, entry):
            raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest")
    extra = sorted(set(_folder_files(folder)) - set(entries))
    if extra:
        raise ManifestError(f"{folder}: {extra[0]} is not listed in the manifest (written after it?)")
    return data, entries


def verify_manifest(folder: Path) -> dict:
    """Check a folder against its manifest (see verified_manifest); returns the manifest."""
    return json.loads(verified_manifest(folder)[0])
