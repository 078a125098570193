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
- The pages of a run whose bytes are in are written by one thread call (`put_many`),
  their room reserved first; each page still gets its own temp file and rename.
- The index lives on the trio thread; file I/O runs in threads. Readers of a page that
  eviction unlinks concurrently still hold their open fd, so sendfile completes.
- A full or failing cache disk never fails a read: the page is served from memory
  without being cached. A full disk (ENOSPC, EDQUOT) lowers the store's `limit` to the
  bytes it holds, so later pages evict older ones and caching goes on at the size the
  disk really has; the configured capacity is tried again after `REGROW_SECONDS`. A
  failing disk (EIO, EROFS, EACCES...) stops write attempts for `FAULT_RETRY_SECONDS`,
  then one is tried again; a successful write ends the fault. Other errors concern one
  page's path and are only counted. `health()` says what is wrong.

Whole objects: `seal` (called by the worker when the last page lands of a version of
`seal_min_size` or more that a mount on this node reads from its files, or asked by
such a mount that wants to hand a wholly cached object to the kernel, or by a load
job) copies its pages, each checked against its checksum, into one file at their
offsets, `ROOT/objects/<oid[:2]>/<oid>`, with `<oid>.sums` beside it (JSON: size, page size, the
checksum of every page); then the page entries point into that file (`PageEntry.offset`)
and the page files are unlinked. Such a file is what a mount on this node hands to the
kernel for passthrough reads (`whole()` says where it is), and it is still sent with
sendfile, page by page or run by run, from its offsets.
- The sums are renamed into place before the object file and the object file is renamed
  from a temp name once all of it is written, so a crash leaves a whole object, or temp
  files and page files (both handled on start), never a torn one. On start, an object
  file without its sums (or of another size than they say) is removed, and page files of
  an object that has its file are removed.
- An object file never changes once it has its name: eviction (of any of its pages) and
  drop remove the whole object and unlink the file, never rewrite, truncate or punch
  it. A mount that hands it to the kernel holds a shared `flock` on it; unlinking such a
  file frees no disk space until the mount lets go, so the store keeps it open, counts
  its bytes in `held` (and in `used`, so the byte bound covers them), and gives them back
  once the lock is gone (checked at each put and eviction, at most every
  `HELD_RECHECK_SECONDS`). Bytes held by open passthrough files therefore delay caching,
  never exceed the bound: while they fill it, new pages are served without caching.
- Sealing costs one read and one write of the object on the cache disk, once, and room
  for the copy while it is made; it is refused (the pages stay as they are) when making
  room would evict pages of the object itself. Made when the last page lands, the copy
  reads pages still in the kernel's page cache. Versions smaller than `seal_min_size`
  (or a page) stay as pages unless asked for, and so do partly cached ones.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
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
HELD_RECHECK_SECONDS = 1.0  # how often unlinked object files a mount holds are looked at


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass
class PageEntry:
    path: Path  # the page's file, or its object's whole file (then `whole` is set)
    size: int
    checksum: str
    offset: int = 0  # where the page starts in `path`
    whole: bool = False  # `path` is the sealed file of the whole object


@dataclass
class WholeObject:
    """A sealed object version: one file, its size, page size and page checksums."""

    path: Path
    size: int
    page_size: int
    checksums: list[str]


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
                length = min(whole.page_size, whole.size - index * whole.page_size)
                found.append((mtime, (whole.path.name, index),
                              PageEntry(whole.path, length, digest, index * whole.page_size, True)))
            self._whole[whole.path.name] = whole
        sealed = {oid for oid in self._whole}
        kept = []
        for item in found:
            _, (oid, _), entry = item
            if oid in sealed and not entry.whole:  # sealed before a crash unlinked its pages
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

    def _load_objects(self) -> list[tuple[float, WholeObject]]:
        """The sealed objects on disk; removes what a crash left half done."""
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
                if name.endswith(".sums"):
                    if not (sub / name[:-5]).exists():
                        path.unlink(missing_ok=True)
                    continue
                whole = _read_sums(path)
                if whole is None:
                    log.warning("removing object file without valid checksums: %s", path)
                    path.unlink(missing_ok=True)
                    Path(f"{path}.sums").unlink(missing_ok=True)
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
        for all of their files; for each, its entry or None as `put` answers. Room for
        all of them is reserved (evicting as needed) before the first file is written."""
        out: list[PageEntry | None] = [None] * len(pages)
        todo: list[tuple[int, PageKey, bytes | memoryview, str, str]] = []
        taken: set[PageKey] = set()
        for i, (key, data, digest) in enumerate(pages):
            if key in self._index:
                out[i] = self._index[key]
            elif key not in taken and self._reserve(len(data)):
                taken.add(key)
                oid, index = key
                todo.append((i, key, data, digest, f"{self.root}/{oid[:2]}/{oid}_{index}_{digest}"))
        if not todo:
            return out
        try:
            failure = await trio.to_thread.run_sync(self._write_all, [(t[4], t[2]) for t in todo],
                                                    limiter=self._limiter)
        finally:
            for _, _, data, _, _ in todo:
                self.used -= len(data)
                self.reserved -= len(data)
        written = len(todo) if failure is None else failure[0]
        if failure is not None:
            self.write_errors += 1
            self._write_failed(failure[1], len(todo[written][2]))
        elif self.fault is not None:
            log.info("cache disk writes work again (after: %s)", self.fault)
            self.fault = None
        for i, key, data, digest, final in todo[:written]:
            if key in self._index:  # a concurrent put of the same page won the race
                out[i] = self._index[key]
                continue
            entry = PageEntry(Path(final), len(data), digest)
            self._insert(key, entry)
            out[i] = entry
        return out

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
            if entry.whole:
                self._drop_whole(key[0])
            else:
                self._unlink(entry)

    def refresh_held(self) -> None:
        """Give back the bytes of held object files no mount holds any more (at most
        every HELD_RECHECK_SECONDS)."""
        self._check_held()

    def statistics(self) -> dict:
        return {"whole_objects": len(self._whole), "sealed": self.sealed, "held_files": len(self._held),
                "held_bytes": self.held}

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
        if oid in self._sealing:  # another caller is sealing it: its outcome is ours
            await self._sealing[oid].wait()
            return self._whole.get(oid)
        count = -(-size // page_size)
        entries = [self._index.get((oid, i)) for i in range(count)]
        if any(e is None or e.whole or e.size != min(page_size, size - i * page_size)
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
                    n = os.pwrite(out, data, at)
                    data, at = data[n:], at + n
            with open(tmp_sums, "w") as f:
                json.dump({"size": whole.size, "page_size": whole.page_size, "checksums": whole.checksums}, f)
        except BaseException:
            os.close(out)
            tmp_file.unlink(missing_ok=True)
            tmp_sums.unlink(missing_ok=True)
            raise
        os.close(out)
        return tmp_sums, tmp_file

    def _drop_whole(self, oid: str) -> None:
        """Forget every page of a sealed object and unlink its file (held if a mount holds it)."""
        whole = self._whole.pop(oid, None)
        for index in list(self._by_object.get(oid, ())):
            entry = self._index.pop((oid, index), None)
            if entry is not None:
                self._forget((oid, index), entry)
        if whole is None:
            return
        Path(f"{whole.path}.sums").unlink(missing_ok=True)
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
        if entry.whole:
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

    def _write_all(self, pages: list[tuple[str, bytes | memoryview]]) -> tuple[int, OSError] | None:
        """Write page files (final name, bytes) one after another, each under a temp
        name renamed into place; None when all landed, else how many did and the error
        that stopped the rest (they are not written: the disk said what it thinks)."""
        for done, (final, data) in enumerate(pages):
            try:
                self._write(final, data)
            except OSError as exc:
                return done, exc
        return None

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
                view = view[os.write(fd, view):]
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
