"""The one async interface every under file system (UFS) adapter implements.

URIs are full and absolute (`s3://bucket/key`, `file:///data/x`); a directory's URI has no
trailing slash. Adapters never block the trio loop: every blocking library call runs in a
thread behind the adapter's own `trio.CapacityLimiter`.

Versions pin reads: `read(uri, offset, length, version)` returns bytes of exactly that
version or raises `StaleVersion`, never bytes of another version.

Writes (used by the mount, never by workers) replace whole objects: `put` for one that
fits in memory, an `Upload` of numbered parts for a larger one. A write may be
conditional (`expect`): `NEW` when the object must not exist, or the version it must
still be at; otherwise it fails with `CommitConflict` (ESTALE) and changes nothing. Nothing of an object is
visible before `put` returns or `Upload.complete` does, and an aborted upload leaves no
object behind. Namespace changes (`delete`, `make_dir`, `remove_dir`, `rename`) check
nothing beyond what the store itself enforces: the caller (the mount) checks existence
and emptiness first. An adapter that cannot write inherits the defaults, which answer
`ReadOnly` (EROFS).
"""

from __future__ import annotations

import stat as _stat
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from dorafs.errors import ReadOnly, StaleVersion
from dorafs.ufs.retry import Progress

NEW = "*"  # `expect` of a write that creates its object: it must not exist yet


class CommitConflict(StaleVersion):
    """A conditional write refused: the object is no longer at the version the writer
    started from (ESTALE). Nothing was changed."""


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
    def list_batches(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """Children of a directory, streamed a batch (one listing response) at a time in name order.

        Raises `NotFound` if the directory does not exist, `NotADirectory` for a file.
        """

    @abstractmethod
    async def read(self, uri: str, offset: int, length: int, version: str,
                   progress: "Progress | None" = None) -> bytes | bytearray:
        """Bytes [offset, offset+length) of exactly `version`, short only at end of file.

        `StaleVersion` if the object is no longer at `version`; `UfsError` on failure.
        With `progress`, an adapter that streams puts the bytes in `progress.buffer` as
        they arrive and reports them (`Progress.wait_for`); others report them at the end.
        """

    # -- writes: defaults for stores that cannot be written ------------------------------

    async def put(self, uri: str, data: bytes, expect: str | None = None) -> FileStatus:
        """Replace (or create) the object `uri` with `data`; its new status."""
        raise ReadOnly(f"this store cannot be written: {uri}")

    async def start_upload(self, uri: str, part_size: int, expect: str | None = None) -> "Upload":
        """Begin replacing `uri` with parts of `part_size` bytes (the last may be shorter)."""
        raise ReadOnly(f"this store cannot be written: {uri}")

    async def delete(self, uri: str) -> None:
        """Remove the file `uri`."""
        raise ReadOnly(f"this store cannot be written: {uri}")

    async def make_dir(self, uri: str) -> None:
        """Create the directory `uri` (on S3, a `key/` marker object)."""
        raise ReadOnly(f"this store cannot be written: {uri}")

    async def remove_dir(self, uri: str) -> None:
        """Remove the empty directory `uri`."""
        raise ReadOnly(f"this store cannot be written: {uri}")

    async def rename(self, src: str, dst: str, is_dir: bool) -> None:
        """Move a file, or a directory with everything under it, to `dst` (which does not
        exist). Atomic where the store renames (local files), copy-then-delete on S3."""
        raise ReadOnly(f"this store cannot be written: {src}")

    async def aclose(self) -> None:
        """Release connections and threads."""


class Upload(ABC):
    """One object being written in numbered parts (1, 2, ...), then completed or aborted.

    Parts may be sent concurrently and in any order; sending a number again replaces that
    part. Every part but the last is exactly `part_size` bytes.
    """

    @abstractmethod
    async def put_part(self, number: int, data: bytes) -> None:
        """Send part `number`."""

    @abstractmethod
    async def complete(self, count: int) -> FileStatus:
        """Make parts 1..count the object, at once; its new status."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop every part; the object is left as it was. Never raises."""
