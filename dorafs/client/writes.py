"""Files being written through the mount: staged on local disk, uploaded to the UFS.

One `WriteFile` per file being written, shared by every handle open on it. Its bytes
live in a staging file (an unnamed local file in the mount's staging directory), so every
kind of write works the same way: sequential, random, append, truncate, overwrite.

Uploads:
- A file of at most one part (`upload_part_size`) is sent in one request at commit.
- A larger one is a multipart upload. While the writer is sequential, every part it has
  written past is sent at once, in the background, so a large file streams to the UFS
  as it is written and commit sends only the last part. At most `upload_concurrency`
  parts are in flight across the mount, which bounds the memory uploads take.
- A part changed after it was sent is sent again at commit (a part sent twice under one
  number replaces the first).
- `commit` (the mount calls it from flush, fsync and the last release) sends what is not
  sent yet and completes the upload. Nothing is visible in the UFS before that, and
  other readers see the previous object until it succeeds.
- Commits tell the truth. The adapter decides whether a request whose answer was lost
  took effect (dorafs/ufs/s3.py), so a commit fails only when the object is not there.
  A failed commit keeps the staged bytes and the pending upload with the parts it
  already holds: the next fsync or close sends only what is missing and completes it.
  The upload is aborted when the file is dropped (last close), so no partial object
  stays behind. A part that failed in the background is sent again by the next commit.
- Commits are conditional: a file staged from version V is committed only while the
  UFS still holds V, a new file only while nothing is there (`expect`). Otherwise the
  commit fails with ESTALE (`CommitConflict`), nothing is overwritten, both versions are
  logged, and the staged bytes stay. A file moved by a rename is committed
  unconditionally afterwards (its version at the new name is not known here).

Staging space: a file holds as much of the `staging_size` budget as its size. When the
budget is exhausted, parts already sent are released from their staging files (hole
punching) before anything fails, and writers wait for parts in flight: a sequential
writer streams a file larger than the whole staging space. A write or read of a released
part fails (ENOSPC, EIO): its bytes are only in the pending upload. When nothing can be
released, a write that needs more space fails with ENOSPC and nothing is uploaded.

Writes of kernel-request size go to the staging file with a plain `pwrite` on the trio
loop (local page cache, microseconds: cheaper than a thread hop); part-sized reads for
uploads run in threads.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import trio

from dorafs.config import MountConfig, user_cache_dir
from dorafs.errors import DoraError, IsADirectory, NoSpace, StaleVersion, UfsError, sole
from dorafs.ufs import FileStatus, UfsSet
from dorafs.ufs.base import NEW, Upload

log = logging.getLogger(__name__)

MAX_PARTS = 10_000  # S3's limit of parts per upload: files end at 10000 x upload_part_size

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [offset, offset+length) of a file; False if unsupported."""
    return _libc.fallocate(fd, _PUNCH_HOLE, offset, length) == 0


class Staging:
    """The mount's staging space: a private directory, a byte budget, the upload tasks."""

    def __init__(self, config: MountConfig, ufs: UfsSet):
        self.config = config
        self.ufs = ufs
        self.limit = config.staging_size
        self.part_size = config.upload_part_size
        self.used = 0
        self.files: set[WriteFile] = set()
        self.uploads = trio.CapacityLimiter(config.upload_concurrency)
        self.dir: Path | None = None
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the staging directory and the background part uploads, until cancelled."""
        base = self.config.staging_dir or (user_cache_dir() / "staging")
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir = Path(tempfile.mkdtemp(prefix="mount-", dir=base))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for f in list(self.files):
                    await f.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def open(self, uri: str, expect: str | None = NEW) -> WriteFile:
        """A new, empty staged file for `uri`, to be committed while the UFS still holds
        the version `expect` (NEW: no object; None: unconditionally)."""
        if self.dir is None:
            raise DoraError("staging is not running")
        f = WriteFile(self, uri, expect)
        self.files.add(f)
        return f

    def statistics(self) -> dict:
        return {"files": len(self.files), "used": self.used, "limit": self.limit}

    async def reserve(self, nbytes: int) -> None:
        """Take `nbytes` of the budget: release sent parts, wait for parts in flight, or ENOSPC."""
        while self.used + nbytes > self.limit:
            short = self.used + nbytes - self.limit
            for f in list(self.files):
                short -= f.release_sent(short)
                if short <= 0:
                    break
            if self.used + nbytes <= self.limit:
                break
            if not any(f.inflight for f in self.files):
                raise NoSpace(f"staging space exhausted ({self.used} of {self.limit} bytes in use; "
                              "raise staging_size)")
            await self._changed.wait()
        self.used += nbytes

    def free(self, nbytes: int) -> None:
        self.used -= nbytes
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def start_soon(self, fn, *args) -> bool:
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args)
        return True


class WriteFile:
    """One file's staged bytes and its upload. `uri` is None once the file was unlinked."""

    def __init__(self, staging: Staging, uri: str, expect: str | None = NEW):
        self.staging = staging
        self._uri: str | None = uri
        self.expect = expect  # the version the next commit requires (NEW: none; None: no condition)
        self.ps = staging.part_size
        self._file = tempfile.TemporaryFile(dir=staging.dir)
        self.fd = self._file.fileno()
        self.size = 0
        self.dirty = False
        self.handles = 0  # open file handles using this file
        self.mtime = 0.0
        self._reserved = 0
        self._changes = 0  # bumped by every modification
        self._part_changed: dict[int, int] = {}  # part index -> `_changes` at its last change
        self._sequential_end = 0
        self._upload: Upload | None = None
        self._upload_lock = trio.Lock()
        self._commit_lock = trio.Lock()
        self.sent: set[int] = set()  # parts whose current bytes are in `_upload`
        self.released: set[int] = set()  # sent parts whose staged bytes were freed
        self.inflight: dict[int, trio.Event] = {}
        self.failed: DoraError | None = None  # set when the staged bytes can no longer be trusted
        self.last_error: DoraError | None = None  # of the last commit; cleared by a successful one
        self._send_error: Exception | None = None  # of a background part send, after boto3's retries

    def __repr__(self) -> str:
        return f"WriteFile({self.uri!r}, size={self.size}, dirty={self.dirty})"

    @property
    def uri(self) -> str | None:
        return self._uri

    @uri.setter
    def uri(self, value: str | None) -> None:
        if value is not None and value != self._uri:
            self.expect = None  # moved: the version under the new name is not known here
        self._uri = value

    # -- content ----------------------------------------------------------------------

    async def load(self, client, status: FileStatus) -> None:
        """Fill the staging file with the version `status` of the file, through the cache."""
        await self._hold(status.size)
        opened = client.open_pinned(self.uri, status)
        chunk = 8 * client.page_size
        offset = 0
        try:
            while offset < status.size:
                data = await client.read(opened, offset, min(chunk, status.size - offset))
                if not data:
                    raise UfsError(f"{self.uri} ended at {offset} of {status.size} bytes while staging it")
                await trio.to_thread.run_sync(os.pwrite, self.fd, data, offset)
                offset += len(data)
        finally:
            client.close(opened)  # its readahead ends with it
        os.ftruncate(self.fd, status.size)  # a first attempt at another version may have been longer
        self.size = status.size
        self._fit_reservation()
        self.mtime = status.mtime
        self.expect = status.version or None

    def read(self, offset: int, size: int) -> bytes:
        self._check()
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        if any(i in self.released for i in range(offset // self.ps, (end - 1) // self.ps + 1)):
            raise UfsError(f"{self.uri}: bytes {offset}-{end} were uploaded and released from staging",
                           errno=_errno.EIO)
        return os.pread(self.fd, end - offset, offset)

    async def write(self, offset: int, data: bytes) -> int:
        self._check()
        if not data:
            return 0
        end = offset + len(data)
        if end > MAX_PARTS * self.ps:
            raise DoraError(f"{self.uri}: files end at {MAX_PARTS} parts of {self.ps} bytes "
                            "(raise upload_part_size)", errno=_errno.EFBIG)
        first, last = offset // self.ps, (end - 1) // self.ps
        self._refuse_released(first, last)
        await self._hold(end)
        self._refuse_released(first, last)  # released while waiting for space
        os.pwrite(self.fd, data, offset)
        self.size = max(self.size, end)
        self._touch(first, last)
        sequential = offset == self._sequential_end
        self._sequential_end = end
        if sequential:  # stream the parts this write completed
            for index in range(first, end // self.ps):
                if index not in self.sent and index not in self.inflight:
                    self.staging.start_soon(self._send_background, index)
        return len(data)

    async def truncate(self, size: int) -> None:
        self._check()
        if size > MAX_PARTS * self.ps:
            raise DoraError(f"{self.uri}: too large for {MAX_PARTS} parts", errno=_errno.EFBIG)
        cut = size // self.ps
        if size % self.ps and cut in self.released:
            raise NoSpace(f"{self.uri}: the part holding byte {size} was uploaded and released from staging")
        await self._hold(size)
        os.ftruncate(self.fd, size)
        old_last = (self.size - 1) // self.ps if self.size else 0
        self.size = size
        self.released = {i for i in self.released if (i + 1) * self.ps <= size}
        self._touch(min(cut, old_last), max(cut, old_last))
        self._fit_reservation()

    def _refuse_released(self, first: int, last: int) -> None:
        if any(i in self.released for i in range(first, last + 1)):
            raise NoSpace(f"{self.uri}: this region was uploaded and released from staging to make room; "
                          "raise staging_size to rewrite it")

    def _touch(self, first: int, last: int) -> None:
        self._changes += 1
        for index in range(first, last + 1):
            self._part_changed[index] = self._changes
            self.sent.discard(index)
        self.dirty = True

    def _check(self) -> None:
        if self.failed is not None:
            raise self.failed

    # -- staging space ----------------------------------------------------------------

    async def _hold(self, size: int) -> None:
        """Hold budget for a file of `size` bytes (less its released parts)."""
        while True:
            want = max(self.size, size) - len(self.released) * self.ps
            if want <= self._reserved:
                return
            extra = want - self._reserved
            await self.staging.reserve(extra)
            self._reserved += extra

    def _fit_reservation(self) -> None:
        want = self.size - len(self.released) * self.ps
        if self._reserved > want:
            self.staging.free(self._reserved - want)
            self._reserved = want

    def release_sent(self, wanted: int) -> int:
        """Free up to `wanted` bytes by punching out parts already sent; bytes freed."""
        freed = 0
        for index in sorted(self.sent - self.released):
            if freed >= wanted:
                break
            if index in self.inflight or (index + 1) * self.ps > self.size:
                continue
            if not punch_hole(self.fd, index * self.ps, self.ps):
                return freed
            self.released.add(index)
            self._reserved -= self.ps
            self.staging.used -= self.ps
            freed += self.ps
        return freed

    # -- uploads ----------------------------------------------------------------------

    async def _upload_for(self, uri: str) -> Upload:
        async with self._upload_lock:
            if self._upload is None:
                self._upload = await self.staging.ufs.get(uri).start_upload(uri, self.ps, self.expect)
            return self._upload

    async def _send(self, index: int) -> None:
        """Send part `index` of the staged bytes (one sender per part at a time)."""
        while index in self.inflight:
            await self.inflight[index].wait()
        if index in self.sent or self.uri is None:
            return
        done = self.inflight[index] = trio.Event()
        try:
            async with self.staging.uploads:
                changes = self._changes
                length = min(self.ps, self.size - index * self.ps)
                data = await trio.to_thread.run_sync(os.pread, self.fd, length, index * self.ps)
                upload = await self._upload_for(self.uri)
                await upload.put_part(index + 1, data)
            if self._part_changed.get(index, 0) <= changes and upload is self._upload:
                self.sent.add(index)
        finally:
            del self.inflight[index]
            done.set()
            self.staging.notify()

    async def _send_background(self, index: int) -> None:
        try:
            await self._send(index)
        except Exception as exc:  # the next commit reports it (a later one sends the part again)
            log.debug("background upload of part %d of %s failed: %s", index + 1, self.uri, exc)
            self._send_error = exc

    async def _abort(self) -> None:
        with trio.CancelScope(shield=True):
            for event in list(self.inflight.values()):
                await event.wait()
            upload, self._upload = self._upload, None
            self.sent.clear()
            self._send_error = None
            if upload is not None:
                await upload.abort()

    async def commit(self) -> FileStatus | None:
        """Upload the staged bytes if they changed since the last commit; the new status.

        Fails only when the object did not land; then the staged bytes and the upload's
        parts stay for the next commit."""
        self._check()
        async with self._commit_lock:
            if not self.dirty or self.uri is None:
                return None
            uri, changes = self.uri, self._changes
            ufs = self.staging.ufs.get(uri)
            try:
                if self.size <= self.ps and not self.released:
                    if self._upload is not None:
                        await self._abort()
                    data = await trio.to_thread.run_sync(os.pread, self.fd, self.size, 0)
                    status = await ufs.put(uri, data, self.expect)
                else:
                    for event in list(self.inflight.values()):
                        await event.wait()
                    self._send_error = None  # its part is not in `sent`: sent again below
                    count = (self.size + self.ps - 1) // self.ps
                    async with trio.open_nursery() as nursery:
                        for index in range(count):
                            if index not in self.sent:
                                nursery.start_soon(self._send, index)
                    upload = await self._upload_for(uri)
                    status = await upload.complete(count)
                    self._upload = None
                    self.sent.clear()
            except BaseException as failure:
                await self._after_failure()
                exc = sole(failure)  # one part failed: its error is the cause
                self.last_error = exc if isinstance(exc, DoraError) else UfsError(f"upload of {uri} failed")
                if isinstance(exc, DoraError):
                    raise exc from None
                if isinstance(failure, Exception):
                    raise UfsError(f"upload of {uri}: {type(exc).__name__}: {exc}") from failure
                raise
            self.last_error = None
            self.expect = status.version or None
            if self._changes == changes:
                self.dirty = False
            if self.released:  # the staged copy has holes: this handle is done
                self.failed = DoraError(f"{uri} was written past the staging space; reopen it to change it "
                                        "again", errno=_errno.EIO)
            self.mtime = status.mtime
            return status

    async def _after_failure(self) -> None:
        """Keep the upload for the next commit, unless the store no longer has it."""
        with trio.CancelScope(shield=True):
            for event in list(self.inflight.values()):
                await event.wait()
        upload = self._upload
        if upload is None or not getattr(upload, "gone", False):
            return
        self._upload = None
        self.sent.clear()
        if self.released:  # those bytes were only in the lost upload
            self.failed = UfsError(f"{self.uri}: the upload was lost after parts were released from staging; "
                                   "the file keeps its previous content")

    async def close(self) -> None:
        """Drop the staged bytes and any pending upload."""
        if self._file.closed:
            return
        self.staging.files.discard(self)
        await self._abort()
        self._file.close()
        self.staging.free(self._reserved)
        self._reserved = 0


class Writes:
    """The mount's writing policy, over its `Staging`: from which version a file is
    staged (its commit's condition), how it is filled, what a commit makes the workers
    forget, and when the last handle's close uploads.

    Subtleties:
    - A file is staged from the version the mount last saw (`NEW` for a file not in the
      UFS): a commit lands only while the UFS still holds it (see `WriteFile.commit`).
    - Filling reads through the cache; a version the workers no longer have (changed
      since they looked: ESTALE) is read again as the UFS states it now.
    - After a commit the workers drop the URI's status, its parent's listing and the
      old version's pages.
    - The last close uploads only what no flush did (writes through a mapping) and only
      if no upload failed; its errors are logged, since the kernel drops them.
    """

    def __init__(self, client, staging: Staging, counted: Callable[[str, int], None] | None = None):
        self.client = client
        self.staging = staging
        self.counted = counted or (lambda result, size: None)  # each upload: "ok" or "failed", bytes

    async def stage(self, uri: str, version: str | None, *, load: bool, path: str = "") -> WriteFile:
        """A new WriteFile for `uri` at `version` (None: not in the UFS), filled with the
        file's bytes if `load`; EISDIR for a directory."""
        writer = self.staging.open(uri, version or NEW)
        try:
            if load:
                await self._load(writer, path or uri)
        except BaseException:
            await writer.close()
            raise
        return writer

    async def _load(self, writer: WriteFile, path: str) -> None:
        uri = writer.uri
        status = await self.client.stat(uri)
        try:
            await writer.load(self.client, status)
        except StaleVersion:  # changed since the workers last looked: ask the UFS
            status = await self.client.ufs.get(uri).stat(uri)
            await writer.load(self.client, status)
        if status.is_dir:
            raise IsADirectory(path)
        writer.dirty = False

    @staticmethod
    async def write(writer: WriteFile, offset: int, data, *, append: bool = False) -> int:
        """Write `data`; an appending handle writes at the file's end, whatever the kernel
        thinks it is."""
        if append:
            offset = writer.size
        written = await writer.write(offset, data)
        writer.mtime = time.time()
        return written

    @staticmethod
    async def truncate(writer: WriteFile, size: int) -> None:
        await writer.truncate(size)
        writer.mtime = time.time()

    async def commit(self, writer: WriteFile, uri: str,
                     uploaded: Callable[[FileStatus], None] | None = None) -> FileStatus | None:
        """Upload the writer's bytes if changed (`uri`: its name if the writer has none
        now); `uploaded` hears of the new status before the workers are told. None if
        nothing needed uploading."""
        try:
            status = await writer.commit()
        except DoraError:
            self.counted("failed", 0)
            raise
        if status is None:
            return None
        self.counted("ok", status.size)
        if uploaded is not None:
            uploaded(status)
        await self.client.invalidate(writer.uri or uri, pages=True)
        return status

    async def release(self, writer: WriteFile, uri: str, *, upload: bool,
                      uploaded: Callable[[FileStatus], None] | None = None,
                      dropped: Callable[[], None] | None = None) -> None:
        """One handle less on `writer`. The last one uploads what is left (if `upload`),
        then `dropped` lets the caller forget the writer, and its staged bytes go."""
        writer.handles -= 1
        if writer.handles > 0:
            return
        try:
            if upload and writer.dirty and writer.failed is None and writer.last_error is None:
                await self.commit(writer, uri, uploaded)
        except DoraError as exc:  # release's errors never reach the application
            log.warning("upload of %s when its last handle closed failed: %s", writer.uri, exc)
        finally:
            if dropped is not None:
                dropped()
            await writer.close()
