"""Object files: versions wholly cached on this node, held open and read by the mount.

A worker on this machine that holds every page of an object version keeps it as one
file at the page offsets (worker/pagestore.py seals it). When a file is opened
read-only and the worker that owns it has sealed (or can seal) its pinned version, the
mount opens that file, checks every page of it against the checksum the worker recorded
when the page arrived, and holds it open for the opens of that version and for LINGER
seconds after the last of them (the next open takes it without asking the worker, opening
and locking it again). Then either the
kernel reads it itself (passthrough.py registers it as a backing file) or, when it
cannot, the mount answers each READ of such an open with one `preadv` of the held file:
no page planning, no buffer, no per-page descriptor. The second way is what a mount
without passthrough gets (not root, a kernel before 6.9, `-o direct_io`, another open of
the inode reading through the kernel's page cache) for every file it holds.

Why this cannot return wrong bytes:
- every page is verified before the first read, by this process, against the checksums
  the worker recorded; once per file (its device and inode number) per mount, since a
  sealed file never changes under a name and the file verified is the one read (the
  same open descriptor);
- a sealed file is never rewritten, truncated or punched: eviction, `free`, a refresh
  that drops pages and a changed object only ever unlink it, and an unlinked file keeps
  its bytes for whoever holds it open; a new version is a new file;
- the mount holds a shared `flock` on every file it holds, which tells the worker to
  count the file's bytes while it is unlinked (the bound on them: docs/SEMANTICS.md).

Getting there: an open does not make the worker seal a version (a copy of the whole
object) while it waits: when the worker still holds it in pages, it seals it in the
background and the open is served by the page path. When a handle that read its file
through the page path is released, `prepare_soon` has the worker seal the version if it
now holds all of it, and verifies it: so a version read to its end by one reader, or in
parts by several (four readers of a quarter each: whichever closes last), is held from
its next open. A release while such a preparation runs asks again after it, since the
worker may have answered before the last reader's pages were all there. That takes
longer than reading the version again from the kernel's page cache (a 256 MiB file:
about 120 ms, against 45 ms): an open meanwhile
waits for it only when the kernel holds no pages of that version for the inode;
otherwise it reads those (`keep_cache`), and a later open holds the file. A load job
(`dorafs-admin load`) seals every file of a page or more as it loads it; the first open
verifies it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import mmap
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio
import xxhash

from dorafs.client.local import all_cached
from dorafs.fuse.metrics import (OBJECT_FILE_OPENS, OBJECT_FILE_PAGES_CHECKED, OBJECT_FILES_PREPARING,
                                 OBJECT_FILES_TAKEN_AGAIN)

log = logging.getLogger(__name__)

# Why an open has no held object file (labels of dorafs_mount_passthrough_opens_total).
NOT_CACHED = "not_cached"  # no worker on this machine holds all of the version
UNREADABLE = "unreadable"  # the worker's file cannot be opened here
CORRUPT = "corrupt"  # a page of it did not match its checksum
SMALL = "small"  # smaller than passthrough_min_size
TOO_MANY = "too_many"  # as many object files held as the descriptor budget allows
HELD = "held"
for _result in (HELD, NOT_CACHED, UNREADABLE, CORRUPT, TOO_MANY):
    OBJECT_FILE_OPENS.labels(_result)

# A held file stays held this long after its last open ends: the next open of that
# version (the next epoch's, a reader that opens a file per sample) takes it at once,
# without asking the worker for it, opening it and locking it again (bench/README.md).
# One the worker unlinked (evicted, freed, refreshed) is let go at once instead.
LINGER = 10.0
SWEEP_EVERY = 1.0  # how often idle held files are looked at (past LINGER, or unlinked)
VERIFY_THREADS = 2  # checksum passes over object files at once
PREPARING = 2  # files sealed and verified ahead of their next open, at once
VERIFIED_KEPT = 100_000  # object files remembered as verified (their device and inode)


class Fallback(Exception):
    """This open is not handed to the kernel; `reason` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(eq=False)
class HeldFile:
    """One verified object file held open: shared by the opens of one object version."""

    key: tuple[str, str]  # (URI, version)
    fd: int
    size: int
    opens: int = 1
    idle_since: float = 0.0  # when its last open ended (trio's clock), while `opens` is 0
    # Read-only shared mapping of the whole file, made at its first read by the mount
    # (HeldReader); False where none could be made. Unmapped when the last view of it goes.
    mapping: mmap.mmap | None | bool = None


def _unlinked(fd: int) -> bool:
    """Has the worker unlinked this file since (evicted, freed, refreshed, replaced)?"""
    return os.fstat(fd).st_nlink == 0


def verify(fd: int, size: int, page_size: int, checksums: list[str], done: set[int] = frozenset()) -> int | None:
    """Check every page of an object file but those in `done`; the index of the first
    bad page, or None."""
    if os.fstat(fd).st_size != size:
        return 0
    buf = bytearray(max(page_size, 1))
    view = memoryview(buf)
    for index, expected in enumerate(checksums):
        if index in done:
            continue
        length = min(page_size, size - index * page_size)
        part = view[:length]
        got = os.preadv(fd, [part], index * page_size)
        if got != length or xxhash.xxh3_64_hexdigest(part) != expected:
            return index
    return None


class HeldReader:
    """Answers READs of held files: a view of the held file's mapping when the kernel's
    page cache holds every byte asked for (the reply is the only copy), else one
    `preadv` into a buffer reused by every read.

    The answer is a view of that mapping or buffer, which is safe because the session
    writes a handler's answer to the kernel before anything else runs on the loop, and a
    read that has to wait for the disk gets bytes of its own instead. A mapping is only
    read where cachestat found every page cached, so the loop does not wait for the disk
    (unless the kernel drops a page in between: then the reply reads it back)."""

    def __init__(self):
        self._buffer = bytearray(1 << 20)
        self._view = memoryview(self._buffer)

    def now(self, held: HeldFile, offset: int, size: int) -> memoryview | None:
        """The bytes, if the kernel's page cache has them all; None if they must come from the disk."""
        end = min(offset + size, held.size)
        if end > offset and held.mapping is not False:
            whole = all_cached(held.fd, offset, end - offset)
            if whole is not None:
                if not whole:
                    return None
                if held.mapping is None:
                    try:
                        held.mapping = mmap.mmap(held.fd, held.size, access=mmap.ACCESS_READ)
                    except (OSError, ValueError):  # (out of address space or map count): read it
                        held.mapping = False
                if held.mapping:
                    return memoryview(held.mapping)[offset:end]
        if size > len(self._buffer):
            self._view.release()
            self._buffer = bytearray(size)
            self._view = memoryview(self._buffer)
        part = self._view[:size]
        try:
            got = os.preadv(held.fd, [part], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                return None
            raise
        if got < size and offset + got < held.size:  # partly in the page cache
            return None
        return part[:got]

    async def later(self, held: HeldFile, offset: int, size: int) -> bytes:
        """The bytes, read in a thread (from the disk); the held descriptor stays open
        meanwhile, since a release cannot run while this read is being answered."""
        return await trio.to_thread.run_sync(os.pread, held.fd, size, offset)


class ObjectFiles:
    """The verified object files this mount holds open, by object version."""

    def __init__(self, client, min_size: int = 0, max_held: int = 4096):
        self.client = client
        self.min_size = min_size
        self.max_held = max_held  # descriptors: one per object version open at once
        self.held: dict[tuple[str, str], HeldFile] = {}
        self.reader = HeldReader()
        self._verified: OrderedDict[tuple[int, int], str] = OrderedDict()  # (st_dev, st_ino) -> version
        self._preparing: dict[tuple[str, str], trio.Event] = {}  # set when prepared
        self._again: dict[tuple[str, str], tuple] = {}  # released while being prepared: what to ask again
        self._holding: dict[tuple[str, str], trio.Event] = {}  # being opened and checked -> set when done
        self._prepare_limiter = trio.CapacityLimiter(PREPARING)
        self._limiter = trio.CapacityLimiter(VERIFY_THREADS)
        self._nursery: trio.Nursery | None = None
        OBJECT_FILES_PREPARING.set_function(lambda: len(self._preparing))

    def started(self, nursery: trio.Nursery) -> None:
        """The mount runs: `nursery` runs the preparation of files read to their end, and
        lets go of held files no open used for LINGER seconds."""
        self._nursery = nursery
        nursery.start_soon(self._sweep)

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_EVERY)
            self._let_go_idle(trio.current_time() - LINGER)

    def _let_go_idle(self, before: float, limit: int | None = None) -> int:
        """Close held files without an open since before `before`, or whose file the
        worker unlinked, the longest idle first, at most `limit` of them; how many."""
        idle = sorted((h for h in self.held.values() if h.opens == 0), key=lambda h: h.idle_since)
        closed = 0
        for held in idle:
            if limit is not None and closed >= limit:
                break
            if held.idle_since <= before or _unlinked(held.fd):
                self._close(held)
                closed += 1
        return closed

    async def hold(self, f, wait: bool = True) -> HeldFile:
        """The verified object file of pinned version `f`, held until `let_go`; raises
        Fallback. `wait`: for the sealing this mount asked for when a reader read the
        version to its end (without, such an open is not held)."""
        if f.status.size < self.min_size or f.status.size == 0:
            raise Fallback(SMALL)
        try:
            held = await self._hold(f, wait)
        except Fallback as why:
            OBJECT_FILE_OPENS.labels(why.reason).inc()
            raise
        OBJECT_FILE_OPENS.labels(HELD).inc()
        return held

    async def _hold(self, f, wait: bool) -> HeldFile:
        key = (f.uri, f.status.version)
        preparing = self._preparing.get(key)
        if preparing is not None:  # what its last reader asked for
            if not wait:
                raise Fallback(NOT_CACHED, "being sealed")
            await preparing.wait()
        while (holding := self._holding.get(key)) is not None:  # opens of it at once: one checks it
            await holding.wait()
        held = self.held.get(key)
        if held is not None:
            if held.opens or not _unlinked(held.fd):  # (an idle one the worker let go of is asked for again)
                if not held.opens:
                    OBJECT_FILES_TAKEN_AGAIN.inc()
                held.opens += 1
                return held
            self._close(held)
        if len(self.held) >= self.max_held and not self._let_go_idle(math.inf, limit=1):
            raise Fallback(TOO_MANY)
        holding = self._holding[key] = trio.Event()
        try:
            return await self._open_held(f, key)
        finally:
            del self._holding[key]
            holding.set()

    async def _open_held(self, f, key: tuple[str, str]) -> HeldFile:
        whole = await self.client.whole_file(f, wait=False)  # an open never waits for a copy
        if whole is None or whole.get("size") != f.status.size:
            raise Fallback(NOT_CACHED)
        try:
            fd = os.open(whole["path"], os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Fallback(NOT_CACHED, "evicted meanwhile") from None
        except OSError as exc:
            raise Fallback(UNREADABLE, f"{whole['path']}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never waits long: the worker only tries LOCK_EX|LOCK_NB
            st = os.fstat(fd)
            if st.st_nlink == 0:
                raise Fallback(NOT_CACHED, "evicted meanwhile")
            bad = await self._verify(fd, st, whole, f.status.version)
            if bad is not None:
                raise Fallback(CORRUPT, f"page {bad} of {whole['path']}")
        except BaseException:
            os.close(fd)
            raise
        held = self.held[key] = HeldFile(key, fd, f.status.size)
        return held

    def let_go(self, held: HeldFile) -> None:
        """One open of `held` ended. After the last one it stays held for LINGER seconds
        (`_sweep`), unless the worker unlinked it: then it is closed at once, which lets
        go of the flock (the worker may give the bytes back)."""
        held.opens -= 1
        if held.opens > 0:
            return
        if self._nursery is None or self.held.get(held.key) is not held or _unlinked(held.fd):
            self._close(held)
        else:
            held.idle_since = trio.current_time()

    def _close(self, held: HeldFile) -> None:
        if self.held.get(held.key) is held:
            del self.held[held.key]
        held.mapping = None
        os.close(held.fd)

    async def _verify(self, fd: int, st: os.stat_result, whole: dict, version: str) -> int | None:
        """Check the object file open at `fd` once per file: the first bad page, or None."""
        key = (st.st_dev, st.st_ino)
        if self._verified.get(key) == version:
            self._verified.move_to_end(key)
            return None
        checksums = list(whole["checksums"])
        done = self.client.local.checked(st, int(whole["page_size"]), checksums)  # as they were read
        if len(done) == len(checksums):
            bad = None
        else:
            OBJECT_FILE_PAGES_CHECKED.inc(len(checksums) - len(done))
            bad = await trio.to_thread.run_sync(verify, fd, int(whole["size"]), int(whole["page_size"]),
                                                checksums, done, limiter=self._limiter)
        if bad is None:
            self._verified[key] = version
            while len(self._verified) > VERIFIED_KEPT:
                self._verified.popitem(last=False)
        return bad

    def prepare_soon(self, f, then: Callable[[], None] | None = None) -> None:
        """In the background: have the worker seal pinned version `f` (read through the
        mount) into one file if it holds all of it, and verify it, so its next open holds
        it at once; then call `then`, if it is."""
        key = (f.uri, f.status.version)
        if self._nursery is None or f.status.size < self.min_size or key in self.held:
            return
        if key in self._preparing:  # asked before this reader's pages were there, maybe
            self._again[key] = (f, then)
            return
        self._preparing[key] = trio.Event()
        self._nursery.start_soon(self._prepare, f, key, then)

    async def _prepare(self, f, key, then: Callable[[], None] | None) -> None:
        ready = False
        try:
            async with self._prepare_limiter:
                whole = await self.client.whole_file(f)  # None unless the worker holds all of it
                if whole is None or whole.get("size") != f.status.size:
                    return
                try:
                    fd = os.open(whole["path"], os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    return
                try:
                    ready = await self._verify(fd, os.fstat(fd), whole, f.status.version) is None
                finally:
                    os.close(fd)
        except Exception as exc:  # the next open tries again, and says why it could not
            log.debug("preparing %s: %s", f.uri, exc)
        finally:
            self._preparing.pop(key).set()
            again = self._again.pop(key, None)
            if again is not None and not ready:
                self.prepare_soon(*again)
        if ready and then is not None:
            then()

    def close(self) -> None:
        for held in self.held.values():
            held.mapping = None
            os.close(held.fd)
        self.held.clear()
