"""Open file and directory handles of the mount, and which names the kernel can show."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dorafs.client import OpenFile
from dorafs.client.writes import WriteFile
from dorafs.fuse.inodes import Node
from dorafs.ufs import FileStatus

NAME_MAX = 255


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


@dataclass
class DirHandle:
    node: Node
    entries: list[FileStatus] = field(default_factory=list)
    pages: AsyncIterator[list[FileStatus]] | None = None
    complete: bool = False
