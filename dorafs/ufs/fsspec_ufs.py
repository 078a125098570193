"""fsspec adapter for every scheme without its own adapter (file, memory, hdfs, gs, ...).

Subtleties:
- One fsspec filesystem per scheme, built with its defaults (credentials, namenode...
  come from the library's own configuration), created on first use in a thread: some
  constructors connect. fsspec's listing cache is turned off where the class takes the
  option: dorafs caches metadata itself, with its own TTLs.
- Paths are fsspec's own (`_strip_protocol`): `file:///data/x` → `/data/x`,
  `memory://x/y` → `/x/y` (what `fsspec.filesystem("memory").pipe("/x/y", ...)` writes),
  `gs://bucket/key` → `bucket/key`. A host in an `hdfs://` URI is dropped by fsspec.
- Versions: the store's ETag/generation when its info has one, else `{mtime_ns}-{size}`.
  Most of these stores have no conditional read, so `read` compares the version before
  and after reading the range: best-effort. A rewrite that keeps both size and mtime
  (within the store's mtime resolution) between the two checks goes unseen.
- Only regular files and directories are listed: fifos, sockets and broken symlinks are
  skipped (reading a fifo would block a thread forever). Local symlinks are followed.
- Writes: an upload's parts go into a local temporary file, which `complete` moves into
  place: by a rename in the target's directory for local files (readers see the old or
  the new file, whole), by `put_file` elsewhere (as atomic as the store makes it).
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import fsspec
import trio

from dorafs.errors import (
    DoraError, Exists, InvalidRequest, IsADirectory, NotADirectory, NotEmpty, NotFound, StaleVersion, UfsError,
)
from dorafs.ufs.base import NEW, CommitConflict, FileStatus, UnderFileSystem, Upload

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE = 1000  # entries per listing page, like an S3 page
_VERSION_KEYS = ("ETag", "etag", "generation")
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created")


def _seconds(value: Any) -> float | None:
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _seconds(_dt.datetime.fromisoformat(value))
        except ValueError:
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _status(info: dict) -> FileStatus:
    name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
    mtime = next((t for t in (_seconds(info.get(k)) for k in _TIME_KEYS) if t is not None), 0.0)
    if info.get("type") == "directory":
        return FileStatus(name=name, is_dir=True, mtime=mtime)
    size = int(info.get("size") or 0)
    version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k) not in (None, "")), "")
    return FileStatus(
        name=name, is_dir=False, size=size, mtime=mtime,
        version=version or f"{round(mtime * 1e9)}-{size}",
    )


def _failure(op: str, uri: str, exc: Exception) -> DoraError:
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{op} {uri}: no such file or directory")
    if isinstance(exc, FileExistsError):
        return Exists(f"{op} {uri}: exists")
    if isinstance(exc, IsADirectoryError):
        return IsADirectory(f"{op} {uri}: is a directory")
    if isinstance(exc, NotADirectoryError):
        return NotADirectory(f"{op} {uri}: not a directory")
    if isinstance(exc, OSError) and exc.errno == _errno.ENOTEMPTY:
        return NotEmpty(f"{op} {uri}: directory not empty")
    if isinstance(exc, PermissionError):
        return UfsError(f"{op} {uri}: permission denied", errno=_errno.EACCES)
    return UfsError(f"{op} {uri}: {type(exc).__name__}: {exc}")


class FsspecUfs(UnderFileSystem):
    """Every URI of one scheme, through one fsspec filesystem."""

    def __init__(self, scheme: str, threads: int = 16):
        self.scheme = scheme
        self._limiter = trio.CapacityLimiter(threads)
        self._fs: Any = None
        self._fs_lock = trio.Lock()

    def _make_fs(self) -> Any:
        try:
            cls = fsspec.get_filesystem_class(self.scheme)
        except ValueError as exc:
            raise InvalidRequest(f"unknown UFS scheme {self.scheme}://") from exc
        except ImportError as exc:  # e.g. gs:// without gcsfs installed
            raise InvalidRequest(f"UFS scheme {self.scheme}:// is not usable here: {exc}") from exc
        try:
            return cls(use_listings_cache=False)
        except TypeError:  # a constructor that does not take the option
            return cls()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._fs is None:
            async with self._fs_lock:
                if self._fs is None:
                    self._fs = await trio.to_thread.run_sync(self._make_fs, limiter=self._limiter)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _path(self, uri: str) -> str:
        cls = type(self._fs)
        return cls._strip_protocol(uri) or cls.root_marker

    def _entry(self, info: dict) -> FileStatus | None:
        """Status of a listing entry, following local symlinks; None to skip it."""
        if info.get("islink"):
            try:
                info = self._fs.info(info["name"])
            except OSError:
                return None  # broken or unreadable link
        if info.get("type") not in ("file", "directory"):
            return None
        return _status(info)

    # -- the interface ----------------------------------------------------------------

    async def stat(self, uri: str) -> FileStatus:
        def info() -> dict:
            return self._fs.info(self._path(uri))

        try:
            status = _status(await self._run(info))
        except FileNotFoundError as exc:
            raise NotFound(f"no such file or directory: {uri}") from exc
        except NotADirectoryError as exc:  # a path through a file: `file/x`
            raise NotFound(f"no such file or directory: {uri}") from exc
        except (OSError, ValueError) as exc:
            raise _failure("stat", uri, exc) from exc
        return status

    async def list_batches(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        def listing() -> list[FileStatus]:
            path = self._path(uri)
            infos = self._fs.ls(path, detail=True)
            # fsspec's `ls` of a file answers the file itself.
            if len(infos) == 1 and infos[0].get("type") != "directory":
                if str(infos[0]["name"]).rstrip("/") == path.rstrip("/"):
                    raise NotADirectoryError(path)
            own = path.rstrip("/")
            entries = {}
            for info in infos:
                if str(info["name"]).rstrip("/") == own:  # some stores list the dir itself
                    continue
                status = self._entry(info)
                if status is not None and status.name:
                    entries.setdefault(status.name, status)
            return [entries[n] for n in sorted(entries)]

        try:
            entries = await self._run(listing)
        except FileNotFoundError as exc:
            raise NotFound(f"no such directory: {uri}") from exc
        except NotADirectoryError as exc:
            raise NotADirectory(f"not a directory: {uri}") from exc
        except (OSError, ValueError) as exc:
            raise _failure("list", uri, exc) from exc
        for start in range(0, len(entries), PAGE):
            yield entries[start:start + PAGE]

    async def read(self, uri: str, offset: int, length: int, version: str, progress=None) -> bytes:
        """Read in one piece (the library's own call); `progress` learns nothing until the end."""
        if length <= 0:
            return b""

        def read_range() -> bytes:
            path = self._path(uri)
            if version:
                self._check(path, uri, version)
            data = self._fs.cat_file(path, start=offset, end=offset + length)
            if version:
                self._check(path, uri, version)
            return bytes(data)

        try:
            return await self._run(read_range)
        except FileNotFoundError as exc:
            if version:  # deleted since its version was pinned: that version is gone
                raise StaleVersion(f"deleted since version {version}: {uri}") from exc
            raise NotFound(f"no such file: {uri}") from exc
        except IsADirectoryError as exc:
            raise IsADirectory(f"is a directory: {uri}") from exc
        except (OSError, ValueError) as exc:
            raise _failure("read", uri, exc) from exc

    def _check(self, path: str, uri: str, version: str) -> None:
        status = _status(self._fs.info(path))
        if status.is_dir or status.version != version:
            raise StaleVersion(f"changed since version {version}: {uri}")

    async def aclose(self) -> None:
        self._fs = None

    # -- writes (the mount's; see base.py) --------------------------------------------

    def _is_local(self) -> bool:
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self._fs, LocalFileSystem)

    async def _change(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        try:
            return await self._run(fn)
        except (OSError, ValueError) as exc:
            raise _failure(op, uri, exc) from exc

    async def put(self, uri: str, data: bytes, expect: str | None = None) -> FileStatus:
        upload = await self.start_upload(uri, max(len(data), 1), expect)
        try:
            await upload.put_part(1, data)
            return await upload.complete(1)
        except BaseException:
            await upload.abort()
            raise

    async def start_upload(self, uri: str, part_size: int, expect: str | None = None) -> Upload:
        await self._run(lambda: None)  # the filesystem exists before the upload does
        fd, temp = tempfile.mkstemp(prefix="dorafs-upload-")
        upload = FsspecUpload(self, uri, part_size, fd, temp)
        upload.expect = expect
        return upload

    async def _check_expected(self, uri: str, expect: str | None) -> None:
        """A conditional write's check (not atomic with the write: fsspec stores have no
        conditional writes; this narrows the window to the move into place)."""
        if expect is None:
            return
        try:
            current: FileStatus | None = await self.stat(uri)
        except NotFound:
            current = None
        if expect == NEW and current is None or current is not None and current.version == expect:
            return
        now = "no object" if current is None else f"version {current.version}"
        was = "no object" if expect == NEW else f"version {expect}"
        message = f"{uri} changed while it was written here: staged from {was}, the store now has {now}"
        log.warning("%s; this commit is refused and the written bytes stay staged", message)
        raise CommitConflict(message)

    async def delete(self, uri: str) -> None:
        path = self._path(uri)
        await self._change("delete", uri, lambda: self._fs.rm_file(path))

    async def make_dir(self, uri: str) -> None:
        path = self._path(uri)
        await self._change("mkdir", uri, lambda: self._fs.mkdir(path, create_parents=False))

    async def remove_dir(self, uri: str) -> None:
        path = self._path(uri)
        await self._change("rmdir", uri, lambda: self._fs.rmdir(path))

    async def rename(self, src: str, dst: str, is_dir: bool) -> None:
        src_path, dst_path = self._path(src), self._path(dst)
        await self._change("rename", src, lambda: self._fs.mv(src_path, dst_path, recursive=is_dir))


class FsspecUpload(Upload):
    """Parts written at their offsets into a local temporary file, moved into place at the end."""

    def __init__(self, ufs: FsspecUfs, uri: str, part_size: int, fd: int, temp: str):
        self.ufs, self.uri, self.part_size, self.fd, self.temp = ufs, uri, part_size, fd, temp
        self.sizes: dict[int, int] = {}
        self.expect: str | None = None

    async def put_part(self, number: int, data: bytes) -> None:
        offset = (number - 1) * self.part_size
        await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset)
        self.sizes[number] = len(data)

    async def complete(self, count: int) -> FileStatus:
        ufs, size = self.ufs, (count - 1) * self.part_size + self.sizes.get(count, 0)
        path = ufs._path(self.uri)
        await ufs._check_expected(self.uri, self.expect)

        def move_into_place() -> None:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            if ufs._is_local():  # a rename in the target's directory: never half a file
                staged = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.dorafs-{uuid.uuid4().hex}")
                try:
                    shutil.move(self.temp, staged)
                    os.replace(staged, path)
                except BaseException:
                    if os.path.exists(staged):
                        os.unlink(staged)
                    raise
            else:
                ufs._fs.put_file(self.temp, path)

        try:
            await ufs._change("upload", self.uri, move_into_place)
        finally:
            await self.abort()
        return await ufs.stat(self.uri)

    async def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.temp)
        except FileNotFoundError:
            pass
