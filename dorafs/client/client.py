"""DoraClient: routes metadata and page reads to the owning worker, with failover.

Routing: the ring key of a file's pages and status is its full UFS URI, and of a
listing the directory's URI, so one worker owns all of a file. Candidates are tried in
ring order; a worker that fails to answer (connection error, timeout, corrupt page) is
skipped for `SUSPECT_SECONDS` and the next candidate serves; when none answers, the
client reads the UFS itself. An error *answer* (not found, changed object, UFS failure)
is authoritative and is raised, not retried elsewhere.

Reads: `read(open_file, offset, length)` returns exactly the bytes asked for (short only
at end of file), assembled from page-aligned fetches of the version pinned at open.
Sequential readers get readahead: the next pages are fetched concurrently into the
page buffer, the window doubling up to `readahead_pages`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from dorafs.client.buffer import PageBuffer
from dorafs.client.workers import WorkerClient
from dorafs.config import MountConfig
from dorafs.errors import DoraError, Unavailable
from dorafs.membership import Membership
from dorafs.pages import page_count, plan
from dorafs.ring import HashRing
from dorafs.singleflight import SingleFlight
from dorafs.ufs import FileStatus, UfsSet
from dorafs.ufs.base import parent as parent_uri

log = logging.getLogger(__name__)

T = TypeVar("T")
SUSPECT_SECONDS = 5.0  # how long a failed worker is skipped before it is tried again
MAX_CANDIDATES = 3  # workers tried for one request before the UFS
MAX_PREFETCH = 16  # readahead fetches in flight across the mount
LIST_PAGE = 1000


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
    ufs_fallback_pages: int = 0
    ufs_fallback_metadata: int = 0
    failovers: int = 0
    by_worker: Counter = field(default_factory=Counter)


class DoraClient:
    def __init__(self, config: MountConfig, membership: Membership, ufs: UfsSet):
        self.config = config
        self.membership = membership
        self.ufs = ufs
        self.page_size = config.page_size
        self.ring = HashRing()
        self.buffer = PageBuffer(config.buffer_size)
        self.stats = ClientStats()
        self._workers = WorkerClient(timeout=config.worker_timeout, connect_timeout=config.connect_timeout)
        self._flights = SingleFlight()
        self._suspect_until: dict[str, float] = {}
        self._prefetching = 0
        self._nursery: trio.Nursery | None = None
        membership.add_listener(self._rebuild_ring)

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep membership fresh and own the readahead tasks, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.membership.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                await self._workers.aclose()

    def _rebuild_ring(self) -> None:
        workers = self.membership.workers
        sizes = Counter(w.page_size for w in workers.values())
        if sizes:
            self.page_size = sizes.most_common(1)[0][0]
        odd = [w.id for w in workers.values() if w.page_size != self.page_size]
        if odd:
            log.error("workers %s use a page size other than %d and are left off the ring", odd, self.page_size)
        self.ring = HashRing([w.id for w in workers.values() if w.page_size == self.page_size])
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
                if address not in self._suspect_until:
                    log.warning("worker %s failed (%s); using the next candidate for %ds", address, exc,
                                SUSPECT_SECONDS)
                self._suspect_until[address] = trio.current_time() + SUSPECT_SECONDS
                self.stats.failovers += 1
                continue
            if self._suspect_until.pop(address, None) is not None:
                log.info("worker %s answers again", address)
            self.stats.by_worker[address] += 1
            return result
        raise Unavailable(f"no worker answered for {key} ({tried} tried)")

    # -- metadata ---------------------------------------------------------------------

    async def stat(self, uri: str) -> FileStatus:
        try:
            return await self._route(uri, lambda address: self._workers.stat(address, uri))
        except Unavailable:
            self.stats.ufs_fallback_metadata += 1
            return await self.ufs.get(uri).stat(uri)

    async def list_pages(self, uri: str) -> AsyncIterator[list[FileStatus]]:
        """A directory's entries a page at a time, from its owner (or the UFS)."""
        after = ""
        while True:
            try:
                entries, after_next = await self._route(
                    uri, lambda address: self._workers.list_page(address, uri, after, LIST_PAGE))
            except Unavailable:
                self.stats.ufs_fallback_metadata += 1
                async for page in self.ufs.get(uri).list_pages(uri):
                    page = [e for e in page if e.name > after] if after else page
                    if page:
                        yield page
                return
            if entries:
                yield entries
            if after_next is None:
                return
            after = after_next

    async def invalidate(self, uri: str, *, recursive: bool = False, pages: bool = False) -> None:
        """Make the workers forget `uri` after it changed through this mount.

        The owner of `uri` drops its status, the owner of the parent its listing. A
        worker that does not answer has nothing this mount can reach anyway; its TTLs
        bound how long it may serve the old entry. `recursive` (a directory renamed or
        removed) asks every worker, since the paths under `uri` hash anywhere. `pages`
        drops the pages of the version the owner knew too (they would never be served
        again: a new version has new page ids; this frees their space at once).
        """
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

    async def read(self, f: OpenFile, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) of the pinned version, short only at EOF.

        A read within one page returns a memoryview into the buffered page: no copy
        until the kernel takes the bytes.
        """
        page_size = self.page_size
        spans = plan(offset, length, f.status.size, page_size)
        if not spans:
            return b""
        self._readahead(f, offset, offset + length, spans[-1].index)
        if len(spans) == 1:
            span = spans[0]
            return memoryview(await self._page(f, span.index))[span.start:span.end]
        parts: list[memoryview] = [memoryview(b"")] * len(spans)

        async def fetch(i: int) -> None:
            span = spans[i]
            parts[i] = memoryview(await self._page(f, span.index))[span.start:span.end]

        async with trio.open_nursery() as nursery:
            for i in range(len(spans)):
                nursery.start_soon(fetch, i)
        return b"".join(parts)

    def _readahead(self, f: OpenFile, offset: int, end: int, last_index: int) -> None:
        sequential = offset == f.next_offset
        f.next_offset = end
        if not sequential or self._nursery is None or self.config.readahead_pages <= 0:
            f.window = 0
            return
        f.window = min(max(1, f.window * 2), self.config.readahead_pages)
        last = min(last_index + f.window, page_count(f.status.size, self.page_size) - 1)
        for index in range(last_index + 1, last + 1):
            key = self._key(f, index)
            if key in self.buffer or key in self._flights:
                continue
            if self._prefetching >= MAX_PREFETCH:
                break
            self._prefetching += 1
            self._nursery.start_soon(self._prefetch, f, index)

    async def _prefetch(self, f: OpenFile, index: int) -> None:
        try:
            await self._page(f, index)
        except Exception as exc:  # the reader will hit (and report) the same error itself
            log.debug("readahead of page %d of %s failed: %s", index, f.uri, exc)
        finally:
            self._prefetching -= 1

    def _key(self, f: OpenFile, index: int) -> tuple:
        return (f.uri, f.status.version, self.page_size, index)

    async def _page(self, f: OpenFile, index: int) -> bytes | bytearray:
        key = self._key(f, index)
        data = self.buffer.get(key)
        if data is not None:
            return data
        data, _ = await self._flights.do(key, lambda: self._fetch(f, index))
        return data

    async def _fetch(self, f: OpenFile, index: int) -> bytes | bytearray:
        status, page_size = f.status, self.page_size
        try:
            data = await self._route(f.uri, lambda address: self._workers.page(
                address, f.uri, status.version, status.size, index, page_size))
            self.stats.worker_pages += 1
        except Unavailable:
            self.stats.ufs_fallback_pages += 1
            length = min(page_size, status.size - index * page_size)
            data = await self.ufs.get(f.uri).read(f.uri, index * page_size, length, status.version)
        self.buffer.put(self._key(f, index), data)
        return data
