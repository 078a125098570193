"""Readahead: each open file's prefetcher keeps a sequential reader's next pages coming.

Every `OpenFile` (client/reading.py) has its own `Prefetcher`; what all of them have in
flight together is counted in the mount's one `Prefetches`.

Subtleties:
- The window doubles on each sequential read (a read starting where the last one ended,
  or at the file's start, where a reader that first read an archive's index at its end
  starts reading it through) up to `readahead_pages`; it starts at `READ_AHEAD_FACTOR`
  times the read (at least a page); any other read sets it back to nothing. A read whose
  own pages nothing brings yet asks for them in the same run as the pages after them. When fewer than half
  of the window's pages are buffered or on their way, the rest is requested as runs of
  `RUN_PAGES` pages, side by side, at most `MAX_PREFETCH` pages across the mount. Once
  the window is a run or more, runs end at multiples of `RUN_PAGES`: the window's end
  is rounded up to one, and what the budget leaves of a run waits for a later top-up
  unless it holds the read's own pages. A tail of a page or two would cost a UFS read
  of its own, as much as a whole run. (A smaller window, a reader just starting, is
  fetched as it is: its own pages must not wait behind a run it did not need.)
- Looking ahead is done once per page a sequential reader reaches (and when its window
  grows), not on each of its reads: a reader of 4 KiB pieces without the kernel's page
  cache reads a page in 256 requests, and looking at each page of a 64-page window for
  every one of them was a sixth of the mount's time. A run the budget held back then
  starts when the reader reaches its next page.
- A run's first page asks the worker to fill the whole run with one UFS read (`run=`).
  From a worker on this machine the run then comes in one block (`/v1/locate`, read
  from its files); from another one in one answer (`/v1/run`, `_run_over_http`), each
  page buffered and handed to its waiting reader as it lands. Several runs in flight
  keep a cold read going at the store's pace rather than one request's latency.
- A page a run is fetching is *scheduled* (`Prefetches.scheduled`, key -> event): a
  reader asking for it waits for that page rather than fetching it a second time, and
  the event is set as soon as that page is in (or its run ends, however it ends).
- Ownership: the run tasks live in the client's nursery (the client's `run` owns them
  and ends them with the mount), but each runs inside a cancel scope its file's
  prefetcher owns. `close` (the file released, or an fsspec file closed) cancels every
  run of that file, and so does a read far from the runs in flight (a seek away: more
  than a window from them). Pages already fetched stay in the buffer, usable by any
  reader; a reader waiting for a page of a cancelled run is let go and fetches it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import trio

from dorafs.client.buffer import Piece
from dorafs.config import MountConfig
from dorafs.errors import DoraError
from dorafs.pages import page_count, page_length

log = logging.getLogger(__name__)

# A sequential reader's readahead is fetched as runs of RUN_PAGES, several at once, at
# most MAX_PREFETCH pages across the mount (6 runs). A store serves a few long GETs at
# once for less CPU per byte than one or two, or than many short ones (bench/README.md,
# "The S3 server spends less per byte on a few long GETs at once").
MAX_PREFETCH = 96
RUN_PAGES = 16  # pages per readahead run (one UFS read on a miss)
RUN_LIMIT = 16  # pages one run may ask a worker to fill (the worker's MAX_RUN)
READ_AHEAD_FACTOR = 4  # a sequential reader's first window: this many times its read, in pages (at least one)
GROUP_PAGES = 8  # a large random read's aligned group of pages, fetched together (`around`)
# A file whose large random reads (by all its readers) land in pages already coming at least
# this often, after more than this many of them, is read back over: its groups are RUN_LIMIT pages.
DENSE_SHARE = 0.5
DENSE_AFTER = 4
# A file whose small random reads, after this many missed, found pages of their group
# coming in under half of DENSE_SHARE of them is read in scattered pieces: its misses
# are not looked around any more (`Prefetcher.scattered`).
SCATTERED_AFTER = 64


class Prefetches:
    """The mount's readahead in flight, across all open files."""

    def __init__(self, config: MountConfig):
        self.config = config
        self.scheduled: dict[tuple, trio.Event] = {}  # keys of pages runs fetch -> set when that page is in
        self.pages = 0  # pages scheduled and not in yet (at most MAX_PREFETCH)
        self.nursery: trio.Nursery | None = None  # the client's, while it runs: the run tasks live there
        self.runs = 0  # runs started (dorafs_mount_readahead_runs_total)
        self.cancelled_runs = 0  # of those, cancelled by a close or a seek away
        # Per file version, of the large random reads of all its readers (`Prefetcher.around`):
        # [how many, how many landed in pages coming already]. The last 1,024 files.
        self.large_reads: OrderedDict[tuple[str, str], list[int]] = OrderedDict()
        # Per file version, of the small random reads of all its readers that found their
        # page missing (`Prefetcher.scattered`): [how many, how many of them had a page of
        # their group coming already]. The last 1,024 files.
        self.small_misses: OrderedDict[tuple[str, str], list[int]] = OrderedDict()


class Prefetcher:
    """Readahead of one open file: its window, and its runs in flight, each in a cancel
    scope this prefetcher owns (see the module's note)."""

    __slots__ = ("reader", "shared", "file", "next_offset", "window", "closed", "_runs", "_looked")

    def __init__(self, reader, file):
        self.reader = reader  # the mount's Reader (client/reading.py): keys, the buffer, page fetches
        self.shared: Prefetches = reader.prefetches
        self.file = file  # the OpenFile this prefetcher reads ahead for
        self.next_offset = 0  # where a sequential reader would read next
        self.window = 0  # current readahead window, in pages
        self.closed = False
        self._runs: dict[trio.CancelScope, tuple[int, int, bool]] = {}  # runs in flight -> (first, last, far)
        self._looked = (-1, 0)  # (last page, window) of the sequential read that last looked ahead

    def follow(self, sequential: bool, end: int, length: int, first_index: int, last_index: int) -> None:
        """A read of `length` bytes ending at `end`, of pages first_index..last_index,
        `sequential` when it started at `next_offset` (or at the file's start): keep the
        pages after it coming if the reader reads sequentially, with the read's own pages
        when nothing brings them yet (one UFS read for both); cancel the runs it went
        away from."""
        self.next_offset = end
        if not sequential:
            self.window = 0
            if self._runs:
                self._cancel_far(first_index, last_index)
            if end != length:  # else a read from the file's start: a sequential reader starting
                return
        if self.shared.nursery is None or self.closed or self.shared.config.readahead_pages <= 0:
            self.window = 0
            return
        f, reader, shared = self.file, self.reader, self.shared
        page_size = reader.page_size
        first_window = -(-READ_AHEAD_FACTOR * length // page_size)  # a larger read starts a larger window
        self.window = min(max(first_window, self.window * 2), shared.config.readahead_pages)
        if sequential and self._looked == (last_index, self.window):
            return  # a small read within the page the last one looked ahead from: nothing new ahead
        self._looked = (last_index, self.window)
        last_page = min(last_index + self.window, page_count(f.status.size, page_size) - 1)
        if last_page == last_index:
            return
        start = first_index  # the read's own pages not coming yet come with the run after them
        while start <= last_index and reader.coming(f, start):
            start += 1
        if start > last_index:
            start = last_index + 1
            while start <= last_page and reader.coming(f, start):
                start += 1
            ahead = start - last_index - 1
            if start > last_page or (ahead and 2 * ahead >= self.window):
                return
        file_last = page_count(f.status.size, page_size) - 1
        budget_end = start + MAX_PREFETCH - shared.pages - 1
        end = min(last_page, budget_end)
        if self.window >= RUN_PAGES:  # whole runs: to the end of one, or what the budget holds of them
            end = min(last_page + -(last_page + 1) % RUN_PAGES, file_last, budget_end)
            if (end + 1) % RUN_PAGES and end < file_last:  # the budget cut a run short
                end = max(end - (end + 1) % RUN_PAGES, min(end, last_index))
        first = start
        while first <= end:  # runs fetched side by side
            last = min(end, first - first % RUN_PAGES + RUN_PAGES - 1)
            self._start_run(first, last - first + 1)
            first = last + 1

    def around(self, first_index: int, last_index: int) -> None:
        """A large read away from where the reader was (a column chunk of a Parquet file,
        a record of an archive): the aligned group of pages around it (`_group`) is
        fetched as one run per stretch of pages that nothing is bringing yet, the read's
        own pages with it, so that the reads that follow nearby find their pages in and a
        cold file costs one UFS read per group instead of one per page. Such a run is not
        cancelled when the reader reads elsewhere (its next read usually does), only at
        `close`."""
        shared, reader, f = self.shared, self.reader, self.file
        if shared.nursery is None or self.closed or shared.config.readahead_pages <= 0:
            return
        self._fetch_group(first_index, last_index, self._group(reader.coming(f, first_index)))

    def _fetch_group(self, first_index: int, last_index: int, group: int) -> None:
        """The aligned `group` of pages around pages first_index..last_index (at most
        RUN_LIMIT pages), one run per stretch of them that nothing brings yet."""
        shared, reader, f = self.shared, self.reader, self.file
        lo = first_index - first_index % group
        hi = min(max(last_index, lo + group - 1), lo + RUN_LIMIT - 1,
                 page_count(f.status.size, reader.page_size) - 1)
        index = lo
        while index <= hi:
            if reader.coming(f, index):
                index += 1
                continue
            end = index
            while end < hi and not reader.coming(f, end + 1):
                end += 1
            if shared.pages + end - index + 1 > MAX_PREFETCH:
                return  # the mount's readahead is full: the read fetches its own pages
            self._start_run(index, end - index + 1, far=False)
            index = end + 1

    def scattered(self, first_index: int, last_index: int) -> None:
        """A small read away from where the reader was. Its page alone is fetched (a
        random reader of a large file reads little of each region), until the file's
        small reads that miss mostly find other pages of their group coming already: then
        its readers are covering the file (fio's random reads, a sampler of records), and
        the pages of the read's group that nothing brings yet come in one run, its own
        with them: a file read all over costs about a GET per group, not one per page
        (bench/README.md, "Small random reads that cover a file")."""
        shared, reader, f = self.shared, self.reader, self.file
        if shared.nursery is None or self.closed or shared.config.readahead_pages <= 0:
            return
        if reader.coming(f, first_index):
            return
        counts = shared.small_misses.get((f.uri, f.status.version))
        if counts is not None and counts[0] >= SCATTERED_AFTER and 2 * counts[1] < DENSE_SHARE * counts[0]:
            return  # its readers read scattered pieces: no need to look around each miss
        lo = first_index - first_index % RUN_LIMIT
        hi = min(lo + RUN_LIMIT, page_count(f.status.size, reader.page_size))
        near = any(reader.coming(f, i) for i in range(lo, hi) if i != first_index)
        if self._tally(shared.small_misses, near):
            self._fetch_group(first_index, last_index, RUN_LIMIT)

    def _group(self, landed_in: bool) -> int:
        """The group of pages for this large read: GROUP_PAGES, or RUN_LIMIT once the
        file's large reads, counted over all its readers, mostly land in pages already
        coming (`landed_in`: whether this one does). Its readers come back to the regions
        they read (the column chunks of one Parquet row group, a random reader covering
        the file), and one GET of a larger group costs the store less than two. A reader
        whose reads keep landing in new places uses one page of each group: a larger group
        would make each of its reads wait for more bytes it never reads (bench/README.md,
        "Tried and not kept: groups of 16 pages around a large random read")."""
        return RUN_LIMIT if self._tally(self.shared.large_reads, landed_in) else GROUP_PAGES

    def _tally(self, seen: OrderedDict[tuple[str, str], list[int]], near: bool) -> bool:
        """Count a read of this file's version in `seen` (`near`: one that found pages
        coming already); whether, after more than DENSE_AFTER, at least DENSE_SHARE of
        them did."""
        which = (self.file.uri, self.file.status.version)
        counts = seen.get(which)
        if counts is None:
            seen[which] = counts = [0, 0]
            if len(seen) > 1024:
                seen.popitem(last=False)
        else:
            seen.move_to_end(which)
        counts[0] += 1
        counts[1] += near
        return counts[0] > DENSE_AFTER and counts[1] >= DENSE_SHARE * counts[0]

    def _start_run(self, first: int, count: int, far: bool = True) -> None:
        """Pages first..first+count-1 fetched as one run in the client's nursery, each
        scheduled until it is in. `far`: cancelled when the reader reads far from it."""
        shared, reader, f = self.shared, self.reader, self.file
        keys = [reader.key(f, i) for i in range(first, first + count)]
        events = {key: trio.Event() for key in keys}  # each set when its own page is in
        shared.scheduled.update(events)
        shared.pages += len(keys)
        scope = trio.CancelScope()
        self._runs[scope] = (first, first + len(keys) - 1, far)
        shared.runs += 1
        shared.nursery.start_soon(self._run, scope, first, keys, events)

    def _cancel_far(self, first_index: int, last_index: int) -> None:
        """The reader left the runs in flight behind (or jumped back) by more than a
        window: their pages would come for nobody."""
        slack = max(self.shared.config.readahead_pages, RUN_PAGES)
        for scope, (first, last, far) in list(self._runs.items()):
            if far and (first_index > last + slack or last_index + slack < first):
                self._cancel(scope)

    def _cancel(self, scope: trio.CancelScope) -> None:
        if not scope.cancel_called:
            scope.cancel()
            self.shared.cancelled_runs += 1

    def close(self) -> None:
        """The file is closed: cancel its runs; start none again."""
        self.closed = True
        for scope in list(self._runs):
            self._cancel(scope)

    @property
    def running(self) -> int:
        """Runs of this file in flight."""
        return len(self._runs)

    async def _run(self, scope: trio.CancelScope, start: int, keys: list[tuple],
                   events: dict[tuple, trio.Event]) -> None:
        shared, reader, f = self.shared, self.reader, self.file

        def arrived(key: tuple) -> None:  # a reader waiting for this page goes on now, not at the run's end
            event = events.pop(key, None)
            if event is None:
                return
            if shared.scheduled.get(key) is event:
                del shared.scheduled[key]
            shared.pages -= 1
            event.set()

        async def one(i: int) -> None:
            try:
                await reader.whole_page(f, i, ahead=True)
            finally:
                arrived(keys[i - start])

        try:
            with scope:
                landed: set[int] | None = None  # pages a run over HTTP brought
                if len(keys) > 1:
                    landed = set()
                    try:
                        if not await self._run_over_http(start, keys, arrived, landed):
                            # A worker on this machine: one streamed ask fills the run and names its pages.
                            await reader.run_pages(f, start, len(keys), arrived)
                            return
                    except DoraError as exc:  # what did not come is fetched page by page below
                        log.debug("the run of pages %d+%d of %s broke off: %s", start, len(keys), f.uri, exc)
                        landed = None
                if landed is None:
                    fallbacks = reader.stats.ufs_fallback_pages
                    try:
                        await reader.whole_page(f, start, run=len(keys), ahead=True)
                    finally:
                        arrived(keys[0])
                    landed = {start}
                    if reader.stats.ufs_fallback_pages == fallbacks:  # a worker fills the run
                        await reader.run_pages(f, start, len(keys), arrived)
                        return
                async with trio.open_nursery() as nursery:  # what the run did not bring
                    for i in range(start, start + len(keys)):
                        if i in landed:
                            continue
                        if keys[i - start] in reader.buffer:
                            arrived(keys[i - start])
                        else:
                            nursery.start_soon(one, i)
        except Exception as exc:  # the reader will hit (and report) the same error itself
            log.debug("readahead of pages %d+%d of %s failed: %s", start, len(keys), f.uri, exc)
        finally:
            self._runs.pop(scope, None)
            for key in keys:
                arrived(key)
        if scope.cancelled_caught:
            log.debug("readahead of pages %d+%d of %s cancelled", start, len(keys), f.uri)

    async def _run_over_http(self, start: int, keys: list[tuple],
                             arrived: Callable[[tuple], None], got: set[int]) -> bool:
        """A readahead run from a worker that is not on this machine (or not read
        directly): its pages in one answer, each buffered and handed to its waiting
        reader as it lands, its index added to `got`. False when the run's worker is read
        directly (short-circuit): the caller takes the page path. On failover the next
        worker is asked for the pages not in yet."""
        reader, f = self.reader, self.file
        status, page_size, buffer = f.status, reader.page_size, reader.buffer
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
            buffer.put(keys[n], Piece(block, offsets[n], offsets[n] + sizes[n]))
            reader.stats.worker_pages += 1
            landed.append(index)
            got.add(index)
            arrived(keys[n])

        async def from_worker(address: str) -> bool:
            if reader.router.reads_files_of(address):
                return False
            first = start + len(landed)
            await reader.workers.run(address, f.uri, status.version, status.size, first, page_size,
                                     start + len(keys) - first, into, land)
            return True

        block = buffer.block(sum(sizes))
        block.filling = True
        try:
            return await reader.router.route(f.uri, from_worker)
        finally:
            buffer.filled(block)
