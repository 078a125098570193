"""What a worker does, independent of HTTP: serve pages, status and listings.

Pages are filled from the UFS on a miss with a read pinned to the client's version, so
a changed object fails with StaleVersion instead of mixing versions. Concurrent misses
on one page, status or listing share one UFS request (single-flight).

A run (one UFS read for a page and the pages after it, for a sequential reader) streams:
the first page goes to its reader as soon as its bytes have arrived, and each following
page is cached as soon as its own bytes are in, while the rest of the run is still on
its way (the run goes on in the service's background nursery). Through a slow store the
reader of the first page so waits for one page, not for the run.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import trio

from dorafs.config import WorkerConfig
from dorafs.errors import CacheFull, InvalidRequest, NotADirectory, NotFound, StaleVersion, Unavailable
from dorafs.notify import notify
from dorafs.pages import object_id, page_count, page_length
from dorafs.scans import ListingPrefetch
from dorafs.singleflight import SingleFlight
from dorafs.ufs import FileStatus, UfsSet
from dorafs.ufs.base import parent as parent_uri
from dorafs.ufs.retry import Progress
from worker.metastore import Cached, Listing, MetaStore
from worker.metrics import WorkerMetrics
from worker.pagestore import PageEntry, PageStore, RunWriter, checksum

log = logging.getLogger(__name__)


@dataclass
class PageResult:
    """A page ready to send: an entry on disk, or bytes in memory when not cached."""

    checksum: str
    size: int
    entry: PageEntry | None = None
    data: bytes | memoryview | None = None
    hit: bool = False
    key: tuple | None = None
    run_pages: int = 1  # pages the UFS read that filled it brings (itself included)


class WorkerService:
    def __init__(self, config: WorkerConfig, ufs: UfsSet, metrics: WorkerMetrics):
        self.config = config
        self.ufs = ufs
        self.metrics = metrics
        self.store = PageStore(config.cache_dir, config.cache_size)
        self.meta = MetaStore(Path(config.cache_dir) / "metadata.db", config.metadata_entries)
        self._page_flights = SingleFlight()
        self._run_pages: dict[tuple[str, int], trio.Event] = {}  # pages a run in flight will cache
        self._meta_flights = SingleFlight()
        self._file_limiter = trio.CapacityLimiter(8)  # verification reads off the loop
        self.background: trio.Nursery | None = None  # the service's own, while `run` runs
        self._scans = ListingPrefetch(self._prefetch_listing)  # stat misses per directory -> its listing
        # Versions a mount on this machine reads from their files (/v1/locate), most recent
        # last: sealed when their last page lands, since such a mount can hold the file.
        self._read_here: OrderedDict[str, None] = OrderedDict()
        self.health: str | None = None  # why caching is degraded (None: it works)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load the cache and the metadata, then own the worker's background work (fills of
        whole runs, seals, listings fetched ahead) until cancelled, which stops all of it."""
        await trio.to_thread.run_sync(self.store.load)
        await trio.to_thread.run_sync(self.meta.load)
        self.update_gauges()
        async with trio.open_nursery() as nursery:
            self.background = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.background = None

    def update_gauges(self) -> None:
        m, s = self.metrics, self.store
        m.cache_used.set(s.used)
        m.cache_capacity.set(s.capacity)
        m.pages.set(len(s))
        s.refresh_held()
        m.whole_objects.set(s.statistics()["whole_objects"])
        m.held_bytes.set(s.held)
        m.evictions.set(s.evictions)
        m.cache_write_errors.set(s.write_errors)
        m.metadata_entries.set(self.meta.memory_size())
        m.metadata_disk_errors.set(self.meta.disk_errors)
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

    async def page(self, uri: str, version: str, size: int, index: int, verify: bool,
                   run: int = 1) -> PageResult:
        """One page, filled from the UFS on a miss.

        `run` > 1 (a sequential reader's readahead) lets a miss fill up to that many
        following pages with the same UFS read, as long as none of them is cached or
        being filled: one large ranged GET costs far less than several small ones.
        Requests for those pages meanwhile wait for the run instead of reading again.
        """
        key, entry = await self._cached(uri, version, size, index, verify)
        if entry is not None:
            try:
                self.metrics.page_requests.labels("hit").inc()
                return PageResult(entry.checksum, entry.size, entry=entry, hit=True, key=key)
            finally:
                self.metrics.bytes_served.inc(entry.size)
        run = max(1, min(run, MAX_RUN, page_count(size, self.config.page_size) - index))
        try:
            result, shared = await self._page_flights.do(key, lambda: self._fill(key, uri, version, size, index, run))
        except StaleVersion:  # the status cached here names a version the UFS no longer has
            await self.invalidate(uri)
            raise
        self.metrics.page_requests.labels("shared" if shared else "miss").inc()
        self.metrics.bytes_served.inc(result.size)
        return result

    def ready(self, uri: str, version: str, size: int, index: int) -> PageResult | None:
        """A page already cached and not being filled, without waiting or filling."""
        if index >= page_count(size, self.config.page_size):
            return None
        key = (object_id(uri, version), index)
        if key in self._run_pages or key in self._page_flights:
            return None
        entry = self.store.lookup(key)
        if entry is None:
            return None
        self.metrics.page_requests.labels("hit").inc()
        self.metrics.bytes_served.inc(entry.size)
        return PageResult(entry.checksum, entry.size, entry=entry, hit=True, key=key)

    def read_here(self, uri: str, version: str) -> None:
        """A mount on this machine reads this version from its files (short-circuit).

        Such a mount can hand the version's object file to the kernel once it is whole,
        so the pages of a version of `seal_min_size` or more (and a page or more) that
        one reads are written into that file as they are filled (`PageStore.grow`): it
        is whole when its last page lands, with no copy. Pages it already had in page
        files are copied into it when its last page is in (`_seal_if_whole`)."""
        oid = object_id(uri, version)
        self._read_here[oid] = None
        self._read_here.move_to_end(oid)
        while len(self._read_here) > READ_HERE_KEPT:
            self._read_here.popitem(last=False)

    async def _cached(self, uri: str, version: str, size: int, index: int,
                      verify: bool) -> tuple[tuple[str, int], PageEntry | None]:
        """The page's key and its cached entry (None on a miss), after any run filling it
        has landed; with `verify`, a corrupt cached page is dropped and reported missing."""
        if index >= page_count(size, self.config.page_size):
            raise InvalidRequest(f"page {index} is past the end of a {size}-byte object")
        key = (object_id(uri, version), index)
        pending = self._run_pages.get(key)
        if pending is not None:  # a run is filling it: wait rather than read it again
            await pending.wait()
        entry = self.store.lookup(key)
        if entry is not None and verify:
            entry = await self._verified(key, entry)
        return key, entry

    async def _verified(self, key, entry: PageEntry) -> PageEntry | None:
        """Re-read a cached page and check its checksum; drop it if it is corrupt."""
        def digest_file() -> str | None:
            try:
                with open(entry.path, "rb") as f:
                    f.seek(entry.offset)
                    data = f.read(entry.size + 1 if not entry.in_object else entry.size)
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

    async def _fill(self, key, uri: str, version: str, size: int, index: int, run: int = 1) -> PageResult:
        page_size = self.config.page_size
        oid = key[0]
        if oid in self._read_here and self.config.seal_min_size and size >= max(self.config.seal_min_size, page_size):
            self.store.grow(oid, size, page_size)  # whole as its last page lands: see `read_here`
        extra = []  # following pages this fill also reads: not cached, not being filled
        for i in range(index + 1, index + run):
            other = (oid, i)
            if other in self._run_pages or other in self._page_flights or self.store.lookup(other) is not None:
                break
            extra.append(other)
        own = {other: trio.Event() for other in extra}  # this run's; a later run may wait on the same page
        self._run_pages.update(own)
        last = index + len(extra)
        start, end = index * page_size, min(size, (last + 1) * page_size)
        progress = Progress()
        keys = [key] + extra
        # Each page checksummed and written by the thread receiving the read, as its bytes come.
        writer = RunWriter(self.store, keys, [page_length(k[1], size, page_size) for k in keys], progress)
        progress.sink = writer.take
        outcome: list = []  # the read's bytes, or its exception
        first = trio.Event()  # set once the first page landed, or the run ended without it
        first_entry: list[PageEntry | None] = []

        async def read_run() -> None:
            try:
                data = await self._ufs_call("read", self.ufs.get(uri).read, uri, start, end - start, version, progress)
                self.metrics.ufs_bytes.inc(len(data))
                outcome.append(data)
            except Exception as exc:  # the first page's reader raises it; later pages refill
                outcome.append(exc)
            finally:
                progress.finish()
                returned = outcome[0] if outcome and not isinstance(outcome[0], Exception) else None
                with trio.CancelScope(shield=True):  # the writer's descriptors and reserved room
                    await trio.to_thread.run_sync(writer.close, returned if progress.buffer is None else None)

        async def cache_rest() -> None:
            """Each page of the run indexed as it lands."""
            try:
                async for at, entry in writer.pages():
                    if at == 0:
                        first_entry.append(entry)
                        first.set()
                    else:
                        landed(keys[at])
                self._seal_if_whole(oid, size)
            finally:
                first.set()
                for other in extra:
                    landed(other)
                self.update_gauges()

        def landed(other) -> None:
            # Only this run's own event: once a page is done here and not kept (a full
            # cache), another run may fill it again and register its own meanwhile.
            event = own.pop(other, None)
            if event is not None:
                if self._run_pages.get(other) is event:
                    del self._run_pages[other]
                event.set()

        async def whole_run() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_run)
                    nursery.start_soon(cache_rest)
            except Exception:  # never the daemon's end: the pages not cached are filled again
                log.exception("caching the run of pages %d-%d of %s failed", index, last, uri)

        if self.background is not None:
            self.background.start_soon(whole_run)
            await first.wait()
        else:  # no daemon around it (in-process use): the run is read before answering
            await whole_run()
        view, digest = writer.head, writer.digests[0]
        if view is None or digest is None:
            if outcome and isinstance(outcome[0], Exception):
                raise outcome[0]
            if not outcome:
                raise Unavailable(f"the fill of page {index} of {uri} was cancelled")
            raise StaleVersion(f"{uri}: expected {end - start} bytes from page {index}, "
                               f"the UFS returned {progress.done}")
        self._seal_if_whole(oid, size)  # (its run's later pages may have landed first)
        return PageResult(digest, len(view), entry=first_entry[0] if first_entry else None, data=view, key=key,
                          run_pages=1 + len(extra))

    async def load_page(self, uri: str, version: str, size: int, index: int, *, verify: bool = False) -> bool:
        """Make sure a page is cached (load jobs); True if this call fetched it from the UFS.

        The same single-flight fill as `page`, so a load and a reader never fetch one page
        twice; nothing is counted as served. With `verify`, a cached page is re-read and
        its checksum checked first (corrupt: dropped and fetched again).
        """
        key, entry = await self._cached(uri, version, size, index, verify)
        if entry is not None:
            return False
        result, shared = await self._page_flights.do(key, lambda: self._fill(key, uri, version, size, index))
        if result.entry is None:
            raise CacheFull(f"page {index} of {uri} could not be cached (cache full or disk failing)")
        return not shared

    async def load_run(self, uri: str, version: str, size: int, first: int, count: int) -> list[int]:
        """Make sure pages first..first+count-1 are cached (load jobs), each stretch of
        missing pages with one UFS read; the indexes this call fetched from the UFS.

        The same single-flight fills as `page`: a page a reader (or another load) is
        filling is waited for, not fetched again. Returns once every page of the run it
        filled has landed (or failed: `CacheFull` when one could not be cached)."""
        fetched: list[int] = []
        end = first + count
        if size >= self.config.page_size:  # the loader wants its one file (loader.py)
            self.store.grow(object_id(uri, version), size, self.config.page_size)
        index = first
        while index < end:
            key, entry = await self._cached(uri, version, size, index, False)
            if entry is not None:
                index += 1
                continue
            here = index
            result, shared = await self._page_flights.do(
                key, lambda: self._fill(key, uri, version, size, here, end - here))
            if result.entry is None:
                raise CacheFull(f"page {index} of {uri} could not be cached (cache full or disk failing)")
            if shared:
                index += 1
                continue
            fetched.append(index)
            for other in range(index + 1, index + result.run_pages):  # the run's later pages
                _, entry = await self._cached(uri, version, size, other, False)
                if entry is None:  # its bytes never came: the loop fills it again
                    break
                fetched.append(other)
            index = fetched[-1] + 1
        return fetched

    def cached_pages(self, uri: str, version: str) -> tuple[int, int]:
        """(pages, bytes) of this version of `uri` in the page store."""
        oid = object_id(uri, version)
        indexes = self.store.pages_of(oid)
        return len(indexes), sum(e.size for i in indexes if (e := self.store.peek((oid, i))) is not None)

    async def whole_object(self, uri: str, version: str, size: int, *, wait: bool = True):
        """The one file of this version of `uri` if every page of it is cached (sealed
        now if it is still in pages), else None; nothing is fetched. Without `wait`, only
        a file already sealed is answered: one still in pages is sealed in the
        background (a copy of the whole object, which an open should not wait for)."""
        oid = object_id(uri, version)
        if not wait and self.background is not None:
            whole = self.store.whole(oid)
            if whole is None and not self.store.is_sealing(oid):
                self.background.start_soon(self.store.seal, oid, size, self.config.page_size)
            return whole
        whole = await self.store.seal(oid, size, self.config.page_size)
        self.update_gauges()
        return whole

    def _seal_if_whole(self, oid: str, size: int) -> None:
        """Seal object version `oid` from its page files into one file in the background
        once its last page is in (a version that grows in its object file needs no
        copy), if a mount on this machine reads it from its files (`read_here`) and it is
        of `seal_min_size` and a page or more: that mount then finds it whole at its next
        open instead of waiting for the copy, and the copy is made while the pages are
        still in the kernel's page cache. Versions only remote mounts read are not
        copied (they cannot hold the file); load jobs seal what they load."""
        page_size, least = self.config.page_size, self.config.seal_min_size
        if self.background is None or not least or size < max(least, page_size) or oid not in self._read_here \
                or self.store.whole(oid) is not None or self.store.is_growing(oid) \
                or self.store.is_sealing(oid) or self.store.count_of(oid) != page_count(size, page_size):
            return
        self.background.start_soon(self._seal, oid, size)

    async def _seal(self, oid: str, size: int) -> None:
        # A moment first: a mount reading the last pages opens their page files right
        # after /v1/locate named them (and keeps them); sealing unlinks them, and a page
        # file gone before its open is fetched over HTTP instead.
        await trio.sleep(SEAL_DELAY)
        if self.store.whole(oid) is None and await self.store.seal(oid, size, self.config.page_size) is not None:
            self.update_gauges()

    async def page_part(self, result: PageResult, offset: int, length: int) -> bytes | memoryview | None:
        """Bytes [offset, offset+length) of a page (None: its file is gone). From memory
        when the page is there, else read from its file: on the loop when the kernel's
        page cache holds it (RWF_NOWAIT), in a thread when it must come from the disk."""
        if result.data is not None:
            return memoryview(result.data)[offset:offset + length]
        fd = self.open_page(result)
        if fd is None:
            return None
        offset += result.entry.offset  # where the page starts in its file (a sealed object's)
        try:
            into = bytearray(length)
            try:
                got = os.preadv(fd, [into], offset, os.RWF_NOWAIT)
            except (BlockingIOError, OSError) as exc:
                if isinstance(exc, BlockingIOError) or exc.errno == errno.EOPNOTSUPP:
                    got = await trio.to_thread.run_sync(os.preadv, fd, [into], offset, limiter=self._file_limiter)
                else:
                    raise
            if got < length:  # partly cached (RWF_NOWAIT stops there), or a short file
                rest = await trio.to_thread.run_sync(os.pread, fd, length - got, offset + got,
                                                     limiter=self._file_limiter)
                into[got:got + len(rest)] = rest
                del into[got + len(rest):]
            return into
        finally:
            os.close(fd)

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
    #
    # Each request may carry the mount's own TTLs (seconds; -1 never recheck, 0 always);
    # without them the worker's configured TTLs apply. Entries carry their fetch time, so
    # the same entry is fresh for one mount and stale for another.

    async def learn_status(self, uri: str, status: FileStatus) -> None:
        """Cache a status learned elsewhere (a load job's listing), as a UFS stat would."""
        await self.meta.put_status(uri, status, time.time())

    def _fresh(self, cached: Cached, ttl: float | None, negative_ttl: float | None) -> bool:
        if cached.status is None:
            limit = self.config.negative_ttl if negative_ttl is None else negative_ttl
        else:
            limit = self.config.status_ttl if ttl is None else ttl
        return _within(cached.fetched, limit)

    async def stat(self, uri: str, ttl: float | None = None, negative_ttl: float | None = None) -> FileStatus:
        """Status from memory, then disk, then the parent's listing held here, then the UFS."""
        status, _ = await self.stat_fetched(uri, ttl, negative_ttl)
        return status

    async def stat_fetched(self, uri: str, ttl: float | None = None,
                           negative_ttl: float | None = None) -> tuple[FileStatus, float]:
        """The status as `stat` finds it, and the wall-clock time it was read from the UFS."""
        cached = self.meta.memory_status(uri)
        if cached is None:
            cached = await self.meta.disk_status(uri)
        if cached is None or not self._fresh(cached, ttl, negative_ttl):
            parent = parent_uri(uri)
            from_listing = await self.meta.child(parent, uri.rpartition("/")[2]) if parent else None
            if from_listing is not None and self._fresh(from_listing, ttl, negative_ttl):
                cached = from_listing
            else:
                cached = None
        if cached is not None:
            self.metrics.metadata_requests.labels("stat", cached.level).inc()
            return _found(uri, cached.status), cached.fetched
        self.metrics.metadata_requests.labels("stat", "miss").inc()
        parent = parent_uri(uri)
        if parent:
            self._scans.miss(parent, self.background, uri)  # the rest of a scan: from one listing

        async def fetch() -> tuple[FileStatus | None, float]:
            fetched = time.time()
            try:
                status = await self._ufs_call("stat", self.ufs.get(uri).stat, uri)
            except NotFound:
                status = None
            await self.meta.put_status(uri, status, fetched)
            return status, fetched

        (status, fetched), _ = await self._meta_flights.do(("stat", uri), fetch)
        return _found(uri, status), fetched

    async def _prefetch_listing(self, directory: str) -> None:
        await self._meta_flights.do(("list", directory), lambda: self._fill_listing(directory))
        self.metrics.listing_prefetches.inc()

    async def list_batch(self, uri: str, after: str, limit: int,
                        ttl: float | None = None) -> tuple[list[FileStatus], str | None, float]:
        """Up to `limit` entries named after `after`, the cursor for the next page, and
        the wall-clock time the listing was read from the UFS.

        Freshness is checked when a reader starts (`after` empty); a reader part-way
        through keeps paging the current listing even if it has aged meanwhile.
        """
        ttl = self.config.listing_ttl if ttl is None else ttl
        listing, level = await self.meta.listing(uri)
        if listing is None or (not after and not _within(listing.fetched, ttl)):
            self.metrics.metadata_requests.labels("list", "miss").inc()
            listing, _ = await self._meta_flights.do(("list", uri), lambda: self._fill_listing(uri))
        else:
            self.metrics.metadata_requests.labels("list", level).inc()
        try:
            entries = await self.meta.batch(listing, after, limit + 1)
        except sqlite3.Error as exc:
            raise Unavailable(f"the metadata store cannot read the listing of {uri}: {exc}") from None
        more = len(entries) > limit
        entries = entries[:limit]
        return entries, (entries[-1].name if more and entries else None), listing.fetched

    async def _fill_listing(self, uri: str) -> Listing:
        """Stream a listing from the UFS into the store, a UFS page at a time.

        The entries are also kept in memory while the listing is small enough for the
        memory level, or while the disk is failing (then the listing must be served from
        memory or not at all).
        """
        gen = self.meta.new_generation()
        fetched = time.time()
        errors_before = self.meta.disk_errors
        kept: list[FileStatus] | None = []
        count = 0
        await self.meta.begin_fill(uri, gen)
        self.metrics.ufs_requests.labels("list").inc()
        try:
            async for page in self.ufs.get(uri).list_batches(uri):
                await self.meta.add_entries(uri, gen, page)
                count += len(page)
                if kept is not None:
                    kept.extend(page)
                    if len(kept) > self.meta.memory_listing_max and self.meta.disk_errors == errors_before:
                        kept = None
        except BaseException as exc:
            if not isinstance(exc, (NotFound, NotADirectory, trio.Cancelled)):
                self.metrics.ufs_errors.labels("list").inc()
            with trio.CancelScope(shield=True):
                await self.meta.abort_fill(uri, gen)
            raise
        if kept is not None:
            kept.sort(key=lambda e: e.name)
        try:
            return await self.meta.finish_fill(uri, gen, fetched, count, kept)
        except sqlite3.Error as exc:
            raise Unavailable(f"the metadata store cannot hold the listing of {uri}: {exc}") from None

    async def invalidate(self, uri: str, *, recursive: bool = False, pages: str = "none") -> dict:
        """Forget cached metadata of `uri` (and of everything under it if `recursive`).

        The parent directory's listing is dropped too, since it names `uri`. `pages`:
        "none" keeps cached pages until evicted (a new version has new page ids, so they
        are never served for it); "all" drops the pages of every dropped file status;
        "changed" drops them only for objects whose version the UFS no longer has.
        """
        parent = parent_uri(uri)
        dropped, listings = await self.meta.invalidate(
            [uri], recursive_under=uri if recursive else None, listings=[uri] + ([parent] if parent else []))
        page_total = 0
        if pages != "none":
            for key, status in dropped:
                oid = object_id(key, status.version)
                indices = self.store.pages_of(oid)
                if not indices:
                    continue
                if pages == "changed":
                    try:
                        current = await self.stat(key, ttl=0)
                        if current.version == status.version:
                            continue
                    except NotFound:
                        pass
                for index in indices:
                    self.store.drop((oid, index))
                    page_total += 1
            self.update_gauges()
        return {"statuses": len(dropped), "listings": listings, "pages": page_total}


MAX_RUN = 16  # pages one UFS read may fill for a sequential reader
READ_HERE_KEPT = 4096  # versions remembered as read by a mount on this machine
SEAL_DELAY = 1.0  # seconds from a version's last page to its seal (see _seal)


def _within(fetched: float, ttl: float) -> bool:
    """Is an entry fetched at `fetched` still trusted under `ttl`?"""
    if ttl < 0:
        return True
    return ttl > 0 and time.time() - fetched <= ttl


def _found(uri: str, status: FileStatus | None) -> FileStatus:
    if status is None:
        raise NotFound(f"no such file or directory: {uri}")
    return status
