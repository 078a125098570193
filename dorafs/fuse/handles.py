"""Open file and directory handles of the mount, and which names the kernel can show."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dorafs.client import OpenFile
from dorafs.client.writes import WriteFile
from dorafs.fuse.inodes import Node
from dorafs.fuse.objectfiles import HeldFile
from dorafs.ufs import FileStatus

NAME_MAX = 255  # bytes of one name (linux/limits.h)
PATH_MAX = 4096  # bytes of a path, its terminating NUL included (linux/limits.h)


URI_MAX = 4096  # characters of a URI a worker takes (worker/access.py)
S3_KEY_MAX = 1024  # bytes of an S3 object key


def too_long(path: str, uri: str) -> bool:
    """A name no file can have: its path from the mount root over PATH_MAX (with its NUL),
    its URI longer than a worker takes, or its S3 key longer than S3 allows."""
    if len(path.encode("utf-8", "surrogateescape")) >= PATH_MAX or len(uri) > URI_MAX:
        return True
    scheme, _, rest = uri.partition("://")
    key = rest.partition("/")[2]
    return scheme in ("s3", "s3a") and len(key.encode("utf-8", "surrogateescape")) > S3_KEY_MAX


def valid_name(name: str) -> bool:
    """Names the kernel can show: not '', '.', '..', no '/' or NUL, at most NAME_MAX bytes."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    return len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX


@dataclass
class FileHandle:
    node: Node
    file: OpenFile | None  # the pinned version read from the cache; None when `writer` serves
    writer: WriteFile | None = None
    append: bool = False
    cached: bool = False  # may use the kernel's page cache (counted in node.cached_opens)
    direct: bool = False  # reads past the kernel's page cache (direct_io), an mmap of it aside
    opener: int = 0  # the process that opened it (a direct handle's), and how many small
    small_reads: int = 0  # pieces it read each where the last read ended (fuse/operations.py)
    passthrough: bool = False  # read by the kernel from a backing file
    held: HeldFile | None = None  # the verified object file of its version, if one is held
    read_end: int = 0  # the furthest byte read through the mount


@dataclass
class DirHandle:
    node: Node
    entries: list[FileStatus] = field(default_factory=list)
    batches: AsyncIterator[list[FileStatus]] | None = None  # the listing, one request's entries at a time
    complete: bool = False
