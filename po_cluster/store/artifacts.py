"""Artifact store: a local folder (the default) or `s3://bucket/prefix`, and releases on top of it.

Layout under the store root, the same on both backends and made of plain files
or objects, so `aws s3 ls/cp --recursive` can list and download a release:

    releases/<id>/<files>          data files, uploaded first
    releases/<id>/manifest.json    sha256 and size of every file, uploaded LAST
    releases/latest.json           {"release_id": ...}, moved only after that manifest exists
    pending/<id>.json              the claim on an id while it is being published

A release exists if and only if its manifest exists: a publish cut short by a
crash or an outage leaves data files that no reader lists, resolves or pulls.
An id always names one content: re-running the same publish (same folder, same
id) completes it, anything else under a used id is refused.

Pulled releases are cached by the sha256 of their manifest bytes and every file
is checked against the manifest before the folder is handed out. Every read and
write goes through po_cluster.store.location, every check through
po_cluster.store.manifest. Nothing here unpickles anything. Errors are StoreError
with one clear line, never a raw botocore traceback.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from po_cluster.store import location
from po_cluster.store.location import ObjectMissing, StoreConfig, StoreError, join, parse_s3_uri
from po_cluster.store.manifest import (
    MANIFEST,
    ManifestError,
    file_matches,
    parse_manifest,
    sha256_bytes,
    verified_manifest,
    verify_manifest,
)

RELEASES = "releases"
LATEST = f"{RELEASES}/latest.json"
PENDING = "pending"
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class ReleaseInfo:
    release_id: str
    created: datetime | None  # when its manifest was written
    files: int
    size: int  # bytes of all data files
    manifest_sha256: str
    latest: bool


def new_release_id(now: datetime | None = None) -> str:
    """`r-YYYYMMDD-HHMMSS-<6 hex>`: sortable by time, and the random tail keeps ids unique."""
    now = now or datetime.now(UTC)
    return f"r-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_release_id(release_id: str) -> str:
    # Ids become key segments and folder names: no slashes, no "..", not the pointer's name.
    if not _ID_PATTERN.match(release_id) or release_id == "latest" or ".." in release_id:
        raise StoreError(f"invalid release id {release_id!r}: use letters, digits, '.', '_' and '-'")
    return release_id


def _verified_folder(folder: Path) -> tuple[bytes, dict[str, dict]]:
    """The manifest bytes and files of a local checkpoint folder whose every file matches them."""
    if not folder.is_dir():
        raise StoreError(f"no folder at {folder}")
    try:
        return verified_manifest(folder)
    except ManifestError as error:
        raise ManifestError(f"refusing to publish {folder}: {error}") from None


class ArtifactStore:
    """Primitive operations on keys (paths relative to the store root), and releases built on them."""

    def __init__(self, uri: str, settings: StoreConfig | None = None) -> None:
        self.uri = uri
        self.settings = settings or StoreConfig()

    def _at(self, key: str) -> str:
        return join(self.uri, key) if key else self.uri

    def put_file(self, path: Path, key: str) -> None:
        """Upload a local file; a reader sees the old object or the whole new one, never a part."""
        location.upload_file(path, self._at(key), self.settings)

    def put_bytes(self, data: bytes, key: str, if_absent: bool = False) -> None:
        """Write a small object; with if_absent, StoreError when the key already exists."""
        location.write_bytes(self._at(key), data, self.settings, if_absent=if_absent)

    def get_file(self, key: str, dest: Path) -> None:
        """Download to dest; ObjectMissing when the key does not exist."""
        location.download_file(self._at(key), dest, self.settings)

    def read(self, key: str) -> tuple[bytes, datetime] | None:
        """The bytes and modification time of a small object, or None when it does not exist."""
        try:
            return location.read_object(self._at(key), self.settings)
        except ObjectMissing:
            return None

    def get_bytes(self, key: str) -> bytes | None:
        found = self.read(key)
        return None if found is None else found[0]

    def exists(self, key: str) -> bool:
        return location.exists(self._at(key), self.settings)

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under the folder `prefix` (recursive), sorted; writes in progress are not keys."""
        folder = prefix.rstrip("/")
        try:
            names = location.list_files(self._at(folder), self.settings)
        except ObjectMissing:
            return []
        return [f"{folder}/{name}" if folder else name for name in names]

    def list_prefixes(self, prefix: str) -> list[str]:
        """Names of the immediate "folders" under prefix."""
        return location.list_folders(self._at(prefix.rstrip("/")), self.settings)

    def delete(self, key: str) -> None:
        location.remove(self._at(key), self.settings)

    # ------------------------------------------------------------ releases

    def publish_release(self, folder: str | Path, release_id: str | None = None) -> str:
        """Upload a verified checkpoint folder as a release; returns its id.

        Order is the whole guarantee: data files, then the manifest (the commit
        point), then the latest pointer. A failure at any step leaves no release.
        """
        folder = Path(folder)
        manifest, entries = _verified_folder(folder)
        release_id = check_release_id(release_id) if release_id else new_release_id()
        base = f"{RELEASES}/{release_id}"
        if not self._claim(release_id, sha256_bytes(manifest)):
            for name in sorted(entries):
                self.put_file(folder / name, f"{base}/{name}")
            # if_absent: should two publishers race on one id, only one manifest ever lands.
            self.put_bytes(manifest, f"{base}/{MANIFEST}", if_absent=True)
        self.put_bytes(json.dumps({"release_id": release_id}).encode(), LATEST)
        # A leftover claim is harmless: the manifest decides, and a re-run removes it.
        with contextlib.suppress(StoreError):
            self.delete(f"{PENDING}/{release_id}.json")
        return release_id

    def _claim(self, release_id: str, manifest_sha: str) -> bool:
        """Reserve the id for this content. True: the manifest is already in place (finish only)."""
        base, pending = f"{RELEASES}/{release_id}", f"{PENDING}/{release_id}.json"
        claim = self.get_bytes(pending)
        claimed_sha = _claim_sha(claim, self.uri, release_id) if claim is not None else None
        published = self.get_bytes(f"{base}/{MANIFEST}")
        if published is not None:
            if claimed_sha == manifest_sha == sha256_bytes(published):
                return True  # the same publish was cut short after its manifest: move latest now
            raise StoreError(f"release {release_id} already exists in {self.uri}; release ids are never reused")
        if claimed_sha is None:
            if self.list_keys(f"{base}/"):
                raise StoreError(f"{self.uri}: {base}/ holds objects without a claim; "
                                 f"release ids are never reused, publish under a new id")
            claim = json.dumps({"release_id": release_id, "manifest_sha256": manifest_sha,
                                "started": datetime.now(UTC).isoformat()}).encode()
            self.put_bytes(claim, pending, if_absent=True)
        elif claimed_sha != manifest_sha:
            raise StoreError(f"release {release_id} was half-published from different content; "
                             f"release ids are never reused, publish under a new id")
        return False

    def latest(self) -> str | None:
        """The id the latest pointer names, or None when nothing was ever published."""
        data = self.get_bytes(LATEST)
        if data is None:
            return None
        try:
            return check_release_id(json.loads(data)["release_id"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, StoreError):
            raise StoreError(f"{self.uri}/{LATEST}: not a valid latest pointer") from None

    def resolve(self, id_or_latest: str) -> str:
        """The id of a published release ("latest" follows the pointer); StoreError otherwise."""
        return self._manifest(id_or_latest)[0]

    def _manifest(self, id_or_latest: str) -> tuple[str, bytes, dict[str, dict], datetime]:
        if id_or_latest == "latest":
            release_id = self.latest()
            if release_id is None:
                raise StoreError(f"no release has been published to {self.uri}")
        else:
            release_id = check_release_id(id_or_latest)
        found = self.read(f"{RELEASES}/{release_id}/{MANIFEST}")
        if found is None:
            if self.exists(f"{PENDING}/{release_id}.json") or self.list_keys(f"{RELEASES}/{release_id}/"):
                raise StoreError(f"release {release_id} in {self.uri} is incomplete: its {MANIFEST} is "
                                 f"missing (an interrupted publish), so it cannot be loaded")
            raise StoreError(f"no release {release_id} in {self.uri}")
        data, modified = found
        return release_id, data, parse_manifest(data, f"{self.uri}/{RELEASES}/{release_id}/{MANIFEST}"), modified

    def list_releases(self) -> list[ReleaseInfo]:
        """Published releases, oldest first; a release without its manifest is not one."""
        latest = self.latest()
        infos = []
        for release_id in self.list_prefixes(f"{RELEASES}/"):
            found = self.read(f"{RELEASES}/{release_id}/{MANIFEST}")
            if found is None:
                continue  # half-published: invisible by design
            data, modified = found
            entries = parse_manifest(data, f"{self.uri}/{RELEASES}/{release_id}/{MANIFEST}")
            infos.append(ReleaseInfo(release_id, modified, len(entries), sum(e["size"] for e in entries.values()),
                                     sha256_bytes(data), release_id == latest))
        return sorted(infos, key=lambda info: (info.created or datetime.min.replace(tzinfo=UTC),
                                               info.release_id))

    def show_release(self, id_or_latest: str) -> dict:
        """Manifest, metrics, model description and model card (card.md text) of a release: small files,
        each checked against the manifest."""
        release_id, data, entries, modified = self._manifest(id_or_latest)
        shown: dict[str, Any] = {"release_id": release_id, "store": self.uri, "created": modified.isoformat(),
                                 "manifest_sha256": sha256_bytes(data), "manifest": json.loads(data)}
        for field, name in (("metrics", "metrics.json"), ("model", "model.json"), ("card", "card.md")):
            content = self.get_bytes(f"{RELEASES}/{release_id}/{name}") if name in entries else None
            if content is not None and sha256_bytes(content) != entries[name]["sha256"]:
                raise ManifestError(f"release {release_id}: {name} differs from its sha256 in the manifest")
            if content is None:
                shown[field] = None
            elif name.endswith(".md"):
                shown[field] = content.decode("utf-8", errors="replace")
            else:
                shown[field] = json.loads(content)
        return shown

    def pull_release(self, id_or_latest: str = "latest", cache_dir: str | Path | None = None) -> Path:
        """A local folder holding the release, every file verified; cached by manifest content hash."""
        release_id, data, entries, _ = self._manifest(id_or_latest)
        root = self.settings.cache_root(cache_dir) / RELEASES
        target = root / sha256_bytes(data)
        if target.is_dir():
            try:
                verify_manifest(target)
                return target  # a verified cached copy: no download
            except ManifestError:
                shutil.rmtree(target)  # a damaged cache is fetched again, never used
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{release_id}-", dir=root))
        try:
            self._download_verified(release_id, entries, partial)
            (partial / MANIFEST).write_bytes(data)
            try:
                partial.rename(target)  # the cache entry appears whole or not at all
            except OSError:
                if not target.is_dir():
                    raise
                shutil.rmtree(partial)  # a concurrent pull got there first; its copy was verified too
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return target

    def _download_verified(self, release_id: str, entries: dict[str, dict], folder: Path) -> None:
        for name, entry in sorted(entries.items()):
            dest = folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.get_file(f"{RELEASES}/{release_id}/{name}", dest)
            except ObjectMissing:
                raise ManifestError(f"release {release_id}: {name} is listed in the manifest but missing from "
                                    f"{self.uri}; refusing to load it") from None
            if not file_matches(dest, entry):
                raise ManifestError(f"release {release_id}: {name} differs from its sha256/size in the manifest "
                                    f"(the bytes in {self.uri} changed); refusing to load it")


def _claim_sha(claim: bytes, uri: str, release_id: str) -> str:
    try:
        return str(json.loads(claim)["manifest_sha256"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise StoreError(f"{uri}/{PENDING}/{release_id}.json: not a valid claim") from None


# ---------------------------------------------------------------- the two backends


class LocalStore(ArtifactStore):
    """Keys are paths under a root folder; every write goes to a temporary file renamed into place."""

    def __init__(self, root: Path, settings: StoreConfig | None = None) -> None:
        self.root = root.expanduser().absolute()
        super().__init__(str(self.root), settings)


class S3Store(ArtifactStore):
    """Keys are objects under s3://bucket/prefix; uploads are single PUTs or multipart, both atomic."""

    def __init__(self, bucket: str, prefix: str, settings: StoreConfig | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        super().__init__(f"s3://{bucket}/{self.prefix}".rstrip("/"), settings)
        location.s3_client(self.settings)  # now: settings that cannot make a client fail at open, not later


# ---------------------------------------------------------------- entry points


def open_store(uri: str, settings: StoreConfig | None = None) -> ArtifactStore:
    """`s3://bucket/prefix` → S3Store; a path (or file://path) → LocalStore."""
    settings = settings or StoreConfig()
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, settings)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported store {uri}: use a local folder or s3://bucket/prefix")
    return LocalStore(Path(uri.removeprefix("file://")), settings)


def pull_release_uri(uri: str, cache_dir: str | Path | None = None,
                     settings: StoreConfig | None = None) -> Path:
    """`<store>/releases/<id or latest>` (s3:// or local) → a verified local folder."""
    store_uri, marker, release_id = uri.rstrip("/").rpartition(f"/{RELEASES}/")
    if not marker or not store_uri or "/" in release_id:
        raise StoreError(f"{uri}: expected <store>/{RELEASES}/<release id or latest>")
    return open_store(store_uri, settings).pull_release(release_id, cache_dir)


def fetch_file(uri: str, cache_dir: str | Path | None = None, settings: StoreConfig | None = None) -> Path:
    """A local path for `uri`: local paths as they are, s3:// objects cached by key and ETag."""
    if not location.is_s3(uri):
        return Path(uri.removeprefix("file://")).expanduser()
    settings = settings or StoreConfig()
    bucket, key = parse_s3_uri(uri)
    if not key or uri.endswith("/"):
        raise StoreError(f"{uri}: not an object (no key)")
    try:
        info = location.stat(uri, settings)
    except ObjectMissing:
        raise ObjectMissing(f"cannot fetch {uri}: no such object") from None
    # The ETag changes whenever the object does, so key+ETag names one content without hashing it.
    folder = settings.cache_root(cache_dir) / "objects" / sha256_bytes(f"{bucket}/{key}\0{info.tag}".encode())[:32]
    path = folder / PurePosixPath(key).name
    if path.is_file() and path.stat().st_size == info.size:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        location.download_file(uri, tmp, settings)
        if location.stat(uri, settings).tag != info.tag:
            # Overwritten while we downloaded: these bytes must not be cached under the old ETag.
            raise StoreError(f"cannot fetch {uri}: the object changed during the download; try again")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
