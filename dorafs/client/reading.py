"""The read path: bytes of an open file's pinned version, from the nearest copy of each page.

`Reader.read(open_file, offset, length)` returns exactly the bytes asked for (short only
at end of file), assembled from page-aligned pieces of the version pinned when the file
was opened (`OpenFile.status`).

Subtleties:
- Words: a *page* here is always a data page, a page-aligned slice of one object version
  (dorafs/pages.py), identified by `key(f, index)`; a *span* is the part of one page a
  read touches; a *part* is the aligned `random_read` bytes around a random reader's
  read.
- The nearest copy first, for each span: the mount's page buffer (client/buffer.py), a
  page file of a worker on this machine this process already holds open
  (client/local.py, one `pread`), then a fetch: `_whole_page` -> `_fetch`, one fetch per
  page at a time (dorafs/singleflight.py), from the owning worker (client/router.py) or,
  when no worker answers, from the UFS in this process.
- From a worker on this machine the mount asks only where the page files are
  (`/v1/locate`) and reads and checks them itself (`_load_page_files`); from another
  worker the bytes come over HTTP with their checksum (client/workers.py).
- A page its readahead run is fetching (client/prefetch.py, `scheduled`) is waited for,
  never fetched twice; its page file may already be kept, but the run buffers it after.
- A random reader of a worker that is not read directly asks only for the part around
  its read (`_random_part`), not the whole page.
- A page whose fetch failed for good (EIO after the UFS retries, ESTALE) answers the
  same error for `FAILURE_MEMORY` seconds without a new fetch: the kernel re-issues a
  failed readahead as a synchronous read at once, which would otherwise wait out the
  same UFS deadline a second time.
- Buffered pages are returned as memoryviews, no copy until the kernel takes the bytes;
  a read across pages of different blocks, for a caller that takes pieces (the FUSE
  session writes them with one `writev`), is a tuple of views, one per page, not a copy
  into fresh memory (the kernel's 1 MiB READs start half a page off the pages of a
  sequential reader, so most cross two). A sequential reader's pages read to their end
  are discarded from the buffer at once (`_consumed`): it will not ask again, and the
  block is reused for the pages coming.
- A readahead run from a worker on this machine learns where its pages are from one
  streamed answer, each page named as it lands, its first page too (`run_pages`,
  `/v1/locate?stream=1`), not from an ask per page.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
import xxhash

from dorafs.client.buffer import Block, PageBuffer, Piece, view
from dorafs.client.local import LocalPages, NotMapped, Unreadable, WouldBlock
from dorafs.client.prefetch import RUN_LIMIT, Prefetcher, Prefetches
from dorafs.client.router import Router
from dorafs.client.statuses import StatusMemo
from dorafs.client.workers import WorkerClient
from dorafs.config import MountConfig
from dorafs.errors import DoraError, NotFound, StaleVersion, Unavailable
from dorafs.pages import page_length, plan
from dorafs.singleflight import SingleFlight
from dorafs.ufs import FileStatus, UfsSet

log = logging.getLogger(__name__)

STALE_TRIES = 3  # reads of a page whose block was reused under them before one goes around the buffer
FAILURE_MEMORY = 0.5  # seconds a page's final error is answered again without a new fetch
LARGE_READ = 256 << 10  # a read away from the last one this large brings its page's group (Prefetcher.around)


@dataclass(eq=False)
class OpenFile:
    """One open file of the client: its URI, the status (version, size) pinned when it
    was opened, and its prefetcher (readahead owned by this file, cancelled at close),
    which belongs to the Reader that reads it: make one with `Reader.open_file`."""

    uri: str
    status: FileStatus
    ahead: Prefetcher | None = field(default=None, repr=False)


class Reader:
    """The mount's read path (see the module's note)."""

    def __init__(self, config: MountConfig, router: Router, workers: WorkerClient, ufs: UfsSet,
                 statuses: StatusMemo, stats):
        self.config = config
        self.router = router
        self.workers = workers
        self.ufs = ufs
        self.statuses = statuses  # forgets a file whose version is gone
        self.stats = stats
        self.page_size = router.page_size  # the cluster's: the router tells when it changes
        router.page_size_followers.append(self._follow_page_size)
        self.buffer = PageBuffer(config.buffer_size)
        self.local = LocalPages(gone=self.buffer.discard_mapped)
        self.prefetches = Prefetches(config)
        self._scheduled = self.prefetches.scheduled  # the same dict: pages runs are fetching
        self._flights = SingleFlight()
        self._failed: dict[tuple, tuple[float, Exception]] = {}  # page key -> (until, error)
        # `coming`'s questions, each a bound method of a dict (no Python frame)
        self._is_scheduled = self._scheduled.__contains__
        self._is_buffered = self.buffer.contains
        self._is_kept = self.local.contains
        self._is_flying = self._flights.contains

    def _follow_page_size(self, page_size: int) -> None:
        self.page_size = page_size

    def open_file(self, uri: str, status: FileStatus) -> OpenFile:
        f = OpenFile(uri, status)
        f.ahead = Prefetcher(self, f)
        return f

    def key(self, f: OpenFile, index: int) -> tuple:
        """The buffer's and the kept files' key of page `index` of the file's pinned version."""
        return (f.uri, f.status.version, self.page_size, index)

    def coming(self, f: OpenFile, index: int) -> bool:
        """Is page `index` kept, buffered, being fetched or scheduled?

        Asked for every page of a sequential reader's window at each of its reads
        (`Prefetcher.follow`): one key, and each question a lookup of C code, most
        likely first (a page ahead of the reader is scheduled or buffered)."""
        key = (f.uri, f.status.version, self.page_size, index)
        return (self._is_scheduled(key) or self._is_buffered(key) or self._is_kept(key)
                or self._is_flying(key))

    async def read(self, f: OpenFile, offset: int, length: int,
                   pieces: bool = False) -> bytes | bytearray | memoryview | tuple[memoryview, ...]:
        """Bytes [offset, offset+length) of the pinned version, short only at EOF.

        Buffered pages are returned as memoryviews, no copy until the kernel takes the
        bytes, and so is a read across pages of one block (a run read together). With
        `pieces`, a read across buffered pages of different blocks is a tuple of views,
        one per page, which the caller writes out with one `writev` (the FUSE session)
        before anything else runs. Else a read is one `pread` of a verified local page
        file, or is assembled in one buffer, each part read or copied straight into it.
        """
        spans = plan(offset, length, f.status.size, self.page_size)
        if not spans:
            return b""
        ahead = f.ahead
        sequential = offset == ahead.next_offset
        ahead.follow(sequential, offset + length, length, spans[0].index, spans[-1].index)
        if not sequential and offset:
            if length >= LARGE_READ:
                ahead.around(spans[0].index, spans[-1].index)
            else:
                ahead.scattered(spans[0].index, spans[-1].index)
        if len(spans) == 1 and not sequential and self.config.random_read:
            data = await self._random_part(f, spans[0])
            if data is not None:
                return data
        data = await self._span(f, spans[0]) if len(spans) == 1 else await self._spans(f, spans, pieces)
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
                self.buffer.discard(self.key(f, span.index))

    async def _spans(self, f: OpenFile, spans, pieces: bool = False) -> bytearray | memoryview | tuple:
        """A read across pages: one slice of a block when they were read together, with
        `pieces` a view of each page when all are buffered, else assembled in one
        buffer. Pages a run is bringing are waited for first: a run brings them into one
        block, and a read of a column chunk that the group around it brings
        (`Prefetcher.around`) is then answered from that block without a copy into
        fresh memory."""
        held = self._held(f, spans)
        if isinstance(held, memoryview):
            return held
        if pieces and None not in held:
            return tuple(view(data)[span.start:span.end] for span, data in zip(spans, held))
        keys = [self.key(f, span.index) for span, data in zip(spans, held) if data is None]
        pending = [self._scheduled.get(key) for key in keys]
        if pending and all(event is not None for event in pending):
            for event in pending:
                await event.wait()
            held = self._held(f, spans)
            if isinstance(held, memoryview):
                return held
        if pieces:
            parts = self._parts(f, spans, held)
            if parts is not None:
                return parts
        out = bytearray(sum(span.end - span.start for span in spans))
        missing = []
        at = 0
        for span, data in zip(spans, held):
            part = memoryview(out)[at:at + span.end - span.start]
            at += len(part)
            if data is not None:
                part[:] = view(data)[span.start:span.end]  # buffered pieces are never stale
                continue
            key = self.key(f, span.index)
            try:
                if key not in self._scheduled and self.local.readinto(key, part, span.start):
                    continue
            except WouldBlock:  # on the disk, not in the kernel's cache: _span reads it in a thread
                pass
            missing.append((span, part))
        if missing:
            async def fill(span, part: memoryview) -> None:
                part[:] = await self._span(f, span)

            async def fill_run(stretch) -> None:  # the run first (one UFS read), then its pages' bytes
                await self._fetch_run(f, stretch[0][0].index, len(stretch))
                for span, part in stretch:
                    await fill(span, part)

            async with trio.open_nursery() as nursery:
                for stretch in self._stretches(f, missing):
                    if len(stretch) > 1:
                        nursery.start_soon(fill_run, stretch)
                    else:
                        nursery.start_soon(fill, *stretch[0])
        return out

    def _parts(self, f: OpenFile, spans, held: list) -> tuple[memoryview, ...] | None:
        """Each span's bytes for a caller that takes pieces: a view of its buffered page
        (buffered pieces are never stale), or read from the page's kept file into memory
        of its own (a page read to its end by the read after this one, answered first,
        is no longer buffered). None when a page is neither, or would wait for the disk."""
        parts = []
        for span, data in zip(spans, held):
            if data is not None:
                parts.append(view(data)[span.start:span.end])
                continue
            key = self.key(f, span.index)
            if key in self._scheduled:
                return None
            part = memoryview(bytearray(span.end - span.start))
            try:
                if not self.local.readinto(key, part, span.start):
                    return None
            except WouldBlock:
                return None
            parts.append(part)
        return tuple(parts)

    def _held(self, f: OpenFile, spans) -> memoryview | list:
        """The buffered pages of a read: one slice of their block when they are
        consecutive pieces of one, else each page's bytes or None."""
        held = [self.buffer.get(self.key(f, span.index)) for span in spans]
        if all(isinstance(piece, Piece) for piece in held) and all(
                later.follows(earlier) for earlier, later in zip(held, held[1:])):
            return memoryview(held[0].block.data)[held[0].start + spans[0].start:held[-1].start + spans[-1].end]
        return held

    def _stretches(self, f: OpenFile, missing: list) -> list[list]:
        """The missing spans of one read, in stretches of consecutive pages that nothing
        is bringing yet (each fetched as one run), and alone the pages that are coming."""
        stretches: list[list] = []
        for item in missing:
            index = item[0].index
            if self.coming(f, index):
                stretches.append([item])
                stretches.append([])  # the next page starts a stretch of its own
                continue
            if stretches and stretches[-1] and stretches[-1][-1][0].index == index - 1 and \
                    len(stretches[-1]) < RUN_LIMIT:
                stretches[-1].append(item)
            else:
                stretches.append([item])
        return [s for s in stretches if s]

    async def _fetch_run(self, f: OpenFile, first: int, count: int) -> None:
        """Pages first..first+count-1 of one read, none of them coming, brought by one
        UFS read: the first page asks its worker to fill the run, and the pages after it
        are scheduled meanwhile (another reader waits for them; the worker answers them
        as the run lands). Errors are left to each page's own read, which meets them."""
        keys = [self.key(f, i) for i in range(first + 1, first + count)]
        events = {key: trio.Event() for key in keys if key not in self._scheduled}
        self._scheduled.update(events)
        try:
            await self.whole_page(f, first, run=count)
            await self.run_pages(f, first, count, lambda key: self._landed(key, events))
        except DoraError as exc:
            log.debug("the run of pages %d+%d of %s broke off: %s", first, count, f.uri, exc)
        finally:
            for key in keys:
                self._landed(key, events)

    async def run_pages(self, f: OpenFile, first: int, count: int, done: Callable[[tuple], None]) -> None:
        """The pages of a run not buffered yet, which a worker fills with one UFS read:
        one ask (`/v1/locate?stream=1` to a worker on this machine) starts the fill and
        names each page's file as it lands, and the page is read from there at once;
        what that answer did not bring is asked for page by page. `done(key)` as each
        page is in (or failed)."""
        start = first
        while start < first + count and self.key(f, start) in self.buffer:  # an earlier ask brought them
            done(self.key(f, start))
            start += 1
        if start < first + count:
            start += await self._placed_run(f, start, first + count - start, done)
        for i in range(start, first + count):
            key = self.key(f, i)
            try:
                if key not in self.buffer:
                    await self.whole_page(f, i, run=first + count - i, ahead=True)
            finally:
                done(key)

    async def _placed_run(self, f: OpenFile, start: int, count: int, done: Callable[[tuple], None]) -> int:
        """Pages start.. start+count-1 read from the files a worker on this machine names
        in one answer as each lands; how many came (from `start` on)."""
        status, got = f.status, 0

        async def placed(located: list[tuple[int, str, int, str, int]]) -> bool:
            """Pages that landed together: their files read (mapped) at once, pages
            that follow one another in one file in one mapping."""
            nonlocal got
            if [page[0] for page in located] != list(range(start + got, start + got + len(located))):
                return False
            pieces = await self._load_page_files(f, located)
            for (index, *_), piece in zip(located, pieces):
                key = self.key(f, index)
                self.buffer.put(key, piece)
                self.stats.short_circuit_pages += 1
                self.stats.worker_pages += 1
                got += 1
                done(key)
            # one gone or corrupt ends it: the worker checks it when asked for it alone
            return len(pieces) == len(located) and got < count

        async def from_worker(address: str) -> None:
            if self.router.reads_files_of(address) and got < count:
                await self.workers.places(address, f.uri, status.version, status.size, start + got,
                                          self.page_size, count - got, placed)

        try:
            await self.router.route(f.uri, from_worker)
        except DoraError as exc:  # asked for page by page: the answer is the reader's to see
            log.debug("the places of pages %d+%d of %s broke off: %s", start, count, f.uri, exc)
        return got

    def _landed(self, key: tuple, events: dict) -> None:
        event = events.pop(key, None)
        if event is not None:
            if self._scheduled.get(key) is event:
                del self._scheduled[key]
            event.set()

    async def _span(self, f: OpenFile, span) -> bytes | memoryview:
        """The bytes of one page span: from the buffer, a verified local page file, or a fetch."""
        key = self.key(f, span.index)
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
                data = await self.whole_page(f, span.index)
            page = view(data)
            if page is not None:  # else its block was reused while this reader waited: again
                return page[span.start:span.end]
        data = await self.router.route(f.uri, lambda address: self.workers.page(
            address, f.uri, f.status.version, f.status.size, span.index, self.page_size))
        return memoryview(data)[span.start:span.end]

    async def _random_part(self, f: OpenFile, span) -> memoryview | bytes | None:
        """A random reader's read from a worker that is not read directly: the aligned
        `random_read` bytes of the page around it (two such for a read across their
        boundary; buffered on their own), not the whole page. None: the page path serves
        it (a buffered or local page, one on its way, a worker read from its files, an
        error, which the page path meets again and answers)."""
        key = self.key(f, span.index)
        if key in self.buffer or key in self._scheduled or key in self._flights or key in self.local:
            return None
        page_size = self.page_size
        size = self.config.random_read
        start = span.start - span.start % size
        end = min(-(-span.end // size) * size, page_length(span.index, f.status.size, page_size))
        length = end - start
        if length >= page_size:
            return None
        part_key = key + (start, end)
        data = self.buffer.get(part_key)
        if data is None:
            status = f.status

            async def from_worker(address: str) -> bytes | bytearray | None:
                if self.router.reads_files_of(address):
                    return None
                return await self.workers.page(address, f.uri, status.version, status.size, span.index,
                                               page_size, part=(start, length))

            try:
                data, _ = await self._flights.do(part_key, lambda: self.router.route(f.uri, from_worker))
            except DoraError:  # the page path tries again and answers (UFS fallback, ESTALE...)
                return None
            if data is None:
                return None
            self.stats.worker_parts += 1
            self.buffer.put(part_key, data)
        return memoryview(data)[span.start - start:span.end - start]

    async def whole_page(self, f: OpenFile, index: int, run: int = 1, ahead: bool = False) -> bytes | bytearray | Piece:
        """A whole page, buffered: from the buffer or a fetch (single-flight per page).

        `run` > 1 lets the fetch bring the following pages of the run too. A reader
        that asks for a page of a run being read ahead waits for that run rather than
        fetching the page a second time (`ahead`: the run's own fetches)."""
        key = self.key(f, index)
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
            data = await self.router.route(f.uri, lambda address: self._fetch_from(address, f, index, run))
            self.stats.worker_pages += 1
        except Unavailable:
            self.stats.ufs_fallback_pages += 1
            length = min(page_size, status.size - index * page_size)
            data = await self.ufs.get(f.uri).read(f.uri, index * page_size, length, status.version)
        self.buffer.put(self.key(f, index), data)
        return data

    async def _fetch_from(self, address: str, f: OpenFile, index: int,
                          run: int = 1) -> bytes | bytearray | Piece:
        """Page `index` from one worker: read from its files when the worker is on this
        machine (and the rest of the run with it), else over HTTP."""
        status, page_size = f.status, self.page_size
        if self.router.reads_files_of(address):
            located = await self.workers.locate(address, f.uri, status.version, status.size, index, page_size,
                                                count=run)
            try:
                pieces = await self._load_page_files(f, located)
            except Unreadable as exc:
                log.info("worker %s: its page files are not readable here (%s); reading over HTTP", address, exc)
                self.router.not_readable_here(address)
                pieces = []
            if pieces:
                self.stats.short_circuit_pages += len(pieces)
                self.stats.worker_pages += len(pieces) - 1  # page `index` is counted by _fetch
                for i, piece in enumerate(pieces[1:], index + 1):  # page `index` is buffered by _fetch
                    self.buffer.put(self.key(f, i), piece)
                return pieces[0]
        return await self.workers.page(address, f.uri, status.version, status.size, index, page_size, run=run)

    async def _load_page_files(self, f: OpenFile, located: list[tuple[int, str, int, str, int]]) -> list[Piece]:
        """The located pages, each checked against its checksum, their descriptors
        kept: the pieces of the leading pages that matched (a missing or corrupt one is
        fetched over HTTP, where the worker checks it). Those the kernel's page cache
        holds are mapped (`_map_page_files`); the others are read one after another
        into one block.

        On the event loop, with a checkpoint between pages, when the page is in the
        kernel's page cache: then it costs a copy and a hash (a fraction of a
        millisecond), and handing it to a thread measured slower (bench/README.md): the
        thread and the loop, which holds the interpreter lock while it copies a
        reply into the kernel, wait on each other. A page that must come from the disk
        is read in a thread, so the loop never waits for the disk."""
        if not located:
            return []
        pieces, done = self._map_page_files(f, located)
        if done:
            return pieces
        located = located[len(pieces):]
        block = self.buffer.block(sum(size for _, _, size, _, _ in located))
        at = 0
        with memoryview(block.data) as whole:
            for index, path, size, checksum, offset in located:
                if pieces:
                    await trio.lowlevel.checkpoint()
                part = whole[at:at + size]
                try:
                    fd = LocalPages.load_page_file(part, path, checksum, wait=False, offset=offset)
                except WouldBlock:
                    fd = await trio.to_thread.run_sync(
                        functools.partial(LocalPages.load_page_file, part, path, checksum, offset=offset))
                if fd is None:
                    break
                self.local.keep(self.key(f, index), fd, size, offset, checksum)
                pieces.append(Piece(block, at, at + size))
                at += size
        if not at:
            self.buffer.give(block)
        return pieces

    def _map_page_files(self, f: OpenFile, located: list[tuple[int, str, int, str, int]]) -> tuple[list[Piece], bool]:
        """The leading located pages that the kernel's page cache holds, mapped and
        checked (client/local.py, `map_page_file`), pages that follow one another in one
        file in one mapping (a read across them is one slice); keep their descriptors.
        Also whether that is all: True when every page was mapped or one is missing or
        corrupt (as `_load_page_files` answers), False when the rest are to be read."""
        pieces: list[Piece] = []
        i = 0
        while i < len(located):
            _, path, _, _, first = located[i]
            j, end = i + 1, first + located[i][2]
            while j < len(located) and located[j][1] == path and located[j][4] == end:
                end += located[j][2]
                j += 1
            try:
                mapped = LocalPages.map_page_file(path, first, end - first)
            except NotMapped:
                return pieces, False
            if mapped is None:
                return pieces, True
            fd, mapping, at = mapped
            block = Block.mapping(mapping)
            try:
                st = os.fstat(fd)
                with memoryview(mapping) as whole:
                    for index, _, size, checksum, offset in located[i:j]:
                        if xxhash.xxh3_64_hexdigest(whole[at:at + size]) != checksum:
                            return pieces, True
                        self.local.keep(self.key(f, index), os.dup(fd), size, offset, checksum,
                                        file=(st.st_dev, st.st_ino))
                        self.stats.mapped_pages += 1
                        pieces.append(Piece(block, at, at + size))
                        at += size
            finally:
                os.close(fd)
            i = j
        return pieces, True
