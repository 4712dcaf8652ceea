"""Locations: a local path or `s3://bucket/key`, read and written the same way.

This is the one layer that knows both backends (po_cluster.store.s3 is its boto3
side). A local write goes to a hidden temporary file beside its target and is
renamed into place; an S3 write is one PUT (or one multipart upload), so on both
a reader sees the old content or the whole new one, never a part. S3 endpoint,
region and credentials come from boto3's own chain (AWS_ENDPOINT_URL,
AWS_PROFILE, instance and pod roles); whatever boto3 raises becomes a StoreError
with one clear line.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from po_cluster.store.s3 import (
    MISSING_CODES,
    error_code,
    parse_s3_uri,
    s3_call,
    s3_client,
    s3_filesystem,
    transfer_config,
)
from po_cluster.store.settings import ObjectMissing, StoreConfig, StoreError

__all__ = ["ObjectInfo", "ObjectMissing", "StoreError", "StoreConfig", "download_file", "download_folder",
           "exists", "is_s3", "is_temporary", "join", "list_files", "list_folders", "parent", "parse_s3_uri",
           "pyarrow_fs", "read_bytes", "read_object", "remove", "resolve", "s3_client", "stat", "upload",
           "upload_file", "write_bytes"]


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    tag: str  # changes whenever the content does: the ETag on S3, mtime and size locally


# ---------------------------------------------------------------- names


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).joinpath(*parts))


def parent(location: str) -> str:
    if is_s3(location):
        return location.rsplit("/", 1)[0]
    return str(Path(location).parent)


def resolve(base_dir: str, path: str) -> str:
    """A path found in a file: URIs and absolute paths as they are, relative ones against base_dir.

    `..` is allowed: a manifest may point at images beside its own folder."""
    if "://" in path or Path(path).is_absolute():
        return path
    return join(base_dir, path)


def is_temporary(name: str) -> bool:
    """A write in progress (or left by a killed process): `.<name>.<hex>.tmp`, never content."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and base.endswith(".tmp")


def _path(location: str) -> Path:
    if "://" in location and not location.startswith("file://"):
        raise StoreError(f"unsupported location {location}: use a local path or s3://bucket/key")
    return Path(location.removeprefix("file://")).expanduser()


def _no_object(location: str) -> str:
    return f"{location}: no such object"


@contextmanager
def _local(location: str, what: str) -> Iterator[Path]:
    path = _path(location)
    try:
        yield path
    except StoreError:
        raise
    except OSError as error:
        raise StoreError(f"{what} {location}: {error.strerror or error}") from None


@contextmanager
def _replacing(dest: Path, if_absent: bool = False) -> Iterator[Path]:
    """A temporary file beside dest to write; moved onto dest when the block ends, removed if anything fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if if_absent:
            os.link(tmp, dest)  # atomic, and refuses an existing name: the local If-None-Match
        else:
            os.replace(tmp, dest)  # atomic on one filesystem
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


def read_object(location: str, settings: StoreConfig | None = None) -> tuple[bytes, datetime]:
    """The bytes at a location and when they were written; ObjectMissing when nothing is there."""
    if is_s3(location):
        # GET (not HEAD) so that a missing bucket says NoSuchBucket instead of a bare 404.
        with s3_call(location, "cannot read", settings, _no_object(location)) as (client, bucket, key):
            response = client.get_object(Bucket=bucket, Key=key)
            return response["Body"].read(), response["LastModified"]
    with _local(location, "cannot read") as path:
        try:
            data, modified = path.read_bytes(), path.stat().st_mtime
        except FileNotFoundError:
            raise ObjectMissing(f"{location}: file not found") from None
        return data, datetime.fromtimestamp(modified, UTC)


def read_bytes(location: str, settings: StoreConfig | None = None) -> bytes:
    return read_object(location, settings)[0]


def stat(location: str, settings: StoreConfig | None = None) -> ObjectInfo:
    """Size and content tag of a file or object, without reading it; ObjectMissing when absent."""
    if not is_s3(location):
        with _local(location, "cannot look up") as path:
            try:
                found = path.stat()
            except FileNotFoundError:
                raise ObjectMissing(f"{location}: file not found") from None
            return ObjectInfo(found.st_size, f"{found.st_mtime_ns}-{found.st_size}")
    from botocore.exceptions import ClientError

    with s3_call(location, "cannot look up", settings, _no_object(location)) as (client, bucket, key):
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as error:
            if error_code(error) in MISSING_CODES:
                read_object(location, settings)  # HEAD cannot say whether the key or the bucket is missing
            raise
    return ObjectInfo(int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))


def exists(location: str, settings: StoreConfig | None = None) -> bool:
    """Whether a file (not a folder) or an object is there."""
    if not is_s3(location):
        return _path(location).is_file()
    try:
        with s3_call(location, "cannot look up", settings, missing=location) as (client, bucket, key):
            client.head_object(Bucket=bucket, Key=key)
        return True
    except ObjectMissing:
        return False


def _s3_listing(root: str, settings: StoreConfig | None, folders: bool) -> list[str]:
    root = root.rstrip("/")
    prefix = parse_s3_uri(root)[1]
    prefix = f"{prefix}/" if prefix else ""
    with s3_call(root, "cannot list", settings) as (client, bucket, _):
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, **({"Delimiter": "/"} if folders else {}))
        if folders:
            return [p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        return [item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])]


def list_files(root: str, settings: StoreConfig | None = None) -> list[str]:
    """Every file under a folder or S3 prefix, recursively, as sorted paths relative to it.

    Writes in progress are left out. ObjectMissing when there is no such folder, and on S3 when
    no object has the prefix (S3 has no empty folders, so the two cannot be told apart)."""
    if is_s3(root):
        names = sorted(k for k in _s3_listing(root, settings, folders=False) if k and not k.endswith("/"))
        if not names:  # "folder/" marker objects are not files
            raise ObjectMissing(f"{root.rstrip('/')}: no objects under this S3 prefix")
        return names
    with _local(root, "cannot list") as folder:
        if not folder.is_dir():
            raise ObjectMissing(f"{root}: folder not found")
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and not is_temporary(p.name))


def list_folders(root: str, settings: StoreConfig | None = None) -> list[str]:
    """Names of the immediate sub-folders (S3: common prefixes) of root, sorted; [] when there are none."""
    if is_s3(root):
        return sorted(_s3_listing(root, settings, folders=True))
    with _local(root, "cannot list") as folder:
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def download_file(location: str, dest: Path, settings: StoreConfig | None = None) -> None:
    """Copy a file or object to the local path dest (S3: ranged GETs for large objects); ObjectMissing when absent."""
    if is_s3(location):
        with s3_call(location, "cannot download", settings, _no_object(location)) as (client, bucket, key):
            client.download_file(bucket, key, str(dest), Config=transfer_config(settings or StoreConfig()))
        return
    with _local(location, "cannot read") as source:
        if not source.is_file():
            raise ObjectMissing(f"{location}: file not found")
        shutil.copyfile(source, dest)


def download_folder(root: str, dest: Path, settings: StoreConfig | None = None) -> Path:
    """Every file under a folder or S3 prefix into the local folder dest; ObjectMissing when there are none."""
    for name in list_files(root, settings):
        if name.startswith("/") or ".." in name.split("/"):  # keys decide where files land: none may escape dest
            raise StoreError(f"{join(root, name)}: refusing a name that leads outside {dest}")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        download_file(join(root, name), target, settings)
    return dest


# ---------------------------------------------------------------- writing


def write_bytes(location: str, data: bytes, settings: StoreConfig | None = None, if_absent: bool = False) -> None:
    """Write whole or not at all: a temporary file renamed into place locally, one PUT on S3.

    if_absent: StoreError when something is already there (a hard link locally, S3's conditional write)."""
    if is_s3(location):
        _put_object(location, data, settings, if_absent)
        return
    with _local(location, "cannot write") as dest:
        try:
            with _replacing(dest, if_absent) as tmp:
                tmp.write_bytes(data)
        except FileExistsError:
            raise StoreError(f"cannot write {location}: it already exists") from None


def _put_object(location: str, data: bytes, settings: StoreConfig | None, if_absent: bool) -> None:
    from botocore.exceptions import ClientError

    extra = {"IfNoneMatch": "*"} if if_absent else {}  # S3 conditional write: never overwrite
    with s3_call(location, "cannot write", settings) as (client, bucket, key):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except ClientError as error:
            if not extra or error_code(error) not in ("NotImplemented", "501"):
                raise
            # An S3-compatible store without conditional writes: the caller's own checks are then the only guard.
            client.put_object(Bucket=bucket, Key=key, Body=data)


def upload_file(path: Path, location: str, settings: StoreConfig | None = None) -> None:
    """Copy a local file to a location, as atomically as write_bytes (S3: multipart above the threshold)."""
    if is_s3(location):
        with s3_call(location, f"cannot upload {path} to", settings) as (client, bucket, key):
            client.upload_file(str(path), bucket, key, Config=transfer_config(settings or StoreConfig()))
        return
    with _local(location, "cannot write") as dest, _replacing(dest) as tmp:
        shutil.copyfile(path, tmp)


def upload(local: Path, location: str, settings: StoreConfig | None = None) -> None:
    """A local file to `location`, or every file of a local folder under it."""
    if not local.is_dir():
        upload_file(local, location, settings)
        return
    for name in list_files(str(local)):
        upload_file(local / name, join(location, name), settings)


def remove(location: str, settings: StoreConfig | None = None) -> None:
    """Delete a file or object if it is there."""
    if is_s3(location):
        with s3_call(location, "cannot delete", settings) as (client, bucket, key):
            client.delete_object(Bucket=bucket, Key=key)
        return
    with _local(location, "cannot delete") as path:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------- pyarrow, for Ray and Parquet readers


def pyarrow_fs(uri: str, settings: StoreConfig | None = None) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) reaching `uri`: S3 and "bucket/prefix", or local and an absolute folder.

    For Ray: `RunConfig(storage_path=path, storage_filesystem=fs)`; for readers that seek (Parquet footers)."""
    if is_s3(uri):
        return s3_filesystem(uri, settings)
    from pyarrow import fs

    return fs.LocalFileSystem(), str(_path(uri).resolve())
