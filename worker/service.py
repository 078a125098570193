"""What a worker does, independent of HTTP: serve pages, status and listings.

Pages are filled from the UFS on a miss with a read pinned to the client's version, so
a changed object fails with StaleVersion instead of mixing versions. Concurrent misses
on one page, status or listing share one UFS request (single-flight).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import dataclass

import trio

from dorafs.config import WorkerConfig
from dorafs.errors import CacheFull, InvalidRequest, NotADirectory, NotFound, StaleVersion
from dorafs.pages import object_id, page_count, page_length
from dorafs.singleflight import SingleFlight
from dorafs.ttlcache import MISSING, TtlCache
from dorafs.ufs import FileStatus, UfsSet, normalize
from dorafs.ufs.base import parent as parent_uri
from worker.metrics import WorkerMetrics
from worker.pagestore import PageEntry, PageStore, checksum

log = logging.getLogger(__name__)


@dataclass
class PageResult:
    """A page ready to send: an entry on disk, or bytes in memory when not cached."""

    checksum: str
    size: int
    entry: PageEntry | None = None
    data: bytes | None = None
    hit: bool = False


class WorkerService:
    def __init__(self, config: WorkerConfig, ufs: UfsSet, metrics: WorkerMetrics):
        self.config = config
        self.ufs = ufs
        self.metrics = metrics
        self.store = PageStore(config.cache_dir, config.cache_size)
        self.status_cache = TtlCache(config.metadata_entries)
        self.listing_cache = TtlCache(max(1, config.metadata_entries // 100))
        self._page_flights = SingleFlight()
        self._meta_flights = SingleFlight()
        self._file_limiter = trio.CapacityLimiter(8)  # verification reads off the loop

    async def start(self) -> None:
        await trio.to_thread.run_sync(self.store.load)
        self.update_gauges()

    def update_gauges(self) -> None:
        m, s = self.metrics, self.store
        m.cache_used.set(s.used)
        m.cache_capacity.set(s.capacity)
        m.pages.set(len(s))
        m.evictions.set(s.evictions)
        m.cache_write_errors.set(s.write_errors)

    # -- UFS calls, measured ----------------------------------------------------------

    async def _ufs_call(self, op: str, fn, *args):
        self.metrics.ufs_requests.labels(op).inc()
        start = time.perf_counter()
        try:
            return await fn(*args)
        except (NotFound, NotADirectory, StaleVersion):
            raise
        except Exception:
            self.metrics.ufs_errors.labels(op).inc()
            raise
        finally:
            self.metrics.ufs_latency.labels(op).observe(time.perf_counter() - start)

    # -- pages ------------------------------------------------------------------------

    async def page(self, uri: str, version: str, size: int, index: int, verify: bool) -> PageResult:
        page_size = self.config.page_size
        if index >= page_count(size, page_size):
            raise InvalidRequest(f"page {index} is past the end of a {size}-byte object")
        key = (object_id(uri, version), index)
        entry = self.store.lookup(key)
        if entry is not None and verify:
            entry = await self._verified(key, entry)
        if entry is not None:
            try:
                self.metrics.page_requests.labels("hit").inc()
                return PageResult(entry.checksum, entry.size, entry=entry, hit=True)
            finally:
                self.metrics.bytes_served.inc(entry.size)
        result, shared = await self._page_flights.do(key, lambda: self._fill(key, uri, version, size, index))
        self.metrics.page_requests.labels("shared" if shared else "miss").inc()
        self.metrics.bytes_served.inc(result.size)
        return result

    async def _verified(self, key, entry: PageEntry) -> PageEntry | None:
        """Re-read a cached page and check its checksum; drop it if it is corrupt."""
        def digest_file() -> str | None:
            try:
                with open(entry.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return checksum(data) if len(data) == entry.size else "size-mismatch"

        actual = await trio.to_thread.run_sync(digest_file, limiter=self._file_limiter)
        if actual == entry.checksum:
            return entry
        log.warning("corrupt page %s_%d in the cache (checksum %s, expected %s): dropped, refetching",
                    key[0], key[1], actual, entry.checksum)
        self.metrics.corrupt_pages.inc()
        self.store.drop(key)
        self.update_gauges()
        return None

    async def _fill(self, key, uri: str, version: str, size: int, index: int) -> PageResult:
        page_size = self.config.page_size
        want = page_length(index, size, page_size)
        ufs = self.ufs.get(uri)
        data = await self._ufs_call("read", ufs.read, uri, index * page_size, want, version)
        self.metrics.ufs_bytes.inc(len(data))
        if len(data) != want:
            raise StaleVersion(f"{uri}: expected {want} bytes of page {index}, the UFS returned {len(data)}")
        digest = checksum(data)
        entry = await self.store.put(key, data, digest)
        self.update_gauges()
        return PageResult(digest, len(data), entry=entry, data=data)

    async def load_page(self, uri: str, version: str, size: int, index: int, *, verify: bool = False) -> bool:
        """Make sure a page is cached (load jobs); True if this call fetched it from the UFS.

        The same single-flight fill as `page`, so a load and a reader never fetch one page
        twice; nothing is counted as served. With `verify`, a cached page is re-read and
        its checksum checked first (corrupt: dropped and fetched again).
        """
        if index >= page_count(size, self.config.page_size):
            raise InvalidRequest(f"page {index} is past the end of a {size}-byte object")
        key = (object_id(uri, version), index)
        entry = self.store.lookup(key)
        if entry is not None and verify:
            entry = await self._verified(key, entry)
        if entry is not None:
            return False
        result, shared = await self._page_flights.do(key, lambda: self._fill(key, uri, version, size, index))
        if result.entry is None:
            raise CacheFull(f"page {index} of {uri} could not be cached (cache full or disk failing)")
        return not shared

    def cached_pages(self, uri: str, version: str) -> tuple[int, int]:
        """(pages, bytes) of this version of `uri` in the page store."""
        oid = object_id(uri, version)
        indexes = self.store.pages_of(oid)
        return len(indexes), sum(e.size for i in indexes if (e := self.store.peek((oid, i))) is not None)

    def open_page(self, result: PageResult) -> int | None:
        """An fd on a cached page for sendfile, or None (gone, or never cached)."""
        if result.entry is None:
            return None
        try:
            return os.open(result.entry.path, os.O_RDONLY)
        except FileNotFoundError:
            return None

    # -- metadata ---------------------------------------------------------------------

    def learn_status(self, uri: str, status: FileStatus) -> None:
        """Cache a status learned elsewhere (a load job's listing), as a UFS stat would."""
        self.status_cache.put(uri, status, self.config.status_ttl)

    async def stat(self, uri: str) -> FileStatus:
        cached = self.status_cache.get(uri)
        if cached is not MISSING:
            self.metrics.metadata_requests.labels("stat", "hit").inc()
            return cached
        self.metrics.metadata_requests.labels("stat", "miss").inc()

        async def fetch():
            status = await self._ufs_call("stat", self.ufs.get(uri).stat, uri)
            self.status_cache.put(uri, status, self.config.status_ttl)
            return status

        status, _ = await self._meta_flights.do(("stat", uri), fetch)
        return status

    async def listing(self, uri: str) -> list[FileStatus]:
        cached = self.listing_cache.get(uri)
        if cached is not MISSING:
            self.metrics.metadata_requests.labels("list", "hit").inc()
            return cached
        self.metrics.metadata_requests.labels("list", "miss").inc()

        async def fetch():
            entries: list[FileStatus] = []
            ufs = self.ufs.get(uri)
            self.metrics.ufs_requests.labels("list").inc()
            async for page in ufs.list_pages(uri):
                entries.extend(page)
            entries.sort(key=lambda e: e.name)
            self.listing_cache.put(uri, entries, self.config.listing_ttl)
            return entries

        entries, _ = await self._meta_flights.do(("list", uri), fetch)
        return entries

    async def list_page(self, uri: str, after: str, limit: int) -> tuple[list[FileStatus], str | None]:
        entries = await self.listing(uri)
        names = _NameView(entries)
        start = bisect.bisect_right(names, after) if after else 0
        chunk = entries[start:start + limit]
        more = start + limit < len(entries)
        return chunk, (chunk[-1].name if more and chunk else None)


    async def invalidate(self, uri: str, *, recursive: bool = False, pages: bool = False) -> dict:
        """Forget cached metadata of `uri` (and of everything under it if `recursive`).

        The parent directory's listing is dropped too, since it names `uri`. With
        `pages`, the pages of the dropped versions go as well; without, they stay
        until evicted (a new version has new page ids, so they are never served for it).
        """
        prefix = uri.rstrip("/") + "/"
        parent = parent_uri(uri)
        dropped: list[tuple[str, FileStatus]] = []
        for key in list(self.status_cache.keys()):
            if key == uri or (recursive and key.startswith(prefix)):
                status = self.status_cache.get(key)
                if status is not MISSING:
                    dropped.append((key, status))
                self.status_cache.pop(key)
        listings = 0
        for key in list(self.listing_cache.keys()):
            if key in (uri, parent) or (recursive and key.startswith(prefix)):
                self.listing_cache.pop(key)
                listings += 1
        page_count_dropped = 0
        if pages:
            for key, status in dropped:
                if status.is_dir:
                    continue
                oid = object_id(key, status.version)
                for index in self.store.pages_of(oid):
                    self.store.drop((oid, index))
                    page_count_dropped += 1
            self.update_gauges()
        return {"statuses": len(dropped), "listings": listings, "pages": page_count_dropped}


class _NameView:
    """Sequence view of entry names, for bisect without building a second list."""

    def __init__(self, entries: list[FileStatus]):
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> str:
        return self._entries[i].name


def check_uri(raw: str) -> str:
    try:
        return normalize(raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
