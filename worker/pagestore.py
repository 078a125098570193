"""Pages on local disk, bounded by bytes, evicted least-recently-used first.

Layout: `ROOT/pages/<oid[:2]>/<oid>_<index>_<checksum>` where oid identifies one version
of one object (`dorafs.pages.object_id`) and checksum is the page's xxh3-64. Keeping the
checksum in the name means the index is rebuilt from a directory walk alone, so a
restarted worker keeps its cache without any side database. Versions that have an
object file keep their pages in it instead (below).

Subtleties:
- A page is written to `ROOT/pages/tmp/` and renamed into place: a crash leaves either
  the whole page or a temp file (removed on start), never a torn page under a real name.
- The byte capacity is never exceeded: room is reserved (evicting as needed) before the
  write starts, and the reservation is dropped if the write fails. When writes in
  flight already hold the room, the page is served without being cached.
- Evicted files are unlinked on the trio thread, before the put that evicted them
  continues (one unlink per page written, microseconds on a local disk): a late unlink
  in a thread could delete a page re-cached under the same name in the meantime.
- A fill's pages are written by the thread that receives them, each as soon as its
  bytes are in (`RunWriter`), their room reserved on the trio thread before the read
  begins (`reserve`) and indexed there as each lands (`settle`); each page still gets
  its own temp file and rename. `put_many` does the same for pages already in memory,
  with one thread call for all of them.
- The index lives on the trio thread; file I/O runs in threads. Readers of a page that
  eviction unlinks concurrently still hold their open fd, so sendfile completes.
- A full or failing cache disk never fails a read: the page is served from memory
  without being cached. A full disk (ENOSPC, EDQUOT) lowers the store's `limit` to the
  bytes it holds, so later pages evict older ones and caching goes on at the size the
  disk really has; the configured capacity is tried again after `REGROW_SECONDS`. A
  failing disk (EIO, EROFS, EACCES...) stops write attempts for `FAULT_RETRY_SECONDS`,
  then one is tried again; a successful write ends the fault. Other errors concern one
  page's path and are only counted. `health()` says what is wrong.

Object files: one file per object version, `ROOT/objects/<oid[:2]>/<oid>`, the pages
at their offsets. Such a file, once whole, is what a mount on this node hands to the
kernel for passthrough reads (`whole()` says where it is); it is also sent with
sendfile, page by page or run by run, from its offsets, and a local mount reads pages
from it. A version gets one in two ways:
- **Grown** (`grow`): the worker asks for it when a mount on this node reads the version
  from its files (and for a load job's files), before its first page is cached. Each
  page is then written into the file at its offset and its checksum appended to
  `<oid>.log` once its bytes are in; the page is indexed only after that. When the last
  page lands, `<oid>.sums` (JSON: size, page size, every page's checksum) is renamed into
  place beside it and the log removed: whole, with no copy.
- **Sealed** (`seal`): a version whose pages are page files (a remote mount read it, or
  it grew no file) is copied into one when a mount on this node or a load job asks, or
  when its last page lands for such a mount: each page checked against its checksum,
  written under a temp name, the sums renamed into place before the file, then the page
  files unlinked. It costs one read and one write of the object, and room for the copy;
  it is refused when making room would evict pages of the object itself.
Rules:
- A page of an object file is written once, at its offset, and never changed: a file
  grows only into its holes; eviction (of any of its pages), drop and a failed write
  remove the whole file (unlink), never rewrite, truncate or punch a page that was
  logged. So a mount that read and checked a page of the file (or holds the whole file)
  keeps reading those bytes. One write per page at a time: a write that fails (a full
  disk) frees the blocks it took by punching its own page's range, which no reader
  reads before its log line exists.
- After a crash: a log line cut short, or naming a page the file does not reach, is not
  a page; a page whose bytes never reached the disk is caught by the checksum every
  reader checks (a mount before its first read of a page, or before it holds the whole
  file; the worker when asked to verify). A log whose every page is there is made whole
  on start; an object file with neither valid sums nor a log is removed, and so are page
  files of a version that has an object file.
- A version grows only if it takes at most 1/`GROW_SHARE` of the store, since evicting
  any page of it removes all of it.
- A mount that hands a whole file to the kernel holds a shared `flock` on it; unlinking
  such a file frees no disk space until the mount lets go, so the store keeps it open,
  counts its bytes in `held` (and in `used`, so the byte bound covers them), and gives
  them back once the lock is gone (checked at each put and eviction, at most every
  `HELD_RECHECK_SECONDS`). Bytes held by open passthrough files therefore delay caching,
  never exceed the bound: while they fill it, new pages are served without caching.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
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
HELD_RECHECK_SECONDS = 1.0  # how often unlinked object files a mount holds are looked at
# A version grows in its object file only if it takes at most 1/GROW_SHARE of the store:
# evicting any page of it removes all of it.
GROW_SHARE = 4
# The most one write call puts into the page cache. For a larger write the kernel makes
# larger folios, and on the machines measured those often came from memory the host had
# taken back: up to ten times the system CPU per byte, where 64 KiB writes always cost
# little (bench/README.md, "Writing new bytes into the page cache costs ten times as
# much in 1 MiB calls").
WRITE_PIECE = 64 << 10
# A run's receiving thread wakes the event loop for the first page it wrote, then once
# TELL_PAGES more landed, TELL_AFTER seconds went by, or the run ended; the loop also
# looks every LOOK_EVERY seconds while it waits, so a page that landed just before the
# store stalled is not held back for the stall. Each wakeup costs the loop a turn and
# every reader of the run a frame (bench/README.md, "Pages told in fours").
TELL_PAGES = 4
TELL_AFTER = 0.01
LOOK_EVERY = 0.05


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class PageEntry:
    path: Path  # the page's file, or its object's file (then `in_object` is set)
    size: int
    checksum: str
    offset: int = 0  # where the page starts in `path`
    in_object: bool = False  # `path` is the object file of its version (whole or growing)


@dataclass(slots=True)
class PageWrite:
    """A page with room reserved for it (`PageStore.reserve`), to be written (`write`,
    in any thread) and then settled (`settle`)."""

    key: PageKey
    size: int
    target: Growing | None  # the growing version whose object file takes it; None: a page file
    digest: str = ""  # set before it is written


@dataclass
class WholeObject:
    """A sealed object version: one file, its size, page size and page checksums."""

    path: Path
    size: int
    page_size: int
    checksums: list[str]


@dataclass(eq=False)
class Growing:
    """An object version whose pages are written into its object file as they arrive,
    each page's checksum appended to `<file>.log` once its bytes are in."""

    path: Path
    size: int
    page_size: int
    checksums: list[str | None]  # by page index; None: not in the file yet
    completing: trio.Event | None = None  # set once its sums are written (or it went)
    missing: int = -1  # pages not in the file yet (counted from `checksums` when made)

    def __post_init__(self) -> None:
        if self.missing < 0:
            self.missing = self.checksums.count(None)

    def complete(self) -> bool:
        return self.missing == 0


@dataclass
class _Held:
    fd: int
    size: int


class PageStore:
    def __init__(self, root: Path, capacity: int, *, thread_limiter: trio.CapacityLimiter | None = None):
        self.root = Path(root) / "pages"
        self.tmp = self.root / "tmp"
        self.objects = Path(root) / "objects"
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
        self._whole: dict[str, WholeObject] = {}  # sealed objects by object id
        self._growing: dict[str, Growing] = {}  # versions written into their object file as pages land
        self._page_writes: dict[str, int] = {}  # page files being written, by object id
        self._growing_writes: set[PageKey] = set()  # pages being written into object files
        self._sealing: dict[str, trio.Event] = {}  # objects being sealed -> set when done
        self._held: list[_Held] = []  # unlinked object files a mount still holds
        self.held = 0  # their bytes (part of `used`)
        self.sealed = 0  # objects sealed since start
        self.corrupt = 0  # corrupt pages found while sealing
        self._held_checked = 0.0
        self._serial = itertools.count()  # temp file names (the temp directory is emptied on start)
        self._pid = os.getpid()

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
        for mtime, whole in self._load_objects():
            for index, digest in enumerate(whole.checksums):
                if digest is None:
                    continue
                length = min(whole.page_size, whole.size - index * whole.page_size)
                found.append((mtime, (whole.path.name, index),
                              PageEntry(whole.path, length, digest, index * whole.page_size, True)))
            if isinstance(whole, Growing):
                self._growing[whole.path.name] = whole
            else:
                self._whole[whole.path.name] = whole
        in_files = set(self._whole) | set(self._growing)
        kept = []
        for item in found:
            _, (oid, _), entry = item
            if oid in in_files and not entry.in_object:  # sealed before a crash unlinked its pages
                entry.path.unlink(missing_ok=True)
            else:
                kept.append(item)
        kept.sort(key=lambda item: item[0])  # oldest first: the LRU end
        for _, key, entry in kept:
            self._insert(key, entry)
        while self.used > self.capacity and self._index:
            self._evict_one()
        log.info("page store: %d pages (%d whole objects), %d bytes of %d", len(self._index),
                 len(self._whole), self.used, self.capacity)

    def _load_objects(self) -> list[tuple[float, WholeObject | Growing]]:
        """The object files on disk, whole or growing; removes what a crash left half done.
        A growing file whose every page is in the file is made whole here."""
        self.objects.mkdir(mode=0o700, exist_ok=True)
        out = []
        for sub in self.objects.iterdir():
            if not sub.is_dir():
                sub.unlink(missing_ok=True)
                continue
            for path in sub.iterdir():
                name = path.name
                if name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                    continue
                if name.endswith((".sums", ".log")):
                    if not (sub / name[:-5] if name.endswith(".sums") else sub / name[:-4]).exists():
                        path.unlink(missing_ok=True)
                    continue
                whole = _read_sums(path)
                if whole is not None:
                    Path(f"{path}.log").unlink(missing_ok=True)
                else:
                    whole = _read_log(path)
                    if whole is not None and whole.complete():
                        _write_sums(path, whole.size, whole.page_size, whole.checksums)
                        Path(f"{path}.log").unlink()
                        whole = WholeObject(path, whole.size, whole.page_size, list(whole.checksums))
                if whole is None:
                    log.warning("removing object file without valid checksums: %s", path)
                    path.unlink(missing_ok=True)
                    Path(f"{path}.sums").unlink(missing_ok=True)
                    Path(f"{path}.log").unlink(missing_ok=True)
                    continue
                out.append((path.stat().st_mtime, whole))
        return out

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

    def count_of(self, oid: str) -> int:
        """How many pages of object version `oid` are cached."""
        return len(self._by_object.get(oid, ()))

    def whole(self, oid: str) -> WholeObject | None:
        """The sealed file of object version `oid`, if it is wholly cached as one."""
        return self._whole.get(oid)

    def is_sealing(self, oid: str) -> bool:
        return oid in self._sealing

    def is_growing(self, oid: str) -> bool:
        return oid in self._growing

    def grow(self, oid: str, size: int, page_size: int) -> bool:
        """Write the pages of object version `oid` (`size` bytes in pages of `page_size`)
        into its object file as they arrive, from now on; True if they go there (or it
        is whole already). Not for a version with pages in page files (sealing copies
        those), nor one bigger than a GROW_SHARE of the store: evicting any page of a
        growing version removes all of it."""
        if oid in self._growing or oid in self._whole:
            return True
        if oid in self._by_object or oid in self._page_writes or oid in self._sealing \
                or size * GROW_SHARE > self.limit or size <= 0 or page_size <= 0:
            return False
        self._growing[oid] = Growing(self.objects / oid[:2] / oid, size, page_size, [None] * -(-size // page_size))
        return True

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
        return (await self.put_many([(key, data, digest)]))[0]

    async def put_many(self, pages: list[tuple[PageKey, bytes | memoryview, str]]) -> list[PageEntry | None]:
        """Store several pages (those of a run whose bytes are in) with one thread call
        for all of them; for each, its entry or None as `put` answers. Room for all of
        them is reserved (evicting as needed) before the first byte is written. Pages
        of a growing version go into its object file, the others into page files."""
        out: list[PageEntry | None] = [None] * len(pages)
        writes = self.reserve([(key, len(page)) for key, page, _ in pages])
        todo: list[tuple[int, PageWrite, bytes | memoryview]] = []
        for i, (key, data, digest) in enumerate(pages):
            write = writes[i]
            if write is None:
                out[i] = self._index.get(key)
            else:
                write.digest = digest
                todo.append((i, write, data))
        if not todo:
            return out
        written, error = 0, None
        try:
            failure = await trio.to_thread.run_sync(self.write, [(w, data) for _, w, data in todo],
                                                    limiter=self._limiter)
            written, error = failure or (len(todo), None)
        finally:
            entries = await self.settle([w for _, w, _ in todo], written, error)
        for (i, _, _), entry in zip(todo, entries):
            out[i] = entry
        return out

    def reserve(self, pages: list[tuple[PageKey, int]]) -> list[PageWrite | None]:
        """Room for pages about to be written (`(key, size)` each), evicting as needed:
        for each, what `write` writes and `settle` gives back or indexes, or None (cached
        already, being written by another, or no room: served without caching)."""
        out: list[PageWrite | None] = []
        taken: set[PageKey] = set()
        for key, size in pages:
            if key in self._index or key in taken or key in self._growing_writes or not self._reserve(size):
                out.append(None)
                continue
            taken.add(key)
            target = self._growing.get(key[0])  # (after the room: making it may have evicted the version)
            if target is None:
                self._page_writes[key[0]] = self._page_writes.get(key[0], 0) + 1
            else:  # one writer per page of an object file: a failed write may punch its range
                self._growing_writes.add(key)
            out.append(PageWrite(key, size, target))
        return out

    def write(self, pages: list[tuple[PageWrite, bytes | memoryview]],
              files: dict[Path, tuple[int, int]] | None = None) -> tuple[int, OSError] | None:
        """Write reserved pages (each with its `digest` set) one after another, in any
        thread; None when all landed, else how many did and the error that stopped the
        rest (they are not written: the disk said what it thinks). A page file is
        written under a temp name renamed into place; a growing version's page at its
        offset in the object file, then its line in the log. `files` (object file -> its
        descriptor and its log's) keeps them open for the caller to close; else they are
        closed here."""
        keep = files is not None
        files = {} if files is None else files
        try:
            for done, (page, data) in enumerate(pages):
                index, target = page.key[1], page.target
                try:
                    if target is None:
                        self._write(self._page_path(page.key, page.digest), data)
                        continue
                    fds = files.get(target.path)
                    if fds is None:
                        fds = files[target.path] = _open_growing(target.path)
                    try:
                        _pwrite_fully(fds[0], data, index * target.page_size)
                    except OSError:
                        # What it wrote holds space a full disk lacks; no reader reads a
                        # page before its log line, and no other write has this page.
                        _punch(fds[0], index * target.page_size, len(data))
                        raise
                    line = f"{index} {target.size} {target.page_size} {page.digest}\n".encode()
                    if os.write(fds[1], line) != len(line):
                        raise OSError(errno.ENOSPC, "short write of a page's checksum")
                except OSError as exc:
                    return done, exc
            return None
        finally:
            if not keep:
                for fd, log_fd in files.values():
                    os.close(fd)
                    os.close(log_fd)

    async def settle(self, pages: list[PageWrite], written: int, error: OSError | None = None) -> list[PageEntry | None]:
        """After `write` of `pages`: give back their room and index the first `written`
        (the others did not land: `error` is what stopped them, None when they were never
        tried); for each, its entry or None."""
        for page in pages:
            self.used -= page.size
            self.reserved -= page.size
            if page.target is None:
                left = self._page_writes[page.key[0]] - 1
                if left:
                    self._page_writes[page.key[0]] = left
                else:
                    del self._page_writes[page.key[0]]
            else:
                self._growing_writes.discard(page.key)
        if error is not None:
            self.write_errors += 1
            self._write_failed(error, pages[written].size)
        elif written and self.fault is not None:
            log.info("cache disk writes work again (after: %s)", self.fault)
            self.fault = None
        out: list[PageEntry | None] = [None] * len(pages)
        grown: dict[str, Growing] = {}
        for i, page in enumerate(pages[:written]):
            key, target = page.key, page.target
            if key in self._index:  # a concurrent put of the same page won the race
                out[i] = self._index[key]
                continue
            if target is not None:
                if self._growing.get(key[0]) is not target:  # the version went meanwhile
                    if key[0] not in self._growing and key[0] not in self._whole:  # what this wrote after it went
                        _unlink(str(target.path))
                        _unlink(f"{target.path}.log")
                    continue
                if target.checksums[key[1]] is None:
                    target.missing -= 1
                target.checksums[key[1]] = page.digest
                grown[key[0]] = target
                entry = PageEntry(target.path, page.size, page.digest, key[1] * target.page_size, True)
            else:
                entry = PageEntry(Path(self._page_path(key, page.digest)), page.size, page.digest)
            self._insert(key, entry)
            out[i] = entry
        for oid, growing in grown.items():
            if growing.completing is None and growing.complete() and self._growing.get(oid) is growing:
                await self._complete(oid, growing)
        return out

    def _page_path(self, key: PageKey, digest: str) -> str:
        return f"{self.root}/{key[0][:2]}/{key[0]}_{key[1]}_{digest}"

    def _reserve(self, size: int) -> bool:
        """Hold room for a page about to be written (evicting as needed); False when it
        cannot be cached now (the disk failed a moment ago, too big, no room)."""
        self._check_held()
        now = time.monotonic()
        if self.fault is not None and now < self._retry_at:
            return False  # the disk failed a moment ago: serve without caching
        if self.limit < self.capacity and now >= self._regrow_at:
            log.info("trying the cache's full capacity again (%d bytes)", self.capacity)
            self.limit = self.capacity
        if self.reserved + self.held + size > self.limit:
            return False  # too big, or writes in flight hold the room: serve without caching
        while self.used + size > self.limit and self._index:
            self._evict_one()
        if self.used + size > self.limit:
            return False  # files mounts hold fill it
        self.used += size  # reserved until the rename lands or fails
        self.reserved += size
        return True

    def drop(self, key: PageKey) -> None:
        """Forget a page and remove its file (all of its object's, for a sealed object)."""
        entry = self._index.pop(key, None)
        if entry is not None:
            self._forget(key, entry)
            if entry.in_object:
                self._drop_whole(key[0])
            else:
                self._unlink(entry)

    def refresh_held(self) -> None:
        """Give back the bytes of held object files no mount holds any more (at most
        every HELD_RECHECK_SECONDS)."""
        self._check_held()

    def statistics(self) -> dict:
        return {"whole_objects": len(self._whole), "growing_objects": len(self._growing), "sealed": self.sealed,
                "held_files": len(self._held), "held_bytes": self.held}

    def close(self) -> None:
        """Let go of held object files (their bytes are no longer counted)."""
        for held in self._held:
            os.close(held.fd)
        self._held.clear()
        self.used -= self.held
        self.held = 0

    # -- whole objects ----------------------------------------------------------------

    async def seal(self, oid: str, size: int, page_size: int) -> WholeObject | None:
        """The one file of object version `oid` (`size` bytes in pages of `page_size`),
        made now from its page files if every page is cached; None if it cannot be (a
        page missing or corrupt, which is then dropped, or no room for the copy)."""
        if oid in self._whole:
            return self._whole[oid]
        growing = self._growing.get(oid)
        if growing is not None:  # whole once its last page lands: nothing to copy
            if growing.completing is not None:
                await growing.completing.wait()
            return self._whole.get(oid)
        if oid in self._sealing:  # another caller is sealing it: its outcome is ours
            await self._sealing[oid].wait()
            return self._whole.get(oid)
        count = -(-size // page_size)
        entries = [self._index.get((oid, i)) for i in range(count)]
        if any(e is None or e.in_object or e.size != min(page_size, size - i * page_size)
               for i, e in enumerate(entries)):
            return None
        if self.reserved + self.held + size > self.limit:
            return None
        while self.used + size > self.limit:
            victim = next(iter(self._index))
            if victim[0] == oid:  # no room but its own pages: leave it as pages
                return None
            self._evict_one()
        done_sealing = self._sealing[oid] = trio.Event()
        try:
            return await self._seal(oid, size, page_size, count, entries)
        finally:
            del self._sealing[oid]
            done_sealing.set()

    async def _seal(self, oid: str, size: int, page_size: int, count: int,
                    entries: list[PageEntry]) -> WholeObject | None:
        self.used += size
        self.reserved += size
        whole = WholeObject(self.objects / oid[:2] / oid, size, page_size, [e.checksum for e in entries])
        try:
            done = await trio.to_thread.run_sync(self._write_whole, whole, [e.path for e in entries],
                                                 limiter=self._limiter)
        except OSError as exc:
            log.warning("cannot seal object %s into one file (its pages stay): %s", oid, exc)
            done = None
        finally:
            self.used -= size
            self.reserved -= size
        if isinstance(done, int):  # a corrupt page: dropped, to be fetched again
            log.warning("corrupt page %s_%d found while sealing its object: dropped", oid, done)
            self.corrupt += 1
            if self._index.get((oid, done)) is entries[done]:
                self.drop((oid, done))
            return None
        if done is None:
            return None
        tmp_sums, tmp_file = done
        now = [self._index.get((oid, i)) for i in range(count)]
        if any(a is not b for a, b in zip(now, entries)):  # a page went meanwhile: give up
            tmp_sums.unlink(missing_ok=True)
            tmp_file.unlink(missing_ok=True)
            return None
        os.rename(tmp_sums, f"{whole.path}.sums")
        os.rename(tmp_file, whole.path)
        for i, old in enumerate(entries):
            self._index[(oid, i)] = PageEntry(whole.path, old.size, old.checksum, i * page_size, True)
            self._index.move_to_end((oid, i))
            self._unlink(old)
        self._whole[oid] = whole
        self.sealed += 1
        return whole

    async def _complete(self, oid: str, growing: Growing) -> None:
        """Make a growing version whose every page is in its file whole: its sums are
        written beside it (renamed into place) and its log removed."""
        growing.completing = trio.Event()
        try:
            await trio.to_thread.run_sync(_write_sums, growing.path, growing.size, growing.page_size,
                                          growing.checksums, limiter=self._limiter)
            if self._growing.get(oid) is not growing:  # it went meanwhile: so do its sums
                if oid not in self._growing and oid not in self._whole:
                    Path(f"{growing.path}.sums").unlink(missing_ok=True)
                return
            Path(f"{growing.path}.log").unlink(missing_ok=True)
            del self._growing[oid]
            self._whole[oid] = WholeObject(growing.path, growing.size, growing.page_size, list(growing.checksums))
            self.sealed += 1
        except OSError as exc:  # it stays growing: whole at the next restart, or evicted
            log.warning("cannot write the checksums of object %s: %s", oid, exc)
        finally:
            growing.completing.set()

    def _write_whole(self, whole: WholeObject, sources: list[Path]) -> tuple[Path, Path] | int | None:
        """Write the object file and its sums under temp names, checking every page
        against its checksum; None if a page file went, the index of a corrupt page.

        Each page is read into one buffer kept for the whole copy (no fresh memory per
        page), checked there, and written from it. The kernel's own copy
        (`copy_file_range`) costs as much CPU on ext4, which cannot share the blocks,
        and would need a second pass over the copy to check it (bench/README.md)."""
        whole.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        stem = whole.path.parent / f"{whole.path.name}.{uuid.uuid4().hex[:8]}"
        tmp_file, tmp_sums = Path(f"{stem}.tmp"), Path(f"{stem}.sums.tmp")
        out = os.open(tmp_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        buffer = bytearray(min(whole.page_size, whole.size) + 1)  # +1: a longer page file shows
        try:
            for index, source in enumerate(sources):
                try:
                    src = os.open(source, os.O_RDONLY)
                except FileNotFoundError:
                    os.close(out)
                    tmp_file.unlink(missing_ok=True)
                    return None
                try:
                    length = min(whole.page_size, whole.size - index * whole.page_size)
                    got = _read_fully(src, memoryview(buffer)[:length + 1])
                finally:
                    os.close(src)
                data = memoryview(buffer)[:length]
                if got != length or checksum(data) != whole.checksums[index]:
                    os.close(out)
                    tmp_file.unlink(missing_ok=True)
                    return index
                at = index * whole.page_size
                while data:
                    n = os.pwrite(out, data[:WRITE_PIECE], at)
                    data, at = data[n:], at + n
            _write_sums_to(tmp_sums, whole.size, whole.page_size, whole.checksums)
        except BaseException:
            os.close(out)
            tmp_file.unlink(missing_ok=True)
            tmp_sums.unlink(missing_ok=True)
            raise
        os.close(out)
        return tmp_sums, tmp_file

    def _drop_whole(self, oid: str) -> None:
        """Forget every page of an object file (whole or growing) and unlink it (held if
        a mount holds it)."""
        whole = self._whole.pop(oid, None) or self._growing.pop(oid, None)
        for index in list(self._by_object.get(oid, ())):
            entry = self._index.pop((oid, index), None)
            if entry is not None:
                self._forget((oid, index), entry)
        if whole is None:
            return
        Path(f"{whole.path}.sums").unlink(missing_ok=True)
        Path(f"{whole.path}.log").unlink(missing_ok=True)
        try:
            fd = os.open(whole.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = None
        try:
            whole.path.unlink()
        except FileNotFoundError:
            pass
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a mount holds it: its disk space stays in use
            self._held.append(_Held(fd, whole.size))
            self.held += whole.size
            self.used += whole.size
            return
        except OSError:
            pass
        os.close(fd)

    def _check_held(self, force: bool = False) -> None:
        """Give back the bytes of held object files no mount holds any more."""
        if not self._held:
            return
        now = time.monotonic()
        if not force and now < self._held_checked + HELD_RECHECK_SECONDS:
            return
        self._held_checked = now
        still = []
        for held in self._held:
            try:
                fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                still.append(held)
                continue
            except OSError:
                pass
            os.close(held.fd)
            self.held -= held.size
            self.used -= held.size
        self._held = still

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

    def _evict_one(self) -> None:
        """Evict the least recently used page (with its whole object, if sealed) and
        unlink its file."""
        self._check_held()
        if not self._index:
            return
        key, entry = self._index.popitem(last=False)
        self._forget(key, entry)
        if entry.in_object:
            self.evictions += 1 + len(self._by_object.get(key[0], ()))
            self._drop_whole(key[0])
        else:
            self.evictions += 1
            self._unlink(entry)

    @staticmethod
    def _unlink(entry: PageEntry) -> None:
        try:
            entry.path.unlink()
        except FileNotFoundError:
            pass

    def _write(self, final: str, data: bytes | memoryview) -> None:
        tmp = f"{self.tmp}/{self._pid}-{next(self._serial)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:  # the temp directory went: make it again
            self.tmp.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:WRITE_PIECE]):]
        except OSError:
            os.close(fd)
            _unlink(tmp)  # a partial page would hold the space a full disk lacks
            raise
        os.close(fd)
        try:
            try:
                os.rename(tmp, final)
            except FileNotFoundError:  # its directory is not there yet
                os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                os.rename(tmp, final)
        except OSError:
            _unlink(tmp)
            raise


class RunWriter:
    """The pages of one UFS read, each checksummed and written by the thread that
    receives its bytes, as soon as they are all in.

    Why: handed to another thread to be written, each page cost a thread call and two
    wakeups of the event loop. Here the loop is woken once per page that landed, to
    index it (bench/README.md, "Cold reads: longer runs, more of them at once, pages
    written by the thread that receives them").

    How: the reading thread calls `take(done)` after each piece it delivered (the read's
    `Progress.sink`); every page whose bytes are all in `progress.buffer` by then is
    written there. Once the read ended, `close(data)` (in a thread) writes what no piece
    wrote (an adapter that hands its bytes back only at the end: `data`) and stops any
    writing after it. On the loop, `pages()` yields each page as it landed, with its
    entry once `PageStore.settle` indexed it (None: not cached), until `close` ran. The
    thread wakes the loop for the run's first page (the fill's caller waits for it), then
    for every TELL_PAGES pages, after TELL_AFTER, and at `close`; `pages()` also looks
    every LOOK_EVERY while it waits (a stall after a page landed).

    Subtleties:
    - Room for every page was reserved on the loop before the read began
      (`PageStore.reserve`); a page without (None) is checksummed, not written. So a
      cache smaller than the reads in flight (a run is up to 16 MiB) caches fewer of
      their pages than room taken page by page would.
    - `close` lets go of the read's progress: the progress calls the writer, and a
      cycle between them would keep the receive buffer from its pool
      (dorafs/ufs/buffers.py) until a full collection, which the worker makes rare.
    - One lock orders the writes: a stalled attempt, abandoned, may still be writing a
      page when the next attempt's thread delivers. Only delivered bytes are read, and
      an abandoned attempt writes into the buffer only past them (dorafs/ufs/s3.py).
    - After a failed write no later page of the run is written: the disk said what it
      thinks (`PageStore.write`). The loop settles it with its error, the rest as never
      tried, which gives their room back.
    - The object file and its log stay open from the first page written to `close`.
    """

    def __init__(self, store: PageStore, keys: list[PageKey], sizes: list[int], progress) -> None:
        self.store = store
        self.keys = keys  # the read's pages, in order
        self.writes = store.reserve(list(zip(keys, sizes)))  # by position in the read
        self.ends = list(itertools.accumulate(sizes))  # where each page ends in the read's bytes
        self.progress = progress
        self.digests: list[str | None] = [None] * len(keys)  # each page's, once its bytes are in
        self.head: memoryview | None = None  # the first page's bytes, once in
        self._next = 0  # the first page not taken yet
        self._error: OSError | None = None
        self._files: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._landed: deque[tuple[int, str]] = deque()  # (position, "written" | "failed" | "skipped")
        self._told = 0  # pages landed when the loop was last woken, and when that was
        self._told_at = 0.0
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()

    # -- the reading thread ---------------------------------------------------------

    def take(self, done: int) -> None:
        """The first `done` bytes of the read are in `progress.buffer`: write the pages
        they complete."""
        buffer = self.progress.buffer
        if buffer is None or self._next >= len(self.ends) or self.ends[self._next] > done:
            return
        with self._lock:
            if not self._closed:
                self._take(memoryview(buffer), done)
            landed, now = self._next, time.perf_counter()
            if self._told and landed < min(self._told + TELL_PAGES, len(self.ends)) \
                    and now < self._told_at + TELL_AFTER:
                return  # told with the pages after it
            self._told, self._told_at = landed, now
        self._tell()

    def close(self, data: bytes | bytearray | memoryview | None) -> None:
        """The read ended: write the pages whose bytes are in (in `data`, else in the
        buffer) and no piece wrote; nothing is written after this."""
        with self._lock:
            if data is not None:
                self._take(memoryview(data), len(data))
            elif self.progress.buffer is not None:
                self._take(memoryview(self.progress.buffer), self.progress.done)
            while self._next < len(self.ends):
                self._landed.append((self._next, "skipped"))
                self._next += 1
            for fd, log_fd in self._files.values():
                os.close(fd)
                os.close(log_fd)
            self._files.clear()
            self._closed = True  # last: the loop, seeing it, finds every page in `_landed`
        # No cycle through the read's progress: the buffer goes back to its pool as soon
        # as the read's callers let go of it, not at the next full collection.
        self.progress.sink = None
        self._tell()

    def _take(self, view: memoryview, done: int) -> None:
        while self._next < len(self.ends) and self.ends[self._next] <= done:
            at = self._next
            piece = view[self.ends[at - 1] if at else 0:self.ends[at]]
            self.digests[at] = digest = checksum(piece)
            if at == 0:
                self.head = piece
            write = self.writes[at]
            if write is None or self._error is not None:
                outcome = "skipped"
            else:
                write.digest = digest
                failure = self.store.write([(write, piece)], self._files)
                outcome = "written" if failure is None else "failed"
                if failure is not None:
                    self._error = failure[1]
            self._landed.append((at, outcome))
            self._next += 1

    def _tell(self) -> None:
        try:
            self._token.run_sync_soon(self._event.set)
        except trio.RunFinishedError:
            pass

    # -- the loop -------------------------------------------------------------------

    async def pages(self) -> AsyncIterator[tuple[int, PageEntry | None]]:
        """(position, entry) of each page as it lands, until `close` ran; the written
        pages are indexed, the others give back their room."""
        while True:
            self._event = trio.Event()
            batch = []
            while self._landed:
                batch.append(self._landed.popleft())
            for at, outcome in batch:
                write = self.writes[at]
                if write is None:  # not this read's to write: cached already, or no room
                    yield at, self.store.lookup(self.keys[at])
                    continue
                written = 1 if outcome == "written" else 0
                (entry,) = await self.store.settle([write], written, self._error if outcome == "failed" else None)
                yield at, entry
            if not batch:
                if self._closed and not self._landed:
                    return
                with trio.move_on_after(LOOK_EVERY):
                    await self._event.wait()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_fully(fd: int, into: memoryview) -> int:
    """Read from the start of `fd` into `into` until it is full or the file ends; the
    bytes read."""
    got = 0
    while got < len(into):
        n = os.preadv(fd, [into[got:]], got)
        if n == 0:
            break
        got += n
    return got


def _open_growing(path: Path) -> tuple[int, int]:
    """Descriptors to write a growing object file and append to its log (both made if new)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:  # its directory is not there yet
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return fd, os.open(f"{path}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    except BaseException:
        os.close(fd)
        raise


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset+length) of a file (best effort)."""
    _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)


def _pwrite_fully(fd: int, data: bytes | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view[:WRITE_PIECE], at)
        view, at = view[n:], at + n


def _write_sums_to(path: Path, size: int, page_size: int, checksums: list) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump({"size": size, "page_size": page_size, "checksums": checksums}, f)


def _write_sums(path: Path, size: int, page_size: int, checksums: list) -> None:
    """The sums of a whole object file, renamed into place beside it."""
    tmp = Path(f"{path}.sums.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_sums_to(tmp, size, page_size, checksums)
        os.rename(tmp, f"{path}.sums")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_log(path: Path) -> Growing | None:
    """The growing object file at `path` from its log: the pages whose line is whole and
    whose bytes the file reaches (a crash may cut the last line or the file short)."""
    try:
        with open(f"{path}.log", "rb") as f:
            text = f.read()
        file_size = path.stat().st_size
    except OSError:
        return None
    growing = None
    for line in text.split(b"\n")[:-1]:  # the part after the last newline is cut short
        fields = line.split()
        if len(fields) != 4 or not all(x.isdigit() for x in fields[:3]) or len(fields[3]) != 16:
            continue
        index, size, page_size = (int(x) for x in fields[:3])
        if growing is None:
            if page_size <= 0 or size <= 0:
                continue
            growing = Growing(path, size, page_size, [None] * -(-size // page_size))
        if (size, page_size) != (growing.size, growing.page_size) or index >= len(growing.checksums) \
                or min(size, (index + 1) * page_size) > file_size:
            continue
        growing.checksums[index] = fields[3].decode()
    if growing is None or not any(c is not None for c in growing.checksums):
        return None
    growing.missing = growing.checksums.count(None)
    return growing


def _read_sums(path: Path) -> WholeObject | None:
    try:
        with open(f"{path}.sums") as f:
            sums = json.load(f)
        size, page_size, checksums = int(sums["size"]), int(sums["page_size"]), list(sums["checksums"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if page_size <= 0 or len(checksums) != -(-size // page_size) or path.stat().st_size != size:
        return None
    return WholeObject(path, size, page_size, [str(c) for c in checksums])


def _parse_name(name: str) -> tuple[str, int, str] | None:
    parts = name.split("_")
    if len(parts) != 3 or len(parts[0]) != 32 or not parts[1].isdigit() or len(parts[2]) != 16:
        return None
    return parts[0], int(parts[1]), parts[2]
