"""The one async interface every under file system (UFS) adapter implements.

URIs are full and absolute (`s3://bucket/key`, `file:///data/x`); a directory's URI has no
trailing slash. Adapters never block the trio loop: every blocking library call runs in a
thread behind the adapter's own `trio.CapacityLimiter`.

Versions pin reads: `read(uri, offset, length, version)` returns bytes of exactly that
version or raises `StaleVersion`, never bytes of another version.
"""

from __future__ import annotations

import stat as _stat
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FileStatus:
    """Status of a file or directory in a UFS."""

    name: str  # last path component; '' for a root
    is_dir: bool
    size: int = 0
    mtime: float = 0.0  # seconds since the epoch
    version: str = ""  # S3 ETag, or mtime+size for fsspec stores; '' for directories

    @property
    def mode(self) -> int:
        return (_stat.S_IFDIR | 0o755) if self.is_dir else (_stat.S_IFREG | 0o644)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FileStatus":
        return cls(
            name=str(data["name"]),
            is_dir=bool(data["is_dir"]),
            size=int(data.get("size", 0)),
            mtime=float(data.get("mtime", 0.0)),
            version=str(data.get("version", "")),
        )


def join(uri: str, name: str) -> str:
    """Child URI of a directory URI."""
    return uri.rstrip("/") + "/" + name if not uri.endswith("://") else uri + name


def parent(uri: str) -> str | None:
    """The directory URI containing a normalized `uri`; None for a root (`s3://bucket`, `file:///`)."""
    scheme, _, rest = uri.partition("://")
    head, sep, _ = rest.rpartition("/")
    if not sep or rest == "/":
        return None
    return f"{scheme}://{head or '/'}"


def normalize(uri: str) -> str:
    """Canonical form: a scheme is required, and no trailing slash except after `scheme://`."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme:
        raise ValueError(f"not a UFS URI (expected scheme://...): {uri!r}")
    rest = rest.rstrip("/")
    if scheme == "file" and not rest.startswith("/"):
        rest = "/" + rest
    return f"{scheme.lower()}://{rest}"


class UnderFileSystem(ABC):
    """Async access to one kind of store. One instance serves every URI of its scheme."""

    @abstractmethod
    async def stat(self, uri: str) -> FileStatus:
        """Status of a file or directory; `NotFound` when neither exists."""

    @abstractmethod
    def list_pages(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """Children of a directory, streamed a page at a time in name order.

        Raises `NotFound` if the directory does not exist, `NotADirectory` for a file.
        """

    @abstractmethod
    async def read(self, uri: str, offset: int, length: int, version: str) -> bytes:
        """Bytes [offset, offset+length) of exactly `version`, short only at end of file.

        `StaleVersion` if the object is no longer at `version`; `UfsError` on failure.
        """

    async def aclose(self) -> None:
        """Release connections and threads."""
