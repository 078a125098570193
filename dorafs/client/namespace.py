"""Changes to the namespace made through a mount: new files and directories, unlink,
rmdir, rename, in terms of URIs.

Subtleties:
- Every change is checked against the UFS itself (not the workers' caches, which may be
  up to a TTL old) for existence and emptiness, goes straight to the UFS, then has the
  workers forget what they kept of the changed URIs.
- The mount knows what the UFS does not yet: files being created through it and not
  uploaded, and files it still reads at a pinned version. It tells the namespace through
  `Local` (asked when the answer is needed, after the UFS was asked), so a pending file
  counts as there for EEXIST and ENOTEMPTY, and a file read here keeps its pages on the
  workers after it is unlinked or replaced (they age out of the caches as any page).
- A directory cannot be moved into itself (EINVAL); a directory replaces only an empty
  directory, a file only a file. Replacing an empty directory removes it first, since
  S3 has no atomic replace. Moving a directory on S3 is a copy and a delete of every
  key under it (dorafs/ufs/s3.py); the workers forget the whole subtree at both names.
- `path` arguments name the file in error messages only (the mount's relative path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from dorafs.errors import Exists, InvalidRequest, IsADirectory, NotADirectory, NotEmpty, NotFound
from dorafs.ufs import FileStatus


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


class Local(Protocol):
    """What the mount knows of its own paths that the UFS may not."""

    def pending(self, path: str) -> bool:
        """A file is being created at `path` through this mount (not in the UFS yet)."""

    def pending_under(self, path: str) -> bool:
        """A file is being created somewhere under the directory `path` through this mount."""

    def read_here(self, path: str) -> bool:
        """A handle of this mount still reads the file at `path` at its pinned version."""

    def replaced(self, path: str) -> None:
        """The file at `path` is about to be replaced: its pending writes must go nowhere."""


@dataclass(frozen=True)
class Renamed:
    is_dir: bool  # a directory was moved
    replaced: bool  # something was at the new name


class Namespace:
    def __init__(self, client):
        self.client = client

    async def status(self, uri: str) -> FileStatus | None:
        """The UFS's own answer (not a cached one): what a change must be checked against."""
        try:
            return await self.client.ufs.get(uri).stat(uri)
        except NotFound:
            return None

    async def existing_file(self, uri: str, path: str) -> FileStatus | None:
        """The file a create(2) at `uri` would open, None if there is none; EISDIR for a directory."""
        status = await self.status(uri)
        if status is not None and status.is_dir:
            raise IsADirectory(path)
        return status

    async def make_file(self, uri: str, path: str, local: Local) -> FileStatus:
        """An empty file at `uri` (mknod); EEXIST if anything is there, pending included."""
        if await self.status(uri) is not None or local.pending(path):
            raise Exists(path)
        status = await self.client.ufs.get(uri).put(uri, b"")
        await self.client.invalidate(uri)
        return status

    async def make_dir(self, uri: str, path: str, local: Local) -> FileStatus:
        """A directory at `uri`; EEXIST if anything is there, pending included."""
        if local.pending(path) or await self.status(uri) is not None:
            raise Exists(path)
        await self.client.ufs.get(uri).make_dir(uri)
        await self.client.invalidate(uri)
        return FileStatus(name=_name(uri), is_dir=True, mtime=time.time())

    async def unlink(self, uri: str, path: str, local: Local) -> None:
        """Remove the file at `uri`. A pending file not in the UFS yet is no error (the
        mount drops its writes); a file read here keeps its pages on the workers."""
        pending = local.pending(path)
        status = await self.status(uri)
        if status is None and not pending:
            raise NotFound(path)
        if status is not None and status.is_dir:
            raise IsADirectory(path)
        if status is not None:
            await self.client.ufs.get(uri).delete(uri)
            await self.client.invalidate(uri, pages=not local.read_here(path))

    async def remove_dir(self, uri: str, path: str, local: Local) -> None:
        """Remove the empty directory at `uri`."""
        status = await self.status(uri)
        if status is None:
            raise NotFound(path)
        if not status.is_dir:
            raise NotADirectory(path)
        await self.require_empty(uri, path, lambda: local.pending_under(path))
        await self.client.ufs.get(uri).remove_dir(uri)
        await self.client.invalidate(uri, recursive=True)

    async def require_empty(self, uri: str, path: str, pending: Callable[[], bool] = lambda: False) -> None:
        """ENOTEMPTY unless the directory has no entry in the UFS and none `pending` here."""
        if pending():
            raise NotEmpty(path)
        async for page in self.client.ufs.get(uri).list_batches(uri):
            if page:
                raise NotEmpty(path)

    async def rename(self, src_uri: str, src_path: str, dst_uri: str, dst_path: str, local: Local, *,
                     noreplace: bool = False) -> Renamed:
        """Move `src_uri` to `dst_uri`, replacing what is there if allowed. What is being
        written at or under the source must be in the UFS before (the caller commits it)."""
        src = await self.status(src_uri)
        if src is None:
            raise NotFound(src_path)
        dst = await self.status(dst_uri)
        if dst is None and local.pending(dst_path):
            dst = FileStatus(name=_name(dst_uri), is_dir=False)  # being created through this mount
        if dst is not None and noreplace:
            raise Exists(dst_path)
        ufs = self.client.ufs.get(src_uri)
        if src.is_dir:
            if dst_path.startswith(src_path + "/"):
                raise InvalidRequest(f"cannot move {src_path} into itself")
            if dst is not None:
                if not dst.is_dir:
                    raise NotADirectory(dst_path)
                await self.require_empty(dst_uri, dst_path, lambda: local.pending_under(dst_path))
                await ufs.remove_dir(dst_uri)
        elif dst is not None and dst.is_dir:
            raise IsADirectory(dst_path)
        local.replaced(dst_path)
        await ufs.rename(src_uri, dst_uri, src.is_dir)
        await self.client.invalidate(src_uri, recursive=src.is_dir, pages=not local.read_here(src_path))
        await self.client.invalidate(dst_uri, recursive=src.is_dir, pages=not local.read_here(dst_path))
        return Renamed(is_dir=src.is_dir, replaced=dst is not None)
