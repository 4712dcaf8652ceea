"""Webdataset tar shards, read as a stream (local or s3://): nothing is unpacked to disk, and a shard
is never held whole, only the member being read and the sample it belongs to.

A sample is the members that share a key: webdataset's convention, which img2dataset and
clip_benchmark's builder write: `<key>.<ext>` in a folder or not, the key up to the first dot of
the file name (`s0000001.webp`, `s0000001.cls`, `00000/000000123.jpg`, `…123.json`, `…123.txt`).
Members of one sample are consecutive in the tar, so a sample is complete when the key changes.

A set of shards is named as webdataset and img2dataset users name it: a brace pattern
(`shards/{00000..00002}.tar`), one `.tar` file, or a folder of `.tar` files; local or s3://.
Each member's place in its shard is kept, so a reader that needs one image later reads just its
bytes (a ranged read on S3) instead of a second pass over the tar.
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from po_cluster.data.images import is_image_name
from po_cluster.store.location import StoreConfig, StoreError, is_s3, join, pyarrow_fs

IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order: the first one a sample has


class ShardError(ValueError):
    """A shard that cannot be read as a tar stream; the message names it and the reason."""


@dataclass(frozen=True)
class Member:
    name: str  # as the tar names it
    offset: int  # where its bytes start in the shard
    size: int


@dataclass
class Sample:
    key: str  # the members' shared name, with its folder inside the tar
    members: dict[str, bytes] = field(default_factory=dict)  # extension (lower case, e.g. "jpg", "cls") → bytes
    shard: str = ""
    too_large: dict[str, int] = field(default_factory=dict)  # extension → size of a member not read
    places: dict[str, Member] = field(default_factory=dict)  # extension → the member's place, read or not


def image_extension(sample: Sample) -> str | None:
    """The extension of the sample's image: its first in IMAGE_MEMBERS' order, None when it has none."""
    return next((e for e in IMAGE_MEMBERS if e in sample.places), None)


def split_member(name: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` → ("dir/abc", "seg.jpg"): webdataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


@contextmanager
def _stream(location: str, settings: StoreConfig | None) -> Iterator[Any]:
    if is_s3(location):
        filesystem, path = pyarrow_fs(location, settings)
        with filesystem.open_input_stream(path) as stream:
            yield stream
    else:
        with open(location, "rb") as stream:
            yield stream


def iter_samples(location: str, max_member_bytes: int | None = None,
                 settings: StoreConfig | None = None) -> Iterator[Sample]:
    """The samples of one shard, in order. A member over `max_member_bytes` is not read into memory: its
    sample lists it in `too_large`. A shard damaged part way yields what came before, then ShardError."""
    current: Sample | None = None
    try:
        with _stream(location, settings) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
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
                place = Member(member.name, member.offset_data, member.size)
                if max_member_bytes is not None and member.size > max_member_bytes:
                    current.too_large[extension] = member.size
                    current.places[extension] = place
                    continue
                handle = tar.extractfile(member)
                current.members[extension] = handle.read() if handle is not None else b""
                current.places[extension] = place
    except (tarfile.TarError, OSError, EOFError) as error:
        if current is not None:
            yield current  # what was read before the damage is kept
        raise ShardError(f"{location}: not a readable tar stream ({type(error).__name__}: {error})") from None
    if current is not None:
        yield current


def read_member(location: str, member: Member, settings: StoreConfig | None = None) -> bytes:
    """One member's bytes, read from its place in the shard: the tar is not walked again."""
    try:
        filesystem, path = pyarrow_fs(location, settings)
        with filesystem.open_input_file(path) as handle:
            data = handle.read_at(member.size, member.offset)
    except (OSError, StoreError) as error:
        raise ShardError(f"{location}/{member.name}: cannot read ({error})") from None
    if len(data) != member.size:  # a shard cut short after it was listed
        raise ShardError(f"{location}/{member.name}: the shard ends inside this member")
    return bytes(data)


# ---------------------------------------------------------------- naming a set of shards


@dataclass(frozen=True)
class ShardSet:
    shards: tuple[str, ...]  # where each shard is
    names: tuple[str, ...]  # each relative to the folder named (`00000.tar`), as a folder's files are in ids


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard lists: `{00000..00002}` a range, zero-padded to its first bound's width;
    `{a,b}` a choice; several braces multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", match.group(1))
    if bounds:
        width = len(bounds.group(1))
        choices = [str(n).zfill(width) for n in range(int(bounds.group(1)), int(bounds.group(2)) + 1)]
    else:
        choices = match.group(1).split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def named_shards(source: str) -> ShardSet | None:
    """The shards a source names by itself: a brace pattern or one `.tar` file; None for anything else."""
    if "{" in source:
        folder = len(source[:source.index("{")].rpartition("/")[0])  # up to the pattern's last fixed "/"
        shards = expand_braces(source)
        return ShardSet(tuple(shards), tuple(shard[folder:].lstrip("/") for shard in shards))
    if source.lower().endswith(".tar"):
        return ShardSet((source,), (source.rstrip("/").rpartition("/")[2],))
    return None


def folder_shards(root: str, names: list[str]) -> ShardSet | None:
    """A folder of shards, from its listing: `.tar` files at its top and no images anywhere (img2dataset
    writes a .parquet and a _stats.json beside each shard: not samples). None for an image folder."""
    tars = sorted(n for n in names if "/" not in n and n.lower().endswith(".tar") and not n.startswith("."))
    if not tars or any(is_image_name(n) for n in names):
        return None
    return ShardSet(tuple(join(root, n) for n in tars), tuple(tars))


@dataclass(frozen=True)
class Fault:
    where: str  # `<shard>/<member or key>`, or the shard when the tar itself is damaged
    reason: str


def walk(shards: ShardSet, settings: StoreConfig | None = None,
         max_member_bytes: int | None = None) -> Iterator[tuple[str, Sample | Fault]]:
    """(shard's name, sample) for every sample of every shard in order (members over `max_member_bytes`
    not read, as iter_samples). A damaged shard yields what it held before the damage, then a Fault naming
    it, and the walk goes on: one bad shard does not cost the others."""
    for shard, name in zip(shards.shards, shards.names, strict=True):
        try:
            for sample in iter_samples(shard, max_member_bytes, settings):
                yield name, sample
        except ShardError as error:
            yield name, Fault(shard, str(error))
