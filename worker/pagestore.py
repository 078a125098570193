"""Pages on local disk, bounded by bytes, evicted least-recently-used first.

Layout: `ROOT/pages/<oid[:2]>/<oid>_<index>_<checksum>` where oid identifies one version
of one object (`dorafs.pages.object_id`) and checksum is the page's xxh3-64. Keeping the
checksum in the name means the index is rebuilt from a directory walk alone, so a
restarted worker keeps its cache without any side database.

Subtleties:
- A page is written to `ROOT/pages/tmp/` and renamed into place: a crash leaves either
  the whole page or a temp file (removed on start), never a torn page under a real name.
- The byte capacity is never exceeded: room is reserved (evicting as needed) before the
  write starts, and the reservation is dropped if the write fails. When writes in
  flight already hold the room, the page is served without being cached.
- Evicted files are unlinked on the trio thread, before the put that evicted them
  continues (one unlink per page written, microseconds on a local disk): a late unlink
  in a thread could delete a page re-cached under the same name in the meantime.
- The index lives on the trio thread; file I/O runs in threads. Readers of a page that
  eviction unlinks concurrently still hold their open fd, so sendfile completes.
- A full or failing cache disk never fails a read: the page is served from memory
  without being cached. A full disk (ENOSPC, EDQUOT) lowers the store's `limit` to the
  bytes it holds, so later pages evict older ones and caching goes on at the size the
  disk really has; the configured capacity is tried again after `REGROW_SECONDS`. A
  failing disk (EIO, EROFS, EACCES...) stops write attempts for `FAULT_RETRY_SECONDS`,
  then one is tried again; a successful write ends the fault. Other errors concern one
  page's path and are only counted. `health()` says what is wrong.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

log = logging.getLogger(__name__)

PageKey = tuple[str, int]  # (object id, page index)
FAULT_RETRY_SECONDS = 5.0  # after a failed write, pages are served uncached this long
REGROW_SECONDS = 60.0  # after a full disk lowered the limit, try the full capacity again
# Write errors that say the disk itself is unusable (others concern one page's path).
DISK_FAULTS = {errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV}


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class PageEntry:
    path: Path
    size: int
    checksum: str


class PageStore:
    def __init__(self, root: Path, capacity: int, *, thread_limiter: trio.CapacityLimiter | None = None):
        self.root = Path(root) / "pages"
        self.tmp = self.root / "tmp"
        self.capacity = capacity
        self.used = 0  # bytes of indexed pages plus reservations for writes in progress
        self.reserved = 0  # bytes reserved by writes in progress
        self.evictions = 0
        self.write_errors = 0
        self.limit = capacity  # capacity, or less while the disk is fuller than we thought
        self.fault: str | None = None  # the last write error, until a write succeeds
        self._retry_at = 0.0
        self._regrow_at = 0.0
        self._index: OrderedDict[PageKey, PageEntry] = OrderedDict()
        self._by_object: dict[str, set[int]] = {}
        self._limiter = thread_limiter or trio.CapacityLimiter(8)

    def __len__(self) -> int:
        return len(self._index)

    # -- start-up ---------------------------------------------------------------------

    def load(self) -> None:
        """Rebuild the index from disk (blocking: call before serving or in a thread)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root.parent, 0o700)
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[float, PageKey, PageEntry]] = []
        for sub in self.root.iterdir():
            if sub == self.tmp or not sub.is_dir():
                continue
            for path in sub.iterdir():
                parsed = _parse_name(path.name) if path.is_file() else None
                if parsed is None and path.is_dir():
                    log.warning("ignoring unexpected directory in page store: %s", path)
                    continue
                if parsed is None:
                    log.warning("removing unrecognised file in page store: %s", path)
                    path.unlink(missing_ok=True)
                    continue
                oid, index, digest = parsed
                st = path.stat()
                found.append((st.st_mtime, (oid, index), PageEntry(path, st.st_size, digest)))
        found.sort(key=lambda item: item[0])  # oldest first: the LRU end
        for _, key, entry in found:
            self._insert(key, entry)
        while self.used > self.capacity and self._index:
            self._unlink(self._evict_one())
        log.info("page store: %d pages, %d bytes of %d", len(self._index), self.used, self.capacity)

    # -- lookups ----------------------------------------------------------------------

    def lookup(self, key: PageKey) -> PageEntry | None:
        entry = self._index.get(key)
        if entry is not None:
            self._index.move_to_end(key)
        return entry

    def peek(self, key: PageKey) -> PageEntry | None:
        """The entry without making it recently used (for reports)."""
        return self._index.get(key)

    def pages_of(self, oid: str) -> set[int]:
        return set(self._by_object.get(oid, ()))

    def health(self) -> str | None:
        """None when caching works; else one line on what degrades it."""
        if self.fault is not None:
            return f"serving without caching: {self.fault}"
        if self.limit < self.capacity:
            return f"cache disk full: caching {self.limit} of {self.capacity} bytes"
        return None

    # -- changes ----------------------------------------------------------------------

    async def put(self, key: PageKey, data: bytes | memoryview, digest: str) -> PageEntry | None:
        """Store a page; None if it cannot be cached (too big, or the disk failed)."""
        if key in self._index:
            return self._index[key]
        now = time.monotonic()
        if self.fault is not None and now < self._retry_at:
            return None  # the disk failed a moment ago: serve without caching
        if self.limit < self.capacity and now >= self._regrow_at:
            log.info("trying the cache's full capacity again (%d bytes)", self.capacity)
            self.limit = self.capacity
        size = len(data)
        if self.reserved + size > self.limit:
            return None  # too big, or writes in flight hold the room: serve without caching
        while self.used + size > self.limit:
            self._unlink(self._evict_one())
        self.used += size  # reserved until the rename lands or fails
        self.reserved += size
        oid, index = key
        final = self.root / oid[:2] / f"{oid}_{index}_{digest}"
        try:
            await trio.to_thread.run_sync(self._write, final, data, limiter=self._limiter)
        except OSError as exc:
            self.write_errors += 1
            self._write_failed(exc, size)
            return None
        finally:
            self.used -= size
            self.reserved -= size
        if self.fault is not None:
            log.info("cache disk writes work again (after: %s)", self.fault)
            self.fault = None
        if key in self._index:  # a concurrent put of the same page won the race
            return self._index[key]
        entry = PageEntry(final, size, digest)
        self._insert(key, entry)
        return entry

    def drop(self, key: PageKey) -> None:
        entry = self._index.pop(key, None)
        if entry is not None:
            self._forget(key, entry)
            self._unlink(entry)

    # -- internals --------------------------------------------------------------------

    def _write_failed(self, exc: OSError, size: int) -> None:
        cause = f"{exc.strerror or exc} ({self.root})"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            held = self.used - self.reserved  # indexed pages: what this disk does hold
            if held < self.limit:
                log.warning("cache disk full (%s): caching at most %d bytes instead of %d; "
                            "pages beyond that are served without caching", cause, held, self.capacity)
                self.limit = held
            self._regrow_at = time.monotonic() + REGROW_SECONDS
            return
        if exc.errno not in DISK_FAULTS:
            log.warning("cannot cache one page (serving it without caching): %s", cause)
            return
        if self.fault is None:
            log.warning("cache disk failed (%s): serving without caching, trying again in %gs",
                        cause, FAULT_RETRY_SECONDS)
        self.fault = cause
        self._retry_at = time.monotonic() + FAULT_RETRY_SECONDS

    def _insert(self, key: PageKey, entry: PageEntry) -> None:
        self._index[key] = entry
        self._by_object.setdefault(key[0], set()).add(key[1])
        self.used += entry.size

    def _forget(self, key: PageKey, entry: PageEntry) -> None:
        self.used -= entry.size
        pages = self._by_object.get(key[0])
        if pages is not None:
            pages.discard(key[1])
            if not pages:
                del self._by_object[key[0]]

    def _evict_one(self) -> PageEntry:
        key, entry = self._index.popitem(last=False)
        self._forget(key, entry)
        self.evictions += 1
        return entry

    @staticmethod
    def _unlink(entry: PageEntry) -> None:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass

    def _write(self, final: Path, data: bytes | memoryview) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)  # a partial page would hold the space a full disk lacks
            raise
        os.close(fd)
        try:
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise


def _parse_name(name: str) -> tuple[str, int, str] | None:
    parts = name.split("_")
    if len(parts) != 3 or len(parts[0]) != 32 or not parts[1].isdigit() or len(parts[2]) != 16:
        return None
    return parts[0], int(parts[1]), parts[2]
