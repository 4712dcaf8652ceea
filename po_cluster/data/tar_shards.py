"""Webdataset tar shards, read as a stream (local or s3://): nothing is unpacked to disk, and a shard
is never held whole, only the member being read and the sample it belongs to.

A sample is the members that share a key: webdataset's convention, which img2dataset and
clip_benchmark's builder write: `<key>.<ext>` in a folder or not, the key up to the first dot of
the file name (`s0000001.webp`, `s0000001.cls`, `00000/000000123.jpg`, `…123.json`, `…123.txt`).
Members of one sample are consecutive in the tar, so a sample is complete when the key changes.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from po_cluster.store.location import is_s3, pyarrow_fs


class ShardError(ValueError):
    """A shard that cannot be read as a tar stream; the message names it and the reason."""


@dataclass
class Sample:
    key: str  # the members' shared name, with its folder inside the tar
    members: dict[str, bytes] = field(default_factory=dict)  # extension (lower case, e.g. "jpg", "cls") → bytes
    shard: str = ""
    too_large: dict[str, int] = field(default_factory=dict)  # extension → size of a member not read


def split_member(name: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` → ("dir/abc", "seg.jpg"): webdataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


@contextmanager
def _stream(location: str) -> Iterator[Any]:
    if is_s3(location):
        filesystem, path = pyarrow_fs(location)
        with filesystem.open_input_stream(path) as stream:
            yield stream
    else:
        with open(location, "rb") as stream:
            yield stream


def iter_samples(location: str, max_member_bytes: int | None = None) -> Iterator[Sample]:
    """The samples of one shard, in order. A member over `max_member_bytes` is not read into memory: its
    sample lists it in `too_large`. A shard damaged part way yields what came before, then ShardError."""
    current: Sample | None = None
    try:
        with _stream(location) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_member(member.name)
                if key.rpartition("/")[2].startswith("."):
                    continue  # hidden files (macOS resource forks) are no samples
                if current is not None and key != current.key:
                    yield current
                    current = None
                if current is None:
                    current = Sample(key, {}, location)
                if max_member_bytes is not None and member.size > max_member_bytes:
                    current.too_large[extension] = member.size
                    continue
                handle = tar.extractfile(member)
                current.members[extension] = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as error:
        if current is not None:
            yield current  # what was read before the damage is kept
        raise ShardError(f"{location}: not a readable tar stream ({type(error).__name__}: {error})") from None
    if current is not None:
        yield current
