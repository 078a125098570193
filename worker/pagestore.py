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
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

log = logging.getLogger(__name__)

PageKey = tuple[str, int]  # (object id, page index)


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

    # -- changes ----------------------------------------------------------------------

    async def put(self, key: PageKey, data: bytes, digest: str) -> PageEntry | None:
        """Store a page; None if it cannot be cached (too big, or the disk failed)."""
        if key in self._index:
            return self._index[key]
        size = len(data)
        if self.reserved + size > self.capacity:
            return None  # too big, or writes in flight hold the room: serve without caching
        while self.used + size > self.capacity:
            self._unlink(self._evict_one())
        self.used += size  # reserved until the rename lands or fails
        self.reserved += size
        oid, index = key
        final = self.root / oid[:2] / f"{oid}_{index}_{digest}"
        try:
            await trio.to_thread.run_sync(self._write, final, data, limiter=self._limiter)
        except OSError as exc:
            self.write_errors += 1
            log.warning("cannot cache page %s_%d (serving without caching): %s", oid, index, exc)
            return None
        finally:
            self.used -= size
            self.reserved -= size
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

    def _write(self, final: Path, data: bytes) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
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
