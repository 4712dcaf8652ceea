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
is checked against the manifest before the folder is handed out. Nothing here
unpickles anything. Errors are StoreError with one clear line, never a raw
botocore traceback.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST = "manifest.json"  # same name as po_cluster.model.checkpoint.MANIFEST (not imported: that pulls in torch)
RELEASES = "releases"
LATEST = f"{RELEASES}/latest.json"
PENDING = "pending"
MiB = 1 << 20
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StoreError(RuntimeError):
    """An artifact-store operation failed; the message says what and why, on one line."""


class ObjectMissing(StoreError):
    """The key does not exist in the store (callers turn it into a message naming the file)."""


class StoreSettings(BaseModel):
    """How to reach S3. Credentials are never here: they come from the standard AWS chain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None  # None: boto3's own resolution (AWS_ENDPOINT_URL[_S3], config, AWS)
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION / profile config
    profile: str | None = None  # None: AWS_PROFILE or the default profile
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1)  # retries in botocore's "standard" mode, first try included
    multipart_threshold: int = Field(64 * MiB, ge=1)
    multipart_chunksize: int = Field(16 * MiB, ge=5 * MiB)  # S3's minimum part size is 5 MiB
    max_concurrency: int = Field(8, ge=1)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    cache_dir: Path | None = None  # None: ~/.cache/po-cluster


@dataclass(frozen=True)
class ReleaseInfo:
    release_id: str
    created: datetime | None  # when its manifest was written
    files: int
    size: int  # bytes of all data files
    manifest_sha256: str
    latest: bool


# ---------------------------------------------------------------- small helpers


def new_release_id(now: datetime | None = None) -> str:
    """`r-YYYYMMDD-HHMMSS-<6 hex>`: sortable by time, and the random tail keeps ids unique."""
    now = now or datetime.now(timezone.utc)
    return f"r-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_release_id(release_id: str) -> str:
    # Ids become key segments and folder names: no slashes, no "..", not the pointer's name.
    if not _ID_PATTERN.match(release_id) or release_id == "latest" or ".." in release_id:
        raise StoreError(f"invalid release id {release_id!r}: use letters, digits, '.', '_' and '-'")
    return release_id


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → ("bucket", "some/prefix")."""
    if not uri.startswith("s3://"):
        raise StoreError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"no bucket in {uri}")
    return bucket, prefix.strip("/")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "po-cluster"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_name(name: Any) -> bool:
    # A manifest from storage decides where files are written: nothing may escape the release folder.
    if not isinstance(name, str) or not name or "\\" in name or name == MANIFEST:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and "." not in path.parts


def parse_manifest(data: bytes, where: str) -> dict[str, dict]:
    """The `files` table of a manifest, every entry checked; StoreError if anything is off."""
    try:
        entries = json.loads(data)["files"]
        valid = isinstance(entries, dict) and all(
            _safe_name(name) and isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and _SHA256.match(e["sha256"]) and isinstance(e.get("size"), int) and e["size"] >= 0
            for name, e in entries.items())
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        valid = False
    if not valid:
        raise StoreError(f"{where}: not a valid manifest")
    return entries


def _verified_folder(folder: Path) -> tuple[bytes, dict[str, dict]]:
    """The manifest bytes of a local checkpoint folder whose every file matches them."""
    from po_cluster.model.checkpoint import CheckpointError, verify_manifest  # lazy: imports torch

    if not folder.is_dir():
        raise StoreError(f"no folder at {folder}")
    try:
        verify_manifest(folder)
    except CheckpointError as error:
        raise StoreError(f"refusing to publish {folder}: {error}") from None
    data = (folder / MANIFEST).read_bytes()
    return data, parse_manifest(data, str(folder / MANIFEST))


# ---------------------------------------------------------------- the store interface


class ArtifactStore(ABC):
    """Primitive operations on keys (relative to the store root), and releases built on them."""

    uri: str
    settings: StoreSettings

    @abstractmethod
    def put_file(self, path: Path, key: str) -> None:
        """Upload a local file; a reader sees the old object or the whole new one, never a part."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str, if_absent: bool = False) -> None:
        """Write a small object; with if_absent, StoreError when the key already exists."""

    @abstractmethod
    def get_file(self, key: str, dest: Path) -> None:
        """Download to dest; ObjectMissing when the key does not exist."""

    @abstractmethod
    def read(self, key: str) -> tuple[bytes, datetime] | None:
        """The bytes and modification time of a small object, or None when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under prefix (recursive)."""

    @abstractmethod
    def list_prefixes(self, prefix: str) -> list[str]:
        """Names of the immediate "folders" under prefix (which ends with '/')."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    def get_bytes(self, key: str) -> bytes | None:
        found = self.read(key)
        return None if found is None else found[0]

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
        if not self._claim(release_id, _sha256_bytes(manifest)):
            for name in sorted(entries):
                self.put_file(folder / name, f"{base}/{name}")
            # if_absent: should two publishers race on one id, only one manifest ever lands.
            self.put_bytes(manifest, f"{base}/{MANIFEST}", if_absent=True)
        self.put_bytes(json.dumps({"release_id": release_id}).encode(), LATEST)
        try:
            self.delete(f"{PENDING}/{release_id}.json")
        except StoreError:
            pass  # a leftover claim is harmless: the manifest decides, and a re-run removes it
        return release_id

    def _claim(self, release_id: str, manifest_sha: str) -> bool:
        """Reserve the id for this content. True: the manifest is already in place (finish only)."""
        base, pending = f"{RELEASES}/{release_id}", f"{PENDING}/{release_id}.json"
        claim = self.get_bytes(pending)
        claimed_sha = _claim_sha(claim, self.uri, release_id) if claim is not None else None
        published = self.get_bytes(f"{base}/{MANIFEST}")
        if published is not None:
            if claimed_sha == manifest_sha == _sha256_bytes(published):
                return True  # the same publish was cut short after its manifest: move latest now
            raise StoreError(f"release {release_id} already exists in {self.uri}; release ids are never reused")
        if claimed_sha is None:
            if self.list_keys(f"{base}/"):
                raise StoreError(f"{self.uri}: {base}/ holds objects without a claim; "
                                 f"release ids are never reused, publish under a new id")
            claim = json.dumps({"release_id": release_id, "manifest_sha256": manifest_sha,
                                "started": datetime.now(timezone.utc).isoformat()}).encode()
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
                                     _sha256_bytes(data), release_id == latest))
        return sorted(infos, key=lambda info: (info.created or datetime.min.replace(tzinfo=timezone.utc),
                                               info.release_id))

    def show_release(self, id_or_latest: str) -> dict:
        """Manifest, metrics and model description of a release (small files, checked against the manifest)."""
        release_id, data, entries, modified = self._manifest(id_or_latest)
        shown: dict[str, Any] = {"release_id": release_id, "store": self.uri, "created": modified.isoformat(),
                                 "manifest_sha256": _sha256_bytes(data), "manifest": json.loads(data)}
        for field, name in (("metrics", "metrics.json"), ("model", "model.json")):
            content = self.get_bytes(f"{RELEASES}/{release_id}/{name}") if name in entries else None
            if content is not None and _sha256_bytes(content) != entries[name]["sha256"]:
                raise StoreError(f"release {release_id}: {name} differs from its sha256 in the manifest")
            shown[field] = json.loads(content) if content is not None else None
        return shown

    def pull_release(self, id_or_latest: str = "latest", cache_dir: str | Path | None = None) -> Path:
        """A local folder holding the release, every file verified; cached by manifest content hash."""
        from po_cluster.model.checkpoint import CheckpointError, verify_manifest  # lazy: imports torch

        release_id, data, entries, _ = self._manifest(id_or_latest)
        root = Path(cache_dir or self.settings.cache_dir or default_cache_dir()).expanduser() / RELEASES
        target = root / _sha256_bytes(data)
        if target.is_dir():
            try:
                verify_manifest(target)
                return target  # a verified cached copy: no download
            except CheckpointError:
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
        from po_cluster.model.checkpoint import sha256_file  # lazy: imports torch

        for name, entry in sorted(entries.items()):
            dest = folder / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.get_file(f"{RELEASES}/{release_id}/{name}", dest)
            except ObjectMissing:
                raise StoreError(f"release {release_id}: {name} is listed in the manifest but missing from "
                                 f"{self.uri}; refusing to load it") from None
            if dest.stat().st_size != entry["size"] or sha256_file(dest) != entry["sha256"]:
                raise StoreError(f"release {release_id}: {name} differs from its sha256/size in the manifest "
                                 f"(the bytes in {self.uri} changed); refusing to load it")


def _claim_sha(claim: bytes, uri: str, release_id: str) -> str:
    try:
        return str(json.loads(claim)["manifest_sha256"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise StoreError(f"{uri}/{PENDING}/{release_id}.json: not a valid claim") from None


# ---------------------------------------------------------------- local folder


class LocalStore(ArtifactStore):
    """Keys are paths under a root folder; every write goes to a temporary file renamed into place."""

    def __init__(self, root: Path, settings: StoreSettings | None = None) -> None:
        self.root = root.expanduser().absolute()
        self.uri = str(self.root)
        self.settings = settings or StoreSettings()

    def _path(self, key: str) -> Path:
        return self.root / key

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except OSError as error:
            raise StoreError(f"{what}: {error.strerror or error}") from None

    def _temporary(self, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")

    def put_file(self, path: Path, key: str) -> None:
        dest = self._path(key)
        with self._errors(f"cannot write {dest}"):
            tmp = self._temporary(dest)
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)

    def put_bytes(self, data: bytes, key: str, if_absent: bool = False) -> None:
        dest = self._path(key)
        with self._errors(f"cannot write {dest}"):
            tmp = self._temporary(dest)
            tmp.write_bytes(data)
            if not if_absent:
                os.replace(tmp, dest)
                return
            try:
                os.link(tmp, dest)  # atomic and refuses an existing name: the local If-None-Match
            except FileExistsError:
                raise StoreError(f"{dest} already exists") from None
            finally:
                tmp.unlink()

    def get_file(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectMissing(f"no file {source}")
        with self._errors(f"cannot read {source}"):
            shutil.copyfile(source, dest)

    def read(self, key: str) -> tuple[bytes, datetime] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        with self._errors(f"cannot read {path}"):
            return path.read_bytes(), datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        folder = base if prefix.endswith("/") or base.is_dir() else base.parent
        if not folder.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in folder.rglob("*")
                if p.is_file() and not p.name.endswith(".tmp"))  # skip writes in progress
        return sorted(k for k in keys if k.startswith(prefix))

    def list_prefixes(self, prefix: str) -> list[str]:
        folder = self._path(prefix)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def delete(self, key: str) -> None:
        with self._errors(f"cannot delete {self._path(key)}"):
            self._path(key).unlink(missing_ok=True)


# ---------------------------------------------------------------- S3


def _boto_session(settings: StoreSettings):  # -> boto3.session.Session
    import boto3  # lazy: a local store needs no AWS SDK at import time
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session(profile_name=settings.profile, region_name=settings.region)
    except ProfileNotFound as error:
        raise StoreError(f"AWS profile not found: {error}") from None


def s3_client(settings: StoreSettings, session: Any = None) -> Any:
    """A boto3 S3 client: endpoint/region/credentials from the AWS chain, retries and timeouts explicit."""
    from botocore.config import Config

    session = session or _boto_session(settings)
    config = Config(retries={"mode": "standard", "max_attempts": settings.max_attempts},
                    connect_timeout=settings.connect_timeout, read_timeout=settings.read_timeout,
                    s3={"addressing_style": settings.addressing_style}, user_agent_extra="po-cluster")
    with _s3_errors("cannot create an S3 client", settings.endpoint_url or "(default endpoint)"):
        # endpoint_url=None lets boto3 apply AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / the profile's endpoint.
        return session.client("s3", endpoint_url=settings.endpoint_url, config=config)


def _error_code(error: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    found = re.search(r"\((\w+)\)", str(error))  # S3UploadFailedError keeps the code only in its text
    return found.group(1) if found else ""


_CODE_REASONS = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied", "403": "access denied", "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the AWS credentials were rejected (unknown access key)",
    "SignatureDoesNotMatch": "the AWS credentials were rejected (wrong secret key)",
    "ExpiredToken": "the AWS credentials have expired", "InvalidToken": "the AWS session token is invalid",
    "PreconditionFailed": "it already exists", "412": "it already exists",
}


@contextmanager
def _s3_errors(what: str, endpoint: str, missing_ok: bool = False) -> Iterator[None]:
    """Turn whatever boto3 raises into a one-line StoreError (ObjectMissing for absent keys)."""
    from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
    from botocore import exceptions as bx

    try:
        yield
    except StoreError:
        raise
    except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as error:
        raise StoreError(f"{what}: no usable AWS credentials ({error}); set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role") from None
    except (bx.ConnectionError, bx.HTTPClientError) as error:
        raise StoreError(f"{what}: cannot reach the S3 endpoint {endpoint} ({error})") from None
    except RetriesExceededError as error:  # download_file's own retries, around a connection error
        raise StoreError(f"{what}: cannot reach the S3 endpoint {endpoint} ({error.last_exception})") from None
    except (bx.ClientError, S3UploadFailedError) as error:
        code = _error_code(error)
        if code in ("NoSuchKey", "404", "NotFound") and missing_ok:
            raise ObjectMissing(f"{what}: not found") from None
        reason = _CODE_REASONS.get(code) or ("not found" if code in ("NoSuchKey", "404", "NotFound")
                                             else f"S3 error {code or '?'}: {error}")
        raise StoreError(f"{what}: {reason} (endpoint {endpoint})") from None
    except (bx.BotoCoreError, Boto3Error) as error:
        raise StoreError(f"{what}: {error}") from None


class S3Store(ArtifactStore):
    """Keys are objects under s3://bucket/prefix; uploads are single PUTs or multipart, both atomic."""

    def __init__(self, bucket: str, prefix: str, settings: StoreSettings | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.settings = settings or StoreSettings()
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = s3_client(self.settings)
        self.endpoint = self.client.meta.endpoint_url
        # "classic": the pure-Python transfer manager, whatever the instance type (CRT ignores some settings).
        self.transfer = TransferConfig(multipart_threshold=self.settings.multipart_threshold,
                                       multipart_chunksize=self.settings.multipart_chunksize,
                                       max_concurrency=self.settings.max_concurrency,
                                       preferred_transfer_client="classic")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _errors(self, what: str, missing_ok: bool = False):  # -> context manager
        return _s3_errors(what, self.endpoint, missing_ok)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, path: Path, key: str) -> None:
        with self._errors(f"cannot upload {path} to {self._uri(key)}"):
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)

    def put_bytes(self, data: bytes, key: str, if_absent: bool = False) -> None:
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}  # S3 conditional write: never overwrite
        with self._errors(f"cannot write {self._uri(key)}"):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
            except ClientError as error:
                if not extra or _error_code(error) not in ("NotImplemented", "501"):
                    raise
                # An S3-compatible store without conditional writes: the claim check is then the only guard.
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, dest: Path) -> None:
        with self._errors(f"cannot download {self._uri(key)}", missing_ok=True):
            self.client.download_file(self.bucket, self._key(key), str(dest), Config=self.transfer)

    def read(self, key: str) -> tuple[bytes, datetime] | None:
        # GET (not HEAD) so that a missing bucket says NoSuchBucket instead of a bare 404.
        try:
            with self._errors(f"cannot read {self._uri(key)}", missing_ok=True):
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
                return response["Body"].read(), response["LastModified"]
        except ObjectMissing:
            return None

    def exists(self, key: str) -> bool:
        try:
            with self._errors(f"cannot look up {self._uri(key)}", missing_ok=True):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ObjectMissing:
            return False

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        kwargs = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        with self._errors(f"cannot list {self._uri(prefix)}"):
            yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def list_keys(self, prefix: str) -> list[str]:
        skip = len(self._key(""))
        return sorted(item["Key"][skip:] for page in self._pages(prefix) for item in page.get("Contents", []))

    def list_prefixes(self, prefix: str) -> list[str]:
        skip = len(self._key(prefix))
        return sorted(p["Prefix"][skip:].rstrip("/") for page in self._pages(prefix, "/")
                      for p in page.get("CommonPrefixes", []))

    def delete(self, key: str) -> None:
        with self._errors(f"cannot delete {self._uri(key)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


# ---------------------------------------------------------------- entry points


def open_store(uri: str, settings: StoreSettings | None = None) -> ArtifactStore:
    """`s3://bucket/prefix` → S3Store; a path (or file://path) → LocalStore."""
    settings = settings or StoreSettings()
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, settings)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported store {uri}: use a local folder or s3://bucket/prefix")
    return LocalStore(Path(uri.removeprefix("file://")), settings)


def pull_release_uri(uri: str, cache_dir: str | Path | None = None,
                     settings: StoreSettings | None = None) -> Path:
    """`<store>/releases/<id or latest>` (s3:// or local) → a verified local folder."""
    store_uri, marker, release_id = uri.rstrip("/").rpartition(f"/{RELEASES}/")
    if not marker or not store_uri or "/" in release_id:
        raise StoreError(f"{uri}: expected <store>/{RELEASES}/<release id or latest>")
    return open_store(store_uri, settings).pull_release(release_id, cache_dir)


def fetch_file(uri: str, cache_dir: str | Path | None = None, settings: StoreSettings | None = None) -> Path:
    """A local path for `uri`: local paths as they are, s3:// objects cached by key and ETag."""
    if not uri.startswith("s3://"):
        return Path(uri.removeprefix("file://")).expanduser()
    settings = settings or StoreSettings()
    bucket, key = parse_s3_uri(uri)
    if not key or uri.endswith("/"):
        raise StoreError(f"{uri}: not an object (no key)")
    store = S3Store(bucket, "", settings)
    with store._errors(f"cannot fetch {uri}", missing_ok=True):
        try:
            head = store.client.head_object(Bucket=bucket, Key=key)
        except Exception as error:
            if _error_code(error) in ("404", "NotFound"):  # HEAD cannot say which: ask with a GET
                store.read(key)
                raise ObjectMissing(f"cannot fetch {uri}: no such object") from None
            raise
    etag = str(head.get("ETag", "")).strip('"')
    # The ETag changes whenever the object does, so key+ETag names one content without hashing it.
    folder = Path(cache_dir or settings.cache_dir or default_cache_dir()).expanduser() / "objects" \
        / _sha256_bytes(f"{bucket}/{key}\0{etag}".encode())[:32]
    path = folder / PurePosixPath(key).name
    if path.is_file() and path.stat().st_size == head["ContentLength"]:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        store.get_file(key, tmp)
        with store._errors(f"cannot fetch {uri}"):
            changed = store.client.head_object(Bucket=bucket, Key=key).get("ETag") != head.get("ETag")
        if changed:  # overwritten while we downloaded: these bytes must not be cached under the old ETag
            raise StoreError(f"cannot fetch {uri}: the object changed during the download; try again")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pyarrow_fs(uri: str, settings: StoreSettings | None = None) -> tuple[Any, str]:
    """(pyarrow.fs.S3FileSystem, "bucket/prefix") reaching what boto3 reaches for `uri`.

    For Ray: `RunConfig(storage_path=path, storage_filesystem=fs)`. Endpoint and
    region are the ones boto3 resolved; static credentials are passed as they are,
    refreshable ones (instance/pod roles, SSO, assume-role) are left to pyarrow's
    own AWS chain so that they keep refreshing during a long sweep.
    """
    from botocore.credentials import RefreshableCredentials
    from pyarrow import fs

    settings = settings or StoreSettings()
    bucket, prefix = parse_s3_uri(uri)
    session = _boto_session(settings)
    resolved = s3_client(settings, session).meta  # the endpoint and region boto3 itself would use
    credentials = session.get_credentials()
    if credentials is None:
        raise StoreError(f"cannot open {uri}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance/pod role")
    keys: dict[str, Any] = {}
    if not isinstance(credentials, RefreshableCredentials):
        frozen = credentials.get_frozen_credentials()
        keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
    scheme, _, host = resolved.endpoint_url.partition("://")
    custom = settings.endpoint_url is not None or not host.split("/")[0].endswith("amazonaws.com")
    filesystem = fs.S3FileSystem(
        region=resolved.region_name, scheme=scheme, endpoint_override=host.rstrip("/") if custom else None,
        connect_timeout=settings.connect_timeout, request_timeout=settings.read_timeout,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        force_virtual_addressing=settings.addressing_style == "virtual", **keys)
    return filesystem, f"{bucket}/{prefix}".rstrip("/")
