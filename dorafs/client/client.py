"""DoraClient: routes metadata and page reads to the owning worker, with failover.

Routing: the ring key of a file's pages and status is its full UFS URI, and of a
listing the directory's URI, so one worker owns all of a file. Candidates are tried in
ring order; a worker that fails to answer (connection error, timeout, corrupt page) is
skipped for `SUSPECT_SECONDS` and the next candidate serves; when none answers, the
client reads the UFS itself. An error *answer* (not found, changed object, UFS failure)
is authoritative and is raised, not retried elsewhere.

A worker that keeps failing is skipped for longer each time (doubling up to
`MAX_SUSPECT_SECONDS`), so a stopped worker that accepts connections but never answers
costs one `worker_timeout` stall per period, not one per request. A success clears it,
and so does the worker (re)joining the membership: its keys come back at once.

When the UFS fails (a worker answers EIO for a status or a listing it had to refresh),
the mount asks the owner again for what it holds, whatever its age (`ttl=-1`): a store
outage costs freshness, not the data already cached. Logged once per outage; during it,
one request every `OUTAGE_RECHECK` seconds tries the UFS again.

A page whose fetch failed for good (EIO after the UFS retries, ESTALE) answers the same
error for `FAILURE_MEMORY` seconds without a new fetch: the kernel re-issues a failed
readahead as a synchronous read at once, which would otherwise wait out the same UFS
deadline a second time.

Reads: `read(open_file, offset, length)` returns exactly the bytes asked for (short only
at end of file), assembled from page-aligned fetches of the version pinned at open.
Sequential readers get readahead: the next pages are fetched concurrently into the
page buffer, the window doubling up to `readahead_pages`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from dorafs.client.buffer import PageBuffer, Piece, view
from dorafs.client.local import LocalPages, Unreadable, WouldBlock, is_loopback
from dorafs.client.statuses import StatusMemo
from dorafs.client.workers import WorkerClient
from dorafs.config import MountConfig
from dorafs.errors import DoraError, NotFound, StaleVersion, UfsError, Unavailable
from dorafs.membership import Membership
from dorafs.pages import page_count, page_length, plan
from dorafs.ring import HashRing
from dorafs.routing import build_routing
from dorafs.scans import ListingPrefetch
from dorafs.security import Credentials
from dorafs.singleflight import SingleFlight
from dorafs.ufs import FileStatus, UfsSet, join
from dorafs.ufs.base import parent as parent_uri

log = logging.getLogger(__name__)

T = TypeVar("T")
SUSPECT_SECONDS = 5.0  # how long a failed worker is skipped before it is tried again
MAX_SUSPECT_SECONDS = 30.0  # the skip doubles while the worker keeps failing, up to this
MAX_CANDIDATES = 3  # workers tried for one request before the UFS
MAX_PREFETCH = 48  # readahead pages in flight across the mount
RUN_PAGES = 8  # pages per readahead run (one UFS read on a miss)
LIST_PAGE = 1000
LIST_AHEAD_ENTRIES = 16 * LIST_PAGE  # statuses a listing fetched ahead of a scan may bring
STALE_TRIES = 3  # reads of a page whose block was reused under them before one goes around the buffer
# While the UFS fails, statuses and listings come straight from what the workers hold,
# and one request per this many seconds tries the UFS again (each try costs the retries).
OUTAGE_RECHECK = 2.0
FAILURE_MEMORY = 0.5  # seconds a page's final error is answered again without a new fetch


@dataclass
class OpenFile:
    """One open file: its URI and the status (version, size) pinned when it was opened."""

    uri: str
    status: FileStatus
    next_offset: int = 0  # where a sequential reader would read next
    window: int = 0  # current readahead window, in pages


@dataclass
class ClientStats:
    worker_pages: int = 0
    short_circuit_pages: int = 0  # of worker_pages, read from a local worker's page file
    worker_parts: int = 0  # parts of pages a random reader fetched instead of whole pages
    ufs_fallback_pages: int = 0
    ufs_fallback_metadata: int = 0
    failovers: int = 0
    by_worker: Counter = field(default_factory=Counter)


class DoraClient:
    def __init__(self, config: MountConfig, membership: Membership, ufs: UfsSet, *,
                 credentials: Credentials | None = None):
        self.config = config
        self.membership = membership
        self.ufs = ufs
        self.page_size = config.page_size
        self.ring = HashRing()
        self.buffer = PageBuffer(config.buffer_size)
        self.stats = ClientStats()
        self.statuses = StatusMemo(config.status_ttl, config.attr_timeout)
        # A listing is fetched ahead once per status_ttl at most: within it, further
        # misses mean a directory larger than the listing brought (LIST_AHEAD_ENTRIES).
        self.scans = ListingPrefetch(self._list_ahead, again_after=max(config.status_ttl, 0.0))
        self._workers = WorkerClient(timeout=config.worker_timeout, connect_timeout=config.connect_timeout,
                                     credentials=credentials)
        self._flights = SingleFlight()
        self._failed: dict[tuple, tuple[float, Exception]] = {}  # page key -> (until, error)
        self._suspect_until: dict[str, float] = {}
        self._remote: set[str] = set()  # loopback workers whose page files this process cannot read
        self.local = LocalPages()
        self._suspect_for: dict[str, float] = {}  # current skip period of a failing worker
        self._ring_addresses: set[str] = set()
        self._prefetching = 0  # pages scheduled by readahead and not yet fetched
        self._scheduled: dict[tuple, trio.Event] = {}  # their keys -> set when that page is in
        self._nursery: trio.Nursery | None = None
        self._outage: str | None = None  # the UFS error that made the mount use held metadata
        self._outage_recheck = 0.0  # until then, metadata requests skip the failing UFS
        membership.add_listener(self._rebuild_ring)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep membership fresh and own the readahead tasks, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.membership.run)
                nursery.start_soon(self.local.sweep)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.local.close()
            with trio.CancelScope(shield=True):
                await self._workers.aclose()

    def _rebuild_ring(self) -> None:
        workers = self.membership.workers
        joined = {w.address for w in workers.values()} - self._ring_addresses
        for address in joined:  # a worker that (re)joins is trusted again at once
            self._suspect_until.pop(address, None)
            self._suspect_for.pop(address, None)
        self._ring_addresses = {w.address for w in workers.values()}
        routing = build_routing(self.membership.workers)  # the scheduler routes loads the same way
        if routing.page_size is not None:
            self.page_size = routing.page_size
        if routing.left_out:
            log.error("workers %s use a page size other than %d and are left off the ring",
                      routing.left_out, self.page_size)
        self.ring = routing.ring
        log.info("ring rebuilt: %d workers (membership version %s)", len(self.ring), self.membership.version)

    # -- routing ----------------------------------------------------------------------

    def candidates(self, key: str) -> list[str]:
        """Worker addresses for a key, in the order they will be tried."""
        workers = self.membership.workers
        found = []
        for wid in self.ring.candidates(key, MAX_CANDIDATES):
            info = workers.get(wid)
            if info is not None:
                found.append(info.address)
        return found

    async def _route(self, key: str, call: Callable[[str], Awaitable[T]]) -> T:
        now = trio.current_time()
        tried = 0
        for address in self.candidates(key):
            if self._suspect_until.get(address, 0) > now:
                continue
            tried += 1
            try:
                result = await call(address)
            except Unavailable as exc:
                self._suspect(address, exc)
                self.stats.failovers += 1
                continue
            self._suspect_for.pop(address, None)
            if self._suspect_until.pop(address, None) is not None:
                log.info("worker %s answers again", address)
            self.stats.by_worker[address] += 1
            return result
        raise Unavailable(f"no worker answered for {key} ({tried} tried)")

    def _suspect(self, address: str, exc: Exception) -> None:
        now = trio.current_time()
        if self._suspect_until.get(address, 0) > now:
            return  # requests that were in flight together fail together: one period
        period = self._suspect_for.get(address)
        period = SUSPECT_SECONDS if period is None else min(period * 2, MAX_SUSPECT_SECONDS)
        if address not in self._suspect_until:
            log.warning("worker %s failed (%s); using the next candidate for %gs", address, exc, period)
        self._suspect_until[address] = now + period
        self._suspect_for[address] = period

    # -- metadata ---------------------------------------------------------------------

    async def stat(self, uri: str) -> FileStatus:
        """The status of `uri`: kept by this mount (see statuses.py), else from its owner,
        else from the UFS. Misses in one directory soon bring its whole listing (scans.py)."""
        now = trio.current_time()
        status = self.statuses.get(uri, now)
        if status is not None:
            return status
        parent = parent_uri(uri)
        if parent:
            self.scans.miss(parent, self._nursery)
        try:
            status, age = await self._metadata(
                uri,
                lambda address: self._workers.stat(
                    address, uri, ttl=self.config.status_ttl, negative_ttl=self.config.negative_ttl),
                lambda address: self._workers.stat(address, uri, ttl=-1, negative_ttl=-1))
        except Unavailable:
            self.stats.ufs_fallback_metadata += 1
            status, age = await self.ufs.get(uri).stat(uri), 0.0
        self.statuses.put(uri, status, age, now)
        return status

    async def list_pages(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """A directory's entries a page at a time, from its owner (or the UFS). The
        mount keeps their statuses as it keeps those of `stat`."""
        after = ""
        while True:
            now = trio.current_time()
            try:
                entries, after_next, age = await self._metadata(
                    uri,
                    lambda address: self._workers.list_page(address, uri, after, LIST_PAGE,
                                                            ttl=self.config.listing_ttl),
                    lambda address: self._workers.list_page(address, uri, after, LIST_PAGE, ttl=-1))
            except Unavailable:
                self.stats.ufs_fallback_metadata += 1
                async for page in self.ufs.get(uri).list_pages(uri):
                    page = [e for e in page if e.name > after] if after else page
                    if page:
                        self._keep_listed(uri, page, 0.0, trio.current_time())
                        yield page
                return
            if entries:
                self._keep_listed(uri, entries, age, now)
                yield entries
            if after_next is None:
                return
            after = after_next

    async def _metadata(self, uri: str, fresh: Callable[[str], Awaitable[T]],
                        held: Callable[[str], Awaitable[T]]) -> T:
        """A status or listing as fresh as the mount's TTLs ask (`fresh`), or, while the
        UFS fails, what the owner holds (`held`)."""
        if self._outage is not None and trio.current_time() < self._outage_recheck:
            return await self._route(uri, held)  # an outage: no UFS attempt per request
        try:
            result = await self._route(uri, fresh)
        except UfsError as exc:
            return await self._held(uri, exc, held)
        self._store_answers()
        return result

    async def _held(self, uri: str, error: UfsError, call: Callable[[str], Awaitable[T]]) -> T:
        """What the owner of `uri` holds, whatever its age, now that the UFS failed with
        `error`; `error` itself if it holds nothing (or does not answer)."""
        try:
            result = await self._route(uri, call)
        except NotFound:
            raise  # held: "no such path"
        except DoraError:
            raise error from None
        if self._outage is None:
            log.warning("the UFS fails (%s); serving the statuses and listings the workers hold, "
                        "whatever their age, until it answers again", error)
        self._outage = str(error)
        self._outage_recheck = trio.current_time() + OUTAGE_RECHECK
        return result

    def _store_answers(self) -> None:
        if self._outage is not None:
            log.info("the UFS answers again; statuses and listings follow their TTLs")
            self._outage = None

    def _keep_listed(self, uri: str, entries: list[FileStatus], age: float | None, now: float) -> None:
        for entry in entries:
            self.statuses.put(join(uri, entry.name), entry, age, now)

    async def _list_ahead(self, uri: str) -> None:
        """Fetch a listing for the statuses it brings (list_pages keeps them), up to
        LIST_AHEAD_ENTRIES: the statuses kept are bounded, and a huge directory would
        only push out what the scan still needs."""
        entries = 0
        async for page in self.list_pages(uri):
            entries += len(page)
            if entries >= LIST_AHEAD_ENTRIES:
                break
        log.debug("listed %s ahead of a scan: %d entries", uri, entries)

    async def invalidate(self, uri: str, *, recursive: bool = False, pages: bool = False) -> None:
        """Make the workers forget `uri` after it changed through this mount.

        The owner of `uri` drops its status, the owner of the parent its listing. A
        worker that does not answer has nothing this mount can reach anyway; its TTLs
        bound how long it may serve the old entry. `recursive` (a directory renamed or
        removed) asks every worker, since the paths under `uri` hash anywhere. `pages`
        drops the pages of the version the owner knew too (they would never be served
        again: a new version has new page ids; this frees their space at once). This
        mount forgets the statuses it kept of them first.
        """
        self.statuses.forget(uri, recursive=recursive)
        if recursive:
            for info in list(self.membership.workers.values()):
                try:
                    await self._workers.invalidate(info.address, uri, recursive=True, pages=pages)
                except DoraError as exc:
                    log.warning("could not invalidate %s on %s: %s", uri, info.address, exc)
            return
        parent = parent_uri(uri)
        for key in [uri] + ([parent] if parent else []):
            drop_pages = pages and key == uri
            try:
                await self._route(key, lambda address: self._workers.invalidate(address, uri, pages=drop_pages))
            except Unavailable as exc:
                log.warning("could not invalidate %s on its owner: %s", uri, exc)

    # -- data -------------------------------------------------------------------------

    def open(self, uri: str, status: FileStatus) -> OpenFile:
        return OpenFile(uri, status)

    async def whole_file(self, f: OpenFile, wait: bool = True) -> dict | None:
        """Where the owning worker keeps this pinned version as one file, if the worker
        is on this machine and holds all of it: {"path", "size", "page_size",
        "checksums"}; None otherwise (nothing is fetched). Without `wait`, None too
        while the worker is still making that file (from its pages, in the background)."""
        for address in self.candidates(f.uri)[:1]:
            if address in self._remote or not is_loopback(address):
                return None
            if self._suspect_until.get(address, 0) > trio.current_time():
                return None
            try:
                return await self._workers.whole_object(address, f.uri, f.status.version, f.status.size,
                                                        self.page_size, wait)
            except (DoraError, OSError) as exc:
                log.debug("worker %s: no whole file of %s: %s", address, f.uri, exc)
                return None
        return None

    async def read(self, f: OpenFile, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Bytes [offset, offset+length) of the pinned version, short only at EOF.

        Buffered pages are returned as memoryviews, no copy until the kernel takes the
        bytes, and so is a read across pages of one block (a run read together). Else a
        read is one `pread` of a verified local page file, or is assembled in one buffer,
        each part read or copied straight into it.
        """
        spans = plan(offset, length, f.status.size, self.page_size)
        if not spans:
            return b""
        sequential = offset == f.next_offset
        self._readahead(f, offset, offset + length, spans[-1].index)
        if len(spans) == 1 and not sequential and self.config.random_read:
            data = await self._part(f, spans[0])
            if data is not None:
                return data
        data = await self._span(f, spans[0]) if len(spans) == 1 else await self._spans(f, spans)
        if sequential:
            self._consumed(f, spans)
        return data

    def _consumed(self, f: OpenFile, spans) -> None:
        """A sequential reader has read these pages to their end: it will not ask for
        them again (the kernel keeps what it read), so their buffer space goes to the
        pages coming next, and a block read ahead is reused as soon as it has been read,
        instead of fresh memory being faulted in for every run. The bytes just returned
        stay valid: the FUSE session writes them to the kernel before anything else runs."""
        size, page_size = f.status.size, self.page_size
        for span in spans:
            if span.end == page_length(span.index, size, page_size):
                self.buffer.discard(self._key(f, span.index))

    async def _spans(self, f: OpenFile, spans) -> bytearray | memoryview:
        """A read across pages: one slice of a block when they were read together, else
        assembled in one buffer."""
        held = [self.buffer.get(self._key(f, span.index)) for span in spans]
        if all(isinstance(piece, Piece) for piece in held) and all(
                later.follows(earlier) for earlier, later in zip(held, held[1:])):
            return memoryview(held[0].block.data)[held[0].start + spans[0].start:held[-1].start + spans[-1].end]
        out = bytearray(sum(span.end - span.start for span in spans))
        missing = []
        at = 0
        for span, data in zip(spans, held):
            part = memoryview(out)[at:at + span.end - span.start]
            at += len(part)
            if data is not None:
                part[:] = view(data)[span.start:span.end]  # buffered pieces are never stale
                continue
            key = self._key(f, span.index)
            try:
                if key not in self._scheduled and self.local.readinto(key, part, span.start):
                    continue
            except WouldBlock:  # on the disk, not in the kernel's cache: _span reads it in a thread
                pass
            missing.append((span, part))
        if missing:
            async def fill(span, part: memoryview) -> None:
                part[:] = await self._span(f, span)

            async with trio.open_nursery() as nursery:
                for span, part in missing:
                    nursery.start_soon(fill, span, part)
        return out

    async def _span(self, f: OpenFile, span) -> bytes | memoryview:
        """The bytes of one page span: from the buffer, a verified local page file, or a fetch."""
        key = self._key(f, span.index)
        for _ in range(STALE_TRIES):
            data = self.buffer.get(key)
            if data is None:
                # A page its readahead run is reading waits for the run: its file is
                # already kept (so `pread` would answer it), but the run buffers it after,
                # behind this reader, where nothing discards it and it pins its block
                # until the buffer is full.
                got = None if key in self._scheduled else await self.local.pread(
                    key, span.end - span.start, span.start)
                if got is not None:  # just the bytes asked for, no whole-page copy
                    return got
                data = await self._page(f, span.index)
            page = view(data)
            if page is not None:  # else its block was reused while this reader waited: again
                return page[span.start:span.end]
        data = await self._route(f.uri, lambda address: self._workers.page(
            address, f.uri, f.status.version, f.status.size, span.index, self.page_size))
        return memoryview(data)[span.start:span.end]

    async def _part(self, f: OpenFile, span) -> memoryview | bytes | None:
        """A random reader's read from a worker that is not read directly: the aligned
        `random_read` bytes of the page around it (two such for a read across their
        boundary; buffered on their own), not the whole page. None: the page path serves
        it (a buffered or local page, one on its way, a worker read from its files, an
        error, which the page path meets again and answers)."""
        key = self._key(f, span.index)
        if key in self.buffer or key in self._scheduled or key in self._flights or key in self.local:
            return None
        size = self.config.random_read
        start = span.start - span.start % size
        end = min(-(-span.end // size) * size, page_length(span.index, f.status.size, self.page_size))
        length = end - start
        if length >= self.page_size:
            return None
        part_key = key + (start, end)
        data = self.buffer.get(part_key)
        if data is None:
            status = f.status

            async def from_worker(address: str) -> bytes | bytearray | None:
                if self._reads_files_of(address):
                    return None
                return await self._workers.page(address, f.uri, status.version, status.size, span.index,
                                                self.page_size, part=(start, length))

            try:
                data, _ = await self._flights.do(part_key, lambda: self._route(f.uri, from_worker))
            except DoraError:  # the page path tries again and answers (UFS fallback, ESTALE...)
                return None
            if data is None:
                return None
            self.stats.worker_parts += 1
            self.buffer.put(part_key, data)
        return memoryview(data)[span.start - start:span.end - start]

    def _readahead(self, f: OpenFile, offset: int, end: int, last_index: int) -> None:
        """Keep a sequential reader's next pages coming, in runs.

        The window doubles on each sequential read up to `readahead_pages`. When fewer
        than half of the window's pages are buffered or on their way, the rest is
        requested as runs of `RUN_PAGES`, side by side: a run's first page asks the worker
        to fill the whole run with one UFS read (`run=`). From a worker on this machine
        the whole run then comes in one block (`/v1/locate`); from others, its pages
        follow from the worker's cache. Several ranged reads in flight keep a cold read
        going at the store's pace rather than one request's latency.
        """
        sequential = offset == f.next_offset
        f.next_offset = end
        if not sequential or self._nursery is None or self.config.readahead_pages <= 0:
            f.window = 0
            return
        f.window = min(max(1, f.window * 2), self.config.readahead_pages)
        last_page = min(last_index + f.window, page_count(f.status.size, self.page_size) - 1)
        start = last_index + 1
        while start <= last_page and self._coming(f, start):
            start += 1
        ahead = start - last_index - 1
        if start > last_page or (ahead and 2 * ahead >= f.window):
            return
        count = min(last_page - start + 1, MAX_PREFETCH - self._prefetching)
        for first in range(start, start + count, RUN_PAGES):  # runs fetched side by side
            keys = [self._key(f, i) for i in range(first, min(start + count, first + RUN_PAGES))]
            events = {key: trio.Event() for key in keys}  # each set when its own page is in
            self._scheduled.update(events)
            self._prefetching += len(keys)
            self._nursery.start_soon(self._prefetch_run, f, first, keys, events)

    def _coming(self, f: OpenFile, index: int) -> bool:
        key = self._key(f, index)
        return key in self.local or key in self.buffer or key in self._flights or key in self._scheduled

    async def _prefetch_run(self, f: OpenFile, start: int, keys: list[tuple],
                            events: dict[tuple, trio.Event]) -> None:
        def arrived(key: tuple) -> None:  # a reader waiting for this page goes on now, not at the run's end
            event = events.pop(key, None)
            if event is None:
                return
            if self._scheduled.get(key) is event:
                del self._scheduled[key]
            self._prefetching -= 1
            event.set()

        async def one(i: int) -> None:
            try:
                await self._page(f, i, ahead=True)
            finally:
                arrived(keys[i - start])

        try:
            landed: set[int] | None = None  # pages a run over HTTP brought
            if len(keys) > 1:
                landed = set()
                try:
                    if not await self._run_over_http(f, start, keys, arrived, landed):
                        landed = None
                except DoraError as exc:  # what did not come is fetched page by page below
                    log.debug("the run of pages %d+%d of %s broke off: %s", start, len(keys), f.uri, exc)
            if landed is None:
                try:
                    await self._page(f, start, run=len(keys), ahead=True)
                finally:
                    arrived(keys[0])
                landed = {start}
            async with trio.open_nursery() as nursery:  # what the run did not bring
                for i in range(start, start + len(keys)):
                    if i in landed:
                        continue
                    if keys[i - start] in self.buffer:
                        arrived(keys[i - start])
                    else:
                        nursery.start_soon(one, i)
        except Exception as exc:  # the reader will hit (and report) the same error itself
            log.debug("readahead of pages %d+%d of %s failed: %s", start, len(keys), f.uri, exc)
        finally:
            for key in keys:
                arrived(key)

    async def _run_over_http(self, f: OpenFile, start: int, keys: list[tuple],
                             arrived: Callable[[tuple], None], got: set[int]) -> bool:
        """A readahead run from a worker that is not on this machine (or not read
        directly): its pages in one answer, each buffered and handed to its waiting
        reader as it lands, its index added to `got`. False when the run's worker is read
        directly (short-circuit): the caller takes the page path. On failover the next
        worker is asked for the pages not in yet."""
        status, page_size = f.status, self.page_size
        sizes = [page_length(i, status.size, page_size) for i in range(start, start + len(keys))]
        offsets = [sum(sizes[:n]) for n in range(len(sizes))]
        landed: list[int] = []
        block = None

        def into(index: int, length: int) -> memoryview:
            n = index - start
            if not 0 <= n < len(keys) or length != sizes[n] or (landed and index != landed[-1] + 1):
                raise ValueError(f"page {index} ({length} bytes) is not the next of this run")
            return memoryview(block.data)[offsets[n]:offsets[n] + length]

        def land(index: int) -> None:
            n = index - start
            self.buffer.put(keys[n], Piece(block, offsets[n], offsets[n] + sizes[n]))
            self.stats.worker_pages += 1
            landed.append(index)
            got.add(index)
            arrived(keys[n])

        async def from_worker(address: str) -> bool:
            if self._reads_files_of(address):
                return False
            first = start + len(landed)
            await self._workers.run(address, f.uri, status.version, status.size, first, page_size,
                                    start + len(keys) - first, into, land)
            return True

        block = self.buffer.block(sum(sizes))
        block.filling = True
        try:
            return await self._route(f.uri, from_worker)
        finally:
            self.buffer.filled(block)

    def _reads_files_of(self, address: str) -> bool:
        """Are the pages of the worker at `address` read from its files (short-circuit)?"""
        return bool(self.config.short_circuit) and address not in self._remote and is_loopback(address)

    def _key(self, f: OpenFile, index: int) -> tuple:
        return (f.uri, f.status.version, self.page_size, index)

    async def _page(self, f: OpenFile, index: int, run: int = 1, ahead: bool = False) -> bytes | bytearray | Piece:
        """A whole page, buffered: from the buffer or a fetch (single-flight per page).

        `run` > 1 lets the fetch bring the following pages of the run too. A reader
        that asks for a page of a run being read ahead waits for that run rather than
        fetching the page a second time (`ahead`: the run's own fetches)."""
        key = self._key(f, index)
        data = self.buffer.get(key)
        if data is not None:
            return data
        pending = None if ahead else self._scheduled.get(key)
        if pending is not None:
            await pending.wait()
            data = self.buffer.get(key)
            if data is not None:
                return data
        failed = self._failed.get(key)
        if failed is not None and failed[0] > trio.current_time():
            raise failed[1]  # the kernel retries a failed readahead at once: same answer, no new wait
        try:
            data, _ = await self._flights.do(key, lambda: self._fetch(f, index, run))
        except DoraError as exc:
            if isinstance(exc, (StaleVersion, NotFound)):  # the next open asks for the current version
                self.statuses.forget(f.uri)
            if len(self._failed) > 1024:
                self._failed.clear()
            self._failed[key] = (trio.current_time() + FAILURE_MEMORY, exc)
            raise
        return data

    async def _fetch(self, f: OpenFile, index: int, run: int = 1) -> bytes | bytearray | Piece:
        status, page_size = f.status, self.page_size
        try:
            data = await self._route(f.uri, lambda address: self._fetch_from(address, f, index, run))
            self.stats.worker_pages += 1
        except Unavailable:
            self.stats.ufs_fallback_pages += 1
            length = min(page_size, status.size - index * page_size)
            data = await self.ufs.get(f.uri).read(f.uri, index * page_size, length, status.version)
        self.buffer.put(self._key(f, index), data)
        return data

    async def _fetch_from(self, address: str, f: OpenFile, index: int,
                          run: int = 1) -> bytes | bytearray | Piece:
        """Page `index` from one worker: read from its files when the worker is on this
        machine (and the rest of the run with it), else over HTTP."""
        status, page_size = f.status, self.page_size
        if self._reads_files_of(address):
            located = await self._workers.locate(address, f.uri, status.version, status.size, index, page_size,
                                                 count=run)
            try:
                pieces = await self._read_local(f, located)
            except Unreadable as exc:
                log.info("worker %s: its page files are not readable here (%s); reading over HTTP", address, exc)
                self._remote.add(address)
                pieces = []
            if pieces:
                self.stats.short_circuit_pages += len(pieces)
                self.stats.worker_pages += len(pieces) - 1  # page `index` is counted by _fetch
                for i, piece in enumerate(pieces[1:], index + 1):  # page `index` is buffered by _fetch
                    self.buffer.put(self._key(f, i), piece)
                return pieces[0]
        return await self._workers.page(address, f.uri, status.version, status.size, index, page_size, run=run)

    async def _read_local(self, f: OpenFile, located: list[tuple[int, str, int, str, int]]) -> list[Piece]:
        """Read located page files one after another into one block, each checked
        against its checksum; keep their descriptors; the pieces of the leading pages
        that matched (a missing or corrupt one is fetched over HTTP, where the worker
        checks it).

        On the event loop, with a checkpoint between pages, when the page is in the
        kernel's page cache: then it costs a copy and a hash (a fraction of a
        millisecond), and handing it to a thread measured slower (bench/README.md): the
        thread and the loop, which holds the interpreter lock while it copies a
        reply into the kernel, wait on each other. A page that must come from the disk
        is read in a thread, so the loop never waits for the disk."""
        if not located:
            return []
        block = self.buffer.block(sum(size for _, _, size, _, _ in located))
        pieces = []
        at = 0
        with memoryview(block.data) as whole:
            for index, path, size, checksum, offset in located:
                if pieces:
                    await trio.lowlevel.checkpoint()
                part = whole[at:at + size]
                try:
                    fd = LocalPages.read_page(part, path, checksum, wait=False, offset=offset)
                except WouldBlock:
                    fd = await trio.to_thread.run_sync(
                        functools.partial(LocalPages.read_page, part, path, checksum, offset=offset))
                if fd is None:
                    break
                self.local.keep(self._key(f, index), fd, size, offset)
                pieces.append(Piece(block, at, at + size))
                at += size
        if not pieces:
            self.buffer.give(block)
        return pieces
