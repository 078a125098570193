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
from dorafs.errors import InvalidRequest, NotADirectory, NotFound, StaleVersion
from dorafs.notify import notify
from dorafs.pages import object_id, page_count, page_length
from dorafs.singleflight import SingleFlight
from dorafs.ttlcache import MISSING, TtlCache
from dorafs.ufs import FileStatus, UfsSet, normalize
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
    key: tuple | None = None


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
        self.health: str | None = None  # why caching is degraded (None: it works)

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
        m.cache_limit.set(s.limit)
        health = s.health()
        m.cache_degraded.set(health is not None)
        if health != self.health:
            if health is not None:
                notify(f"STATUS=degraded: {health}")
            else:
                notify("STATUS=serving; cache healthy again")
            self.health = health

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
                return PageResult(entry.checksum, entry.size, entry=entry, hit=True, key=key)
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
        return PageResult(digest, len(data), entry=entry, data=data, key=key)

    def open_page(self, result: PageResult) -> int | None:
        """An fd on a cached page for sendfile, or None (gone, or never cached)."""
        if result.entry is None:
            return None
        try:
            return os.open(result.entry.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a failing disk: forget the page, the caller fills it again
            log.warning("cannot open cached page %s (%s): dropped", result.entry.path, exc.strerror or exc)
            if result.key is not None:
                self.store.drop(result.key)
            return None

    # -- metadata ---------------------------------------------------------------------

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
